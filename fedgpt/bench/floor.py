"""The floor under a simulation's start-up: what Flower, Ray and torch cost with none of fedgpt's own work.

    python -m fedgpt.bench.floor --num-clients 8

It starts Ray as simulate.py does and a Flower simulation whose ClientApp only imports torch (as a
simulation's Ray actors do) and answers one message per node; it prints, as JSON, the seconds from the
interpreter's start to the first message handled. `python -m fedgpt.bench fed` runs it beside the real
simulation. The deployment floor is fedgpt.bench.floor_deploy.
"""

import time

T0 = time.time()

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402, F401  (what every process of a torch ClientApp pays, as a Ray actor of fedgpt's)
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402  (loaded by flwr.clientapp already: free here)

app = ClientApp()


@app.train()
def answer(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"t": ConfigRecord({"handled-at": time.time()})}), reply_to=msg)


def main(num_clients: int) -> dict:
    from flwr.simulation import run_simulation

    from fedgpt.bench import (
        floor,  # the app by module name: Ray actors import it (and torch), as with client_app
    )
    from fedgpt.fed.grid import send_and_receive, wait_for_nodes
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
            r.content["t"]["handled-at"]
            for r in send_and_receive(grid, msgs, timeout=120)
            if not r.has_error()
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
