"""LoRA (Hu et al. 2021): low-rank adapters beside the GPT's projections, the rest of the model frozen.

    add_lora(model, cfg.lora)         # c_attn, attn.c_proj, c_fc, mlp.c_proj get adapters; all else frozen
                                      # (lora.targets=attn,mlp,embedding: the tied embedding and head too)
                                      # (lora.embedding_rows=K: K rows of the tied embedding in full too)
                                      # (lora.head_bias: a bias over the vocabulary on the head too)
    adapters = adapter_state(model)   # what a federated client trains and sends: lora_A, lora_B, lora_rows,
                                      # lora_bias
    plain = merged_state(model)       # base + scale * B @ A: a plain GPT's state dict (checkpoints, sampling)

Written here rather than taken from peft: fedgpt's GPT is not a transformers model, the layer is a few
lines, and merged_state keeps the one checkpoint format, which every reader (python -m fedgpt.sample)
already takes.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedgpt.config import LoRAConfig
from fedgpt.model import GPT

ADAPTER_LEAVES = ("lora_A", "lora_B", "lora_rows", "lora_bias")  # what trains (and travels) under LoRA
TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}  # in every block


class LowRank(nn.Module):
    """What every adapter here holds: its base layer (weight (out, in)), A (r, in) initialised as nn.Linear
    initialises its weight, B (out, r) at zero, so the adapted layer starts as the base; the merged weight."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, n_in: int, n_out: int, generator=None):
        super().__init__()
        self.base = base
        a = nn.init.kaiming_uniform_(
            torch.empty(rank, n_in), a=math.sqrt(5), generator=generator
        )  # on the CPU:
        self.lora_A = nn.Parameter(a.to(base.weight.device))  # the same A wherever it is built, from one seed
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, device=base.weight.device))
        self.scale = alpha / rank

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)


