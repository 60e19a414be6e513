"""The floor under the simulation's start-up: Flower, Ray and torch starting, with none of fedgpt's own work.

    python -m fedgpt.bench_floor --num-clients 8

Starts Ray as simulate.py does and a Flower simulation whose ClientApp only imports torch and answers one message
per node; prints, as JSON, the seconds from the interpreter's start to the first message handled. `python -m
fedgpt.bench fed` runs it beside the real simulation: its start-up reads against what no torch ClientApp avoids.
"""

import time

T0 = time.time()

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402, F401  (what every process of a torch ClientApp pays)
from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

app = ClientApp()


@app.train()
def answer(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"t": ConfigRecord({"handled-at": time.time()})}), reply_to=msg)


def main(num_clients: int) -> dict:
    from flwr.app import MessageType
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedgpt import bench_floor  # the app by module name: Ray actors import it (and torch), as with client_app
    from fedgpt.server import exchange, wait_for_nodes
    from simulate import ray_init_args, start_ray

    init_args = ray_init_args()
    start_ray(init_args)
    server, handled = ServerApp(), []

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid, num_clients, timeout=120, log=lambda _: None)
        msgs = [Message(RecordDict({"c": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
        handled.extend(r.content["t"]["handled-at"] for r in exchange(grid, msgs, timeout=120) if not r.has_error())

    run_simulation(server_app=server, client_app=bench_floor.app, num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}, "init_args": init_args})
    if len(handled) != num_clients:
        raise RuntimeError(f"{len(handled)} of {num_clients} floor clients answered")
    # first_message_at: Unix time, for timing from the moment a parent launched this process
    return {"num_clients": num_clients, "first_message_s": round(min(handled) - T0, 2), "first_message_at": min(handled)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m fedgpt.bench_floor", description=__doc__.splitlines()[0])
    p.add_argument("--num-clients", type=int, default=8)
    print(json.dumps(main(p.parse_args().num_clients)))
