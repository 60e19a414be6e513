"""Training-step throughput of the core, optionally against nanoGPT's own train.py at identical settings.

    python -m fedgpt.bench train --config configs/shakespeare_char_cpu.yaml
    python -m fedgpt.bench train --config configs/shakespeare_char_cpu.yaml --nanogpt ../nanoGPT --repeats 5
    python -m fedgpt.bench train --config configs/tiny.yaml --steps 5 --warmup 2 --repeats 1 --out /tmp/b.json

Each repeat times `steps` calls of Trainer.train_steps(batches, 1) after `warmup` untimed steps; with
--nanogpt the repeats alternate (fedgpt, nanoGPT, fedgpt, ...) so that both see the same machine load.
nanoGPT runs from a temporary copy of the checkout, on the same tokens as fedgpt (written as its train.bin
/ val.bin / meta.pkl); the checkout itself is never modified. nanoGPT is not a dependency of fedgpt.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fedgpt.config import Config, load_config
from fedgpt.data import Batches, load_dataset
from fedgpt.train import Trainer, build_model, peak_flops, resolve_device, reuse_freed_cpu_memory

NANOGPT_ITER = re.compile(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms", re.MULTILINE)
NANOGPT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
NO_NANOGPT = "no nanoGPT checkout was given (--nanogpt PATH): the nanoGPT comparison was skipped"


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: VmHWM where /proc has it, else getrusage."""
    # ru_maxrss alone can be wrong for a child: Linux carries the parent's high-water mark across fork + exec.
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024
    except (OSError, AttributeError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


# Runs nanoGPT's train.py as `python train.py ARGS` would, then reports the peak RSS of that process.
NANOGPT_MAIN = (
    "import runpy, sys\nsys.argv = ['train.py'] + sys.argv[1:]\nrunpy.run_path('train.py', "
    "run_name='__main__')\ntry:\n    print('peak_rss_mb', [int(l.split()[1]) / 1024 for l in "
    "open('/proc/self/status') if l.startswith('VmHWM:')][0])\nexcept (OSError, IndexError):\n    pass  # "
    "no /proc: peak memory is not reported\n"
)
NANOGPT_RSS = re.compile(r"^peak_rss_mb ([\d.]+)$", re.MULTILINE)


def _summary(step_ms: list[float], tokens_per_step: int) -> dict[str, Any]:
    ms = statistics.median(step_ms)
    return {
        "ms_per_step": round(ms, 3),
        "tokens_per_s": round(tokens_per_step / (ms / 1000), 1),
        "ms_per_step_min": round(min(step_ms), 3),
        "steps_timed": len(step_ms),
    }


class FedgptRunner:
    """The fedgpt core on one config: one Trainer, fresh warm-up before each repeat."""

    def __init__(self, cfg: Config):
        self.cfg, tc = cfg, cfg.train
        self.device = resolve_device(tc.device)
        self.ds = load_dataset(cfg.data)
        torch.manual_seed(tc.seed)
        model = build_model(cfg, self.ds.tokenizer.meta(), self.ds.tokenizer.vocab_size)
        self.trainer = Trainer(model, tc, self.device, log=None)
        self.batches = Batches(self.ds.train, cfg.model.block_size, tc.batch_size, self.device, seed=tc.seed)
        self.tokens_per_step = tc.batch_size * tc.grad_accum_steps * cfg.model.block_size

    def run(self, steps: int, warmup: int) -> list[float]:
        """Milliseconds of each of `steps` optimizer steps, after `warmup` untimed ones."""
        tr = self.trainer
        tr.train_steps(self.batches, warmup)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        step_ms = []
        for _ in range(steps):
            t0 = time.perf_counter()
            # ends in loss.item(): a device sync every step
            tr.train_steps(self.batches, 1)
            step_ms.append((time.perf_counter() - t0) * 1000)
        return step_ms

    def figures(self, step_ms: list[list[float]]) -> dict[str, Any]:
        """Median step time and tokens/s over every repeat, MFU (CUDA), peak memory, each repeat's median."""
        res = _summary([t for rep in step_ms for t in rep], self.tokens_per_step)
        mfu = self.mfu(res["ms_per_step"])
        mem, mem_kind = self.peak_memory()
        return {
            **res,
            "mfu": None if mfu is None else round(mfu, 4),
            "peak_memory_mb": round(mem, 1),
            "peak_memory_kind": mem_kind,
            "repeat_ms_per_step": [round(statistics.median(r), 3) for r in step_ms],
        }

    def peak_memory(self) -> tuple[float, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda max_memory_allocated"
        return _peak_rss_mb(), "peak RSS of the bench process"

    def mfu(self, ms: float) -> float | None:
        peak = peak_flops(self.device)
        return (
            None
            if peak is None
            else self.trainer.raw_model.estimate_mfu(self.tokens_per_step, ms / 1000, peak)
        )


class NanoGPTError(RuntimeError):
    """nanoGPT's train.py failed or printed no per-iteration times."""


class NanoGPTRunner:
    """nanoGPT's train.py in a temporary copy of a checkout, fed fedgpt's tokens, at fedgpt's settings."""

    def __init__(self, checkout: Path, ours: FedgptRunner, workdir: Path):
        missing = [f for f in ("train.py", "model.py", "configurator.py") if not (checkout / f).is_file()]
        if missing:
            raise ValueError(
                f"--nanogpt {checkout} is not a nanoGPT checkout (missing {', '.join(missing)}): pass the "
                "directory of a clone of https://github.com/karpathy/nanoGPT"
            )
        m, tc = ours.cfg.model, ours.cfg.train
        if m.arch != "gpt2":
            raise ValueError(
                f"model.arch={m.arch}: nanoGPT only has the gpt2 architecture, nothing to compare with"
            )
        self.root = workdir / "nanoGPT"
        shutil.copytree(checkout, self.root, ignore=shutil.ignore_patterns(".git", "*.bin", "*.pkl", "out*"))
        data = self.root / "data" / "fedgpt_bench"
        data.mkdir(parents=True)
        ours.ds.train.tofile(data / "train.bin")  # the same uint16 token stream fedgpt samples from
        ours.ds.val.tofile(data / "val.bin")
        with open(data / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": ours.trainer.raw_model.cfg.vocab_size}, f)
        self.peak_rss_mb: float | None = None
        # The same torch thread count as this process (nanoGPT takes torch's default, OMP_NUM_THREADS).
        self.env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        self.args = {
            "dataset": "fedgpt_bench",
            "out_dir": str(workdir / "nanogpt_out"),
            "device": str(ours.device),
            "dtype": NANOGPT_DTYPES[ours.trainer.precision],
            "compile": tc.compile,
            "log_interval": 1,
            "eval_iters": min(tc.eval_iters, 20),
            "always_save_checkpoint": False,
            "wandb_log": False,
            "block_size": m.block_size,
            "batch_size": tc.batch_size,
            "gradient_accumulation_steps": tc.grad_accum_steps,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "n_embd": m.n_embd,
            "dropout": float(m.dropout),
            "bias": m.bias,
            "learning_rate": tc.learning_rate,
            "min_lr": tc.min_lr,
            "warmup_iters": tc.warmup_steps,
            "lr_decay_iters": tc.lr_decay_steps or tc.max_steps,
            "decay_lr": tc.decay_lr,
            "weight_decay": tc.weight_decay,
            "beta1": tc.beta1,
            "beta2": tc.beta2,
            "grad_clip": tc.grad_clip,
        }

    def command(self, steps: int, warmup: int) -> list[str]:
        """nanoGPT's own command line for these settings (as run from the temporary copy)."""
        # Iterations 0 .. max_iters run; iteration 0 also evaluates (it is part of the warm-up), and no later
        # evaluation happens because eval_interval is beyond max_iters.
        args = {**self.args, "max_iters": warmup + steps - 1, "eval_interval": warmup + steps + 1}
        return ["python", "train.py"] + [
            f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in args.items()
        ]

    def figures(
        self, step_ms: list[list[float]], ours: FedgptRunner, args: argparse.Namespace
    ) -> dict[str, Any]:
        """As FedgptRunner.figures, with MFU from fedgpt's model (the same shape) and the command that ran."""
        res = _summary([t for rep in step_ms for t in rep], ours.tokens_per_step)
        mfu = ours.mfu(res["ms_per_step"])
        cpu_rss = ours.device.type == "cpu" and self.peak_rss_mb is not None
        return {
            **res,
            "mfu": None if mfu is None else round(mfu, 4),
            "peak_memory_mb": self.peak_rss_mb if cpu_rss else None,
            "peak_memory_kind": "peak RSS of the nanoGPT process" if cpu_rss else "not measured",
            "repeat_ms_per_step": [round(statistics.median(r), 3) for r in step_ms],
            "checkout": str(Path(args.nanogpt).resolve()),
            "command": " ".join(self.command(args.steps, args.warmup)),
        }

    def run(self, steps: int, warmup: int) -> list[float]:
        cmd = [sys.executable, "-c", NANOGPT_MAIN] + self.command(steps, warmup)[2:]
        r = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise NanoGPTError(
                f"nanoGPT failed (exit {r.returncode}) in {self.root}: "
                f"{' '.join(self.command(steps, warmup))}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
            )
        times = {int(i): float(ms) for i, ms in NANOGPT_ITER.findall(r.stdout)}
        step_ms = [times[i] for i in range(warmup, warmup + steps) if i in times]
        if len(step_ms) != steps:
            raise NanoGPTError(
                "expected nanoGPT's 'iter N: ... time X ms' lines for iterations "
                f"{warmup}..{warmup + steps - 1}, found {sorted(times)[-5:]}: "
                f"is {self.root} an unmodified nanoGPT checkout?"
            )
        rss = NANOGPT_RSS.search(r.stdout)
        if rss:
            self.peak_rss_mb = max(self.peak_rss_mb or 0.0, float(rss.group(1)))
        return step_ms


def differences(cfg: Config, ours: FedgptRunner) -> list[str]:
    """What the two runs do differently, beyond the shared model shape, tokens, batch, precision, AdamW groups
    and clip."""
    tc, cpu = cfg.train, ours.device.type == "cpu"
    out = [
        "GELU: fedgpt the tanh approximation (GPT-2's gelu_new, for Hugging Face parity)"
        + (", computed as x*sigmoid(...) on CPU float32" if cpu and ours.trainer.precision == "fp32" else "")
        + "; nanoGPT exact erf GELU",
        "batches: both sample random windows of the same token stream, with different random generators",
        "init: same scheme (normal 0.02, scaled c_proj), different seeds",
        "timing: fedgpt times each Trainer.train_steps(batches, 1) call (ends in loss.item()); nanoGPT "
        "prints its own per-iteration time (includes its get_batch, loss.item() and log print)",
    ]
    if cpu:
        out.append(
            "AdamW: fedgpt uses the fused CPU kernel; nanoGPT the for-loop kernel (it fuses on CUDA only), "
            "the same update"
        )
        if reuse_freed_cpu_memory():
            out.append(
                "allocator: fedgpt's Trainer makes glibc malloc reuse freed blocks (no page faults per "
                "step); nanoGPT runs with glibc's defaults"
            )
        if ours.trainer.precision != "fp32":
            out.append(
                f"precision: fedgpt {ours.trainer.precision} autocast on CPU; "
                "nanoGPT ignores dtype on CPU (fp32)"
            )
    if tc.compile:
        out.append("torch.compile: both compile their model (train.compile=true)")
    return out


def bench_train(args: argparse.Namespace, overrides: list[str], command: str = "") -> dict[str, Any]:
    """Time fedgpt (and nanoGPT, alternating) on args.config; the result as a JSON-ready dict."""
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1:
        raise ValueError(
            f"--steps={args.steps}, --repeats={args.repeats} and --warmup={args.warmup} must be >= 1 (the "
            "first step includes one-time costs, and nanoGPT evaluates in it)"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, overrides)
    ours = FedgptRunner(cfg)
    with tempfile.TemporaryDirectory(prefix="fedgpt-bench-") as tmp:
        nano = (
            NanoGPTRunner(Path(args.nanogpt).expanduser().resolve(), ours, Path(tmp))
            if args.nanogpt
            else None
        )
        ours_ms, nano_ms = alternate(ours, nano, args.steps, args.warmup, args.repeats)
    result = {
        "bench": "train",
        "config": args.config,
        "overrides": overrides,
        "command": command,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **machine(ours),
        "precision": ours.trainer.precision,
        "compile": cfg.train.compile,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "tokens_per_step": ours.tokens_per_step,
        "params": ours.trainer.raw_model.num_params(),
        "fedgpt": ours.figures(ours_ms),
    }
    if nano is None:
        return {**result, "nanogpt": None, "nanogpt_skipped": NO_NANOGPT}
    nano_res = nano.figures(nano_ms, ours, args)
    pairs = [statistics.median(n) / statistics.median(f) for f, n in zip(ours_ms, nano_ms)]
    # speedup pools every timed step; the median of the per-repeat ratios resists load that comes and goes
    # between repeats.
    return {
        **result,
        "nanogpt": nano_res,
        "speedup": round(nano_res["ms_per_step"] / result["fedgpt"]["ms_per_step"], 3),
        "speedup_repeat_median": round(statistics.median(pairs), 3),
        "repeat_speedups": [round(p, 3) for p in pairs],
        "differences": differences(cfg, ours),
    }


def alternate(
    ours: FedgptRunner, nano: NanoGPTRunner | None, steps: int, warmup: int, repeats: int
) -> tuple[list[list[float]], list[list[float]]]:
    """Step times of each repeat, fedgpt then nanoGPT in turn, so that both see the same machine load."""
    ours_ms, nano_ms = [], []
    for r in range(repeats):
        ours_ms.append(ours.run(steps, warmup))
        print(
            f"repeat {r + 1}/{repeats}: fedgpt {statistics.median(ours_ms[-1]):.2f} ms/step",
            end="",
            flush=True,
        )
        if nano is not None:
            nano_ms.append(nano.run(steps, warmup))
            print(f" | nanoGPT {statistics.median(nano_ms[-1]):.2f} ms/step", end="")
        print(flush=True)
    return ours_ms, nano_ms


def machine(ours: FedgptRunner) -> dict[str, Any]:
    dev = ours.device
    name = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    )
    return {
        "device": str(dev),
        "device_name": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def markdown(res: dict[str, Any]) -> str:
    """The result as a markdown table, fedgpt and nanoGPT side by side."""
    cols = [("fedgpt", res["fedgpt"])] + ([("nanoGPT", res["nanogpt"])] if res["nanogpt"] else [])

    def cell(r: dict, key: str) -> str:
        v = r.get(key)
        if v is None:
            return "-"
        if key == "mfu":
            return f"{100 * v:.1f}%"
        return f"{v:,.1f}" if isinstance(v, float) else str(v)

    rows = [
        ("ms/step (median)", "ms_per_step"),
        ("tokens/s", "tokens_per_s"),
        ("MFU", "mfu"),
        ("peak memory (MiB)", "peak_memory_mb"),
    ]
    lines = [
        "| " + " | ".join(["train step"] + [c for c, _ in cols]) + " |",
        "|" + " --- |" * (1 + len(cols)),
    ]
    lines += ["| " + " | ".join([label] + [cell(r, key) for _, r in cols]) + " |" for label, key in rows]
    lines.append(
        f"\n{res['device']} ({res['device_name']}), torch {res['torch']}, {res['threads']} threads, "
        f"{res['precision']}, {res['tokens_per_step']} tokens/step, {res['repeats']} x {res['steps']} timed "
        f"steps after {res['warmup']} warm-up"
    )
    if res["nanogpt"]:
        lines.append(
            f"fedgpt / nanoGPT tokens/s: {res['speedup']:.3f}x over all steps, "
            f"{res['speedup_repeat_median']:.3f}x median of repeats "
            f"({', '.join(f'{p:.3f}' for p in res['repeat_speedups'])})"
        )
        lines += ["differences:"] + [f"- {d}" for d in res["differences"]]
    else:
        lines.append(res["nanogpt_skipped"])
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="training-step throughput of the core (Trainer.train_steps)")
    t.add_argument("--config", required=True, help="YAML config, e.g. configs/shakespeare_char_cpu.yaml")
    t.add_argument("--steps", type=int, default=50, help="timed steps per repeat")
    t.add_argument("--warmup", type=int, default=10, help="untimed steps before each repeat")
    t.add_argument("--repeats", type=int, default=3, help="repeats (alternating with nanoGPT, if given)")
    t.add_argument("--threads", type=int, default=0, help="torch threads for both runs; 0: torch's default")
    t.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout to run at identical settings (copied)")
    t.add_argument("--out", help="JSON result file (default results/bench-train-<time>.json)")