class LoRALinear(LowRank):
    """y = base(x) + (alpha / r) * dropout(x) A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator=None):
        super().__init__(base, rank, alpha, base.in_features, base.out_features, generator)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale


class LoRAEmbedding(LowRank):
    """The token embedding W (vocab, n_embd) as W + (alpha / r) B A, with B (vocab, r) and A (r, n_embd).
    The output head shares W (tied weights), so it is wrapped too (LoRAHead) with the same adapter: embedding
    and head stay one matrix. Initialised as an adapter of the head (in n_embd, out vocab): with B random
    instead, A's steps would move the logits only along r fixed random directions of the vocabulary."""

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, generator=None):
        super().__init__(base, rank, alpha, base.embedding_dim, base.num_embeddings, generator)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.base(idx) + nn.functional.embedding(idx, self.lora_B) @ self.lora_A * self.scale

    def adapt_logits(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


class RowEmbedding(nn.Module):
    """The token embedding W with K of its rows trained in full: W + D on those rows, D (K, n_embd) at zero.
    The rows are fixed for the run and the same on every side (frequent_rows: the most frequent tokens of a
    public text, counted by the server, which sends their ids); the tied head adds x D^T to their logits.
    Averaging D is exact, as for any weight."""

    def __init__(self, base: nn.Embedding, rows: torch.Tensor):
        super().__init__()
        self.base = base
        device, k = base.weight.device, len(rows)
        self.lora_rows = nn.Parameter(torch.zeros(k, base.embedding_dim, device=device))
        slot = torch.full((base.num_embeddings,), k, dtype=torch.long)  # row k: zeros, for every other token
        slot[rows] = torch.arange(k)
        self.register_buffer("row_ids", rows.to(device), persistent=False)  # not in checkpoints
        self.register_buffer("slot", slot.to(device), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([self.lora_rows, self.lora_rows.new_zeros(1, self.lora_rows.shape[1])])
        return self.base(idx) + nn.functional.embedding(self.slot[idx], padded)

    def adapt_logits(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(-1, self.row_ids, (x @ self.lora_rows.t()).to(logits.dtype))

    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight
        return w.index_add(0, self.row_ids, self.lora_rows.to(w.dtype))


def embedding_rows(model: nn.Module) -> list[int] | None:
    """The ids of the embedding rows that `model` trains in full (lora.embedding_rows), or None."""
    wte = model.transformer.wte
    return wte.row_ids.tolist() if isinstance(wte, RowEmbedding) else None


def frequent_rows(path: str, tokenizer, k: int, vocab_size: int) -> torch.Tensor:
    """The ids of the k most frequent tokens of the text at `path` (ties: the lower id), ascending."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(
            f"lora.rows_from={path}: cannot read it ({e.strerror or e}); give a public text file that the "
            "server can read (e.g. the base model's training text)"
        ) from None
    if k > vocab_size:
        raise ValueError(f"lora.embedding_rows={k}: the vocabulary has {vocab_size} rows; give at most that")
    counts = np.bincount(np.asarray(tokenizer.encode(text), dtype=np.int64), minlength=vocab_size)
    return torch.from_numpy(np.sort(np.argsort(-counts, kind="stable")[:k]))


class LoRAHead(nn.Module):
    """The output head: logits = x W^T, plus the part of the tied embedding's adapter (LoRAEmbedding or
    RowEmbedding; its parameters stay the embedding's, outside this module's state, so they travel once), plus
    with `bias` a trained bias over the vocabulary (lora_bias, at zero): what full fine-tuning gets by moving
    every row of the tied embedding, and no adapter on the blocks can give (docs/results.md, LoRA)."""

    def __init__(self, base: nn.Linear, embedding: LoRAEmbedding | RowEmbedding | None, bias: bool = False):
        super().__init__()
        self.base = base
        self._embedding = (embedding,)  # a tuple: not registered as a submodule, its adapter not listed twice
        self.lora_bias = (
            nn.Parameter(torch.zeros(base.out_features, device=base.weight.device)) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.base(x)
        if self._embedding[0] is not None:
            logits = self._embedding[0].adapt_logits(x, logits)
        return logits if self.lora_bias is None else logits + self.lora_bias.to(logits.dtype)

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight if self._embedding[0] is None else self._embedding[0].merged_weight()

    def merged_bias(self) -> torch.Tensor | None:
        if self.lora_bias is None:
            return self.base.bias
        return self.lora_bias.detach() + (0 if self.base.bias is None else self.base.bias)


def add_lora(
    model: GPT, cfg: LoRAConfig, seed: int = 0, tokenizer=None, rows: list[int] | None = None
) -> GPT:
    """Wrap the target projections of every block in LoRALinear, and with the "embedding" target the tied
    embedding and head; freeze every other parameter (in place). Every A is drawn from `seed`: the server and
    every client build the same adapters. lora.scheme=ffa freezes A as drawn (FFA-LoRA: only B trains and
    travels, so the average of the clients' B A is the averaged B times the one A: exact).
    lora.embedding_rows=K trains K rows of the tied embedding in full (RowEmbedding), at lora.rows_lr_scale x
    the learning rate: `rows` (a client takes the server's, sent with the run's config) or, without them, the
    K most frequent tokens of lora.rows_from in `tokenizer` (the server)."""
    targets = [t.strip() for t in cfg.targets.split(",")]
    suffixes = [s for t in targets if t in TARGETS for s in TARGETS[t]]
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    if "embedding" in targets:
        model.transformer.wte = LoRAEmbedding(model.transformer.wte, cfg.rank, cfg.alpha, g)
        model.lm_head = LoRAHead(model.lm_head, model.transformer.wte)
    if cfg.embedding_rows:
        wte = model.transformer.wte
        if rows is None:
            ids = frequent_rows(cfg.rows_from, tokenizer, cfg.embedding_rows, wte.num_embeddings)
        else:
            ids = torch.tensor(rows, dtype=torch.long)
            if len(ids) != cfg.embedding_rows:
                raise ValueError(
                    f"the server sent {len(ids)} embedding rows for lora.embedding_rows="
                    f"{cfg.embedding_rows}: run the server and every node from the same fedgpt version"
                )
        model.transformer.wte = RowEmbedding(wte, ids)
        model.transformer.wte.lora_rows.lr_scale = cfg.rows_lr_scale  # GPT.configure_optimizers reads it
        model.lm_head = LoRAHead(model.lm_head, model.transformer.wte)
    if cfg.head_bias:
        head = model.lm_head
        base, embedding = (head.base, head._embedding[0]) if isinstance(head, LoRAHead) else (head, None)
        model.lm_head = LoRAHead(base, embedding, bias=True)
        model.lm_head.lora_bias.lr_scale = cfg.bias_lr_scale  # GPT.configure_optimizers reads it
        model.cfg.head_bias = True  # the merged plain GPT has one (checkpoints record model.cfg)
    for block in model.transformer.h:
        for suffix in suffixes:
            parent_name, name = suffix.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, name, LoRALinear(getattr(parent, name), cfg.rank, cfg.alpha, cfg.dropout, g))
    if cfg.scheme == "ffa":
        for m in model.modules():
            if isinstance(m, LowRank):
                m.lora_A.requires_grad_(False)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors that train, by state_dict name (everything a LoRA client trains and sends): A
    and B (B alone under FFA-LoRA) and the embedding's trained rows."""
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    return {
        k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES and k in trains
    }


def aggregation_error(states: list[dict], weights: list[float], model: nn.Module) -> float:
    """How far averaging A and B apart is from averaging the adapters' products: ||mean(B A) - mean(B)
    mean(A)|| over ||mean(B A)||, every adapter of the clients' `states` together (an A a state lacks is the
    model's: FFA-LoRA's frozen one), with the aggregation's `weights`."""
    own = dict(model.state_dict())
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    gap, size = 0.0, 0.0
    for key in [k for k in own if k.endswith(".lora_B")]:
        a_key = key[: -len("B")] + "A"
        bs = torch.stack([s[key].double() for s in states])  # (n, out, r)
        as_ = torch.stack([s.get(a_key, own[a_key]).double() for s in states])  # (n, r, in)
        product = torch.einsum("n,nor,nri->oi", w, bs, as_)  # mean(B A)
        apart = torch.einsum("n,nor->or", w, bs) @ torch.einsum("n,nri->ri", w, as_)  # mean(B) mean(A)
        gap += float((product - apart).square().sum())
        size += float(product.square().sum())
    return (gap / size) ** 0.5 if size > 0 else 0.0


def merged_model(model: GPT) -> GPT:
    """A plain GPT of its own that computes what `model` with its adapters computes (merged_state loaded)."""
    plain = GPT(copy.deepcopy(model.cfg))
    plain.load_state_dict(merged_state(model))
    return plain


def merged_state(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict of the plain GPT that computes what the adapted model computes: each adapter folded into
    its base weight (for checkpoints: python -m fedgpt.sample reads them as any other)."""
    merged = {}
    wrapped = {
        name: m for name, m in model.named_modules() if isinstance(m, (LowRank, LoRAHead, RowEmbedding))
    }
    for k, v in model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if leaf in ADAPTER_LEAVES:
            continue
        if owner.endswith(".base") and owner[: -len(".base")] in wrapped:
            name = owner[: -len(".base")]
            merged[f"{name}.{leaf}"] = wrapped[name].merged_weight().detach() if leaf == "weight" else v
        else:
            merged[k] = v
    head = model.lm_head
    if isinstance(head, LoRAHead) and head.merged_bias() is not None:
        merged["lm_head.bias"] = head.merged_bias()
    return merged
