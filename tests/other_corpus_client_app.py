"""A ClientApp for tests/test_federation.py whose node holds another corpus than the server (the file named by
$FEDGPT_TEST_OTHER_CORPUS, cached next to it), as a SuperNode started with a wrong node-config input-file
would."""

import json
import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgpt.fed import client

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    corpus = Path(os.environ["FEDGPT_TEST_OTHER_CORPUS"])
    record = msg.content["config"]
    cfg = json.loads(record["fedgpt-config"])
    cfg["data"].update(input_file=str(corpus), data_dir=str(corpus.parent))
    record["fedgpt-config"] = json.dumps(cfg)
    return Message(client.handshake(msg.content, dict(context.node_config)), reply_to=msg)
