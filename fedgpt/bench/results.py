"""The results: centralized training against federated strategies at equal training tokens, and the
communication/quality frontier.

    python -m fedgpt.results                        # the main table, every run below on the CPU config
    python -m fedgpt.results --frontier             # final loss against bytes sent, local steps 5 to 125
    python -m fedgpt.results --only fedavg_iid      # rerun one; the table keeps the others' saved runs

Each run is the real entry point in a subprocess (`python -m fedgpt.local_train`, `python simulate.py`),
writing to <runs-dir>/<name>. Every run trains on the same number of tokens: clients x rounds x local_steps
x the batch. Centralized runs take that many steps of the batch (one takes rounds x local_steps steps of
clients x the batch, the federation's parallelism); a run with another batch size (--train.batch_size)
takes as many more steps as its batch is smaller. The table between the markers of the results document and
the plot are rewritten; the rest of the document (the discussion) is left as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedgpt.bench import targets
from fedgpt.bench.common import app_dir, commands, run_logged
from fedgpt.checkpoint import load_checkpoint
from fedgpt.config import TrainConfig, load_config
from fedgpt.fed.privacy import DPState
from fedgpt.fed.rounds import read_rounds
from fedgpt.files import atomic_write, atomic_write_bytes
from fedgpt.metrics import read_jsonl

MARKERS = {
    "target": ("<!-- target:start -->", "<!-- target:end -->"),
    "main": ("<!-- results:start -->", "<!-- results:end -->"),
    "frontier": ("<!-- frontier:start -->", "<!-- frontier:end -->"),
    "privacy": ("<!-- privacy:start -->", "<!-- privacy:end -->"),
    "stragglers": ("<!-- stragglers:start -->", "<!-- stragglers:end -->"),
}
START, END = MARKERS["main"]


@dataclass
class Experiment:
    name: str
    label: str
    args: list[str] = field(default_factory=list)  # extra flags for simulate.py, or for fedgpt.local_train
    # "federated"; "central": the local trainer; "parallel": it, at the federation's parallelism
    kind: str = "federated"
    batch: int | None = None  # windows per step, when not the config's; steps grow to keep the tokens equal
    local_steps: int | None = None  # the frontier: local steps per round, with rounds to match


# DiLoCo as the results use it: one window per client step (many sequential steps for the same tokens), 25
# local steps a round, the outer Nesterov step at the paper's lr 0.7 and momentum 0.9, clients keeping their
# AdamW state.
DILOCO = ["--strategy", "diloco"]
SMALL_BATCH, SMALL_BATCH_STEPS = 1, 25


def experiments() -> list[Experiment]:
    speaker, contiguous, dirichlet = (
        ["--non-iid", "speaker"],
        ["--non-iid", "contiguous"],
        ["--non-iid", "dirichlet"],
    )
    small = dict(batch=SMALL_BATCH, local_steps=SMALL_BATCH_STEPS)
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
        Experiment(
            "fedavg_iid_reset",
            "FedAvg, IID, client AdamW reset each round",
            ["--iid", "--strategy", "fedavg", "--fed.client_optimizer=reset"],
        ),
        Experiment("fedavg_iid", "FedAvg, IID", ["--iid", "--strategy", "fedavg"]),
        Experiment("diloco_iid_b12", "DiLoCo, IID", ["--iid", *DILOCO]),
        Experiment("fedavg_iid_b1", f"FedAvg, IID, {b}", ["--iid", "--strategy", "fedavg"], **small),
        Experiment("diloco_iid_b1", f"DiLoCo, IID, {b}", ["--iid", *DILOCO], **small),
        Experiment(
            "diloco_iid_b1_seed2", f"DiLoCo, IID, {b}, seed 2", ["--iid", *DILOCO, "--train.seed=2"], **small
        ),
        Experiment("diloco_speaker_b1", f"DiLoCo, non-IID (speaker), {b}", [*speaker, *DILOCO], **small),
        Experiment(
            "diloco_contiguous_b1", f"DiLoCo, non-IID (contiguous), {b}", [*contiguous, *DILOCO], **small
        ),
        Experiment("fedavg_speaker", "FedAvg, non-IID (speaker)", [*speaker, "--strategy", "fedavg"]),
        Experiment(
            "fedavg_contiguous", "FedAvg, non-IID (contiguous)", [*contiguous, "--strategy", "fedavg"]
        ),
        Experiment(
            "fedprox_contiguous", "FedProx mu=0.01, non-IID (contiguous)", [*contiguous, "--mu", "0.01"]
        ),
        Experiment(
            "fedavg_dirichlet",
            "FedAvg, Dirichlet sizes, weighted by data",
            [*dirichlet, "--strategy", "fedavg"],
        ),
        Experiment(
            "fedavg_dirichlet_trained",
            "FedAvg, Dirichlet sizes, weighted by tokens trained (equal)",
            [*dirichlet, "--strategy", "fedavg", "--fed.weighting=trained"],
        ),
        *[
            Experiment(
                f"fedprox_speaker_mu{mu}", f"FedProx mu={mu}, non-IID (speaker)", [*speaker, "--mu", mu]
            )
            for mu in ("0.001", "0.01", "0.1")
        ],
        Experiment("fedadam_speaker", "FedAdam, non-IID (speaker)", [*speaker, "--strategy", "fedadam"]),
        Experiment("fedyogi_speaker", "FedYogi, non-IID (speaker)", [*speaker, "--strategy", "fedyogi"]),
    ]


# The frontier at batch 4: 750 steps per client, in rounds of 5 to 125 local steps.
FRONTIER_BATCH, FRONTIER_STEPS = 4, (5, 10, 25, 50, 125)


def frontier() -> list[Experiment]:
    """FedAvg and DiLoCo at FRONTIER_STEPS local steps per round (rounds to match) at FRONTIER_BATCH."""
    return [
        Experiment(
            f"frontier_{name}_h{h}",
            f"{label}, {h} local steps",
            ["--iid", *args],
            batch=FRONTIER_BATCH,
            local_steps=h,
        )
        for name, label, args in (
            ("fedavg", "FedAvg", ["--strategy", "fedavg"]),
            ("diloco", "DiLoCo", DILOCO),
        )
        for h in FRONTIER_STEPS
    ]


# Client-level DP at the main table's budget (8 clients, IID, 10 rounds x 25 steps): unweighted FedAvg without
# DP, with its updates clipped but (almost) no noise, and at epsilon 8 and 1 (delta 1e-5). DP_CLIP is about
# the median update norm of the run without DP (update_norm in its rounds.jsonl): clipping at the median keeps
# half of each round's updates whole.
DP_CLIP = 4.0


def privacy() -> list[Experiment]:
    base, clip = ["--iid", "--strategy", "fedavg", "--fed.weighting=uniform"], f"--dp.clipping_norm={DP_CLIP}"
    return [
        Experiment("dp_none", "FedAvg, IID, unweighted, no DP", base),
        Experiment(
            "dp_clip",
            f"clipped to {DP_CLIP}, noise multiplier 1e-6",
            [*base, clip, "--dp.noise_multiplier=1e-6"],
        ),
        Experiment("dp_eps8", f"clipped to {DP_CLIP}, epsilon 8", [*base, clip, "--dp.target_epsilon=8"]),
        Experiment("dp_eps1", f"clipped to {DP_CLIP}, epsilon 1", [*base, clip, "--dp.target_epsilon=1"]),
    ]


# Li et al. 2020's systems heterogeneity on the speaker split: a share of each round's clients runs 1 to 24 of
# its 25 steps; FedAvg drops them (the paper's baseline) or averages their partial work (FedProx with mu 0),
# and FedProx at STRAGGLER_MU averages it too.
STRAGGLER_MU = "0.01"


def stragglers() -> list[Experiment]:
    speaker = ["--non-iid", "speaker"]
    rows = [Experiment("straggle0_fedavg", "FedAvg, no stragglers", [*speaker, "--strategy", "fedavg"])]
    for pct in (50, 90):
        share = f"--fed.stragglers={pct / 100}"
        rows += [
            Experiment(
                f"straggle{pct}_fedavg_drop",
                f"FedAvg, {pct}% stragglers dropped",
                [*speaker, "--strategy", "fedavg", share, "--fed.straggler_policy=drop"],
            ),
            Experiment(
                f"straggle{pct}_fedavg_accept",
                f"FedProx mu=0, {pct}% stragglers' partial work",
                [*speaker, "--strategy", "fedavg", share],
            ),
            Experiment(
                f"straggle{pct}_fedprox",
                f"FedProx mu={STRAGGLER_MU}, {pct}% stragglers' partial work",
                [*speaker, "--mu", STRAGGLER_MU, share],
            ),
        ]
    return rows


def command(
    e: Experiment, a: argparse.Namespace, overrides: list[str], out_dir: Path, tc: TrainConfig
) -> list[str]:
    """The run's command line; `tc` is the config's train section."""
    batch = e.batch or tc.batch_size
    if tc.batch_size % batch:
        raise ValueError(
            f"{e.name}: batch {batch} must divide the config's {tc.batch_size} to keep tokens equal"
        )
    seq_steps = a.rounds * a.local_steps * tc.batch_size // batch  # each client's steps
    run_args = [*overrides, *e.args, f"--train.out_dir={out_dir}"]
    local_train = [sys.executable, "-m", "fedgpt.local_train", "--config", a.config, *run_args]
    if e.kind == "parallel":
        # What synchronous data parallelism over the clients does with the same tokens; evaluated once per
        # "round", on about as many val windows as the other runs (evaluation batches are training-batch
        # sized).
        warmup = round(tc.warmup_steps * seq_steps / max(1, tc.max_steps))  # the federation's share
        return [
            *local_train,
            f"--train.batch_size={a.num_clients * batch}",
            f"--train.max_steps={seq_steps}",
            f"--train.warmup_steps={warmup}",
            "--train.lr_decay_steps=0",
            f"--train.eval_interval={a.local_steps}",
            f"--train.eval_iters={math.ceil(tc.eval_iters / a.num_clients)}",
        ]
    if e.kind == "target":  # its own clients, rounds and steps; overrides last, so that they can shrink them
        return [
            sys.executable,
            "simulate.py",
            "--config",
            a.config,
            *e.args,
            *overrides,
            f"--train.out_dir={out_dir}",
        ]
    if e.kind == "central":
        return [
            *local_train,
            f"--train.batch_size={batch}",
            f"--train.max_steps={a.num_clients * seq_steps}",
            "--train.lr_decay_steps=0",
        ]
    local_steps = e.local_steps or a.local_steps * tc.batch_size // batch
    if seq_steps % local_steps:
        raise ValueError(
            f"{e.name}: {local_steps} local steps do not divide the {seq_steps} steps of each client"
        )
    return [
        sys.executable,
        "simulate.py",
        "--config",
        a.config,
        *run_args,
        f"--train.batch_size={batch}",
        "--num-clients",
        str(a.num_clients),
        "--rounds",
        str(seq_steps // local_steps),
        "--local-steps",
        str(local_steps),
    ]


def run(e: Experiment, a: argparse.Namespace, overrides: list[str], tc: TrainConfig, app: Path) -> dict:
    out_dir = Path(a.runs_dir).resolve() / e.name
    cmd = command(e, a, overrides, out_dir, tc)
    print(f"[{e.name}] {' '.join(cmd[1:])}", flush=True)
    _, wall = run_logged(cmd + ["--overwrite"], out_dir / "run.log", app)
    info = {
        "name": e.name,
        "command": " ".join(["python", *cmd[1:]]).replace(str(app) + "/", ""),
        "wall_s": round(wall, 1),
    }
    atomic_write_bytes(out_dir / "experiment.json", json.dumps(info, indent=1).encode())
    print(f"[{e.name}] done in {wall:.0f} s", flush=True)
    return info


def collect(e: Experiment, runs_dir: Path) -> dict | None:
    """A finished run's figures, or None if it has not been run."""
    d = runs_dir / e.name
    if not (d / "experiment.json").is_file():
        return None
    info = json.loads((d / "experiment.json").read_text())
    if e.kind in ("federated", "target"):
        rows = read_rounds(d / "rounds.jsonl")
        curve = [(r.tokens, r.val_loss) for r in rows if r.val_loss is not None]
        trained = [r for r in rows if r.round > 0 and r.clients_ok]
        # what one client sends and receives over the whole run
        mb = (
            sum(
                r.bytes_sent / (r.clients_ok + r.clients_failed) + r.bytes_received / r.clients_ok
                for r in trained
            )
            / 1e6
        )
        norms = [r.update_norm for r in trained if r.update_norm is not None]
        extra = {
            "rounds": len(trained),
            "mb_per_client": mb,
            "epsilon": trained[-1].dp_epsilon if trained else None,
            "update_norm": norms[len(norms) // 2] if norms else None,  # the middle round's median
            "noise_multiplier": noise_multiplier(d),
        }
        if e.kind == "target":
            split, method = e.name.split("_")[1:]
            extra.update(
                targets.figures(d),
                split=split,
                method=method,
                method_label=e.label.split(", ")[0],
                split_label=e.label.split(", ")[-1],
            )
    else:
        rows = read_jsonl(d / "metrics.jsonl")
        curve = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        extra = {"rounds": None, "mb_per_client": None}
    if not curve:
        return None
    return {
        **info,
        **extra,
        "label": e.label,
        "final_val_loss": curve[-1][1],
        "best_val_loss": min(v for _, v in curve),
        "tokens": curve[-1][0],
        "curve": curve,
    }


def noise_multiplier(run_dir: Path) -> float | None:
    """The noise multiplier a DP run's last rounds were released at (its last.pt); None without DP."""
    ckpt = run_dir / "last.pt"
    saved = load_checkpoint(ckpt)["extra"].get("dp") if ckpt.is_file() else None
    return DPState.from_json(saved).noise_multiplier if saved else None


def privacy_table(res: list[dict]) -> str:
    lines = [
        "| run | noise multiplier | epsilon (delta 1e-5) | final val loss | best val loss | update norm |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in res:
        lines.append(
            f"| {r['label']} | {fmt(r['noise_multiplier'], '.4g')} | {fmt(r['epsilon'], '.3g')} | "
            f"{r['final_val_loss']:.4f} | {r['best_val_loss']:.4f} | {fmt(r['update_norm'], '.3f')} |"
        )
    lines += ["", "Commands:", ""] + commands(res)
    return "\n".join(lines)


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
    lines += commands(res)
    return "\n".join(lines)


def frontier_table(res: list[dict]) -> str:
    lines = [
        "| strategy | local steps | rounds | MB per client, whole run | final val loss | best val loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res:
        strategy, steps = r["label"].rsplit(", ", 1)
        lines.append(
            f"| {strategy} | {steps.split()[0]} | {r['rounds']} | {r['mb_per_client']:.0f} | "
            f"{r['final_val_loss']:.4f} | {r['best_val_loss']:.4f} |"
        )
    lines += ["", "Commands:", ""] + commands(res)
    return "\n".join(lines)


def _axes(figsize):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    return plt, fig, ax


def _save(plt, fig, ax, path: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1)
    )  # beside the axes: inside, it hides curves
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot(res: list[dict], path: Path) -> None:
    """Central val loss against training tokens, one curve per run."""
    plt, fig, ax = _axes((11, 5))
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
    _save(plt, fig, ax, path)


def plot_frontier(res: list[dict], path: Path) -> None:
    """Final central val loss against the megabytes one client sends and receives over the run."""
    plt, fig, ax = _axes((9, 5))
    for strategy in dict.fromkeys(r["label"].rsplit(", ", 1)[0] for r in res):
        pts = sorted(
            (r["mb_per_client"], r["final_val_loss"], r["label"].rsplit(", ", 1)[1].split()[0])
            for r in res
            if r["label"].startswith(strategy + ",")
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=strategy)
        for mb, val, steps in pts:
            ax.annotate(f"H={steps}", (mb, val), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("MB sent and received per client over the run (log)")
    ax.set_ylabel("final central val loss")
    _save(plt, fig, ax, path)


def write_doc(doc: Path, block: str, markers: tuple[str, str] = MARKERS["main"]) -> None:
    """Replace the block between the markers of `doc` (a new document gets just a title and the block)."""
    start, end = markers
    text = doc.read_text() if doc.is_file() else f"# Results\n\n{start}\n{end}\n"
    if start not in text or end not in text:
        raise ValueError(f"{doc} lacks the {start} / {end} markers: add them where the table belongs")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    atomic_write_bytes(doc, f"{head}{start}\n{block}\n{end}{tail}".encode())


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m fedgpt.results",
        description=__doc__.splitlines()[0],
        epilog="Any config field can be overridden for every run: --train.eval_iters=50",
    )
    p.add_argument(
        "--config", default="configs/shakespeare_char_cpu.yaml", help="YAML config (default: %(default)s)"
    )
    p.add_argument("--num-clients", type=int, default=8, help="clients (default: %(default)s)")
    p.add_argument(
        "--rounds", type=int, default=10, help="rounds at the config's batch (default: %(default)s)"
    )
    p.add_argument(
        "--local-steps",
        type=int,
        default=25,
        help="local steps per round at the config's batch (default: %(default)s)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--frontier", action="store_true", help="the frontier table instead of the main one")
    which.add_argument("--privacy", action="store_true", help="val loss without DP and at epsilon 8 and 1")
    which.add_argument(
        "--stragglers", action="store_true", help="50%% and 90%% stragglers: dropped, or their work kept"
    )
    which.add_argument(
        "--rounds-to-target",
        action="store_true",
        help="rounds to a target accuracy (FedSGD, "
        "FedAvg, DiLoCo; role split and IID) instead of the main table",
    )
    names = [e.name for exps in GROUPS.values() for e in exps()]
    p.add_argument(
        "--only", nargs="+", choices=names, metavar="NAME", help=f"run only these ({', '.join(names)})"
    )
    p.add_argument(
        "--no-run", action="store_true", help="run nothing: rewrite the table from the finished runs on disk"
    )
    p.add_argument("--runs-dir", default="results/runs", help="where each run writes (default: %(default)s)")
    p.add_argument("--app-dir", default=".", help="the fedgpt app directory (default: the current one)")
    p.add_argument(
        "--doc", default="docs/results.md", help="document whose table is rewritten (default: %(default)s)"
    )
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    a, overrides = parse_args(argv)
    if min(a.num_clients, a.rounds, a.local_steps) < 1:
        raise ValueError(
            "--num-clients, --rounds and --local-steps must be >= 1 "
            f"(got {a.num_clients}, {a.rounds}, {a.local_steps})"
        )
    tc = load_config(a.config, overrides).train  # a bad config or override fails here, before any run
    app = app_dir(a.app_dir)
    kind = next((k for k in ("frontier", "privacy", "stragglers") if getattr(a, k)), None)
    kind = kind or ("target" if a.rounds_to_target else "main")
    exps = GROUPS[kind]()
    for e in exps:
        if not a.no_run and (a.only is None or e.name in a.only):
            run(e, a, overrides, tc, app)
    runs_dir = Path(a.runs_dir).resolve()
    res = [r for e in exps if (r := collect(e, runs_dir)) is not None]
    doc = Path(a.doc)
    block = render(kind, res, a, doc)
    write_doc(doc, block, MARKERS[kind])
    atomic_write_bytes(runs_dir / f"results-{kind}.json", json.dumps(res, indent=1).encode())
    print(block)
    print(f"wrote {doc} and {runs_dir / f'results-{kind}.json'}")
    return res


GROUPS = {
    "main": experiments,
    "frontier": frontier,
    "target": lambda: targets.experiments(Experiment),
    "privacy": privacy,
    "stragglers": stragglers,
}


def render(kind: str, res: list[dict], a: argparse.Namespace, doc: Path) -> str:
    """One kind of table's block of the results document, with its plot (written beside the document)."""
    if kind == "target":
        return targets.table(res)
    if kind == "privacy":
        return privacy_table(res)
    if kind == "stragglers":
        return table(res, a)
    png = doc.parent / "results" / ("frontier.png" if kind == "frontier" else "val_vs_tokens.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    if kind == "frontier":
        plot_frontier(res, png)
        return (
            frontier_table(res)
            + f"\n\n![final val loss against bytes per client]({png.relative_to(doc.parent)})"
        )
    plot(res, png)
    return table(res, a) + f"\n\n![central val loss against training tokens]({png.relative_to(doc.parent)})"


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
