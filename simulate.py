"""Run a fedgpt federation as a Flower simulation on the Ray backend.

    python simulate.py --iid --num-clients 8
    python simulate.py --non-iid speaker --strategy fedprox --mu 0.01 --rounds 20 --train.out_dir=out/fedprox
    python simulate.py --config configs/tiny.yaml --fed.local_steps=5 --train.out_dir=out/tiny_fed

Any config field can be overridden with --section.key=value. `flwr run .` runs the same apps natively.
"""

import time

T0 = time.time()  # start-up is measured from here to the first client training step

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from fedgpt.config import load_config, parse_overrides  # noqa: E402
from fedgpt.config_rules import PARTITIONS, STRATEGIES  # noqa: E402
from fedgpt.fed.simulation import Resources, launch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python simulate.py",
        description=__doc__.splitlines()[0],
        epilog="Any config field can be overridden: --fed.local_steps=20 --model.n_layer=2",
    )
    p.add_argument(
        "--config", default="configs/shakespeare_char_cpu.yaml", help="YAML config (default: %(default)s)"
    )
    split = p.add_mutually_exclusive_group()
    split.add_argument("--iid", action="store_true", help="IID partition (fed.partition=iid)")
    split.add_argument(
        "--non-iid", choices=[s for s in PARTITIONS if s != "iid"], help="non-IID partition scheme"
    )
    p.add_argument("--num-clients", type=int, help="clients (= simulated SuperNodes)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-steps", type=int)
    p.add_argument("--strategy", choices=STRATEGIES)
    p.add_argument("--mu", type=float, help="FedProx proximal_mu")
    p.add_argument("--resume", action="store_true", help="continue from <train.out_dir>/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in train.out_dir")
    p.add_argument(
        "--client-cpus",
        type=float,
        default=1.0,
        help="CPUs per client; concurrency = Ray CPUs / this (default 1)",
    )
    p.add_argument(
        "--client-gpus", type=float, default=None, help="GPU fraction per client (default: 1 if CUDA, else 0)"
    )
    p.add_argument(
        "--ray-address", default=None, help='join an existing Ray cluster, e.g. "auto" or "10.0.0.5:6379"'
    )
    p.add_argument("--verbose", action="store_true", help="Flower's own INFO lines too (a few a round)")
    return p.parse_known_args(argv)


def main(argv=None) -> dict:
    args, overrides = parse_args(argv)
    flags = {
        "fed.partition": "iid" if args.iid else args.non_iid,
        "fed.num_clients": args.num_clients,
        "fed.rounds": args.rounds,
        "fed.local_steps": args.local_steps,
        "fed.strategy": args.strategy,
        "fed.proximal_mu": args.mu,
    }
    if args.mu is not None and args.strategy is None:
        flags["fed.strategy"] = "fedprox"
    # The flags as values (dotted overrides win over them), checked with the rest of the config.
    extra: dict[str, dict] = {}
    for key, value in flags.items():
        if value is not None:
            section, name = key.split(".")
            extra.setdefault(section, {})[name] = value
    for section, values in parse_overrides(overrides).items():
        extra.setdefault(section, {}).update(values)
    cfg = load_config(args.config, extra)
    resources = Resources(args.client_cpus, args.client_gpus, args.ray_address, args.verbose)
    # client_app by module name: Ray actors import it, and its per-process cache lives on between rounds.
    summary = launch(
        cfg, "client_app:app", resources, resume=args.resume, overwrite=args.overwrite, t_start=T0
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
