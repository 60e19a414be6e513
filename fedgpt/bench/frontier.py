"""The communication/quality frontier: FedAvg and DiLoCo at 5 to 125 local steps a round (rounds to match) at
batch 4, final loss against the megabytes one client sends and receives over the run.

    python -m fedgpt.results --frontier
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedgpt.bench.common import commands
from fedgpt.bench.equal_tokens import DILOCO
from fedgpt.bench.experiments import Experiment
from fedgpt.bench.plots import axes, loss_against_bytes, save, with_figure

FRONTIER_BATCH, FRONTIER_STEPS = 4, (5, 10, 25, 50, 125)  # 750 steps per client, in rounds of 5 to 125
STRATEGIES = (("fedavg", "FedAvg", ["--strategy", "fedavg"]), ("diloco", "DiLoCo", DILOCO))


def experiments() -> list[Experiment]:
    return [
        Experiment(
            f"frontier_{name}_h{h}",
            f"{label}, {h} local steps",
            ["--iid", *args],
            batch=FRONTIER_BATCH,
            local_steps=h,
            group=label,
        )
        for name, label, args in STRATEGIES
        for h in FRONTIER_STEPS
    ]


def table(res: list[dict]) -> str:
    lines = [
        "| strategy | local steps | rounds | MB per client, whole run | final val loss | best val loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res:
        lines.append(
            f"| {r['group']} | {r['local_steps']} | {r['rounds']} | {r['mb_per_client']:.0f} | "
            f"{r['final_val_loss']:.4f} | {r['best_val_loss']:.4f} |"
        )
    return "\n".join(lines + ["", "Commands:", ""] + commands(res))


def plot(res: list[dict], path: Path) -> None:
    """Final central val loss against the megabytes one client sends and receives over the run."""
    plt, fig, ax = axes((9, 5))
    for group in dict.fromkeys(r["group"] for r in res):
        pts = sorted(
            (r["mb_per_client"], r["final_val_loss"], r["local_steps"]) for r in res if r["group"] == group
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=group)
        for mb, val, steps in pts:
            ax.annotate(f"H={steps}", (mb, val), textcoords="offset points", xytext=(4, 4), fontsize=7)
    loss_against_bytes(ax, "MB sent and received per client over the run (log)")
    save(plt, fig, ax, path)


def render(res: list[dict], a: argparse.Namespace, doc: Path) -> str:
    return with_figure(table(res), plot, res, doc, "frontier.png", "final val loss against bytes per client")
