"""Rounds to a target accuracy: FedSGD, FedAvg and DiLoCo on the role split and on IID, McMahan et al.'s way.

    python -m fedgpt.results --rounds-to-target

McMahan et al. (2017) count the rounds of communication each method needs to reach a test accuracy on the
Shakespeare role split (1,146 clients, 10% a round) and on an IID split of the same data, with FedSGD (each
client one step of plain SGD on the gradient of all its data) as the reference. These runs do the same with
the CPU baby GPT, at TARGET_ACCURACY next-character accuracy on the central validation split: 333 clients,
Tiny Shakespeare's roles in its train split (one client per role, as McMahan et al. define the split), 10%
sampled each round, FedAvg and DiLoCo at 25 local steps of the config's batch.
"""

from __future__ import annotations

from fedgpt.bench.common import commands
from fedgpt.bench.experiments import Experiment
from fedgpt.fed.rounds import read_rounds

TARGET_ACCURACY = 0.35
LEVELS = (0.15, 0.20, 0.25, 0.30, TARGET_ACCURACY)  # the table's columns: every run reaches some of them
CLIENTS = ["--fed.num_clients=333", "--fed.fraction_train=0.1"]
# FedSGD: one full-batch gradient per client and round, plain SGD at a constant learning rate (the server's
# step, as every client takes the same one and FedAvg averages them).
FEDSGD = [
    "--strategy",
    "fedavg",
    "--fed.local_steps=1",
    "--fed.full_batch=true",
    "--train.optimizer=sgd",
    "--train.learning_rate=0.3",  # at 1.0 it never got past predicting frequent characters (docs/results.md)
    "--train.decay_lr=false",
    "--train.warmup_steps=0",
    "--fed.rounds=200",
]
FEDAVG = ["--strategy", "fedavg", "--fed.local_steps=25", "--fed.rounds=20"]
DILOCO = ["--strategy", "diloco", "--fed.local_steps=25", "--fed.rounds=20"]
METHODS = (("fedsgd", "FedSGD", FEDSGD), ("fedavg", "FedAvg", FEDAVG), ("diloco", "DiLoCo", DILOCO))
SPLITS = (("role", "role split"), ("iid", "IID"))
METHOD_LABELS = {method: label for method, label, _ in METHODS}


def rounds_to(rows, accuracy: float) -> int | None:
    """The first round whose global model reaches `accuracy` on the central validation split, or None."""
    return next((r.round for r in rows if r.val_accuracy is not None and r.val_accuracy >= accuracy), None)


def figures(run_dir) -> dict:
    rows = read_rounds(run_dir / "rounds.jsonl")
    accuracies = [r.val_accuracy for r in rows if r.val_accuracy is not None]
    return {
        "rounds_to_target": rounds_to(rows, TARGET_ACCURACY),
        "rounds_to_level": {f"{a:.2f}": rounds_to(rows, a) for a in LEVELS},
        "rounds_run": len(rows) - 1,
        "best_accuracy": max(accuracies, default=None),
        "final_val_loss": rows[-1].val_loss if rows else None,
    }


def _speedup(r: dict, base: dict | None, level: str) -> str:
    """FedSGD's rounds to `level` over this run's; a lower bound when FedSGD did not get there."""
    n = r["rounds_to_level"][level]
    if n is None or base is None:
        return "-"
    m = base["rounds_to_level"][level]
    return f"{m / n:.1f}x" if m is not None else f"> {base['rounds_run'] / n:.1f}x"


def table(res: list[dict]) -> str:
    """Rounds to each accuracy of LEVELS per split and method, and the speed-up over FedSGD on the same
    split at the highest level the method reached."""
    levels = [f"{a:.2f}" for a in LEVELS]
    lines = [
        "| split | method | "
        + " | ".join(f"rounds to {float(a):.0%}" for a in levels)
        + " | speed-up over FedSGD | best accuracy | rounds run |",
        "| --- | --- | " + " | ".join("---:" for _ in levels) + " | ---: | ---: | ---: |",
    ]
    for r in res:
        base = next((b for b in res if b["group"] == r["group"] and b["method"] == "fedsgd"), None)
        top = next((a for a in reversed(levels) if r["rounds_to_level"][a] is not None), None)
        speedup = f"{_speedup(r, base, top)} at {float(top):.0%}" if top and r is not base else "-"
        cells = " | ".join(
            "-" if r["rounds_to_level"][a] is None else str(r["rounds_to_level"][a]) for a in levels
        )
        lines.append(
            f"| {dict(SPLITS)[r['group']]} | {METHOD_LABELS[r['method']]} | {cells} | {speedup} | "
            f"{r['best_accuracy']:.3f} | {r['rounds_run']} |"
        )
    lines += ["", "Commands:", ""] + commands(res)
    return "\n".join(lines)


def experiments() -> list[Experiment]:
    """The runs of the table (each with its own clients, rounds and steps)."""
    return [
        Experiment(
            f"target_{split}_{method}",
            f"{label}, {split_label}",
            [f"--fed.partition={split}", *CLIENTS, *args],
            kind="own",
            group=split,
            method=method,
        )
        for split, split_label in SPLITS
        for method, label, args in METHODS
    ]


def render(res: list[dict], a, doc) -> str:
    return table(res)
