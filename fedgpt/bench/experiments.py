"""The runs behind the results tables: what one is (an Experiment, with the fields its table groups and sorts
by), its command line, running it as a user would, and reading back what it left.

    cmd = command(e, a, overrides, out_dir, tc)     # python simulate.py ..., python -m fedgpt.local_train ...
    info = run(e, a, overrides, tc, app)            # in a subprocess, from the app directory
    save_record(runs_dir / e.name, records_dir / e.name)  # what the tables read of it, kept in git
    res = collect(e, records_dir)                   # its curve, final and best loss, bytes; None if not run

At equal tokens (the main table, the frontier, stragglers) every run trains on clients x rounds x local_steps
x the batch: centralized runs take that many steps of the batch ("central"; "parallel": rounds x local_steps
steps of clients x the batch, the federation's parallelism), and a run with a smaller batch takes as many more
steps. A run of kind "own" sets its own clients, rounds and steps in its args.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fedgpt.bench.common import run_logged
from fedgpt.config import TrainConfig
from fedgpt.fed.rounds import read_rounds
from fedgpt.files import atomic_write_bytes
from fedgpt.metrics import read_jsonl
from fedgpt.train import Schedule

KINDS = ("federated", "central", "parallel", "own", "own-central")


@dataclass
class Experiment:
    name: str
    label: str  # its row's label
    args: list[str] = field(default_factory=list)  # flags for simulate.py, or for fedgpt.local_train
    kind: str = "federated"  # one of KINDS
    batch: int | None = None  # windows per step, when not the config's; steps grow to keep the tokens equal
    local_steps: int | None = None  # local steps per round, with rounds to match (the frontier)
    group: str = ""  # what a table groups rows by: a strategy ("FedAvg"), a split ("role")
    method: str = ""  # and tells rows apart by within a group ("fedsgd", "dp_eps8")


def command(
    e: Experiment, a: argparse.Namespace, overrides: list[str], out_dir: Path, tc: TrainConfig
) -> list[str]:
    """The run's command line; `tc` is the config's train section."""
    if e.kind in ("own", "own-central"):  # its own clients, rounds and steps; overrides last, to shrink them
        entry = ["simulate.py"] if e.kind == "own" else ["-m", "fedgpt.local_train"]
        return [
            sys.executable,
            *entry,
            "--config",
            a.config,
            *e.args,
            *overrides,
            f"--train.out_dir={out_dir}",
        ]
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
        # sized). Warm-up takes the federation's share of the steps.
        return [
            *local_train,
            f"--train.batch_size={a.num_clients * batch}",
            f"--train.max_steps={seq_steps}",
            f"--train.warmup_steps={Schedule.of(tc, seq_steps).warmup}",
            "--train.lr_decay_steps=0",
            f"--train.eval_interval={a.local_steps}",
            f"--train.eval_iters={math.ceil(tc.eval_iters / a.num_clients)}",
        ]
    if e.kind == "central":
        steps = a.num_clients * seq_steps
        return [
            *local_train,
            f"--train.batch_size={batch}",
            f"--train.max_steps={steps}",
            "--train.lr_decay_steps=0",
        ]
    local_steps = e.local_steps or a.local_steps * tc.batch_size // batch
    if seq_steps % local_steps:
        raise ValueError(
            f"{e.name}: {local_steps} local steps do not divide the {seq_steps} steps of each client"
        )
    return [
        *(sys.executable, "simulate.py", "--config", a.config, *run_args, f"--train.batch_size={batch}"),
        *("--num-clients", str(a.num_clients), "--rounds", str(seq_steps // local_steps)),
        *("--local-steps", str(local_steps)),
    ]


def as_shown(cmd: list[str], app: Path) -> str:
    """A command line as its record keeps it: `python`, and paths inside the app directory relative to it."""
    return " ".join(["python", *cmd[1:]]).replace(str(app) + "/", "")


def run(e: Experiment, a: argparse.Namespace, overrides: list[str], tc: TrainConfig, app: Path) -> dict:
    """Run `e` in a subprocess from the app directory, into <runs-dir>/<name>; what it was and how long it
    took (experiment.json there)."""
    out_dir = Path(a.runs_dir).resolve() / e.name
    cmd = command(e, a, overrides, out_dir, tc)
    print(f"[{e.name}] {' '.join(cmd[1:])}", flush=True)
    _, wall = run_logged(cmd + ["--overwrite"], out_dir / "run.log", app)
    info = {
        "name": e.name,
        "command": as_shown(cmd, app),
        "wall_s": round(wall, 1),
    }
    atomic_write_bytes(out_dir / "experiment.json", json.dumps(info, indent=1).encode())
    print(f"[{e.name}] done in {wall:.0f} s", flush=True)
    return info


# What a record keeps of a finished run: what it was and how long it took, its config, its curve. No
# checkpoints and no logs: a record is small enough to commit, and collect reads nothing else.
RECORD_FILES = (
    "experiment.json",
    "run.json",
    "rounds.jsonl",
    "metrics.jsonl",
    "client_eval.jsonl",  # each client's scores, when the run scored its clients (personal models)
    "partition.json",  # who each client is (the speakers or roles it holds)
)


def save_record(run_dir: Path, record_dir: Path, extra: dict[str, bytes] | None = None) -> None:
    """Copy RECORD_FILES of the run in `run_dir` (and `extra`: name -> bytes) into `record_dir`, replacing an
    earlier record whole: written into a temporary folder beside it and renamed into place, so a record is
    never half of one run and half of another."""
    if not (run_dir / "experiment.json").is_file():
        raise ValueError(f"{run_dir} holds no finished run (experiment.json): run it before recording it")
    record_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=record_dir.parent, prefix=f".{record_dir.name}.", suffix=".tmp"))
    old = record_dir.with_name(f".{record_dir.name}.old")
    try:
        tmp.chmod(0o755)
        for name in RECORD_FILES:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, tmp / name)
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
        shutil.rmtree(old, ignore_errors=True)
        if record_dir.exists():
            record_dir.rename(old)
        tmp.rename(record_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not record_dir.exists():
            old.rename(record_dir)  # the earlier record back
        raise
    shutil.rmtree(old, ignore_errors=True)


def collect(e: Experiment, runs_dir: Path) -> dict | None:
    """A finished run's figures, from its run folder or its record under `runs_dir`, or None if there is
    none."""
    d = runs_dir / e.name
    if not (d / "experiment.json").is_file():
        return None
    info = json.loads((d / "experiment.json").read_text())
    federated = (d / "rounds.jsonl").is_file()
    extra = federated_figures(d) if federated else {"rounds": None, "mb_per_client": None}
    if federated:
        rows = read_rounds(d / "rounds.jsonl")
        curve = [(r.tokens, r.val_loss) for r in rows if r.val_loss is not None]
        accuracy = [r.val_accuracy for r in rows if r.val_loss is not None]
    else:
        rows = read_jsonl(d / "metrics.jsonl")
        curve = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        accuracy = [r.get("val_accuracy") for r in rows if r.get("val_loss") is not None]
    if not curve:
        return None
    return {
        **info,
        **extra,
        "label": e.label,
        "group": e.group,
        "method": e.method,
        "local_steps": e.local_steps,
        "final_val_loss": curve[-1][1],
        "final_val_accuracy": accuracy[-1],
        "best_val_loss": min(v for _, v in curve),
        "tokens": curve[-1][0],
        "curve": curve,
    }


def federated_figures(run_dir: Path) -> dict:
    """Rounds, the megabytes one client sends and receives over the run (and sends alone), the last epsilon,
    the update norm."""
    rows = [r for r in read_rounds(run_dir / "rounds.jsonl") if r.round > 0]
    trained = [r for r in rows if r.clients_ok]
    up = sum(r.bytes_received / r.clients_ok for r in trained)
    mb = up + sum(r.bytes_sent / (r.clients_ok + r.clients_failed) for r in trained)
    norms = [r.update_norm for r in trained if r.update_norm is not None]
    last = rows[-1] if rows else None
    private = last is not None and last.clients_ok is None  # a DP run publishes no cohort, bytes or tokens
    return {
        "rounds": len(rows) if private else len(trained),
        "mb_per_client": None if private else mb / 1e6,
        "uplink_mb_per_client": None if private else up / 1e6,
        "epsilon": last.dp_epsilon if last else None,
        "epsilon_pld": last.dp_epsilon_pld if last else None,
        "update_norm": norms[len(norms) // 2] if norms else None,  # the middle round's median
    }
