"""What crosses the wire: model weights, or a client's update, as a Flower ArrayRecord of one flat array.

    record = to_record(state, aliases, fmt="int8", base=received)    # a client's update, quantized
    state = from_record(record, aliases, base=global_state, like=global_state)

Downlink (server -> client, fed.downlink): the global weights, fp32 or fp16. Uplink (client -> server,
fed.uplink): the trained weights in fp32; or the update, trained minus received weights, in fp16, or
quantized to int8 or int4 with one fp32 scale per block of fed.quant_block values (symmetric, round to
nearest, zero exact). The server adds an update to its fp32 global model, so rounding never accumulates
there, and with fed.error_feedback a client adds what quantization cut from its last update to its next one
(fedgpt.fed.client). Flower's ArrayRecord rejects bf16, so half precision means fp16.

All tensors travel as one flat array (a quantized update: its codes, their scales and the block size),
split again by the receiver's own model: Flower moves every array of a message as its own object, each hop
(ServerApp, SuperLink, SuperNode, ClientApp) pushing or pulling it with a request of its own
(docs/deployment.md has what that cost). Strategies still see one fp32 array per tensor (to_record(...,
flat=False)), and their state keeps those names.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.nn import functional as F

FORMATS = ("fp32", "fp16", "int8", "int4")
FLAT, CODES, SCALES, BLOCK = "flat", "codes", "scales", "block"  # the arrays of a record


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


def flatten(
    state: dict[str, torch.Tensor], aliases: dict[str, str], base: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Every tensor but tied aliases, in state order, as one fp32 vector; with `base`, state - base."""
    parts = [
        (v.detach().float().cpu() - (base[k].float() if base is not None else 0)).reshape(-1)
        for k, v in state.items()
        if k not in aliases
    ]
    return torch.cat(parts)


def quantize(x: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest quantization of a flat fp32 vector, one fp32 scale per block of `block`.

    Returns (codes, scales): int8 codes in [-127, 127] for 8 bits; for 4 bits, codes in [-7, 7] packed two
    to a byte (uint8, low nibble first, each stored + 8).
    """
    levels = 2 ** (bits - 1) - 1  # 127 or 7: as many steps on both sides of an exact zero
    blocks = F.pad(x, (0, (-x.numel()) % block)).view(-1, block)  # (nb, block)
    scales = blocks.abs().amax(dim=1) / levels  # (nb,)
    q = torch.round(blocks / torch.where(scales > 0, scales, 1.0)[:, None]).clamp_(-levels, levels)
    q = q.to(torch.int8).view(-1)[: x.numel()]
    if bits == 8:
        return q, scales
    nibbles = F.pad((q + 8).to(torch.uint8), (0, q.numel() % 2))  # (2k,) values 1..15
    return nibbles[0::2] | (nibbles[1::2] << 4), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """The fp32 vector of n values that quantize() encoded (4 bits when the codes are uint8)."""
    if codes.dtype == torch.uint8:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=1).view(-1).to(torch.int8) - 8
    q = F.pad(codes[:n].float(), (0, (-n) % block)).view(-1, block)
    return (q * scales[:, None]).view(-1)[:n]


def encode(flat: torch.Tensor, fmt: str, block: int = 64) -> ArrayRecord:
    """A flat fp32 vector as a record in `fmt` (fp32, fp16, int8, int4)."""
    if fmt in ("fp32", "fp16"):
        return ArrayRecord({FLAT: flat.half() if fmt == "fp16" else flat})
    codes, scales = quantize(flat, 8 if fmt == "int8" else 4, block)
    return ArrayRecord({CODES: codes, SCALES: scales, BLOCK: torch.tensor([block])})


def decode(record: ArrayRecord, n: int) -> torch.Tensor:
    """The flat fp32 vector of n values a record of encode() holds."""
    arrays = record.to_torch_state_dict()
    if FLAT in arrays:
        return arrays[FLAT].float()
    return dequantize(arrays[CODES], arrays[SCALES], int(arrays[BLOCK][0]), n)


def to_record(
    state: dict[str, torch.Tensor],
    aliases: dict[str, str],
    fmt: str = "fp32",
    base: dict[str, torch.Tensor] | None = None,
    block: int = 64,
    flat: bool = True,
) -> ArrayRecord:
    """Pack weights (minus tied aliases) in `fmt`; with `base`, pack state - base (an update).

    flat: every tensor, in state order, in one array (the wire). Not flat: one fp32 array per tensor (what
    strategies average).
    """
    if not flat:
        return ArrayRecord({k: v.detach().float().cpu() for k, v in state.items() if k not in aliases})
    return encode(flatten(state, aliases, base), fmt, block)


def from_record(
    record: ArrayRecord,
    aliases: dict[str, str],
    base: dict[str, torch.Tensor] | None = None,
    like: dict[str, torch.Tensor] | None = None,
    who: str = "the sender",
) -> dict[str, torch.Tensor]:
    """Unpack to fp32 tensors, adding `base` back for an update, and restore tied aliases.

    A flat record is split by the names and shapes of `like` (the receiver's own model, in state order); a
    size mismatch raises ValueError."""
    if FLAT not in record and CODES not in record:
        state = {k: v.float() for k, v in record.to_torch_state_dict().items()}  # one array per tensor
    else:
        if like is None:
            raise ValueError("a flat record needs the receiving model's state dict (like=) to unpack")
        names = [k for k in like if k not in aliases]
        sizes = [like[k].numel() for k in names]
        sent = _values(record)
        if sent not in (sum(sizes), sum(sizes) + (CODES in record and record[CODES].dtype == "uint8")):
            raise ValueError(
                f"{who} sent {sent:,} values for a model of {sum(sizes):,}: every client must use "
                "the server's model config and tokenizer"
            )
        flat = decode(record, sum(sizes))
        state = {k: t.view(like[k].shape) for k, t in zip(names, flat.split(sizes))}
    if base is not None:
        state = {k: base[k].float() + v for k, v in state.items()}
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    return state


def _values(record: ArrayRecord) -> int:
    """How many values a flat record holds (two per byte in 4-bit codes, which may end in one of padding)."""
    if FLAT in record:
        return record[FLAT].shape[0]
    codes = record[CODES]
    return codes.shape[0] * (2 if codes.dtype == "uint8" else 1)


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
