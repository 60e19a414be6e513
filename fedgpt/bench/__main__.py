"""python -m fedgpt.bench {train,fed,comm,deploy,scale,gpu}: run a benchmark, print its table, write its JSON.

    python -m fedgpt.bench train --config configs/shakespeare_char_cpu.yaml [--nanogpt ../nanoGPT]
    python -m fedgpt.bench fed | comm | deploy [--config ...]

Each writes results/bench-<kind>-<time>.json unless --out names the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fedgpt.bench import federation, gpu, scale, step
from fedgpt.bench.common import commit
from fedgpt.files import atomic_write_bytes


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m fedgpt.bench",
        description=__doc__.splitlines()[0],
        epilog="Any config field can be overridden: --train.batch_size=32 --model.n_layer=2",
    )
    sub = p.add_subparsers(dest="bench", required=True)
    step.add_parser(sub)
    federation.add_parsers(sub)
    scale.add_parser(sub)
    gpu.add_parser(sub)
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    command = " ".join(["python -m fedgpt.bench", *argv])
    if args.bench == "train":
        res = step.bench_train(args, overrides, command=command)
        table = step.markdown(res)
    elif args.bench == "gpu":  # it writes its JSON as each step finishes
        work = Path(args.out).parent / "gpu-work" if args.out else Path("results/gpu")
        res = gpu.bench_gpu(args, overrides, work)
        print(json.dumps(res, indent=1))
        return res
    else:
        figures = federation.run(args.bench, args, overrides)
        res = {
            "bench": args.bench,
            "config": args.config,
            "overrides": overrides,
            "command": command,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            **figures,
        }
        table = federation.markdown(args.bench, res)
    res["commit"] = commit(getattr(args, "app_dir", "."))
    out = Path(args.out or f"results/bench-{args.bench}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    atomic_write_bytes(out, (json.dumps(res, indent=2) + "\n").encode())
    print(table)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as e:  # NanoGPTError is a RuntimeError
        sys.exit(f"error: {e}")
