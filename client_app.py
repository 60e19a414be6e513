"""fedgpt ClientApp: local training of the shared GPT core on this node's partition (fedgpt/fed/client.py).

In a deployment every message is a new process of this app: it relays the message to the node's warm trainer
(fedgpt/fed/relay.py, fedgpt/fed/worker.py) and imports no torch. In a simulation it does the work itself.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgpt.fed import relay, secagg
from fedgpt.fed.node_policy import NodePolicy

app = ClientApp(mods=[secagg.secure_aggregation])  # SecAgg+ when the run asks for it, or the node requires it


def reply(kind: str, msg: Message, context: Context) -> Message:
    with NodePolicy.guard(kind):  # what fails is told to the server, what the node holds only to its log
        return Message(relay.handle(kind, msg.content, context, msg.metadata.run_id), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return reply("query", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return reply("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return reply("evaluate", msg, context)
