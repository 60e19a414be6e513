"""The main results table: centralized training against federated strategies at equal training tokens, and
the stragglers table (Li et al. 2020's systems heterogeneity), which compares its rows the same way.

    python -m fedgpt.results                   # the main table and its plot, every run on the CPU config
    python -m fedgpt.results --stragglers
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from fedgpt.bench.common import commands
from fedgpt.bench.experiments import Experiment
from fedgpt.bench.plots import axes, save, with_figure

# DiLoCo as the results use it: the outer Nesterov step at the paper's lr 0.7 and momentum 0.9, clients
# keeping their AdamW state; at batch 1 (many sequential steps for the same tokens), 25 local steps a round.
DILOCO = ["--strategy", "diloco"]
MUON = ["--train.optimizer=muon"]  # Muon for the blocks' matrices, AdamW for the rest (fedgpt/optim.py)
SMALL_BATCH, SMALL_BATCH_STEPS = 1, 25
SPEAKER, CONTIGUOUS, DIRICHLET = (
    ["--non-iid", "speaker"],
    ["--non-iid", "contiguous"],
    ["--non-iid", "dirichlet"],
)


def central() -> list[Experiment]:
    b = f"batch {SMALL_BATCH}"
    return [
        Experiment("centralized", "centralized (local trainer)", kind="central"),
        Experiment(
            "centralized_lr1e-3",
            "centralized, nanoGPT's lr 1e-3",
            ["--train.learning_rate=1e-3", "--train.min_lr=1e-4"],
            kind="central",
        ),
        Experiment(
            "centralized_parallel",
            "centralized, clients x the batch for rounds x local steps",
            kind="parallel",
        ),
        Experiment("centralized_b1", f"centralized, {b}", kind="central", batch=SMALL_BATCH),
        Experiment(
            "centralized_parallel_b1", f"centralized, clients x {b}", kind="parallel", batch=SMALL_BATCH
        ),
    ]


def federated() -> list[Experiment]:
    small, b = dict(batch=SMALL_BATCH, local_steps=SMALL_BATCH_STEPS), f"batch {SMALL_BATCH}"
    fedavg = ["--strategy", "fedavg"]
    return [
        Experiment(
            "fedavg_iid_reset",
            "FedAvg, IID, client AdamW reset each round",
            ["--iid", *fedavg, "--fed.client_optimizer=reset"],
        ),
        Experiment("fedavg_iid", "FedAvg, IID", ["--iid", *fedavg]),
        Experiment("diloco_iid_b12", "DiLoCo, IID", ["--iid", *DILOCO]),
        Experiment("fedavg_iid_b1", f"FedAvg, IID, {b}", ["--iid", *fedavg], **small),
        Experiment("diloco_iid_b1", f"DiLoCo, IID, {b}", ["--iid", *DILOCO], **small),
        Experiment(
            "diloco_iid_b1_seed2", f"DiLoCo, IID, {b}, seed 2", ["--iid", *DILOCO, "--train.seed=2"], **small
        ),
        Experiment("diloco_speaker_b1", f"DiLoCo, non-IID (speaker), {b}", [*SPEAKER, *DILOCO], **small),
        Experiment(
            "diloco_contiguous_b1", f"DiLoCo, non-IID (contiguous), {b}", [*CONTIGUOUS, *DILOCO], **small
        ),
        Experiment("fedavg_speaker", "FedAvg, non-IID (speaker)", [*SPEAKER, *fedavg]),
        Experiment("fedavg_contiguous", "FedAvg, non-IID (contiguous)", [*CONTIGUOUS, *fedavg]),
        Experiment(
            "fedprox_contiguous", "FedProx mu=0.01, non-IID (contiguous)", [*CONTIGUOUS, "--mu", "0.01"]
        ),
        Experiment("fedavg_dirichlet", "FedAvg, Dirichlet sizes, weighted by data", [*DIRICHLET, *fedavg]),
        Experiment(
            "fedavg_dirichlet_trained",
            "FedAvg, Dirichlet sizes, weighted by tokens trained (equal)",
            [*DIRICHLET, *fedavg, "--fed.weighting=trained"],
        ),
        *[
            Experiment(
                f"fedprox_speaker_mu{mu}", f"FedProx mu={mu}, non-IID (speaker)", [*SPEAKER, "--mu", mu]
            )
            for mu in ("0.001", "0.01", "0.1")
        ],
        Experiment("fedadam_speaker", "FedAdam, non-IID (speaker)", [*SPEAKER, "--strategy", "fedadam"]),
        Experiment("fedyogi_speaker", "FedYogi, non-IID (speaker)", [*SPEAKER, "--strategy", "fedyogi"]),
    ]


def experiments() -> list[Experiment]:
    return central() + federated()


# A share of each round's clients on the speaker split runs 1 to 24 of its 25 steps; FedAvg drops them (the
# paper's baseline) or averages their partial work (FedProx with mu 0), and FedProx at STRAGGLER_MU averages
# it. The 90% rows run again at SEED2, whose figures the table shows beside the first seed's.
STRAGGLER_MU = "0.01"
SEED2 = "2"


def stragglers() -> list[Experiment]:
    fedavg = [*SPEAKER, "--strategy", "fedavg"]
    rows = [Experiment("straggle0_fedavg", "FedAvg, no stragglers", fedavg)]
    for pct in (50, 90):
        share = f"--fed.stragglers={pct / 100}"
        rows += [
            Experiment(
                f"straggle{pct}_fedavg_drop",
                f"FedAvg, {pct}% stragglers dropped",
                [*fedavg, share, "--fed.straggler_policy=drop"],
            ),
            Experiment(
                f"straggle{pct}_fedavg_accept",
                f"FedProx mu=0, {pct}% stragglers' partial work",
                [*fedavg, share],
            ),
            Experiment(
                f"straggle{pct}_fedprox",
                f"FedProx mu={STRAGGLER_MU}, {pct}% stragglers' partial work",
                [*SPEAKER, "--mu", STRAGGLER_MU, share],
            ),
        ]
    return rows + [
        replace(
            e,
            name=f"{e.name}_seed{SEED2}",
            label=f"{e.label}, seed {SEED2}",
            args=[*e.args, f"--train.seed={SEED2}"],
            group=f"seed {SEED2}",
        )
        for e in rows
        if e.name.startswith("straggle90_")
    ]


def table(res: list[dict], a: argparse.Namespace) -> str:
    """Each run's losses against the centralized run's, or when there is none (stragglers) the first run's."""
    base = next((r for r in res if r["name"] == "centralized"), res[0] if res else None)
    vs = "centralized" if base and base["name"] == "centralized" else "the first row"
    lines = [
        f"| run | final val loss | vs {vs} | best val loss | tokens (M) | MB per client | wall (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res:
        diff = f"{r['final_val_loss'] - base['final_val_loss']:+.4f}" if base and r is not base else "-"
        mb = "-" if r["mb_per_client"] is None else f"{r['mb_per_client']:.0f}"
        lines.append(
            f"| {r['label']} | {r['final_val_loss']:.4f} | {diff} | {r['best_val_loss']:.4f} | "
            f"{r['tokens'] / 1e6:.3f} | {mb} | {r['wall_s']:.0f} |"
        )
    lines += [
        "",
        f"Config `{a.config}`; federated runs: {a.num_clients} clients x {a.rounds} rounds x {a.local_steps} "
        "local steps at the config's batch, or as many more steps of a smaller batch; centralized: "
        f"{a.num_clients * a.rounds * a.local_steps} steps; centralized with the federation's parallelism: "
        f"{a.rounds * a.local_steps} steps of {a.num_clients}x the batch. Commands:",
        "",
    ]
    return "\n".join(lines + commands(res))


def stragglers_table(res: list[dict], a: argparse.Namespace, doc: Path) -> str:
    """The first seed's rows as the main table shows runs, then the 90% rows on both seeds, each against the
    run that drops the stragglers on its seed."""
    first = [r for r in res if not r["group"]]
    second = {r["name"].removesuffix(f"_seed{SEED2}"): r for r in res if r["group"]}
    pairs = [(r, second[r["name"]]) for r in first if r["name"] in second]
    if not pairs:
        return table(first, a)
    drop = "straggle90_fedavg_drop"
    drops = (next((r for r in first if r["name"] == drop), None), second.get(drop))

    def vs(r: dict, dropped: dict | None) -> str:
        if dropped is None or r is dropped:
            return "-"
        return f"{r['final_val_loss'] - dropped['final_val_loss']:+.4f}"

    lines = [
        "",
        f"The 90% rows again at `--train.seed={SEED2}`, each against the run that drops the stragglers on "
        "the same seed:",
        "",
        f"| 90% stragglers | final val loss, config's seed | vs dropped | final val loss, seed {SEED2} | "
        "vs dropped |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r1, r2 in pairs:
        lines.append(
            f"| {r1['label'].replace('90% ', '')} | {r1['final_val_loss']:.4f} | {vs(r1, drops[0])} | "
            f"{r2['final_val_loss']:.4f} | {vs(r2, drops[1])} |"
        )
    lines += ["", f"Seed {SEED2}'s commands:", "", *commands([r2 for _, r2 in pairs])]
    return table(first, a) + "\n" + "\n".join(lines)


def plot(res: list[dict], path: Path) -> None:
    """Central val loss against training tokens, one curve per run."""
    plt, fig, ax = axes((11, 5))
    for i, r in enumerate(res):
        xs, ys = zip(*r["curve"])
        style = "-" if "centralized" in r["name"] else "--"
        color = plt.cm.tab20(i % 20)  # 20 colours: the table's rows do not share one
        ax.plot([x / 1e6 for x in xs], ys, marker=".", label=r["label"], linestyle=style, color=color)
    ax.set_xlabel("training tokens (millions, all clients)")
    ax.set_ylabel("central val loss")
    later = [y for r in res for _, y in r["curve"][1:]]
    if later:  # the initial loss (~4.2) would squash the part worth seeing
        ax.set_ylim(top=max(later) + 0.05)
    save(plt, fig, ax, path)


def render(res: list[dict], a: argparse.Namespace, doc: Path) -> str:
    return with_figure(
        table(res, a), plot, res, doc, "val_vs_tokens.png", "central val loss against training tokens"
    )
