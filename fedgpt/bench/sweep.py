"""The sweep behind the main table's settings: DiLoCo and FedAvg at batch 1 to 12 and 5 to 50 local steps a
round, and one change at a time to DiLoCo's outer step or the clients' learning rate, all at the main table's
equal tokens (8 IID clients, 1.536M tokens), sorted by final val loss.

    python -m fedgpt.results --sweep

Eight of its rows are runs of the main table or the frontier (the same names, so the same commands and
records); the other nine are its own. `--sweep` reruns all seventeen, the shared ones into their tables'
records too; `--sweep --only sweep_...` reruns its own.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from fedgpt.bench import equal_tokens, frontier
from fedgpt.bench.common import commands
from fedgpt.bench.equal_tokens import DILOCO
from fedgpt.bench.experiments import Experiment

FEDAVG = ["--strategy", "fedavg"]
M05, OLR1, LR5 = "--fed.server_momentum=0.5", "--fed.server_lr=1.0", "--train.learning_rate=5e-3"
SHARED = {  # a run of another table: its label here
    "diloco_iid_b1": "DiLoCo, batch 1",
    "frontier_diloco_h10": "DiLoCo, batch 4",
    "frontier_diloco_h25": "DiLoCo, batch 4",
    "frontier_fedavg_h25": "FedAvg, batch 4",
    "frontier_diloco_h50": "DiLoCo, batch 4",
    "diloco_iid_b12": "DiLoCo, batch 12",
    "fedavg_iid": "FedAvg, batch 12",
    "fedavg_iid_reset": "FedAvg, batch 12, client AdamW reset each round",
}
OWN = [  # name, label, args, batch (None: the config's), local steps
    ("sweep_diloco_b2_h10", "DiLoCo, batch 2", DILOCO, 2, 10),
    ("sweep_diloco_b2_h25", "DiLoCo, batch 2", DILOCO, 2, 25),
    ("sweep_fedavg_b2_h25", "FedAvg, batch 2", FEDAVG, 2, 25),
    ("sweep_diloco_b2_h50", "DiLoCo, batch 2", DILOCO, 2, 50),
    ("sweep_diloco_b4_m05", "DiLoCo, batch 4, outer momentum 0.5", [*DILOCO, M05], 4, 25),
    ("sweep_diloco_b4_olr1", "DiLoCo, batch 4, outer lr 1.0", [*DILOCO, OLR1], 4, 25),
    ("sweep_diloco_b4_lr5e-3", "DiLoCo, batch 4, client lr 5e-3", [*DILOCO, LR5], 4, 25),
    ("sweep_diloco_b12_h5", "DiLoCo, batch 12", DILOCO, None, 5),
    ("sweep_diloco_b12_h5_m05", "DiLoCo, batch 12, outer momentum 0.5", [*DILOCO, M05], None, 5),
]


def experiments() -> list[Experiment]:
    others = {e.name: e for e in equal_tokens.experiments() + frontier.experiments()}
    shared = [replace(others[name], label=label) for name, label in SHARED.items()]
    own = [
        Experiment(name, label, ["--iid", *args], batch=batch, local_steps=steps)
        for name, label, args, batch, steps in OWN
    ]
    return shared + own


def render(res: list[dict], a: argparse.Namespace, doc: Path) -> str:
    lines = [
        "| run | rounds x local steps | final val loss | best val loss | MB per client |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(res, key=lambda r: r["final_val_loss"]):
        steps = r["local_steps"] or a.local_steps
        lines.append(
            f"| {r['label']} | {r['rounds']} x {steps} | {r['final_val_loss']:.4f} | "
            f"{r['best_val_loss']:.4f} | {r['mb_per_client']:.0f} |"
        )
    return "\n".join(lines + ["", "Commands:", ""] + commands(res))
