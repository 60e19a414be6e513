"""Floors: what Flower, Ray and torch cost with none of fedgpt's own work, to read fedgpt's figures against.

    python -m fedgpt.bench.floor --num-clients 8

Simulation start-up: starts Ray as simulate.py does and a Flower simulation whose ClientApp only imports
torch and answers one message per node; prints, as JSON, the seconds from the interpreter's start to the
first message handled.
`python -m fedgpt.bench fed` runs it beside the real simulation.

Deployment round: `server` below is a ServerApp that sends model-sized arrays to every node for a number of
rounds, and the same ClientApp sends them back through torch. `python -m fedgpt.bench deploy` runs it on
the federation that ran fedgpt, as its own Flower app (deployment_floor_app writes its pyproject.toml).
"""

import time

T0 = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402  (what every process of a torch ClientApp pays)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402  (loaded by flwr.clientapp already: free here)

app = ClientApp()


@app.train()
def answer(msg: Message, context: Context) -> Message:
    content = RecordDict({"t": ConfigRecord({"handled-at": time.time()})})
    if (
        "arrays" in msg.content
    ):  # the deployment floor: the weights go back through torch, as a torch client's would
        state = msg.content["arrays"].to_torch_state_dict()
        content["arrays"] = ArrayRecord({k: v.float() for k, v in state.items()})
    return Message(content, reply_to=msg)


server = ServerApp()


@server.main()
def deployment_floor(grid: Grid, context: Context) -> None:
    """`rounds` rounds of a float32 array of `params` values to each of `nodes` nodes and back.

    The seconds of each round go to the file `out` as JSON.
    """
    from fedgpt.fed.grid import exchange, wait_for_nodes
    from fedgpt.files import atomic_write_bytes

    c = context.run_config
    nodes = wait_for_nodes(grid, int(c["nodes"]), timeout=120, log=lambda _: None)
    arrays = ArrayRecord({"weights": torch.zeros(int(c["params"]))})  # a torch state dict, as fedgpt sends
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
                f"deployment floor, round {rnd}: {len(replies)} of {len(nodes)} nodes sent the weights back"
            )
        rounds.append(round(time.time() - t, 3))
    atomic_write_bytes(
        c["out"], json.dumps({"nodes": len(nodes), "params": int(c["params"]), "round_s": rounds}).encode()
    )


def deployment_floor_app(directory: Path, nodes: int, rounds: int, params: int, out: Path) -> Path:
    """A Flower app directory for `flwr run`: only a pyproject.toml, whose components are this installed
    module's."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(f"""[project]
name = "fedgpt-deployment-floor"
version = "1.0.0"
description = "Flower and a torch ClientApp, with none of fedgpt's work (fedgpt.bench.floor)"
license = "MIT"

[tool.flwr.app]
publisher = "fedgpt"

[tool.flwr.app.components]
serverapp = "fedgpt.bench.floor:server"
clientapp = "fedgpt.bench.floor:app"

[tool.flwr.app.config]
nodes = {nodes}
rounds = {rounds}
params = {params}
out = {json.dumps(str(out.resolve()))}
""")
    return directory


def main(num_clients: int) -> dict:
    from flwr.simulation import run_simulation

    from fedgpt.bench import (
        floor,  # the app by module name: Ray actors import it (and torch), as with client_app
    )
    from fedgpt.fed.grid import exchange, wait_for_nodes
    from fedgpt.fed.simulation import ray_init_args, start_ray

    init_args = ray_init_args()
    start_ray(init_args)
    sim_server, handled = ServerApp(), []

    @sim_server.main()
    def _main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid, num_clients, timeout=120, log=lambda _: None)
        msgs = [
            Message(RecordDict({"c": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in nodes
        ]
        handled.extend(
            r.content["t"]["handled-at"] for r in exchange(grid, msgs, timeout=120) if not r.has_error()
        )

    run_simulation(
        server_app=sim_server,
        client_app=floor.app,
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}, "init_args": init_args},
    )
    if len(handled) != num_clients:
        raise RuntimeError(f"{len(handled)} of {num_clients} floor clients answered")
    # first_message_at: Unix time, for timing from the moment a parent launched this process
    return {
        "num_clients": num_clients,
        "first_message_s": round(min(handled) - T0, 2),
        "first_message_at": min(handled),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m fedgpt.bench.floor", description=__doc__.splitlines()[0])
    p.add_argument("--num-clients", type=int, default=8)
    print(json.dumps(main(p.parse_args().num_clients)))
