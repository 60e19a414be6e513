"""Run a fedgpt federation as a Flower simulation on the Ray backend.

    python simulate.py --iid --num-clients 8
    python simulate.py --non-iid speaker --strategy fedprox --mu 0.01 --rounds 20
    python simulate.py --config configs/tiny.yaml --fed.local_steps=5 --train.out_dir=out/tiny_fed

Any config field can be overridden with --section.key=value. `flwr run .` runs the same apps natively.
"""

import time

T0 = time.time()  # start-up is measured from here to the first client training step

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from fedgpt.config import PARTITIONS, STRATEGIES, load_config  # noqa: E402

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

    from fedgpt.server import FederatedRun


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python simulate.py", description=__doc__.splitlines()[0],
                                epilog="Any config field can be overridden: --fed.local_steps=20 --model.n_layer=2")
    p.add_argument("--config", default="configs/shakespeare_char_cpu.yaml", help="YAML config (default: %(default)s)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--iid", action="store_true", help="IID partition (fed.partition=iid)")
    split.add_argument("--non-iid", choices=[s for s in PARTITIONS if s != "iid"], help="non-IID partition scheme")
    p.add_argument("--num-clients", type=int, help="clients (= simulated SuperNodes)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-steps", type=int)
    p.add_argument("--strategy", choices=STRATEGIES)
    p.add_argument("--mu", type=float, help="FedProx proximal_mu")
    p.add_argument("--resume", action="store_true", help="continue from <train.out_dir>/last.pt")
    p.add_argument("--client-cpus", type=float, default=1.0, help="CPUs per client; concurrency = Ray CPUs / this (default 1)")
    p.add_argument("--client-gpus", type=float, default=None, help="GPU fraction per client (default: 1 if CUDA, else 0)")
    p.add_argument("--ray-address", default=None, help='join an existing Ray cluster, e.g. "auto" or "10.0.0.5:6379"')
    return p.parse_known_args(argv)


def main(argv=None) -> dict:
    args, overrides = parse_args(argv)
    flags = {"fed.partition": "iid" if args.iid else args.non_iid, "fed.num_clients": args.num_clients, "fed.rounds": args.rounds,
             "fed.local_steps": args.local_steps, "fed.strategy": args.strategy, "fed.proximal_mu": args.mu}
    flag_overrides = [f"--{k}={v}" for k, v in flags.items() if v is not None]
    if args.mu is not None and args.strategy is None:
        flag_overrides.append("--fed.strategy=fedprox")
    cfg = load_config(args.config, flag_overrides + overrides)
    if not any(o.lstrip("-").startswith("train.out_dir=") for o in overrides):
        cfg.train.out_dir = f"out/fed_{cfg.fed.partition}_{cfg.fed.strategy}"

    cpus = os.cpu_count() or 1
    init_args = ray_init_args(args.ray_address)

    # Everything that can fail on bad input (data, partition, model, resume) fails in prepare(), before any round.
    # It runs beside Ray's start-up (seconds of processes starting), which must stay on the main thread.
    prepared: dict = {}

    def prepare() -> None:
        try:
            import torch

            from fedgpt.server import FederatedRun

            gpus = args.client_gpus if args.client_gpus is not None else (1.0 if torch.cuda.is_available() else 0.0)
            # Clients that can train at once: Ray schedules by CPUs, or by GPUs when clients ask for them.
            slots = max(1, int(cpus // args.client_cpus)) if gpus == 0 else max(1, int(torch.cuda.device_count() // gpus))
            prepared["gpus"] = gpus
            prepared["run"] = FederatedRun(cfg, resume=args.resume, slots=min(slots, cfg.fed.num_clients),
                                           client_threads=max(1, int(args.client_cpus)), t_start=T0)
        except BaseException as e:
            prepared["error"] = e

    worker = threading.Thread(target=prepare, name="prepare")
    worker.start()
    start_ray(init_args)
    worker.join()
    if "error" in prepared:
        import ray

        ray.shutdown()
        raise prepared["error"]
    run, gpus = prepared["run"], prepared["gpus"]

    import client_app  # an importable module: its per-process cache survives between rounds in a Ray actor

    backend_config = {"client_resources": {"num_cpus": args.client_cpus, "num_gpus": gpus}, "init_args": init_args}
    summary = {**simulate(run, client_app.app, cfg.fed.num_clients, backend_config), "out_dir": cfg.train.out_dir}
    print(json.dumps(summary))
    return summary


def ray_init_args(address: str | None = None) -> dict:
    """ray.init arguments: join the cluster at `address`, or start a local Ray over this machine's cores."""
    return {"address": address} if address else {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}


def start_ray(init_args: dict) -> None:
    """Start Ray as Flower would (Flower skips ray.init when Ray is already up), so start-up can overlap our own."""
    import logging
    import warnings

    import ray

    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")  # about GPU env vars; not ours to act on
    # Ray workers import client_app and fedgpt: they get this process's import path, like Flower gives them. A local
    # Ray inherits it from the environment; a runtime_env (what Flower passes) would also keep Ray from handing the
    # workers it pre-started at init to the clients, and each client would wait about a second for a fresh one.
    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = path
    runtime_env = {"runtime_env": {"env_vars": {"PYTHONPATH": path}}} if "address" in init_args else {}
    ray.init(logging_level=logging.WARNING, **runtime_env, **init_args)


def simulate(run: "FederatedRun", client_app: "ClientApp", num_supernodes: int, backend_config: dict) -> dict:
    """Run `run` in a ServerApp against `num_supernodes` simulated SuperNodes serving `client_app`; its summary."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    outcome = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            outcome["summary"] = run.run(grid)
        except BaseException as e:  # surfaced after the simulation stops
            outcome["error"] = e
            raise

    run_simulation(server_app=server, client_app=client_app, num_supernodes=num_supernodes, backend_config=backend_config)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("summary", {})


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
