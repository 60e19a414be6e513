"""Federation benchmarks: simulation overhead, communication, deployment overhead.

    python -m fedgpt.bench fed --config configs/shakespeare_char_cpu.yaml
    python -m fedgpt.bench comm --config configs/shakespeare_char_cpu.yaml
    python -m fedgpt.bench deploy --config configs/shakespeare_char_cpu.yaml

Each runs the real entry points as a user would (`python simulate.py ...`, a SuperLink with SuperNodes and
`flwr run .`) in subprocesses, then reads the per-round rows the ServerApp writes (rounds.jsonl). Start-up is
timed from the moment the command is launched.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedgpt.bench import comm, deploy, scale
from fedgpt.bench.common import SimRun, app_dir, run_logged, run_simulate_py, sim_args
from fedgpt.config import load_config
from fedgpt.fed.rounds import median


def round_figures(run: SimRun) -> dict[str, Any]:
    """Per-round overhead figures of a run: medians over its rounds, and start-up from the launch."""
    rs = run.rounds
    rounds_s = sum(r.round_s for r in rs)
    tokens = rs[-1].tokens if rs else 0
    return {
        "rounds": len(rs),
        "startup_s": round(rs[0].first_step_at - run.launched_at, 2) if rs and rs[0].first_step_at else None,
        "median_round_s": median([r.round_s for r in rs]),
        "median_outside_training_share": median(
            [r.outside_training_share for r in rs if r.outside_training_share is not None]
        ),
        "outside_training_share_by_round": [r.outside_training_share for r in rs],
        "median_eval_s": median([r.eval_s for r in rs]),
        "tokens": tokens,
        "tokens_per_s_rounds": round(tokens / rounds_s, 1) if rs and rounds_s > 0 else None,
        "tokens_per_s_wall": round(tokens / run.wall_s, 1) if rs else None,
        "wall_s": round(run.wall_s, 1),
        "final_val_loss": rs[-1].val_loss if rs else None,
    }


def local_trainer_throughput(config: str, overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """Tokens/s of the local trainer's step (Trainer.train_steps) on the same config, with torch's default
    threads."""
    import torch

    from fedgpt.bench.step import FedgptRunner

    runner = FedgptRunner(load_config(config, overrides))
    ms = statistics.median(runner.run(steps, warmup))
    return {
        "ms_per_step": round(ms, 2),
        "tokens_per_s": round(runner.tokens_per_step / (ms / 1000), 1),
        "threads": torch.get_num_threads(),
    }


def bench_fed(a: argparse.Namespace, overrides: list[str], work: Path) -> dict[str, Any]:
    """Start-up, per-round time outside client training, and aggregate tokens/s against the local trainer."""
    app = app_dir(a.app_dir)
    local = local_trainer_throughput(a.config, overrides, a.trainer_steps, warmup=5)
    print(
        f"local trainer: {local['ms_per_step']:.1f} ms/step, {local['tokens_per_s']:,.0f} tokens/s "
        f"({local['threads']} threads)",
        flush=True,
    )
    floor = startup_floor(app, a.num_clients, work / "floor.log")
    print(f"start-up floor (Flower + Ray + a torch ClientApp): {floor:.2f} s", flush=True)
    run = run_simulate_py(app, sim_args(a) + overrides, work / "fed", work / "fed.log")
    fig = round_figures(run)
    ratio = fig["tokens_per_s_rounds"] / local["tokens_per_s"] if fig["tokens_per_s_rounds"] else None
    # fedgpt's own part of the start-up: the floor starts Flower, Ray and torch the same way, and nothing
    # else.
    over = round(fig["startup_s"] - floor, 2) if fig["startup_s"] is not None else None
    return {
        "local_trainer": local,
        "simulation": fig,
        "startup_floor_s": floor,
        "startup_over_floor_s": over,
        "tokens_per_s_ratio": round(ratio, 3) if ratio else None,
        "tokens_per_s_ratio_wall": round(fig["tokens_per_s_wall"] / local["tokens_per_s"], 3),
    }


def startup_floor(app: Path, num_clients: int, log: Path) -> float:
    """Seconds from launch to the first message handled by a simulation that does nothing but start."""
    cmd = [sys.executable, "-m", "fedgpt.bench.floor", "--num-clients", str(num_clients)]
    t0, _ = run_logged(cmd, log, app, timeout=600)
    result = json.loads(log.read_text().strip().splitlines()[-1])
    return round(result["first_message_at"] - t0, 2)


def markdown(kind: str, res: dict[str, Any]) -> str:
    """One result as a markdown table."""
    if kind in ("scale", "comm", "deploy"):
        return {"scale": scale.markdown, "comm": comm.markdown, "deploy": deploy.markdown}[kind](res)
    if kind == "fed":
        s, loc = res["simulation"], res["local_trainer"]
        rows = [
            ("start-up: launch to first client step (s)", s["startup_s"]),
            (
                "start-up floor: Flower + Ray + a ClientApp that only imports torch (s)",
                res["startup_floor_s"],
            ),
            ("start-up over the floor: fedgpt's own part (s)", res["startup_over_floor_s"]),
            ("round time: send to aggregate, central eval beside the next (s, median)", s["median_round_s"]),
            ("share of a round outside client training (median)", _pct(s["median_outside_training_share"])),
            ("central evaluation per round, beside the next round (s, median)", s["median_eval_s"]),
            ("simulation tokens/s over rounds", s["tokens_per_s_rounds"]),
            ("simulation tokens/s over the whole run", s["tokens_per_s_wall"]),
            (f"local trainer tokens/s ({loc['threads']} threads)", loc["tokens_per_s"]),
            (
                "simulation / local trainer (rounds; whole run)",
                f"{res['tokens_per_s_ratio']}x; {res['tokens_per_s_ratio_wall']}x",
            ),
        ]
    lines = [f"| {kind} | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _mb(a: float, b: float) -> str:
    return f"{a / 1e6:.4f} / {b / 1e6:.4f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for name, help_, rounds, steps in (
        ("fed", "8-client simulation: start-up, per-round overhead, tokens/s vs the local trainer", 3, 50),
        ("comm", "bytes per client per round, fp32 vs fp16 transport, and the val loss each reaches", 5, 25),
        ("deploy", "seconds per round of a loopback deployment (SuperLink + SuperNodes, flwr run)", 5, 0),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument(
            "--config", default="configs/shakespeare_char_cpu.yaml", help="YAML config (default: %(default)s)"
        )
        p.add_argument("--rounds", type=int, default=rounds, help="rounds (default: %(default)s)")
        p.add_argument(
            "--local-steps",
            type=int,
            default=steps,
            help="local steps per client per round (default: %(default)s)",
        )
        if name == "deploy":
            deploy.add_arguments(p)
        else:
            p.add_argument("--num-clients", type=int, default=8, help="clients (default: %(default)s)")
        if name == "comm":
            comm.add_arguments(p)
        if name == "fed":
            p.add_argument(
                "--trainer-steps",
                type=int,
                default=30,
                help="timed local-trainer steps (default: %(default)s)",
            )
        p.add_argument("--app-dir", default=".", help="the fedgpt app directory (default: the current one)")
        p.add_argument(
            "--keep", help="directory for the runs' outputs and logs (default: a temporary one, removed)"
        )
        p.add_argument("--out", help="JSON result file (default results/bench-<kind>-<time>.json)")


def run(kind: str, a: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    fn = {
        "fed": bench_fed,
        "comm": comm.bench_comm,
        "deploy": deploy.bench_deploy,
        "scale": scale.bench_scale,
    }[kind]
    if a.rounds < 1 or a.local_steps < 0:
        raise ValueError(f"--rounds={a.rounds} must be >= 1 and --local-steps={a.local_steps} >= 0")
    if a.keep:
        work = Path(a.keep).resolve()
        work.mkdir(parents=True, exist_ok=True)
        return fn(a, overrides, work)
    with tempfile.TemporaryDirectory(prefix=f"fedgpt-bench-{kind}-") as tmp:
        return fn(a, overrides, Path(tmp))
