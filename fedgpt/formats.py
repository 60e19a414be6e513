"""The wire formats, in one table: where each may travel, what it does to an update, and its codec.

    fmt = FORMATS["int8"]
    arrays = fmt.encode(x, block, kept)     # a flat fp32 vector as arrays: {"codes": int8 (n,), ...}
    fmt.layout(n, block, kept)              # {array: (dtype, shape)} that a record of n values must hold
    x_hat = fmt.decode(arrays, block, n)    # back to fp32 (n,)

Config validation (fed.uplink, fed.downlink, SecAgg+, DP's client clipping, error feedback), the wire
(fedgpt/fed/wire.py: which codec decodes a record is what its header declares, never its arrays' dtype) and
the README's table of formats all read FORMATS. A new format is one row here and one encode/decode pair; the
table is checked at import (each codec's arrays are exactly the layout it declares). A record's header names
its format by its place in FORMATS: add new formats at the end.

The arrays are torch tensors that Flower's ArrayRecord takes as they are: it refuses bf16 and fp8, so fp8
codes travel as their bytes (uint8) and are read back as e4m3 because the header says fp8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

FLAT, CODES, SCALES = "flat", "codes", "scales"  # the arrays of a record
OFFSETS, COUNTS = "offsets", "counts"  # a sparse record's positions: uint16 within chunks of CHUNK values
CHUNK = 1 << 16
E4M3_MAX = 448.0  # torch.float8_e4m3fn's largest finite value
DIRECTIONS = ("uplink", "downlink")
Layout = dict[str, tuple[str, tuple[int, ...]]]  # {array: (dtype, shape)}


def blocks_of(n: int, block: int) -> int:
    return -(-n // block)


def kept_values(n: int, fraction: float) -> int:
    """How many of n values a sparse record keeps (at least one)."""
    return max(1, min(n, round(fraction * n)))


# ---- fp32 and fp16: the values themselves


def fp32_encode(x: torch.Tensor, block: int, kept: int) -> dict[str, torch.Tensor]:
    return {FLAT: x.float()}


def fp16_encode(x: torch.Tensor, block: int, kept: int) -> dict[str, torch.Tensor]:
    return {FLAT: x.half()}


def flat_decode(arrays: dict[str, torch.Tensor], block: int, n: int) -> torch.Tensor:
    return arrays[FLAT].float()


# ---- int8 and int4: symmetric round to nearest, one fp32 scale per block


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


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, n: int) -> torch.Tensor:
    """The fp32 vector of n values that quantize(x, bits, block) encoded."""
    if bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=1).view(-1).to(torch.int8) - 8
    q = F.pad(codes[:n].float(), (0, (-n) % block)).view(-1, block)  # (nb, block)
    return (q * scales[:, None]).view(-1)[:n]


def int8_encode(x: torch.Tensor, block: int, kept: int) -> dict[str, torch.Tensor]:
    codes, scales = quantize(x, 8, block)
    return {CODES: codes, SCALES: scales}


def int8_decode(arrays: dict[str, torch.Tensor], block: int, n: int) -> torch.Tensor:
    return dequantize(arrays[CODES], arrays[SCALES], 8, block, n)


def int4_encode(x: torch.Tensor, block: int, kept: int) -> dict[str, torch.Tensor]:
    codes, scales = quantize(x, 4, block)
    return {CODES: codes, SCALES: scales}


def int4_decode(arrays: dict[str, torch.Tensor], block: int, n: int) -> torch.Tensor:
    return dequantize(arrays[CODES], arrays[SCALES], 4, block, n)


# ---- fp8: e4m3 (4 exponent bits, 3 mantissa bits), one fp32 scale per block


def fp8_encode(x: torch.Tensor, block: int, kept: int) -> dict[str, torch.Tensor]:
    """Each block scaled so that its largest magnitude is e4m3's largest (448), then rounded to e4m3: a
    value's error is at most 2^-4 of itself (3 mantissa bits), or 2^-10 of its block's scale below e4m3's
    normals (2^-6)."""
    blocks = F.pad(x, (0, (-x.numel()) % block)).view(-1, block)  # (nb, block)
    scales = blocks.abs().amax(dim=1) / E4M3_MAX  # (nb,)
    # clamped: x / (absmax / 448) may round past 448, and e4m3fn has no inf, only NaN, beyond it
    scaled = (blocks / torch.where(scales > 0, scales, 1.0)[:, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    codes = scaled.to(torch.float8_e4m3fn).view(-1)[: x.numel()]
    return {CODES: codes.view(torch.uint8), SCALES: scales}  # the e4m3 bytes: Flower takes no fp8 array


def fp8_decode(arrays: dict[str, torch.Tensor], block: int, n: int) -> torch.Tensor:
    q = arrays[CODES].contiguous().view(torch.float8_e4m3fn).float()
    return (F.pad(q, (0, (-n) % block)).view(-1, block) * arrays[SCALES][:, None]).view(-1)[:n]


# ---- sparse: SparseLoCo's top-k at 2 bits a kept value


def sparse_encode(x: torch.Tensor, block: int, kept: int) -> dict[str, torch.Tensor]:
    """The `kept` values of x largest in magnitude, at 2 bits each (SparseLoCo's top-k): their positions
    as uint16 offsets within chunks of CHUNK values and a count per chunk, and their values on a grid of 4
    levels, +-1/3 and +-1 of one fp32 scale per block of `block` kept values (no zero: the kept are the
    largest), packed four to a byte."""
    idx = torch.topk(x.abs(), kept, sorted=False).indices.sort().values
    blocks = F.pad(x[idx], (0, (-kept) % block)).view(-1, block)  # (nb, block)
    scales = blocks.abs().amax(dim=1)  # (nb,)
    level = torch.round((blocks / torch.where(scales > 0, scales, 1.0)[:, None] * 3 + 3) / 2).clamp_(0, 3)
    codes = F.pad(level.to(torch.uint8).view(-1)[:kept], (0, (-kept) % 4)).view(-1, 4)  # 0..3: -1 -1/3 1/3 1
    packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
    counts = torch.bincount(idx // CHUNK, minlength=blocks_of(x.numel(), CHUNK)).to(torch.int32)
    return {
        OFFSETS: (idx % CHUNK).to(torch.int32).to(torch.uint16),
        COUNTS: counts,
        CODES: packed,
        SCALES: scales,
    }


def sparse_decode(arrays: dict[str, torch.Tensor], block: int, n: int) -> torch.Tensor:
    """The fp32 vector of n values a sparse record holds: zero but for its kept values."""
    counts = arrays[COUNTS].long()
    chunk_of = torch.repeat_interleave(torch.arange(len(counts)), counts)
    idx = chunk_of * CHUNK + arrays[OFFSETS].to(torch.int32).long()
    packed = arrays[CODES]
    codes = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=1).view(-1)[: len(idx)].float()
    scales = arrays[SCALES].repeat_interleave(block)[: len(idx)]
    out = torch.zeros(n)
    out[idx] = (codes * 2 - 3) / 3 * scales
    return out


# ---- the table


def flat_layout(dtype: str) -> Callable[[int, int, int], Layout]:
    return lambda n, block, kept: {FLAT: (dtype, (n,))}


def scaled_layout(codes_dtype: str, values_per_code: int) -> Callable[[int, int, int], Layout]:
    """Codes (values_per_code to an element) and an fp32 scale per block."""
    return lambda n, block, kept: {
        CODES: (codes_dtype, (blocks_of(n, values_per_code),)),
        SCALES: ("float32", (blocks_of(n, block),)),
    }


def sparse_layout(n: int, block: int, kept: int) -> Layout:
    return {
        OFFSETS: ("uint16", (kept,)),
        COUNTS: ("int32", (blocks_of(n, CHUNK),)),
        CODES: ("uint8", (blocks_of(kept, 4),)),
        SCALES: ("float32", (blocks_of(kept, block),)),
    }


@dataclass(frozen=True)
class Format:
    """One wire format: where it may travel, what it does to an update, and its codec."""

    name: str
    directions: tuple[str, ...]  # of DIRECTIONS: an uplink carries a client's update, a downlink the weights
    quantized: bool  # values on a coarse grid, or dropped: client-side DP clipping would be undone by it
    error_feedback: bool  # fed.error_feedback applies: a client adds what it cut from an update to its next
    secagg: bool  # may be the uplink under SecAgg+ (which quantizes and masks the update itself)
    encode: Callable[[torch.Tensor, int, int], dict[str, torch.Tensor]]  # (fp32 (n,), block, kept) -> arrays
    decode: Callable[[dict[str, torch.Tensor], int, int], torch.Tensor]  # (arrays, block, n) -> fp32 (n,)
    layout: Callable[[int, int, int], Layout]  # (n, block, kept) -> {array: (dtype, shape)} encode returns
    about: str  # the README's line

    def bytes_per_value(self, block: int = 256, fraction: float = 0.02, n: int = 1 << 24) -> float:
        """Bytes a record takes per value of the vector it carries, scales and positions included."""
        arrays = self.layout(n, block, kept_values(n, fraction)).values()
        return sum(torch.empty(0, dtype=getattr(torch, d)).element_size() * s[0] for d, s in arrays) / n


BOTH, UP = ("uplink", "downlink"), ("uplink",)
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "fp32", BOTH, quantized=False, error_feedback=False, secagg=True,
            encode=fp32_encode, decode=flat_decode, layout=flat_layout("float32"),
            about="the values as they are",
        ),
        Format(
            "fp16", BOTH, quantized=False, error_feedback=False, secagg=False,
            encode=fp16_encode, decode=flat_decode, layout=flat_layout("float16"),
            about="rounded to fp16 (Flower's arrays take no bf16)",
        ),
        Format(
            "int8", UP, quantized=True, error_feedback=True, secagg=False,
            encode=int8_encode, decode=int8_decode, layout=scaled_layout("int8", 1),
            about="symmetric round to nearest, 127 steps either side of 0, an fp32 scale per fed.quant_block",
        ),
        Format(
            "int4", UP, quantized=True, error_feedback=True, secagg=False,
            encode=int4_encode, decode=int4_decode, layout=scaled_layout("uint8", 2),
            about="as int8 with 7 steps either side of 0, two values a byte",
        ),
        Format(
            "sparse", UP, quantized=True, error_feedback=True, secagg=False,
            encode=sparse_encode, decode=sparse_decode, layout=sparse_layout,
            about="the fed.sparse_fraction largest values at 2 bits and their positions (SparseLoCo's top-k)",
        ),
        Format(
            "fp8", UP, quantized=True, error_feedback=True, secagg=False,
            encode=fp8_encode, decode=fp8_decode, layout=scaled_layout("uint8", 1),
            about="e4m3 (3 mantissa bits), each fed.quant_block scaled so its largest value is 448",
        ),
    )
}  # fmt: skip


def formats_for(direction: str) -> tuple[str, ...]:
    """The formats that may travel in `direction` ("uplink" or "downlink"), in table order."""
    return tuple(name for name, f in FORMATS.items() if direction in f.directions)


def normal_error(fmt: str, block: int = 256, fraction: float = 0.02, n: int = 1 << 16) -> float:
    """||decoded - x|| / ||x|| of a seeded random-normal x of n values in `fmt`."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    f = FORMATS[fmt]
    return float((f.decode(f.encode(x, block, kept_values(n, fraction)), block, n) - x).norm() / x.norm())


def markdown_table(block: int = 256, fraction: float = 0.02) -> str:
    """The README's table of formats: bytes per value and the error on a random-normal vector, at the default
    fed.quant_block and fed.sparse_fraction."""
    yes = lambda b: "yes" if b else "no"
    rows = [
        "| format | travels | quantized | error feedback | SecAgg+ | bytes per value | error on N(0, 1) "
        "| what it sends |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in FORMATS.values():
        rows.append(
            f"| `{f.name}` | {', '.join(f.directions)} | {yes(f.quantized)} | {yes(f.error_feedback)} | "
            f"{yes(f.secagg)} | {f.bytes_per_value(block, fraction):.4f} | "
            f"{normal_error(f.name, block, fraction):.2%} | {f.about} |"
        )
    return "\n".join(rows)


def check_table(formats: dict[str, Format]) -> None:
    """ImportError unless every format's directions are known, error feedback goes only with a quantized
    format, and its codec's arrays are exactly the layout it declares (and decode to n values)."""
    x = torch.linspace(-1, 1, 37)
    for f in formats.values():
        problem = None
        got = {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in f.encode(x, 8, 5).items()}
        if not f.directions or set(f.directions) - set(DIRECTIONS):
            problem = f"directions {f.directions} are not of {DIRECTIONS}"
        elif f.error_feedback and not f.quantized:
            problem = "has error feedback but is not quantized"
        elif got != f.layout(37, 8, 5):
            problem = f"encodes {got}, not its layout {f.layout(37, 8, 5)}"
        elif f.decode(f.encode(x, 8, 5), 8, 37).shape != (37,):
            problem = "decodes to another number of values than it encoded"
        if problem:
            raise ImportError(f"wire format {f.name} in fedgpt.formats.FORMATS {problem}")


check_table(FORMATS)

if __name__ == "__main__":
    print(markdown_table())
