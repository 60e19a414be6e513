"""fedgpt.local_train as a user runs it: subprocesses on the real corpus, kill and --resume, torchrun, bad
input."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_concurrently

from fedgpt.checkpoint import load_checkpoint, model_config_of, save_checkpoint
from fedgpt.metrics import read_jsonl

# One config for the uninterrupted run, the killed-and-resumed run and the torchrun run. grad_accum_steps=2 so
# that two DDP processes take one micro-batch each per step.
TINY = [
    "--config",
    "configs/tiny.yaml",
    "--train.max_steps=60",
    "--train.eval_interval=10",
    "--train.eval_iters=4",
    "--train.grad_accum_steps=2",
    "--train.log_interval=1000",
    "--train.device=cpu",
]
MAX_STEPS, EVAL_INTERVAL = 60, 10


def env() -> dict[str, str]:
    # One thread per process: tiny matmuls are faster so, and these machines are shared.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def local_train(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedgpt.local_train", *args]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def run_all(cmds: dict[str, list[str]], timeout: float = 300) -> dict[str, subprocess.CompletedProcess]:
    return run_concurrently(cmds, env(), timeout)


def check_ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


def val_losses(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_jsonl(out_dir / "metrics.jsonl")]


@pytest.fixture(autouse=True)
def _slow_tests_share_one_ray():
    """No test here starts Ray: the slow torchrun test does not need conftest's shared Ray cluster."""


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, data_dir: Path) -> Path:
    """The reference: one uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("run_a")
    check_ok(run(local_train(*TINY, f"--data.data_dir={data_dir}", f"--train.out_dir={out}")))
    return out


def test_short_run_writes_checkpoints_metrics_and_plot(run_a: Path):
    assert {"last.pt", "best.pt", "metrics.jsonl", "loss.png"} <= {p.name for p in run_a.iterdir()}
    assert not [p.name for p in run_a.iterdir() if p.name.endswith(".tmp")]
    assert (run_a / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_jsonl(run_a / "metrics.jsonl")
    # one row per eval, step 0 included
    assert [r["step"] for r in rows] == list(range(0, MAX_STEPS + 1, EVAL_INTERVAL))
    assert {"step", "tokens", "train_loss", "val_loss", "lr", "elapsed_s"} <= rows[-1].keys()
    assert rows[-1]["tokens"] == MAX_STEPS * 8 * 2 * 16  # steps x batch x accumulation x block
    losses = [r["val_loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.3, losses
    last, best = load_checkpoint(run_a / "last.pt"), load_checkpoint(run_a / "best.pt")
    assert last["step"] == MAX_STEPS and last["val_loss"] == pytest.approx(losses[-1])
    assert best["best_val_loss"] == pytest.approx(min(losses)) and best["val_loss"] == best["best_val_loss"]
    assert last["config"]["train"]["max_steps"] == MAX_STEPS and last["config"]["model"]["n_layer"] == 2
    assert last["tokenizer"]["kind"] == "char" and last["optimizer"] is not None
    assert best["optimizer"] is None  # best.pt is for sampling; only last.pt carries the resume state


def test_resume_after_a_kill_reproduces_an_uninterrupted_run(run_a: Path, tmp_path: Path, data_dir: Path):
    out = tmp_path / "run_b"
    cmd = local_train(*TINY, f"--data.data_dir={data_dir}", f"--train.out_dir={out}")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "last.pt").is_file():
                step = load_checkpoint(out / "last.pt")["step"]
                if step >= EVAL_INTERVAL and proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = step
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        stderr = proc.communicate(timeout=60)[1]
    assert killed_at is not None, (
        f"run B ended (exit {proc.returncode}) before it could be killed:\n{stderr[-2000:]}"
    )
    assert proc.returncode == -signal.SIGKILL
    stopped = load_checkpoint(out / "last.pt")["step"]
    assert EVAL_INTERVAL <= stopped < MAX_STEPS, "run B must have been killed mid-run"

    r = run(cmd + ["--resume"])
    check_ok(r)
    assert f"resumed from {out / 'last.pt'} at step {stopped}" in r.stdout

    a, b = load_checkpoint(run_a / "last.pt"), load_checkpoint(out / "last.pt")
    assert b["step"] == a["step"] == MAX_STEPS
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-6)
    assert b["best_val_loss"] == pytest.approx(a["best_val_loss"], abs=1e-6)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-6, rtol=0, msg=k)
    (steps_a, losses_a), (steps_b, losses_b) = zip(*val_losses(run_a)), zip(*val_losses(out))
    assert steps_b == steps_a == tuple(range(0, MAX_STEPS + 1, EVAL_INTERVAL))
    assert losses_b == pytest.approx(losses_a, abs=1e-6)


def test_a_stopped_and_resumed_run_with_dropout_equals_an_uninterrupted_one(tmp_path: Path, data_dir: Path):
    """With dropout the random state decides every step's masks, so a resume that did not restore it
    would train on other masks: the stopped-and-resumed run must end on the uninterrupted run's weights, bit
    for bit. (TINY's model has no dropout, so the killed-and-resumed test above cannot tell.)"""
    from fedgpt.local_train import main

    args = [*TINY, f"--data.data_dir={data_dir}", "--model.dropout=0.2", "--train.lr_decay_steps=20"]
    a, b = tmp_path / "a", tmp_path / "b"
    main([*args, "--train.max_steps=20", f"--train.out_dir={a}"])
    main([*args, "--train.max_steps=10", f"--train.out_dir={b}"])  # stops at step 10, as if killed there
    torch.manual_seed(12345)  # whatever the random state is now, the resume must not depend on it
    main([*args, "--train.max_steps=20", f"--train.out_dir={b}", "--resume"])

    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["step"] == cb["step"] == 20
    for k in ca["model"]:
        assert torch.equal(cb["model"][k], ca["model"][k]), k
    assert val_losses(b) == val_losses(a)


@pytest.mark.slow  # starts torchrun (README, Test)
def test_torchrun_two_processes_equal_one_process(run_a: Path, tmp_path: Path, data_dir: Path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fedgpt.local_train",
        *TINY,
        f"--data.data_dir={data_dir}",
        f"--train.out_dir={out}",
    ]
    r = run(cmd)
    check_ok(r)
    assert "| 2 process(es)" in r.stdout
    assert r.stdout.count("eval step 60 |") == 1, "only rank 0 logs"
    a, d = load_checkpoint(run_a / "last.pt"), load_checkpoint(out / "last.pt")
    assert d["step"] == MAX_STEPS
    assert d["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    for k in a["model"]:
        torch.testing.assert_close(d["model"][k], a["model"][k], atol=1e-4, rtol=0, msg=k)
    assert [s for s, _ in val_losses(out)] == list(range(0, MAX_STEPS + 1, EVAL_INTERVAL))


# --- bad input: one line on stderr, no traceback
# --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_runs(run_a: Path, tmp_path_factory, data_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "latin1.txt").write_bytes("ROMEO:\ncaf\u00e9 au lait.\n\n".encode("latin-1") * 50)
    (tmp / "small.txt").write_text("ab", encoding="utf-8")  # 1 train token: no (input, target) pair
    # run A's last.pt as train.save_optimizer=false would have written it, and as a ServerApp round would have
    ckpt = load_checkpoint(run_a / "last.pt")
    common = {k: ckpt[k] for k in ("tokenizer", "config", "step", "best_val_loss", "val_loss")}
    no_opt, fed = tmp / "no_opt", tmp / "fed"
    save_checkpoint(
        no_opt / "last.pt",
        model_state=ckpt["model"],
        model_config=model_config_of(ckpt),
        extra=ckpt["extra"],
        **common,
    )
    save_checkpoint(
        fed / "last.pt", model_state=ckpt["model"], model_config=model_config_of(ckpt), round=3, **common
    )

    base = [*TINY, f"--data.data_dir={data_dir}"]
    own = [*TINY, f"--data.data_dir={tmp / 'data'}"]  # corpora of the tests get their caches out of the repo
    cases = {
        "missing_input": [*own, "--data.input_file=/nonexistent/corpus.txt", f"--train.out_dir={tmp / 'o1'}"],
        "not_utf8": [*own, f"--data.input_file={tmp / 'latin1.txt'}", f"--train.out_dir={tmp / 'o2'}"],
        "too_small": [*own, f"--data.input_file={tmp / 'small.txt'}", f"--train.out_dir={tmp / 'o3'}"],
        "block_size": [
            *base,
            f"--train.init_from={run_a / 'last.pt'}",
            "--model.block_size=32",
            f"--train.out_dir={tmp / 'o4'}",
        ],
        "resume_nothing": [*base, "--resume", f"--train.out_dir={tmp / 'o5'}"],
        "unknown_key": [*base, "--train.max_stepz=3", "--model.n_layerz=1", f"--train.out_dir={tmp / 'o6'}"],
        "resume_no_optimizer": [*base, "--resume", f"--train.out_dir={no_opt}"],
        "resume_federated": [*base, "--resume", f"--train.out_dir={fed}"],
    }
    return run_all({k: local_train(*v) for k, v in cases.items()})


BAD = {
    "missing_input": r"input file /nonexistent/corpus.txt not found",
    "not_utf8": r"latin1.txt is not UTF-8 text",
    "too_small": r"has only 1 token\(s\), need at least 2 for one \(input, target\) pair",
    "block_size": r"another architecture than the config's \(model.block_size: checkpoint 16 vs config 32\)",
    "resume_nothing": r"last.pt not found",
    "unknown_key": r"invalid config: (?=.*train.max_stepz: unknown key)(?=.*model.n_layerz: unknown key)",
    "resume_no_optimizer": r"saved with train.save_optimizer=false.*--train.init_from=",
    "resume_federated": r"from a federated run \(round 3\)",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clean_error_line(bad_runs, case: str):
    r = bad_runs[case]
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert re.search(BAD[case], lines[0]), lines[0]
