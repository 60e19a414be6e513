"""The floor under a deployment round: Flower alone, with a ClientApp that imports only Flower and numpy.

A ServerApp that sends an array of the model's size to every node for a number of rounds, and a ClientApp
that sends it back; `python -m fedgpt.bench deploy` runs it as its own Flower app (floor_app writes its
pyproject.toml) on the federation that ran fedgpt, right after it. Whatever a fedgpt round costs over this is
fedgpt's own: with the warm trainer, a round's ClientApp processes import no torch either.
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
    if "arrays" in msg.content:  # the weights go back, as a client's update would
        content["arrays"] = ArrayRecord({k: Array(a.numpy()) for k, a in msg.content["arrays"].items()})
    return Message(content, reply_to=msg)


server = ServerApp()


@server.main()
def deployment_floor(grid: Grid, context: Context) -> None:
    """`rounds` rounds of a float32 array of `params` values to each of `nodes` nodes and back; the seconds
    of each round go to the file `out` as JSON."""
    from fedgpt.fed.grid import exchange, wait_for_nodes
    from fedgpt.files import atomic_write_bytes

    c = context.run_config
    nodes = wait_for_nodes(grid, int(c["nodes"]), timeout=120, log=lambda _: None)
    arrays = ArrayRecord({"weights": Array(np.zeros(int(c["params"]), dtype=np.float32))})
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
        replies = exchange(grid, msgs, timeout=600)
        if len(replies) != len(nodes) or any(r.has_error() or "arrays" not in r.content for r in replies):
            raise RuntimeError(
                f"deployment floor, round {rnd}: {len(replies)} of {len(nodes)} nodes answered"
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
