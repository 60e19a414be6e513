"""Non-federated trainer on the shared core; one process or DDP under torchrun.

    python -m fedgpt.local_train --config configs/shakespeare_char_cpu.yaml
    python -m fedgpt.local_train --config configs/shakespeare_char_cpu.yaml --resume
    torchrun --standalone --nproc_per_node=2 -m fedgpt.local_train --config configs/shakespeare_char.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fedgpt.checkpoint import check_compatible, load_checkpoint, model_from_checkpoint, save_checkpoint
from fedgpt.config import Config, load_config
from fedgpt.data import Batches, load_dataset
from fedgpt.download import DataUnavailableError
from fedgpt.metrics import MetricsLog
from fedgpt.train import Trainer, build_model, evaluate, resolve_device


class RankBatches:
    """Rank r of W takes every W-th batch of one shared stream, so W processes see exactly the
    micro-batches one process would, and a DDP run equals a single-process run with the same global batch."""

    def __init__(self, batches: Batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        return self

    def __next__(self):
        mine = None
        for i in range(self.world):
            b = next(self.batches)
            if i == self.rank:
                mine = b
        return mine


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m fedgpt.local_train", description=__doc__.splitlines()[0],
                                epilog="Any config field can be overridden: --train.max_steps=200 --model.n_layer=2")
    p.add_argument("--config", help="YAML config (see configs/); defaults apply when omitted")
    p.add_argument("--resume", action="store_true", help="continue from <train.out_dir>/last.pt exactly where it stopped")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    tc = cfg.train

    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = resolve_device(tc.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    if tc.grad_accum_steps % world:
        raise ValueError(f"train.grad_accum_steps={tc.grad_accum_steps} must be divisible by the {world} DDP processes")
    accum = tc.grad_accum_steps // world
    say = print if master else (lambda *a, **k: None)

    # Rank 0 downloads and encodes; the others wait and then read the cache.
    if ddp and not master:
        dist.barrier()
    ds = load_dataset(cfg.data)
    if ddp and master:
        dist.barrier()

    out_dir = Path(tc.out_dir)
    torch.manual_seed(tc.seed)  # same initial weights in every process and every run
    resume = load_checkpoint(out_dir / "last.pt") if args.resume else None
    if args.resume:
        _check_resumable(resume, out_dir / "last.pt", world)
        check_compatible(resume, _model_config_for(cfg, ds.tokenizer.vocab_size), out_dir / "last.pt")
        model = model_from_checkpoint(resume, dropout=cfg.model.dropout)
    else:
        model = build_model(cfg, ds.tokenizer.meta(), ds.tokenizer.vocab_size)
    if model.cfg.block_size < cfg.model.block_size:
        raise ValueError(f"model.block_size={cfg.model.block_size} is larger than the model's context ({model.cfg.block_size})")
    torch.manual_seed(tc.seed + rank)  # dropout masks differ between ranks
    say(f"model: {model.cfg.arch}, {model.num_params() / 1e6:.2f}M parameters | data: {len(ds.train):,} train / "
        f"{len(ds.val):,} val tokens ({ds.tokenizer.meta()['kind']}) | device {device} | {world} process(es)")

    trainer = Trainer(model, tc, device, ddp_rank=rank if ddp else None, log=say)
    block = cfg.model.block_size
    stream = Batches(ds.train, block, tc.batch_size, device, seed=tc.seed)
    batches = RankBatches(stream, rank, world) if ddp else stream
    metrics = MetricsLog(out_dir / "metrics.jsonl", plot=out_dir / "loss.png", x="step") if master else None
    best_val = float("inf")
    if resume is not None:
        trainer.optimizer.load_state_dict(resume["optimizer"])
        trainer.step = resume["step"]
        best_val = resume["best_val_loss"]
        extra = resume["extra"]
        stream.load_state_dict(extra["batches"])
        torch.set_rng_state(extra["rng"][rank])
        if trainer.scaler is not None and extra.get("scaler"):
            trainer.scaler.load_state_dict(extra["scaler"])
        if metrics:
            metrics.truncate(trainer.step)
        say(f"resumed from {out_dir / 'last.pt'} at step {trainer.step} (best val {best_val:.4f})")
    elif metrics:
        metrics.truncate(-1)
    writer = _tensorboard(out_dir) if tc.tensorboard and master else None

    def eval_and_save(elapsed: float) -> None:
        nonlocal best_val
        rng = [torch.get_rng_state()]
        if ddp:
            rng = [None] * world
            dist.all_gather_object(rng, torch.get_rng_state())
        if master:
            # Fixed-seed evaluation batches: every evaluation scores the same windows.
            val = evaluate(trainer.raw_model, Batches(ds.val, block, tc.batch_size, device, seed=tc.seed), tc.eval_iters, trainer.ctx)
            train = evaluate(trainer.raw_model, Batches(ds.train, block, tc.batch_size, device, seed=tc.seed + 1), tc.eval_iters, trainer.ctx)
            improved = val["loss"] < best_val
            best_val = min(best_val, val["loss"])
            tokens = trainer.step * tc.batch_size * tc.grad_accum_steps * block
            say(f"eval step {trainer.step} | train {train['loss']:.4f} | val {val['loss']:.4f} | best {best_val:.4f}")
            metrics.append({"step": trainer.step, "tokens": tokens, "train_loss": train["loss"], "val_loss": val["loss"],
                            "lr": trainer.optimizer.param_groups[0]["lr"], "elapsed_s": round(elapsed, 3)})
            if writer:
                writer.add_scalars("loss", {"train": train["loss"], "val": val["loss"]}, trainer.step)
            common = dict(model_state=trainer.raw_model.state_dict(), model_config=trainer.raw_model.cfg,
                          tokenizer=ds.tokenizer.meta(), config=cfg.to_dict(), step=trainer.step,
                          best_val_loss=best_val, val_loss=val["loss"])
            save_checkpoint(out_dir / "last.pt", **common,
                            optimizer=trainer.optimizer.state_dict() if tc.save_optimizer else None,
                            extra={"batches": stream.state_dict(), "rng": rng,
                                   "scaler": trainer.scaler.state_dict() if trainer.scaler else None})
            if improved:
                save_checkpoint(out_dir / "best.pt", **common)
        if ddp:
            dist.barrier()

    t0 = time.perf_counter()
    if trainer.step == 0:
        eval_and_save(0.0)
    while trainer.step < tc.max_steps:
        n = min(tc.eval_interval - trainer.step % tc.eval_interval, tc.max_steps - trainer.step)
        trainer.train_steps(batches, n, total_steps=tc.max_steps, grad_accum_steps=accum)
        eval_and_save(time.perf_counter() - t0)
    if ddp:
        dist.destroy_process_group()
    if writer:
        writer.close()
    result = {"step": trainer.step, "best_val_loss": best_val, "out_dir": str(out_dir)}
    say(json.dumps(result))
    return result


def _model_config_for(cfg: Config, vocab_size: int):
    import dataclasses

    return dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or vocab_size)


def _check_resumable(ckpt: dict, path: Path, world: int) -> None:
    """--resume needs the optimizer and data-stream state that only a local_train checkpoint saved with them has."""
    if ckpt.get("round") is not None:
        raise ValueError(f"{path} is from a federated run (round {ckpt['round']}): resume it with the ServerApp, "
                         f"or start a new local run from its weights with --train.init_from={path} and another out_dir")
    if ckpt.get("optimizer") is None:
        raise ValueError(f"{path} was saved with train.save_optimizer=false, so --resume cannot continue it exactly: "
                         f"start a new run from its weights with --train.init_from={path} and another out_dir")
    saved = len(ckpt["extra"].get("rng", []))
    if saved != world:
        raise ValueError(f"{path} was written by {saved} process(es) and this run has {world}: resume with the same "
                         f"number of processes (the per-rank random state must match)")


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out_dir / "tensorboard"))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, DataUnavailableError) as e:
        sys.exit(f"error: {e}")
