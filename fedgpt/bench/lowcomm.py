"""Federated against synchronous at the same per-client batch, with the inner optimizer and the bytes on the
wire as the variables: AdamW and Muon, centralized, synchronous data parallel (8 x batch 1), DiLoCo and
MuLoCo (120 rounds x 25 local steps of batch 1), streaming fragments with an int4 uplink, a sparse uplink,
and the contiguous split; final loss against the megabytes a client sends.

    python -m fedgpt.results --lowcomm
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedgpt.bench.common import commands
from fedgpt.bench.equal_tokens import CONTIGUOUS, DILOCO, MUON, SMALL_BATCH, SMALL_BATCH_STEPS
from fedgpt.bench.experiments import Experiment
from fedgpt.bench.plots import axes, loss_against_bytes, save, with_figure

STREAMING = ["--fed.fragments=4", "--fed.uplink=int4"]  # each block its own fragment, synced every 4 rounds
# The largest 2% of each update, 2 bits each, error feedback; as SparseLoCo, the clients' error feedback in
# place of outer momentum: the server takes the mean as it is (FedAvg). DiLoCo's momentum on top of sparse
# updates stalled in a first run (no record kept; docs/results.md says why).
SPARSE = ["--strategy", "fedavg", "--fed.uplink=sparse"]
SEED2 = "--train.seed=2"  # a second seed for the claims smaller than 0.05
# Muon's momentum at batch 1: 0.99 averages about 100 windows' gradients, 0.95 about 20 (synchronous Muon
# averages 8 windows a step, so about 160 at 0.95). A remedy tried: much worse on two seeds, when first run.
M99 = "--train.muon_momentum=0.99"


def momentum_rows(small: dict) -> list[tuple]:
    """MuLoCo with more momentum on the clients' batch-1 gradients (M99), on two seeds."""
    label, args = "MuLoCo, IID, fp32, momentum 0.99", ["--iid", *DILOCO, *MUON, M99]
    return [
        ("muloco_iid_b1_m99", label, args, "Muon", small),
        ("muloco_iid_b1_m99_seed2", f"{label}, seed 2", [*args, SEED2], "Muon", small),
    ]


def experiments() -> list[Experiment]:
    small = dict(batch=SMALL_BATCH, local_steps=SMALL_BATCH_STEPS, group="federated")
    h10 = dict(small, local_steps=10)
    sync = dict(kind="parallel", batch=SMALL_BATCH, group="synchronous")
    every, central = f"8 x batch {SMALL_BATCH}, every step", dict(kind="central", group="centralized")
    rows = [  # name, label, args, inner optimizer, how it runs
        ("centralized", "centralized, batch 12", [], "AdamW", central),
        ("centralized_muon", "centralized, batch 12", MUON, "Muon", central),
        ("centralized_parallel_b1", every, [], "AdamW", sync),
        ("centralized_parallel_b1_muon", every, MUON, "Muon", sync),
        ("diloco_iid_b1", "DiLoCo, IID, fp32", ["--iid", *DILOCO], "AdamW", small),
        ("muloco_iid_b1", "MuLoCo, IID, fp32", ["--iid", *DILOCO, *MUON], "Muon", small),
        ("muloco_iid_b1_seed2", "MuLoCo, IID, fp32, seed 2", ["--iid", *DILOCO, *MUON, SEED2], "Muon", small),
        (
            "streaming_iid_b1",
            "DiLoCo, IID, 4 fragments, int4",
            ["--iid", *DILOCO, *STREAMING],
            "AdamW",
            small,
        ),
        ("sparse_iid_b1", "FedAvg, IID, sparse 2%", ["--iid", *SPARSE], "AdamW", small),
        ("muloco_sparse_iid_b1", "FedAvg, IID, sparse 2%", ["--iid", *SPARSE, *MUON], "Muon", small),
        (
            "muloco_sparse_iid_b1_seed2",
            "FedAvg, IID, sparse 2%, seed 2",
            ["--iid", *SPARSE, *MUON, SEED2],
            "Muon",
            small,
        ),
        # The same tokens in 300 rounds of 10 local steps (2.5 times the syncs and the bytes): DiLoCo's best
        # local steps on the frontier at batch 4 (5 was unstable under its outer momentum).
        ("muloco_iid_b1_h10", "MuLoCo, IID, fp32, 300 x 10", ["--iid", *DILOCO, *MUON], "Muon", h10),
        *momentum_rows(small),
        ("diloco_contiguous_b1", "DiLoCo, contiguous, fp32", [*CONTIGUOUS, *DILOCO], "AdamW", small),
        ("muloco_contiguous_b1", "MuLoCo, contiguous, fp32", [*CONTIGUOUS, *DILOCO, *MUON], "Muon", small),
        (
            "muloco_contiguous_b1_seed2",
            "MuLoCo, contiguous, fp32, seed 2",
            [*CONTIGUOUS, *DILOCO, *MUON, SEED2],
            "Muon",
            small,
        ),
        (
            "diloco_contiguous_b1_m05",
            "DiLoCo, contiguous, outer momentum 0.5",
            [*CONTIGUOUS, *DILOCO, "--fed.server_momentum=0.5"],
            "AdamW",
            small,
        ),
    ]
    return [Experiment(name, label, args, method=method, **how) for name, label, args, method, how in rows]


def table(res: list[dict]) -> str:
    sync = [r for r in res if r["group"] == "synchronous"]
    best = min(sync, key=lambda r: r["final_val_loss"]) if sync else None
    vs = f"vs {best['label']}, {best['method']}" if best else "vs synchronous"
    lines = [
        f"| run | inner optimizer | final val loss | {vs} | uplink MB per client | MB both ways | wall (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res:
        diff = f"{r['final_val_loss'] - best['final_val_loss']:+.4f}" if best and r is not best else "-"
        up = "-" if r.get("uplink_mb_per_client") is None else f"{r['uplink_mb_per_client']:.1f}"
        both = "-" if r["mb_per_client"] is None else f"{r['mb_per_client']:.1f}"
        lines.append(
            f"| {r['label']} | {r['method']} | {r['final_val_loss']:.4f} | {diff} | {up} | {both} | "
            f"{r['wall_s']:.0f} |"
        )
    return "\n".join(lines + ["", "Commands:", ""] + commands(res))


def plot(res: list[dict], path: Path) -> None:
    """Final central val loss against the megabytes one client sends over the run; synchronous runs as
    lines."""
    plt, fig, ax = axes((9, 5))
    for r in res:
        if r["group"] == "federated":
            ax.scatter(r["uplink_mb_per_client"], r["final_val_loss"], label=f"{r['label']}, {r['method']}")
        elif r["group"] == "synchronous":
            style = "-" if r["method"] == "AdamW" else "--"
            ax.axhline(
                r["final_val_loss"], color="gray", linestyle=style, label=f"{r['label']}, {r['method']}"
            )
    loss_against_bytes(ax, "MB one client sends over the run (log)")
    save(plt, fig, ax, path)


def render(res: list[dict], a: argparse.Namespace, doc: Path) -> str:
    return with_figure(
        table(res), plot, res, doc, "lowcomm.png", "final val loss against uplink bytes per client"
    )
