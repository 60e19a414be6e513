"""What crosses the wire: model weights as a Flower ArrayRecord, tied weights once, optionally fp16.

Downlink (server -> client): the global weights, fp32 or fp16.
Uplink (client -> server): the trained weights in fp32, or with half precision the fp16 *difference* from the
weights the client received; the server adds it to its fp32 global model, so rounding never accumulates.
Flower's ArrayRecord rejects bf16, so half precision means fp16, and all tensors travel as one flat fp16 array: one
array header instead of one per tensor, so the payload is half the fp32 model's bytes (plus ~130 bytes).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch import nn


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: canonical} for state_dict entries that share storage (lm_head.weight -> transformer.wte.weight)."""
    seen: dict[int, str] = {}
    aliases = {}
    for k, v in model.state_dict(keep_vars=True).items():
        ptr = v.data_ptr()
        if ptr in seen:
            aliases[k] = seen[ptr]
        else:
            seen[ptr] = k
    return aliases


FLAT = "fp16-flat"  # the key of the one array of a half-precision record


def to_record(state: dict[str, torch.Tensor], aliases: dict[str, str], half: bool = False,
              base: dict[str, torch.Tensor] | None = None) -> ArrayRecord:
    """Pack weights (minus tied aliases); with `base`, pack state - base instead (the uplink delta).

    fp32: one array per tensor. Half: every tensor, in state order, in one flat fp16 array.
    """
    out = {}
    for k, v in state.items():
        if k in aliases:
            continue
        v = v.detach().float().cpu()
        if base is not None:
            v = v - base[k].float()
        out[k] = v.half() if half else v
    if half:
        out = {FLAT: torch.cat([v.reshape(-1) for v in out.values()])}
    return ArrayRecord(out)


def from_record(record: ArrayRecord, aliases: dict[str, str], base: dict[str, torch.Tensor] | None = None,
                like: dict[str, torch.Tensor] | None = None, who: str = "the sender") -> dict[str, torch.Tensor]:
    """Unpack to fp32 tensors, adding `base` back for a delta, and restore tied aliases.

    A flat half-precision record is split by the names and shapes of `like` (the receiver's own model, in
    state order); a size mismatch raises ValueError."""
    state = {k: v.float() for k, v in record.to_torch_state_dict().items()}
    if set(state) == {FLAT}:
        if like is None:
            raise ValueError("a flat fp16 record needs the receiving model's state dict (like=) to unpack")
        flat, names = state[FLAT], [k for k in like if k not in aliases]
        sizes = [like[k].numel() for k in names]
        if flat.numel() != sum(sizes):
            raise ValueError(f"{who} sent {flat.numel():,} fp16 values for a model of {sum(sizes):,}: every client must use "
                             "the server's model config and tokenizer")
        state = {k: t.view(like[k].shape) for k, t in zip(names, flat.split(sizes))}
    if base is not None:
        state = {k: base[k].float() + v for k, v in state.items()}
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    return state


def check_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], who: str) -> None:
    """Raise ValueError if weights from `who` do not fit the expected model (another architecture or vocabulary)."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        raise ValueError(f"{who} sent weights of another model (missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"shapes {shapes[:3]}): every client must use the server's model config and tokenizer")
