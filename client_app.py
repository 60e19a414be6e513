"""fedgpt ClientApp: local training of the shared GPT core on this node's partition (fedgpt/fed/client.py)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgpt.fed import client, secagg

app = ClientApp(mods=[secagg.secure_aggregation])  # SecAgg+ when the run asks for it (secagg.enabled)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return client.handshake(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return client.fit(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return client.evaluate_partition(msg, context)
