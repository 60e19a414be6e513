"""The results table: centralized training against federated strategies at equal training tokens.

    python -m fedgpt.results                       # every run below, on the CPU config
    python -m fedgpt.results --only fedavg_iid     # rerun one; the table keeps the others' saved runs

Each run is the real entry point in a subprocess (`python -m fedgpt.local_train`, `python simulate.py`),
writing to <runs-dir>/<name>. Centralized runs take clients x rounds x local_steps steps, so every run
trains on the same number of tokens. Federated runs keep the config's LR schedule shape: the warm-up is
scaled to the same share of their rounds x local_steps schedule. The table, between the markers of the
results document, and the plot are rewritten; the rest of the document (the discussion) is left as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from fedgpt.bench.common import app_dir, run_logged
from fedgpt.config import TrainConfig, load_config
from fedgpt.files import atomic_write, atomic_write_bytes
from fedgpt.metrics import read_jsonl

START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass
class Experiment:
    name: str
    label: str
    args: list[str]  # extra flags: for simulate.py, or for fedgpt.local_train when central
    central: bool = False
    # central, but with the federation's parallelism: clients x batch per step, rounds x local steps
    parallel: bool = False


def experiments() -> list[Experiment]:
    return [
        Experiment("centralized", "centralized (local trainer)", [], central=True),
        Experiment(
            "centralized_lr1e-3",
            "centralized, nanoGPT's lr 1e-3",
            ["--train.learning_rate=1e-3", "--train.min_lr=1e-4"],
            central=True,
        ),
        Experiment(
            "centralized_parallel",
            "centralized, clients x the batch for rounds x local steps",
            [],
            central=True,
            parallel=True,
        ),
        Experiment("fedavg_iid", "FedAvg, IID", ["--iid", "--strategy", "fedavg"]),
        Experiment(
            "fedavg_speaker", "FedAvg, non-IID (speaker)", ["--non-iid", "speaker", "--strategy", "fedavg"]
        ),
        *[
            Experiment(
                f"fedprox_speaker_mu{mu}",
                f"FedProx mu={mu}, non-IID (speaker)",
                ["--non-iid", "speaker", "--mu", str(mu)],
            )
            for mu in ("0.001", "0.01", "0.1")
        ],
        Experiment(
            "fedadam_speaker", "FedAdam, non-IID (speaker)", ["--non-iid", "speaker", "--strategy", "fedadam"]
        ),
        Experiment(
            "fedyogi_speaker", "FedYogi, non-IID (speaker)", ["--non-iid", "speaker", "--strategy", "fedyogi"]
        ),
    ]


def command(
    e: Experiment, a: argparse.Namespace, overrides: list[str], out_dir: Path, tc: TrainConfig
) -> list[str]:
    """The run's command line; `tc` is the config's train section."""
    seq_steps = a.rounds * a.local_steps  # steps of each client's schedule
    warmup = round(tc.warmup_steps * seq_steps / max(1, tc.max_steps))  # the same share of the schedule
    local_train = [sys.executable, "-m", "fedgpt.local_train", "--config", a.config, *overrides, *e.args]
    if e.parallel:
        # What synchronous data parallelism over the clients does with the same tokens; evaluated once per
        # "round", on about as many val windows as the other runs (evaluation batches are training-batch
        # sized).
        return local_train + [
            f"--train.batch_size={a.num_clients * tc.batch_size}",
            f"--train.max_steps={seq_steps}",
            f"--train.warmup_steps={warmup}",
            "--train.lr_decay_steps=0",
            f"--train.eval_interval={a.local_steps}",
            f"--train.eval_iters={math.ceil(tc.eval_iters / a.num_clients)}",
            f"--train.out_dir={out_dir}",
        ]
    if e.central:
        return local_train + [
            f"--train.max_steps={a.num_clients * seq_steps}",
            "--train.lr_decay_steps=0",
            f"--train.out_dir={out_dir}",
        ]
    return [
        sys.executable,
        "simulate.py",
        "--config",
        a.config,
        *overrides,
        *e.args,
        "--num-clients",
        str(a.num_clients),
        "--rounds",
        str(a.rounds),
        "--local-steps",
        str(a.local_steps),
        f"--train.warmup_steps={warmup}",
        f"--train.out_dir={out_dir}",
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
    rows = read_jsonl(d / ("metrics.jsonl" if e.central else "rounds.jsonl"))
    if not (d / "experiment.json").is_file() or not rows:
        return None
    info = json.loads((d / "experiment.json").read_text())
    curve = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    return {
        **info,
        "label": e.label,
        "final_val_loss": curve[-1][1],
        "best_val_loss": min(v for _, v in curve),
        "tokens": curve[-1][0],
        "curve": curve,
    }


def table(res: list[dict], a: argparse.Namespace) -> str:
    base = next((r for r in res if r["name"] == "centralized"), None)
    lines = [
        "| run | final val loss | vs centralized | best val loss | tokens (M) | wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res:
        diff = f"{r['final_val_loss'] - base['final_val_loss']:+.4f}" if base and r is not base else "-"
        lines.append(
            f"| {r['label']} | {r['final_val_loss']:.4f} | {diff} | {r['best_val_loss']:.4f} | "
            f"{r['tokens'] / 1e6:.3f} | {r['wall_s']:.0f} |"
        )
    lines += [
        "",
        f"Config `{a.config}`; federated runs: {a.num_clients} clients x {a.rounds} rounds x {a.local_steps} "
        f"local steps; centralized: {a.num_clients * a.rounds * a.local_steps} steps; centralized with the "
        f"federation's parallelism: {a.rounds * a.local_steps} steps of {a.num_clients}x the batch. "
        "Commands:",
        "",
    ]
    lines += [f"- {r['name']}: `{r['command']}`" for r in res]
    return "\n".join(lines)


def plot(res: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    for r in res:
        xs, ys = zip(*r["curve"])
        ax.plot(
            [x / 1e6 for x in xs],
            ys,
            marker=".",
            label=r["label"],
            linestyle="-" if "centralized" in r["name"] else "--",
        )
    ax.set_xlabel("training tokens (millions, all clients)")
    ax.set_ylabel("central val loss")
    later = [y for r in res for _, y in r["curve"][1:]]
    if later:  # the initial loss (~4.2) would squash the part worth seeing
        ax.set_ylim(top=max(later) + 0.05)
    ax.grid(alpha=0.3)
    # beside the axes: inside, it hides curves
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def write_doc(doc: Path, block: str) -> None:
    """Replace the block between the markers of `doc` (a new document gets just a title and the block)."""
    text = doc.read_text() if doc.is_file() else f"# Results\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        raise ValueError(f"{doc} lacks the {START} / {END} markers: add them where the table belongs")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    atomic_write_bytes(doc, f"{head}{START}\n{block}\n{END}{tail}".encode())


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
    p.add_argument("--rounds", type=int, default=10, help="rounds (default: %(default)s)")
    p.add_argument(
        "--local-steps", type=int, default=25, help="local steps per client per round (default: %(default)s)"
    )
    names = [e.name for e in experiments()]
    p.add_argument(
        "--only", nargs="+", choices=names, metavar="NAME", help=f"run only these ({', '.join(names)})"
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
    exps = experiments()
    for e in exps:
        if not a.only or e.name in a.only:
            run(e, a, overrides, tc, app)
    runs_dir = Path(a.runs_dir).resolve()
    res = [r for e in exps if (r := collect(e, runs_dir)) is not None]
    doc = Path(a.doc)
    png = doc.parent / "results" / "val_vs_tokens.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(res, png)
    block = table(res, a) + f"\n\n![central val loss against training tokens]({png.relative_to(doc.parent)})"
    write_doc(doc, block)
    atomic_write_bytes(runs_dir / "results.json", json.dumps(res, indent=1).encode())
    print(block)
    print(f"wrote {doc}, {png} and {runs_dir / 'results.json'}")
    return res


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
