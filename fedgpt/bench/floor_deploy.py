"""The floor under a deployment round: Flower alone, with a ClientApp that imports only Flower and numpy.

A ServerApp that sends an array of the model's size to every node for a number of rounds, and a ClientApp
that answers with another of that size; `python -m fedgpt.bench deploy` runs it as its own Flower app
(floor_app writes its pyproject.toml) on the federation that ran fedgpt, right after it. Whatever a fedgpt
round costs over this is fedgpt's own: with the warm trainer, a round's ClientApp processes import no torch
either.

The floor moves what a fedgpt round at 0 local steps moves: weights down (random values, as a model's are)
and a zero update of the same size back. Flower's objects are content-addressed (an object's id is the hash
of its bytes), and a SuperNode does not push what the SuperLink already holds: a reply that echoed the
received array, as this floor's did, was never sent back, so the floor moved half of fedgpt's bytes.
"""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

app = ClientApp()


@app.train()
def answer(msg: Message, context: Context) -> Message:
    content = RecordDict({"t": ConfigRecord({"handled-at": time.time()})})
    if "arrays" in msg.content:  # an update of the weights' size goes back: all zeros, as after 0 steps
        zeros = {k: Array(np.zeros_like(a.numpy())) for k, a in msg.content["arrays"].items()}
        content["arrays"] = ArrayRecord(zeros)
    return Message(content, reply_to=msg)


server = ServerApp()


@server.main()
def deployment_floor(grid: Grid, context: Context) -> None:
    """`rounds` rounds of a float32 array of `params` values to each of `nodes` nodes, and one of as many
    back from each; the seconds of each round go to the file `out` as JSON."""
    from fedgpt.fed.grid import send_and_receive, wait_for_nodes
    from fedgpt.files import atomic_write_bytes

    c = context.run_config
    nodes = wait_for_nodes(grid, int(c["nodes"]), timeout=120, log=lambda _: None)
    weights = np.random.default_rng(0).standard_normal(int(c["params"]), dtype=np.float32)
    arrays = ArrayRecord({"weights": Array(weights)})
    rounds = []
    for rnd in range(1, int(c["rounds"]) + 1):
        t = time.time()
        msgs = [
            Message(
                RecordDict({"arrays": arrays}),
                dst_node_id=n,
                message_type=MessageType.TRAIN,
                group_id=str(rnd),
            )
            for n in nodes
        ]
        replies = send_and_receive(grid, msgs, timeout=600)
        ok = [r for r in replies if not r.has_error() and "arrays" in r.content]
        ok = [r for r in ok if r.content["arrays"]["weights"].numpy().size == weights.size]
        if len(ok) != len(nodes):
            raise RuntimeError(
                f"deployment floor, round {rnd}: {len(ok)} of {len(nodes)} nodes answered with "
                f"{weights.size} values"
            )
        rounds.append(round(time.time() - t, 3))
    out = {"nodes": len(nodes), "params": int(c["params"]), "round_s": rounds}
    atomic_write_bytes(c["out"], json.dumps(out).encode())


def floor_app(directory: Path, nodes: int, rounds: int, params: int, out: Path) -> Path:
    """A Flower app directory for `flwr run`: only a pyproject.toml, whose components are this installed
    module's."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(f"""[project]
name = "fedgpt-deployment-floor"
version = "1.0.0"
description = "Flower and a ClientApp of Flower and numpy alone, with none of fedgpt's work"
license = "MIT"

[tool.flwr.app]
publisher = "fedgpt"

[tool.flwr.app.components]
serverapp = "fedgpt.bench.floor_deploy:server"
clientapp = "fedgpt.bench.floor_deploy:app"

[tool.flwr.app.config]
nodes = {nodes}
rounds = {rounds}
params = {params}
out = {json.dumps(str(out.resolve()))}
""")
    return directory
