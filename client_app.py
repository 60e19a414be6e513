"""fedgpt ClientApp: local training of the shared GPT core on this node's partition."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgpt import client

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return client.handshake(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return client.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return client.evaluate_local(msg, context)
