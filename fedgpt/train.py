"""The one training core: every caller (local trainer, ClientApp, benchmarks, tests) trains through `Trainer`.

    trainer = Trainer(model, cfg.train, device)
    metrics = trainer.train_steps(batches, num_steps=50)            # the local trainer's schedule
    val = evaluate(trainer.model, val_batches, iters=20, ctx=trainer.ctx)

Also here: the learning-rate schedule, precision (autocast, GradScaler), FedProx's proximal gradient, and
build_model, which makes the GPT that train.init_from asks for.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fedgpt.config import Config, TrainConfig
from fedgpt.model import GPT
from fedgpt.optim import FusedAdamW, MuonAdamW

# Dense bf16/fp16 peak of common accelerators, for MFU. CPUs have no meaningful figure here: MFU is not shown.
PEAK_FLOPS = {
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
    "V100": 125e12,
}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else is checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available: use --train.device=cpu or auto")
    return dev


@functools.cache
def reuse_freed_cpu_memory() -> bool:
    """Make glibc malloc keep freed blocks up to 32 MiB for reuse; True if it took effect (glibc only)."""
    # glibc's dynamic threshold still maps many activation-sized blocks fresh from the kernel and unmaps them
    # when freed, so every step page-faults them in again. Served from the heap they are reused step after
    # step; freed memory returns to the OS beyond 256 MiB at the top of the heap.
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 256 * 2**20))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def precision_context(
    precision: str, device: torch.device
) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler | None, str]:
    """Autocast context, GradScaler (fp16 only) and the resolved precision name.

    'auto' means bf16 on CUDA where supported, else fp16 on CUDA, and fp32 elsewhere (CPU autocast is
    slower here).
    """
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), None, precision
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"train.precision=fp16 needs a CUDA device (got {device}): use fp32 or bf16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    ctx = torch.autocast(device_type=device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return ctx, scaler, precision


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every optimizer step: linear warm-up to `peak`, cosine decay to `floor` at step
    `decay_steps` (0: `peak` after warm-up, no decay), `floor` after it."""

    peak: float
    floor: float
    warmup: int
    decay_steps: int

    @classmethod
    def of(cls, tc: TrainConfig, steps: int | None = None) -> Schedule:
        """The local trainer's schedule (over train.lr_decay_steps, or train.max_steps); over `steps` instead
        (a federation's rounds x local steps), with warm-up taking the same share of it."""
        if steps is None:
            warmup, decay = tc.warmup_steps, tc.lr_decay_steps or tc.max_steps
        else:
            warmup, decay = round(tc.warmup_steps * steps / max(1, tc.max_steps)), steps
        return cls(tc.learning_rate, tc.min_lr, warmup, decay if tc.decay_lr else 0)

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / (self.warmup + 1)
        if not self.decay_steps:
            return self.peak
        if step >= self.decay_steps:
            return self.floor
        ratio = (step - self.warmup) / max(1, self.decay_steps - self.warmup)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
        return self.floor + coeff * (self.peak - self.floor)


def proximal_term(params: list[torch.Tensor], ref: list[torch.Tensor]) -> torch.Tensor:
    """Σ‖w − w_ref‖² over all parameters (FedProx multiplies it by mu/2)."""
    return sum(((p.detach().float() - r.float()) ** 2).sum() for p, r in zip(params, ref, strict=True))


@torch.no_grad()
def add_proximal_grad(params: list[torch.Tensor], ref: list[torch.Tensor], mu: float) -> None:
    """Add ∇ (mu/2)·‖w − w_ref‖² = mu·(w − w_ref) to each .grad, without building an autograd graph."""
    for p, r in zip(params, ref, strict=True):
        if p.grad is not None:
            p.grad.add_(p.detach() - r.to(p.dtype), alpha=mu)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterator, iters: int, ctx: contextlib.AbstractContextManager | None = None
) -> dict[str, float]:
    """Mean loss, perplexity and next-token accuracy over `iters` batches; restores the training mode.

    Accuracy: the share of target positions (-1 targets are padding) where the likeliest token is right.
    """
    was_training = model.training
    model.eval()
    losses = torch.zeros(iters)
    correct, counted = 0, 0
    for i in range(iters):
        x, y = next(batches)
        with ctx or contextlib.nullcontext():
            logits, loss = model(x, y)
        losses[i] = loss.item()
        scored = y >= 0
        correct += int((logits.argmax(dim=-1) == y)[scored].sum())
        counted += int(scored.sum())
    model.train(was_training)
    mean = losses.mean().item()
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "accuracy": correct / max(1, counted)}


