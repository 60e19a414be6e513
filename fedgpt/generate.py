"""Generation apart from the network: a KV cache and a sampling loop, ids in and ids out (no tokenizer here).

    out = generate(model, idx, max_new_tokens=100, temperature=0.8, top_k=200)   # (B, T + new)
    cache = KVCache.for_model(model, batch_size=2)                               # model(idx, kv_cache=cache)

GPT.forward writes each layer's keys and values into the cache it is given.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fedgpt.model import GPT


class KVCache:
    """Keys and values of every layer for incremental decoding; GPT.forward appends to it in place."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int):
        self.batch_size, self.n_head, self.max_len, self.head_size = batch_size, n_head, max_len, head_size
        # Allocated on the first write of each layer, with the dtype and device of the keys that arrive:
        # under autocast they are bf16/fp16, and a float32 cache would hand SDPA mixed dtypes.
        self.k: list[torch.Tensor | None] = [None] * n_layer  # each (B, nh, max_len, hs)
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0  # positions filled so far, the same in every layer

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache for up to max_len (default: the model's block_size) positions."""
        c = model.cfg
        length = min(max_len or c.block_size, c.block_size)
        return cls(c.n_layer, batch_size, c.n_head, length, c.n_embd // c.n_head)

    def __len__(self) -> int:
        return self.pos

    def reset(self) -> None:
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at the current position; return all keys and values so far."""
        if self.k[layer] is None:
            shape = (self.batch_size, self.n_head, self.max_len, self.head_size)
            self.k[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, pos + T, hs)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample continuations of idx (B, T); returns (B, T + n_generated).

    temperature 0 is greedy. Prompts longer than block_size are cropped to their last block_size tokens for
    conditioning (the output still starts with the whole prompt). Stops early once every row has produced
    eot_id; finished rows are padded with eot_id.
    """
    if max_new_tokens <= 0:
        return idx
    was_training = model.training
    model.eval()
    bs = model.cfg.block_size
    cache = KVCache.for_model(model, idx.size(0))
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    logits, _ = model(idx[:, -bs:], kv_cache=cache)  # prefill
    for i in range(max_new_tokens):
        next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
        if eot_id is not None:
            next_id = next_id.masked_fill(finished.unsqueeze(1), eot_id)
            finished |= next_id.squeeze(1) == eot_id
        idx = torch.cat((idx, next_id), dim=1)
        if bool(finished.all()) or i == max_new_tokens - 1:
            break
        if cache.pos < bs:
            logits, _ = model(next_id, kv_cache=cache)
        else:
            # Cache full: positions would have to shift (learned wpe, RoPE angles), so re-run the last
            # block_size tokens from scratch, exactly as a cache-free cropped loop would.
            cache.reset()
            logits, _ = model(idx[:, -bs:], kv_cache=cache)
    model.train(was_training)
    return idx


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token id per row (B, 1) from last-position logits (B, vocab)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the ones before it already reach top_p; the most likely one always stays.
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
