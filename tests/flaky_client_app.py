"""A ClientApp for tests/test_federation.py: the client of partition 1 raises in round 1, every other call is
fedgpt's."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgpt.fed import client

FAIL_PARTITION, FAIL_ROUND = 1, 1

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return client.handshake(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["work.round"])
    if (pid, rnd) == (FAIL_PARTITION, FAIL_ROUND):
        raise RuntimeError(f"planned failure of partition {pid} in round {rnd}")
    return client.fit(msg, context)