class Trainer:
    """Model, optimizer, precision and step counter of one process.

    `model` is what runs forward (compiled and/or DDP-wrapped); `raw_model` is the plain GPT whose
    state_dict goes into checkpoints and onto the wire.
    """

    def __init__(
        self,
        model: GPT,
        cfg: TrainConfig,
        device: torch.device,
        ddp_rank: int | None = None,
        log: Callable[[str], None] | None = print,
    ):
        self.cfg = cfg
        self.device = device
        self.raw_model = model.to(device)
        self._optimizer: FusedAdamW | torch.optim.Optimizer | None = None
        self.ctx, self.scaler, self.precision = precision_context(cfg.precision, device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        elif device.type == "cpu":
            reuse_freed_cpu_memory()
        self.model: nn.Module = torch.compile(model) if cfg.compile else model
        self.ddp = ddp_rank is not None
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.step = 0  # optimizer steps taken, drives the LR schedule
        self.log = log
        self.peak = peak_flops(device)

    @property
    def optimizer(self) -> FusedAdamW | MuonAdamW | torch.optim.Optimizer:
        """AdamW (or Muon and AdamW, or SGD), built on first use: evaluation-only callers (a ClientApp
        answering a query) never pay for it."""
        if self._optimizer is None and self.cfg.optimizer == "sgd":
            self._optimizer = torch.optim.SGD(self.raw_model.parameters(), lr=self.cfg.learning_rate)
        if self._optimizer is None:
            c = self.cfg
            self._optimizer = self.raw_model.configure_optimizers(
                c.weight_decay,
                c.learning_rate,
                (c.beta1, c.beta2),
                self.device.type,
                muon=c.optimizer == "muon",
                muon_momentum=c.muon_momentum,
            )
        return self._optimizer

    def train_steps(
        self,
        batches: Iterator,
        num_steps: int,
        schedule: Schedule | None = None,
        at_step: int | None = None,
        grad_accum_steps: int | None = None,
        mu: float = 0.0,
        ref: list[torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Run `num_steps` optimizer steps. Returns loss (mean), tokens, seconds, tokens_per_s, grad_norm, lr.

        The learning rate follows `schedule` (default: the local trainer's, Schedule.of(cfg)) from step
        `at_step` (default: the steps this trainer has taken); mu > 0 adds FedProx's proximal term against
        `ref` (the parameters of raw_model in order, e.g. the global model of this round).
        """
        if mu > 0 and ref is None:
            raise ValueError("mu > 0 needs ref, the reference parameters of the proximal term")
        schedule = schedule or Schedule.of(self.cfg)
        if at_step is not None:
            self.step = at_step
        accum = grad_accum_steps or self.cfg.grad_accum_steps
        params = list(self.raw_model.parameters())
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)  # summed on the device: no host sync per step
        tokens, lr, grad_norm = 0, 0.0, torch.zeros(())
        t0 = t_log = time.perf_counter()
        since_log = 0
        for _ in range(num_steps):
            lr = schedule.lr(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss, step_tokens = self._forward_backward(batches, accum)
            grad_norm = self._update(params, mu, ref)
            loss_sum += loss
            tokens += step_tokens
            self.step, since_log = self.step + 1, since_log + 1
            if self.log is not None and self.step % self.cfg.log_interval == 0:
                now = time.perf_counter()  # the loss is read (a host sync) only here, once per log line
                dt = (now - t_log) / since_log
                self.log(self.format_log(loss.item(), lr, float(grad_norm), dt, step_tokens))
                t_log, since_log = now, 0
        seconds = time.perf_counter() - t0
        return {
            "loss": (loss_sum / max(1, num_steps)).item(),
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "steps": num_steps,
        }

    def _forward_backward(self, batches: Iterator, accum: int) -> tuple[torch.Tensor, int]:
        """One step's gradients over `accum` micro-batches; its mean loss (a device tensor) and tokens."""
        loss_sum, tokens = torch.zeros((), device=self.device), 0
        for micro in range(accum):
            x, y = next(batches)
            # Under DDP, all-reduce gradients only on the last micro-step.
            sync = not self.ddp or micro == accum - 1
            with self.ctx, contextlib.nullcontext() if sync else self.model.no_sync():
                _, loss = self.model(x, y)
                loss = loss / accum
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            loss_sum += loss.detach()
            tokens += x.numel()
        return loss_sum, tokens

    def _update(self, params: list[torch.Tensor], mu: float, ref: list[torch.Tensor] | None) -> torch.Tensor:
        """The optimizer step on the gradients in place (unscaled, proximal term added, clipped); the norm."""
        grad_norm = torch.zeros(())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if mu > 0:
            add_proximal_grad(params, ref, mu)
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()
        return grad_norm

    def format_log(self, loss: float, lr: float, grad_norm: float, dt: float, tokens_per_step: int) -> str:
        """One fixed-field line: step, loss, lr, grad norm, ms/step, tokens/s, MFU."""
        world = torch.distributed.get_world_size() if self.ddp else 1
        tps = tokens_per_step * world / dt
        mfu = (
            "-"
            if self.peak is None
            else f"{100 * self.raw_model.estimate_mfu(tokens_per_step, dt, self.peak):.1f}%"
        )
        return (
            f"step {self.step:6d} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:6.3f} | {dt * 1000:7.1f} "
            f"ms/step | {tps:9.0f} tok/s | mfu {mfu}"
        )


def build_model(cfg: Config, tokenizer_meta: dict, vocab_size: int) -> GPT:
    """The GPT that cfg.train.init_from asks for: "scratch", a fedgpt checkpoint path, or "hf:DIR" (GPT-2
    weights).

    Checks that the model can read the tokenizer's ids and that a checkpoint's architecture is the one
    model.* describes; a checkpoint or HF model is cropped to model.block_size when that is smaller than
    its own context.
    """
    from fedgpt.checkpoint import architecture_diff, load_checkpoint, model_from_checkpoint

    init, m = cfg.train.init_from, cfg.model
    if init == "scratch":
        if m.vocab_size and m.vocab_size < vocab_size:
            raise ValueError(
                f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {vocab_size}: set it to 0 "
                "(use the tokenizer's) or larger"
            )
        return GPT(dataclasses.replace(m, vocab_size=m.vocab_size or vocab_size))
    if init.startswith("hf:"):
        if tokenizer_meta.get("kind") != "gpt2":
            raise ValueError(
                f"train.init_from={init} loads GPT-2 weights, which need data.tokenizer=gpt2 (got "
                f"{tokenizer_meta.get('kind')})"
            )
        from fedgpt.hf import from_hf

        model = from_hf(init[3:], dropout=m.dropout)
    else:
        ckpt = load_checkpoint(init)
        if ckpt["tokenizer"] != tokenizer_meta:
            raise ValueError(
                f"checkpoint {init} was trained with another tokenizer ({ckpt['tokenizer'].get('kind')}) "
                f"than data.tokenizer={tokenizer_meta.get('kind')}: use the same data settings"
            )
        model = model_from_checkpoint(ckpt, dropout=m.dropout)
    diffs = architecture_diff(model.cfg, m, initialising=True)
    if diffs:
        raise ValueError(
            f"train.init_from={init} is another architecture than the config's ({'; '.join(diffs)}): set "
            "model.* to the checkpoint's (a smaller block_size is fine)"
        )
    if model.cfg.vocab_size < vocab_size:
        raise ValueError(f"{init} has vocab_size {model.cfg.vocab_size} < the tokenizer's {vocab_size}")
    if m.block_size < model.cfg.block_size:
        model.crop_block_size(m.block_size)
    return model
