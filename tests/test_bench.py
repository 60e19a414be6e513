"""fedgpt.bench as a user runs it: the JSON fields, the no-nanoGPT message, and the nanoGPT side against a
stand-in checkout.

No timing assertions: speed targets live in benchmark runs, not in tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TINY = [
    "--config",
    "configs/tiny.yaml",
    "--steps",
    "5",
    "--warmup",
    "2",
    "--repeats",
    "1",
    "--train.device=cpu",
]

# Stands in for nanoGPT's train.py: checks what the bench hands it, then prints nanoGPT's per-iteration lines.
FAKE_TRAIN = """
import pickle, sys
import numpy as np
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
expected = {"device": "'cpu'", "compile": "False", "n_layer": "2", "n_head": "4", "n_embd": "32",
            "block_size": "16", "batch_size": "8", "dropout": "0.0", "bias": "False", "grad_clip": "1.0",
            "dtype": "'float32'",
            "dataset": "'fedgpt_bench'", "log_interval": "1"}
for key, want in expected.items():
    assert args[key] == want, (key, args[key], want)
assert int(args["eval_interval"]) > int(args["max_iters"])
meta = pickle.load(open("data/fedgpt_bench/meta.pkl", "rb"))
assert meta["vocab_size"] == 65, meta
assert np.fromfile("data/fedgpt_bench/train.bin", dtype=np.uint16).max() < 65
for i in range(int(args["max_iters"]) + 1):
    print(f"iter {i}: loss 4.1743, time {100.0 if i == 0 else 2.5:.2f}ms, mfu -100.00%")
"""


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedgpt.bench", "train", *TINY, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def fake_nanogpt(tmp_path: Path) -> Path:
    root = tmp_path / "nanoGPT"
    root.mkdir()
    (root / "train.py").write_text(FAKE_TRAIN)
    (root / "model.py").write_text("")
    (root / "configurator.py").write_text("")
    return root


def test_bench_writes_json_and_says_nanogpt_was_skipped(tmp_path, data_dir):
    out = tmp_path / "bench.json"
    r = bench(tmp_path, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("ms_per_step", "tokens_per_s", "peak_memory_mb"):
        assert res["fedgpt"][key] > 0, key
    assert res["fedgpt"]["steps_timed"] == 5 and res["fedgpt"]["mfu"] is None  # MFU only on CUDA
    assert (
        res["device"] == "cpu" and res["threads"] >= 1 and res["torch"] and res["tokens_per_step"] == 8 * 16
    )
    assert res["nanogpt"] is None and "no nanoGPT checkout was given" in res["nanogpt_skipped"]
    assert "no nanoGPT checkout was given" in r.stdout and "| tokens/s |" in r.stdout


def test_bench_alternates_with_nanogpt(tmp_path, data_dir, fake_nanogpt):
    out = tmp_path / "bench.json"
    r = bench(tmp_path, "--out", str(out), "--repeats", "2", "--nanogpt", str(fake_nanogpt))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("repeat")] == [
        "repeat 1/2",
        "repeat 2/2",
    ]
    res = json.loads(out.read_text())
    # iteration 0 (eval) left out
    assert res["nanogpt"]["ms_per_step"] == 2.5 and res["nanogpt"]["steps_timed"] == 10
    assert (
        res["speedup"] == pytest.approx(2.5 / res["fedgpt"]["ms_per_step"], rel=1e-2)
        and res["speedup_repeat_median"] > 0
    )
    assert any(d.startswith("GELU") for d in res["differences"])
    assert not (fake_nanogpt / "data").exists(), "the checkout must not be modified"


def test_bench_rejects_a_directory_that_is_not_nanogpt(tmp_path, data_dir):
    r = bench(tmp_path, "--out", str(tmp_path / "b.json"), "--nanogpt", str(tmp_path))
    assert r.returncode != 0 and "is not a nanoGPT checkout" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_the_gpu_check_runs_its_steps_and_writes_what_each_found(tmp_path, data_dir):
    # On the CPU with tiny models: the same script a GPU machine runs, step by step, its JSON after each.
    out = tmp_path / "gpu.json"
    res = subprocess.run(
        [sys.executable, "-m", "fedgpt.bench", "gpu", "--tiny", "--only", "tests", "step_char", "full_char"]
        + ["--out", str(out), f"--data.data_dir={data_dir}"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert list(steps) == ["tests", "step_char", "full_char"] and all(s["ok"] for s in steps.values()), steps
    assert steps["step_char"]["result"]["fedgpt"]["tokens_per_s"] > 0  # fedgpt.bench train's own JSON
    assert steps["full_char"]["best_val_loss"] > 0
    assert "skipped" in steps["tests"]["tail"]  # no CUDA here: the gpu tests skip, and say so
