"""LoRA (Hu et al. 2021): low-rank adapters beside the GPT's projections, the rest of the model frozen.

    add_lora(model, cfg.lora)         # c_attn, attn.c_proj, c_fc, mlp.c_proj get adapters; all else frozen
    adapters = adapter_state(model)   # what a federated client trains and sends: {name.lora_A, name.lora_B}
    plain = merged_state(model)       # base + scale * B @ A: a plain GPT's state dict (checkpoints, sampling)

Written here rather than taken from peft: fedgpt's GPT is not a transformers model, the layer is a few
lines, and merged_state keeps the one checkpoint format, which every reader (python -m fedgpt.sample)
already takes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedgpt.config import LoRAConfig
from fedgpt.model import GPT

TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * dropout(x) A^T B^T, with A (r, in) and B (out, r); B starts at zero, so the
    wrapped layer starts as the base layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)


def add_lora(model: GPT, cfg: LoRAConfig) -> GPT:
    """Wrap the target projections of every block in LoRALinear; freeze every other parameter (in place)."""
    suffixes = [s for t in cfg.targets.split(",") for s in TARGETS[t.strip()]]
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.h:
        for suffix in suffixes:
            parent_name, name = suffix.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, name, LoRALinear(getattr(parent, name), cfg.rank, cfg.alpha, cfg.dropout))
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors, by state_dict name (everything a LoRA client trains)."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


def merged_state(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict of the plain GPT that computes what the adapted model computes: each adapter folded into
    its base weight (for checkpoints: python -m fedgpt.sample reads them as any other)."""
    merged = {}
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for k, v in model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            continue
        if owner.endswith(".base") and owner[: -len(".base")] in wrapped:
            name = owner[: -len(".base")]
            merged[f"{name}.{leaf}"] = wrapped[name].merged_weight().detach() if leaf == "weight" else v
        else:
            merged[k] = v
    return merged
