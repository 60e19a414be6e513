"""Generation apart from the network: a sampling loop, ids in and ids out (no tokenizer here).

    out = generate(model, idx, max_new_tokens=100, temperature=0.8, top_k=200)   # (B, T + new)

It works with any model that has a block_size in its cfg and a KV cache of its own (model.new_cache(batch):
fedgpt.model's GPT), and imports none of them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


@torch.no_grad()
def generate(
    model: nn.Module,
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
    cache = model.new_cache(idx.size(0))
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
        if len(cache) < bs:
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
