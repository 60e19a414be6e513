"""What the benchmarks share: the app directory they run fedgpt's entry points from, a logged subprocess, a
simulation's rows, the model's size on the wire, the plays the fine-tuning tables train on, the command
lines under the results tables, and the marked blocks of the documents they rewrite."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedgpt.download import download_shakespeare
from fedgpt.fed.rounds import RoundRow, read_rounds
from fedgpt.files import atomic_write_bytes

# Flower kept offline and quiet: no telemetry, no update check, no `uv sync` of the app's dependencies at run
# time.
QUIET = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def app_dir(path: str | Path = ".") -> Path:
    """The fedgpt Flower app directory (pyproject.toml with [tool.flwr.app], simulate.py), where `flwr run .`
    and
    `python simulate.py` work; the benchmarks run them as a user would."""
    root = Path(path).resolve()
    pyproject = root / "pyproject.toml"
    if not (
        (root / "simulate.py").is_file()
        and pyproject.is_file()
        and "[tool.flwr.app]" in pyproject.read_text()
    ):
        raise ValueError(
            f"{root} is not the fedgpt app directory (pyproject.toml with [tool.flwr.app], simulate.py): run "
            "the benchmark from the fedgpt checkout, or pass --app-dir"
        )
    return root


def commit(path: str | Path = ".") -> str | None:
    """The git commit of the checkout at `path` ("-dirty" when its tracked files differ from it), or None
    outside a git checkout: what a benchmark's figures were measured at."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def markers(name: str) -> tuple[str, str]:
    """The comments around a rendered block of a document: <!-- name:start --> and <!-- name:end -->."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_doc(doc: Path, block: str, marks: tuple[str, str] = markers("results")) -> None:
    """Replace the block between the markers of `doc` (a new document gets just a title and the block)."""
    start, end = marks
    text = doc.read_text() if doc.is_file() else f"# Results\n\n{start}\n{end}\n"
    if start not in text or end not in text:
        raise ValueError(f"{doc} lacks the {start} / {end} markers: add them where the table belongs")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    atomic_write_bytes(doc, f"{head}{start}\n{block}\n{end}{tail}".encode())


def run_logged(cmd: list[str], log: Path, cwd: Path, timeout: float | None = None) -> tuple[float, float]:
    """Run `cmd` in `cwd` with Flower kept quiet, its output into `log`; (Unix start time, wall seconds).

    A non-zero exit raises RuntimeError naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with log.open("w") as f:
        rc = subprocess.run(
            cmd, cwd=cwd, env={**os.environ, **QUIET}, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} exited with {rc}; its output is in {log}")
    return t0, time.time() - t0


@dataclass
class SimRun:
    rows: list[RoundRow]  # rounds.jsonl, round 0 (the initial evaluation) first
    launched_at: float  # Unix time the command was started
    wall_s: float
    log: Path

    @property
    def rounds(self) -> list[RoundRow]:
        return [r for r in self.rows if r.round > 0]


def run_simulate_py(app: Path, args: list[str], out_dir: Path, log: Path, timeout: float = 3600) -> SimRun:
    """`python simulate.py ARGS --train.out_dir=OUT_DIR` in the app directory; its rounds."""
    t0, wall = run_logged(
        [sys.executable, "simulate.py", *args, f"--train.out_dir={out_dir}"], log, app, timeout
    )
    return SimRun(read_rounds(out_dir / "rounds.jsonl"), t0, wall, log)


def sim_args(a: argparse.Namespace) -> list[str]:
    return [
        "--config",
        str(Path(a.config).resolve()),
        f"--fed.num_clients={a.num_clients}",
        f"--fed.rounds={a.rounds}",
        f"--fed.local_steps={a.local_steps}",
    ]


def wire_params(cfg) -> int:
    """Floating-point values of the model that cfg builds, as they cross the wire (tied weights once)."""
    from fedgpt.data import load_dataset
    from fedgpt.fed.wire import tied_aliases
    from fedgpt.train import build_model

    tok = load_dataset(cfg.data).tokenizer
    model = build_model(cfg, tok.meta(), tok.vocab_size)
    aliases = tied_aliases(model)
    return sum(v.numel() for k, v in model.state_dict().items() if k not in aliases and v.is_floating_point())


def write_plays(a: argparse.Namespace, app: Path, folder: Path, groups: dict[str, str]) -> None:
    """Tiny Shakespeare's plays grouped as text files <folder>/<group>.txt (python -m fedgpt.fed.plays,
    `groups`: name -> plays in corpus order, "1,5,9"); the corpus downloaded first if missing and refused if
    it is another text (the plays' numbers are Tiny Shakespeare's); nothing done if every group's file is
    there."""
    if all((folder / f"{name}.txt").is_file() for name in groups):
        return
    corpus = download_shakespeare(Path(a.data_dir))
    cmd = [sys.executable, "-m", "fedgpt.fed.plays", str(corpus), str(folder)]
    for name, plays in groups.items():
        cmd += ["--group", f"{name}={plays}"]
    subprocess.run(cmd, cwd=app, check=True)


def commands(res: list[dict]) -> list[str]:
    """A line per run: its command, and where a run came from elsewhere, the note that says so."""
    return [f"- {r['name']}: `{r['command']}`" + (f" ({r['note']})" if r.get("note") else "") for r in res]
