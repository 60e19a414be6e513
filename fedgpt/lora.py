"""LoRA (Hu et al. 2021): low-rank adapters beside the GPT's projections, the rest of the model frozen.

    add_lora(model, cfg.lora)         # c_attn, attn.c_proj, c_fc, mlp.c_proj get adapters; all else frozen
                                      # (lora.targets=attn,mlp,embedding: the tied embedding and head too)
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

TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}  # in every block


class LowRank(nn.Module):
    """What every adapter here holds: its base layer (weight (out, in)), A (r, in) initialised as nn.Linear
    initialises its weight, B (out, r) at zero, so the adapted layer starts as the base; the merged weight."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, n_in: int, n_out: int):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, n_in, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)


class LoRALinear(LowRank):
    """y = base(x) + (alpha / r) * dropout(x) A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base, rank, alpha, base.in_features, base.out_features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale


class LoRAEmbedding(LowRank):
    """The token embedding W (vocab, n_embd) as W + (alpha / r) B A, with B (vocab, r) and A (r, n_embd).
    The output head shares W (tied weights), so it is wrapped too (LoRAHead) with the same adapter: embedding
    and head stay one matrix. Initialised as an adapter of the head (in n_embd, out vocab): with B random
    instead, A's steps would move the logits only along r fixed random directions of the vocabulary."""

    def __init__(self, base: nn.Embedding, rank: int, alpha: float):
        super().__init__(base, rank, alpha, base.embedding_dim, base.num_embeddings)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.base(idx) + nn.functional.embedding(idx, self.lora_B) @ self.lora_A * self.scale


class LoRAHead(nn.Module):
    """The output head tied to a LoRAEmbedding: logits = x W^T + scale (x A^T) B^T with the embedding's A and
    B, which stay the embedding's parameters (held outside this module's state, so they travel once)."""

    def __init__(self, base: nn.Linear, embedding: LoRAEmbedding):
        super().__init__()
        self.base = base
        self._embedding = (embedding,)  # a tuple: not registered as a submodule, its adapter not listed twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self._embedding[0]
        return self.base(x) + (x @ e.lora_A.t() @ e.lora_B.t()) * e.scale

    def merged_weight(self) -> torch.Tensor:
        return self._embedding[0].merged_weight()


def add_lora(model: GPT, cfg: LoRAConfig) -> GPT:
    """Wrap the target projections of every block in LoRALinear, and with the "embedding" target the tied
    embedding and head; freeze every other parameter (in place)."""
    targets = [t.strip() for t in cfg.targets.split(",")]
    suffixes = [s for t in targets if t in TARGETS for s in TARGETS[t]]
    for p in model.parameters():
        p.requires_grad_(False)
    if "embedding" in targets:
        model.transformer.wte = LoRAEmbedding(model.transformer.wte, cfg.rank, cfg.alpha)
        model.lm_head = LoRAHead(model.lm_head, model.transformer.wte)
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
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, (LowRank, LoRAHead))}
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
