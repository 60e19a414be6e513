"""Non-federated trainer on the shared core; one process or DDP under torchrun.

    python -m fedgpt.local_train --config configs/shakespeare_char_cpu.yaml
    python -m fedgpt.local_train --config configs/shakespeare_char_cpu.yaml --resume
    torchrun --standalone --nproc_per_node=2 -m fedgpt.local_train --config configs/shakespeare_char.yaml

Every eval_interval steps rank 0 evaluates and writes last.pt (best.pt when validation improves).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fedgpt.checkpoint import CheckpointWriter, check_compatible, load_checkpoint, model_from_checkpoint
from fedgpt.config import Config, load_config
from fedgpt.data import Batches, Dataset, check_windows, load_dataset
from fedgpt.download import DataUnavailableError
from fedgpt.metrics import MetricsLog
from fedgpt.rundir import claim_run_dir
from fedgpt.train import Trainer, build_model, evaluate, resolve_device


@dataclass
class Processes:
    """Where this process stands: its rank among `world` processes (one without torchrun) and its device."""

    rank: int
    world: int
    device: torch.device
    ddp: bool

    @property
    def master(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier()


class RankBatches:
    """Rank r of W takes every W-th batch of one shared stream, so W processes see exactly the
    micro-batches one process would, and a DDP run equals a single-process run with the same global batch.
    Every rank draws all W batches' windows (cheap, on the CPU) but copies only its own to its device."""

    def __init__(self, batches: Batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        return self

    def __next__(self):
        drawn = [self.batches.draw() for _ in range(self.world)]
        return self.batches.to_device(drawn[self.rank])


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m fedgpt.local_train",
        description=__doc__.splitlines()[0],
        epilog="Any config field can be overridden: --train.max_steps=200 --model.n_layer=2",
    )
    p.add_argument("--config", help="YAML config (see configs/); defaults apply when omitted")
    p.add_argument(
        "--resume", action="store_true", help="continue from <train.out_dir>/last.pt exactly where it stopped"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run already in train.out_dir")
    return p.parse_known_args(argv)


def start_processes(cfg: Config) -> Processes:
    """One process, or this rank of a torchrun launch (nccl on CUDA, gloo on CPU)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = resolve_device(cfg.train.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.train.grad_accum_steps % world:
        raise ValueError(
            f"train.grad_accum_steps={cfg.train.grad_accum_steps} "
            f"must be divisible by the {world} DDP processes"
        )
    return Processes(rank, world, device, ddp)


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    if cfg.lora.rank:
        raise ValueError(
            "lora.rank > 0: LoRA fine-tuning runs federated (python simulate.py); the local trainer "
            "trains every weight"
        )
    tc, procs = cfg.train, start_processes(cfg)
    say = print if procs.master else (lambda *a, **k: None)

    # Rank 0 downloads and encodes; the others wait and then read the cache.
    if not procs.master:
        procs.barrier()
    ds = load_dataset(cfg.data)
    if procs.master:
        procs.barrier()
    check_windows(cfg.model.block_size, ds)

    out_dir = Path(tc.out_dir)
    resume = load_checkpoint(out_dir / "last.pt") if args.resume else None
    model = _model(cfg, ds, resume, out_dir, procs.world)
    if procs.master:
        claim_run_dir(out_dir, "local_train", cfg.to_dict(), resume=args.resume, overwrite=args.overwrite)
    torch.manual_seed(tc.seed + procs.rank)  # dropout masks differ between ranks
    say(
        f"model: {model.cfg.arch}, {model.num_params() / 1e6:.2f}M parameters | data: {len(ds.train):,} "
        f"train / {len(ds.val):,} val tokens ({ds.tokenizer.meta()['kind']}) | device {procs.device} | "
        f"{procs.world} process(es)"
    )

    trainer = Trainer(model, tc, procs.device, ddp_rank=procs.rank if procs.ddp else None, log=say)
    stream = Batches(ds.train, cfg.model.block_size, tc.batch_size, procs.device, seed=tc.seed)
    run = LocalRun(cfg, ds, trainer, stream, procs, out_dir)
    if resume is not None:
        run.restore(resume)
        say(
            f"resumed from {out_dir / 'last.pt'} at step {trainer.step} (best val "
            f"{run.ckpt.best_val_loss:.4f})"
        )
    result = run.train()
    say(json.dumps(result))
    return result


def _model(cfg: Config, ds: Dataset, resume: dict | None, out_dir: Path, world: int):
    """The model to train: the checkpoint's when resuming, else what train.init_from asks for."""
    torch.manual_seed(cfg.train.seed)  # same initial weights in every process and every run
    if resume is None:
        return build_model(cfg, ds.tokenizer.meta(), ds.tokenizer.vocab_size)
    _check_resumable(resume, out_dir / "last.pt", world)
    vocab = cfg.model.vocab_size or ds.tokenizer.vocab_size
    check_compatible(resume, dataclasses.replace(cfg.model, vocab_size=vocab), out_dir / "last.pt")
    return model_from_checkpoint(resume, dropout=cfg.model.dropout)


class LocalRun:
    """The training loop of one process: eval_interval steps, then evaluation and checkpoints (rank 0)."""

    def __init__(
        self, cfg: Config, ds: Dataset, trainer: Trainer, stream: Batches, procs: Processes, out_dir: Path
    ):
        self.cfg, self.ds, self.trainer, self.stream, self.procs = cfg, ds, trainer, stream, procs
        self.batches = RankBatches(stream, procs.rank, procs.world) if procs.ddp else stream
        self.ckpt = CheckpointWriter(out_dir)
        self.metrics = (
            MetricsLog(out_dir / "metrics.jsonl", plot=out_dir / "loss.png", x="step")
            if procs.master
            else None
        )
        self.writer = _tensorboard(out_dir) if cfg.train.tensorboard and procs.master else None

    def restore(self, ckpt: dict) -> None:
        """Continue exactly where a checkpoint left off: optimizer, step, data position, RNG, loss scaler."""
        tr, extra = self.trainer, ckpt["extra"]
        tr.optimizer.load_state_dict(ckpt["optimizer"])
        tr.step = ckpt["step"]
        self.ckpt.best_val_loss = ckpt["best_val_loss"]
        self.stream.load_state_dict(extra["batches"])
        torch.set_rng_state(extra["rng"][self.procs.rank])
        if tr.scaler is not None and extra.get("scaler"):
            tr.scaler.load_state_dict(extra["scaler"])

    def train(self) -> dict:
        tc, tr = self.cfg.train, self.trainer
        if self.metrics:
            # a resumed run keeps the rows up to its checkpoint
            self.metrics.truncate(tr.step if tr.step else -1)
        t0 = time.perf_counter()
        if tr.step == 0:
            self.evaluate_and_save(0.0)
        while tr.step < tc.max_steps:
            n = min(tc.eval_interval - tr.step % tc.eval_interval, tc.max_steps - tr.step)
            tr.train_steps(self.batches, n, grad_accum_steps=tc.grad_accum_steps // self.procs.world)
            self.evaluate_and_save(time.perf_counter() - t0)
        if self.procs.ddp:
            # DDP's reducer holds the process group: let it go first, so that the group is not torn down
            # under it at exit (a rank once aborted there, after its run was written, on a loaded machine)
            tr.model = tr.raw_model
            dist.barrier()
            dist.destroy_process_group()
        if self.writer:
            self.writer.close()
        return {"step": tr.step, "best_val_loss": self.ckpt.best_val_loss, "out_dir": str(self.ckpt.out_dir)}

    def evaluate_and_save(self, elapsed: float) -> None:
        """Rank 0 scores fixed validation and training windows, logs them and writes the checkpoints."""
        tc, tr, block = self.cfg.train, self.trainer, self.cfg.model.block_size
        rng = [torch.get_rng_state()]
        if self.procs.ddp:
            rng = [None] * self.procs.world
            dist.all_gather_object(rng, torch.get_rng_state())
        if self.procs.master:
            # Fixed-seed evaluation batches: every evaluation scores the same windows.
            val = evaluate(
                tr.raw_model,
                Batches(self.ds.val, block, tc.batch_size, tr.device, seed=tc.seed),
                tc.eval_iters,
                tr.ctx,
            )
            train = evaluate(
                tr.raw_model,
                Batches(self.ds.train, block, tc.batch_size, tr.device, seed=tc.seed + 1),
                tc.eval_iters,
                tr.ctx,
            )
            best = min(self.ckpt.best_val_loss, val["loss"])
            print(
                f"eval step {tr.step} | train {train['loss']:.4f} | val {val['loss']:.4f} | "
                f"acc {val['accuracy']:.3f} | best {best:.4f}"
            )
            self.metrics.append(
                {
                    "step": tr.step,
                    "tokens": tr.step * tc.batch_size * tc.grad_accum_steps * block,
                    "train_loss": train["loss"],
                    "val_loss": val["loss"],
                    "val_accuracy": val["accuracy"],
                    "lr": tr.optimizer.param_groups[0]["lr"],
                    "elapsed_s": round(elapsed, 3),
                }
            )
            if self.writer:
                self.writer.add_scalars("loss", {"train": train["loss"], "val": val["loss"]}, tr.step)
            self.ckpt.save(
                val["loss"],
                model_state=tr.raw_model.state_dict(),
                model_config=tr.raw_model.cfg,
                tokenizer=self.ds.tokenizer.meta(),
                config=self.cfg.to_dict(),
                step=tr.step,
                optimizer=tr.optimizer.state_dict() if tc.save_optimizer else None,
                extra={
                    "batches": self.stream.state_dict(),
                    "rng": rng,
                    "scaler": tr.scaler.state_dict() if tr.scaler else None,
                },
            )
        self.procs.barrier()


def _check_resumable(ckpt: dict, path: Path, world: int) -> None:
    """--resume needs the optimizer and data-stream state that only a local_train checkpoint saved with them
    has."""
    if ckpt.get("round") is not None:
        raise ValueError(
            f"{path} is from a federated run (round {ckpt['round']}): resume it with the ServerApp, or start "
            f"a new local run from its weights with --train.init_from={path} and another out_dir"
        )
    if ckpt.get("optimizer") is None:
        raise ValueError(
            f"{path} was saved with train.save_optimizer=false, so --resume cannot continue it exactly: "
            f"start a new run from its weights with --train.init_from={path} and another out_dir"
        )
    saved = len(ckpt["extra"].get("rng", []))
    if saved != world:
        raise ValueError(
            f"{path} was written by {saved} process(es) and this run has {world}: resume with the same "
            "number of processes (the per-rank random state must match)"
        )


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter(str(out_dir / "tensorboard"))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, DataUnavailableError) as e:
        sys.exit(f"error: {e}")
