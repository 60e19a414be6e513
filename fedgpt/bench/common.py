"""What the benchmarks share: the app directory they run fedgpt's entry points from, a logged subprocess."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

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
