"""fedgpt's ClientApp with probes, for tests: in each train message it saves, to $FEDGPT_TEST_PROBE_DIR, the
optimizer state as restored before training and as saved after it, and the update it sends back. The probed
code is fedgpt's own: client_app.py's handlers, with fedgpt.fed.client's restore, fit and state store wrapped
to record what they did. (A ClientApp of this module's own, so that Ray's actors import this module, and the
probes with it.)

A client that should fail: $FEDGPT_TEST_FAIL="partition:round" makes that partition raise in that round.
"""

import os
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import client_app
import fedgpt.fed.client as client
from fedgpt.fed.work import WorkOrder

PROBE_DIR = Path(os.environ["FEDGPT_TEST_PROBE_DIR"])
_restore, _fit = client.restore, client.fit


def restore_and_record(trainer, store, rnd, cfg, *shared):
    result = _restore(trainer, store, rnd, cfg, *shared)
    if store is not None:
        partition = store.dir.name.removeprefix("partition-")
        torch.save(trainer.optimizer.state_dict(), PROBE_DIR / f"restored-p{partition}-r{rnd}.pt")
    return result


def fit_and_record(content, node):
    partition, rnd = int(node["partition-id"]), WorkOrder.from_config(content["config"]).round
    if os.environ.get("FEDGPT_TEST_FAIL") == f"{partition}:{rnd}":
        raise RuntimeError(f"planned failure of partition {partition} in round {rnd}")
    reply = _fit(content, node)
    torch.save(reply["arrays"].to_torch_state_dict(), PROBE_DIR / f"sent-p{partition}-r{rnd}.pt")
    return reply


_save = client.ClientStateStore.save


def save_and_record(store, rnd, state):
    _save(store, rnd, state)
    # the patch outlives the test that imported this module, in its test process: other stores save too
    if state.get("optimizer") is not None and PROBE_DIR.is_dir():
        partition = store.dir.name.removeprefix("partition-")
        torch.save(state["optimizer"], PROBE_DIR / f"saved-p{partition}-r{rnd}.pt")


client.restore, client.fit, client.ClientStateStore.save = restore_and_record, fit_and_record, save_and_record

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return client_app.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return client_app.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return client_app.evaluate(msg, context)
