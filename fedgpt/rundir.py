"""A run folder belongs to one run: another run with other settings is refused instead of overwriting it.

    claim_run_dir(cfg.train.out_dir, "local_train", cfg.to_dict(), resume=False, overwrite=False)

Every run first writes <out_dir>/run.json: its kind and its config. A later run may start in that folder
only if it is the same run (same kind, same config but for the run-neutral keys of fedgpt.config),
continues it (--resume), or is told to replace it (--overwrite, which removes the earlier run's outputs
first).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fedgpt.config import config_diff
from fedgpt.files import atomic_write_bytes

RUN_FILE = "run.json"
# What runs write into their folder; --overwrite removes these, and their presence marks a folder as a run's.
OUTPUTS = (
    "last.pt",
    "best.pt",
    "metrics.jsonl",
    "rounds.jsonl",
    "loss.png",
    "partition.json",
    "dp_ledger.json",
    "membership.jsonl",
    "client_eval.jsonl",
    "client_state",
    "tensorboard",
)


def claim_run_dir(
    out_dir: str | Path, kind: str, config: dict, *, resume: bool, overwrite: bool, extra: dict | None = None
) -> Path:
    """Make out_dir this run's folder, or raise ValueError saying why it is another run's and what to do;
    `extra` goes into run.json beside the config (what the run started from)."""
    path = Path(out_dir)
    _make_folder(path)
    previous = _read_run_file(path / RUN_FILE)
    if not resume:
        if overwrite:
            _remove_outputs(path)
        elif previous is not None:
            diff = config_diff(previous.get("config", {}), config)
            if previous.get("kind") != kind or diff:
                what = f"a {previous.get('kind', 'fedgpt')} run" + (
                    f" with other settings ({'; '.join(diff[:4])})" if diff else ""
                )
                raise ValueError(
                    f"train.out_dir={path} holds {what}: pass --train.out_dir=NEW_FOLDER for this run, "
                    "--resume to continue that one, or --overwrite to replace it"
                )
        elif found := [name for name in OUTPUTS if (path / name).exists()]:
            raise ValueError(
                f"train.out_dir={path} holds another run's outputs ({', '.join(found)}): pass "
                "--train.out_dir=NEW_FOLDER for this run, or --overwrite to replace them"
            )
    record = {"kind": kind, "config": config, **(extra or {})}
    atomic_write_bytes(path / RUN_FILE, json.dumps(record, indent=1).encode())
    return path


def _make_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"train.out_dir={path} is a file, not a folder: pass another --train.out_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"cannot create train.out_dir={path} ({e.strerror}): pass a folder you can write to"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"train.out_dir={path} is not writable: pass a folder you can write to")


def _read_run_file(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _remove_outputs(path: Path) -> None:
    for name in OUTPUTS:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
