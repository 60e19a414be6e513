"""What crosses the wire: model weights as a Flower ArrayRecord of one flat array, tied weights once.

Downlink (server -> client): the global weights, fp32 or fp16. Uplink (client -> server): the trained
weights in fp32, or with half precision the fp16 *difference* from the weights the client received; the
server adds it to its fp32 global model, so rounding never accumulates. Flower's ArrayRecord rejects bf16,
so half precision means fp16.

All tensors travel as one flat array, split again by the receiver's own model: Flower moves every array of a
message as its own object, each hop (ServerApp, SuperLink, SuperNode, ClientApp) pushing or pulling it with a
request of its own (docs/deployment.md has what that cost). Strategies still see one fp32 array per tensor
(to_record(..., flat=False)), and their state keeps those names.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch import nn


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: canonical} for state_dict entries that share storage (lm_head.weight ->
    transformer.wte.weight)."""
    seen: dict[int, str] = {}
    aliases = {}
    for k, v in model.state_dict(keep_vars=True).items():
        ptr = v.data_ptr()
        if ptr in seen:
            aliases[k] = seen[ptr]
        else:
            seen[ptr] = k
    return aliases


FLAT = "flat"  # the key of the one array of a flat record


def to_record(
    state: dict[str, torch.Tensor],
    aliases: dict[str, str],
    half: bool = False,
    base: dict[str, torch.Tensor] | None = None,
    flat: bool = True,
) -> ArrayRecord:
    """Pack weights (minus tied aliases) in fp32, or fp16 with `half`; with `base`, pack state - base (the
    uplink delta).

    flat: every tensor, in state order, in one array (the wire). Not flat: one array per tensor (what
    strategies average).
    """
    out = {}
    for k, v in state.items():
        if k in aliases:
            continue
        v = v.detach().float().cpu()
        if base is not None:
            v = v - base[k].float()
        out[k] = v.half() if half else v
    if flat:
        out = {FLAT: torch.cat([v.reshape(-1) for v in out.values()])}
    return ArrayRecord(out)


def from_record(
    record: ArrayRecord,
    aliases: dict[str, str],
    base: dict[str, torch.Tensor] | None = None,
    like: dict[str, torch.Tensor] | None = None,
    who: str = "the sender",
) -> dict[str, torch.Tensor]:
    """Unpack to fp32 tensors, adding `base` back for a delta, and restore tied aliases.

    A flat record is split by the names and shapes of `like` (the receiver's own model, in state order); a
    size mismatch raises ValueError."""
    state = {k: v.float() for k, v in record.to_torch_state_dict().items()}
    if set(state) == {FLAT}:
        if like is None:
            raise ValueError("a flat record needs the receiving model's state dict (like=) to unpack")
        flat, names = state[FLAT], [k for k in like if k not in aliases]
        sizes = [like[k].numel() for k in names]
        if flat.numel() != sum(sizes):
            raise ValueError(
                f"{who} sent {flat.numel():,} values for a model of {sum(sizes):,}: every client must use "
                "the server's model config and tokenizer"
            )
        state = {k: t.view(like[k].shape) for k, t in zip(names, flat.split(sizes))}
    if base is not None:
        state = {k: base[k].float() + v for k, v in state.items()}
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    return state


def check_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], who: str) -> None:
    """Raise ValueError if weights from `who` do not fit the expected model (another architecture or
    vocabulary)."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or shapes:
        raise ValueError(
            f"{who} sent weights of another model (missing {missing[:3]}, unexpected {extra[:3]}, shapes "
            f"{shapes[:3]}): every client must use the server's model config and tokenizer"
        )
