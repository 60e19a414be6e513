"""The GPU check in one call: the gpu-marked tests, then every GPU figure, written as JSON as each finishes.

    python -m fedgpt.bench gpu --nanogpt ../nanoGPT                     # on a CUDA machine, within ~8 minutes
    python -m fedgpt.bench gpu --tiny --out /tmp/gpu.json               # the same steps, tiny, on the CPU

Steps, each with a time box, each skipped with its reason when it cannot run (no nanoGPT checkout, no Flower):
1. `pytest -m gpu` (tests/test_gpu.py: precision, compile, flash attention, fused AdamW, the warm trainer);
2. the training step against nanoGPT's on shakespeare_char and on the GPT-2 124M shape (fedgpt.bench.step);
3. a full shakespeare_char run of the local trainer (val loss and wall time);
4. a 2-SuperNode loopback deployment with the warm trainer and compile (fedgpt.bench.federation's deploy):
   each round's seconds and its share outside training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedgpt.bench.common import app_dir, run_logged
from fedgpt.files import atomic_write_bytes

# The GPT-2 124M shape nanoGPT benchmarks (block 1024, batch 16, biases, a padded vocabulary), on BPE tokens.
GPT2_SHAPE = [
    "--model.n_layer=12",
    "--model.n_head=12",
    "--model.n_embd=768",
    "--model.block_size=1024",
    "--model.bias=true",
    "--model.vocab_size=50304",
    "--train.batch_size=16",
]
TINY = [
    "--model.n_layer=2",
    "--model.n_head=2",
    "--model.n_embd=32",
    "--model.block_size=32",
    "--train.batch_size=4",
]


def steps(a: argparse.Namespace) -> list[tuple[str, list[str], float]]:
    """(name, command, time box in seconds) of each step."""
    py, tiny = sys.executable, TINY if a.tiny else []
    nanogpt = ["--nanogpt", a.nanogpt] if a.nanogpt else []
    bench = [
        py,
        "-m",
        "fedgpt.bench",
        "train",
        "--steps",
        "5" if a.tiny else "50",
        "--repeats",
        "1" if a.tiny else "3",
    ]
    full = ["--train.max_steps=20", "--train.eval_interval=10", "--train.eval_iters=2"] if a.tiny else []
    # tiny, on a CPU: the full run alone compiles (a cold compile of even the tiny model takes ~45 s there)
    eager = ["--train.compile=false"] if a.tiny else []
    return [
        ("tests", [py, "-m", "pytest", "-q", "-n", "0", "-m", "gpu", "tests/test_gpu.py"], 90),
        ("step_char", [*bench, "--config", "configs/shakespeare_char.yaml", *nanogpt, *tiny, *eager], 90),
        (
            "step_gpt2",
            [*bench, "--config", "configs/shakespeare_bpe.yaml", *nanogpt, *GPT2_SHAPE, *tiny, *eager],
            120,
        ),
        (
            "full_char",
            [py, "-m", "fedgpt.local_train", "--config", "configs/shakespeare_char.yaml", *full, *tiny],
            200,
        ),
        (
            "deploy_char",
            [py, "-m", "fedgpt.bench", "deploy", "--config", "configs/shakespeare_char.yaml", "--rounds", "3"]
            + ["--local-steps", "2" if a.tiny else "100", "--train.compile=true", *tiny],
            150,
        ),
    ]


def run_step(name: str, cmd: list[str], limit: float, work: Path, app: Path) -> dict[str, Any]:
    """One step in a subprocess, its output in <work>/<name>.log; its JSON where it writes one."""
    out = work / f"{name}.json"
    if "fedgpt.bench" in cmd:
        cmd = [*cmd, "--out", str(out)]
    if "fedgpt.local_train" in cmd:
        cmd = [*cmd, f"--train.out_dir={work / name}", "--overwrite"]
    t0 = time.time()
    try:
        run_logged(cmd, work / f"{name}.log", app, timeout=limit)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return {"ok": False, "seconds": round(time.time() - t0, 1), "error": str(e)[-500:]}
    res: dict[str, Any] = {"ok": True, "seconds": round(time.time() - t0, 1)}
    if out.is_file():
        res["result"] = json.loads(out.read_text())
    elif name == "full_char":
        rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        res["best_val_loss"] = min(r["val_loss"] for r in rows if r.get("val_loss") is not None)
    else:
        res["tail"] = (work / f"{name}.log").read_text(errors="replace")[-1500:]
    return res


def bench_gpu(a: argparse.Namespace, overrides: list[str], work: Path) -> dict[str, Any]:
    app = app_dir(a.app_dir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else work / "gpu.json"
    res: dict[str, Any] = {"tiny": a.tiny, "steps": {}}
    for name, cmd, limit in steps(a):
        if a.only and name not in a.only:
            continue
        print(f"[gpu] {name}: {' '.join(cmd[1:])}", flush=True)
        fedgpt = "fedgpt" in " ".join(cmd)  # config overrides are fedgpt's, not pytest's
        res["steps"][name] = run_step(name, [*cmd, *overrides] if fedgpt else cmd, limit, work, app)
        atomic_write_bytes(out, json.dumps(res, indent=1).encode())  # what finished survives a timeout
        step = res["steps"][name]
        print(f"[gpu] {name}: {'ok' if step['ok'] else 'FAILED'} in {step['seconds']} s", flush=True)
    return res


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("gpu", help="the gpu-marked tests and every GPU figure, in one call")
    g.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout, to run the step benchmarks beside")
    g.add_argument(
        "--tiny", action="store_true", help="tiny models and few steps (check the script on a CPU)"
    )
    g.add_argument(
        "--only", nargs="+", choices=["tests", "step_char", "step_gpt2", "full_char", "deploy_char"]
    )
    g.add_argument("--app-dir", default=".", help="the fedgpt app directory (default: the current one)")
    g.add_argument("--out", help="JSON result file (default results/gpu/gpu.json)")
