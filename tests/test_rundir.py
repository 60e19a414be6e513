"""Run folders: two runs with different settings never share one by accident; --resume and --overwrite are the
ways to reuse one; a path that cannot be a folder is one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY

from fedgpt.config import load_config
from fedgpt.rundir import RUN_FILE, claim_run_dir


def config(*overrides: str) -> dict:
    return load_config(TINY, list(overrides)).to_dict()


def test_same_run_may_reuse_its_folder_another_may_not(tmp_path):
    claim_run_dir(tmp_path, "local_train", config(), resume=False, overwrite=False)
    (tmp_path / "last.pt").write_bytes(b"first run")
    # the same settings (a run-neutral key aside) again: the same run
    claim_run_dir(tmp_path, "local_train", config("--train.log_interval=3"), resume=False, overwrite=False)
    with pytest.raises(
        ValueError,
        match=r"holds a local_train run with other settings \(train.learning_rate: "
        r"0.001 -> 0.002\): pass --train.out_dir=NEW_FOLDER .*--resume .*--overwrite",
    ):
        claim_run_dir(
            tmp_path, "local_train", config("--train.learning_rate=2e-3"), resume=False, overwrite=False
        )
    with pytest.raises(ValueError, match="holds a local_train run: pass"):
        claim_run_dir(tmp_path, "federated", config(), resume=False, overwrite=False)
    assert (tmp_path / "last.pt").read_bytes() == b"first run"  # refused: nothing touched
    assert json.loads((tmp_path / RUN_FILE).read_text())["config"] == config("--train.log_interval=3")


def test_overwrite_removes_the_earlier_outputs_and_resume_keeps_them(tmp_path):
    claim_run_dir(tmp_path, "federated", config(), resume=False, overwrite=False)
    for name in ("last.pt", "best.pt", "rounds.jsonl", "notes.txt"):
        (tmp_path / name).write_text("old")
    claim_run_dir(tmp_path, "federated", config("--fed.rounds=9"), resume=True, overwrite=False)
    assert (tmp_path / "last.pt").read_text() == "old"
    claim_run_dir(tmp_path, "federated", config("--fed.proximal_mu=0.1"), resume=False, overwrite=True)
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "rounds.jsonl").exists()
    assert (tmp_path / "notes.txt").read_text() == "old"  # only what runs write is removed
    assert json.loads((tmp_path / RUN_FILE).read_text())["config"]["fed"]["proximal_mu"] == 0.1


def test_a_folder_with_outputs_but_no_record_is_not_taken(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"holds another run's outputs \(metrics.jsonl\)"):
        claim_run_dir(tmp_path, "local_train", config(), resume=False, overwrite=False)


def test_paths_that_cannot_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        claim_run_dir(tmp_path / "file", "local_train", config(), resume=False, overwrite=False)
    with pytest.raises(ValueError, match="cannot create train.out_dir=.*file/sub"):
        claim_run_dir(tmp_path / "file" / "sub", "local_train", config(), resume=False, overwrite=False)


def local_train(data_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "fedgpt.local_train",
        "--config",
        str(TINY),
        "--train.max_steps=4",
        "--train.eval_interval=4",
        "--train.eval_iters=2",
        f"--data.data_dir={data_dir}",
        f"--train.out_dir={out}",
        *extra,
    ]
    return subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )


def test_two_runs_with_different_settings_never_share_a_folder(data_dir, tmp_path):
    out = tmp_path / "run"
    first = local_train(data_dir, out)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    second = local_train(data_dir, out, "--train.learning_rate=3e-3")
    assert second.returncode != 0
    assert second.stderr.strip().splitlines() == [second.stderr.strip()], second.stderr[-2000:]
    assert second.stderr.startswith("error: ") and "train.learning_rate: 0.001 -> 0.003" in second.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the first run is intact

    third = local_train(data_dir, out, "--train.learning_rate=3e-3", "--overwrite")
    assert third.returncode == 0, third.stderr[-2000:]
    assert json.loads((out / RUN_FILE).read_text())["config"]["train"]["learning_rate"] == 3e-3

    not_a_folder = local_train(data_dir, out / "last.pt")
    assert not_a_folder.returncode != 0 and "Traceback" not in not_a_folder.stderr
    assert (
        not_a_folder.stderr.strip()
        == f"error: train.out_dir={out / 'last.pt'} is a file, not a folder: pass another --train.out_dir"
    )
