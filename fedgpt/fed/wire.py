"""What crosses the wire between the server and its clients, defined once for both sides.

    ex = Exchange.of(model, cfg)                    # what travels: the whole model, or its LoRA adapters
    down = ex.downlink(global_state, base_id)       # server -> client: the weights, fp32 or fp16
    received = ex.read_downlink(down)               # client: exactly what was sent (fp16-rounded, if so)
    update = ex.difference(trained, received)       # the client's update, flat, against what it received
    up, residual = ex.uplink(update, down, residual)   # client -> server: the update, fp32 to int4
    state = ex.apply(up, global_state, down)        # server: its exact global model + the update (or refused)
    down_ex, up_ex = ex.streaming(rnd)              # fed.fragments > 1: what of the model round rnd moves

A record says what it holds: a small header array gives its kind (weights or update), its format, its block
and value count, and the id of the downlink it is based on. The server adds every update to its own fp32
global model, so neither the downlink's nor the uplink's rounding ever accumulates there; with error feedback
a client adds what quantization cut from its last update to its next one. The uplink is always an update,
against exactly the weights the client received: with an fp16 downlink, what the client trains from is the
rounded model, and only its own change travels back.

Streaming fragments (fed.fragments = P > 1, Douillard et al. 2025): the model is cut into P fragments, the
blocks i with i % P == p in fragment p (embeddings and the final norm in fragment 0), and round r syncs only
fragment (r - 1) % P: its update travels up, and its new global value comes down with the next round's
message (round 1 brings the whole model). Each client keeps its own weights of the other fragments from
round to round; every message moves one fragment, so a round costs 1/P of the model's bytes each way.

Refused: the server takes an update only as this contract describes it (Exchange.apply): its header's kind,
format and block the run's, its arrays exactly those of that format, of the shapes and dtypes the header
implies, and every value it decodes to finite; and a reply's metrics (check_metrics) finite numbers, its
weight above 0. Anything else is a ValueError: the reply is refused before any update is clipped or averaged.

Formats: fp32, fp16 (Flower's ArrayRecord rejects bf16), int8 / int4 with one fp32 scale per block of
fed.quant_block values (symmetric, round to nearest, zero exact), or sparse: the fed.sparse_fraction of an
update's values largest in magnitude, 2 bits each, and their positions (SparseLoCo's top-k). All tensors
travel as one flat array, split again by the receiver's own model: Flower moves every array of a message as
its own object, each hop pushing or pulling it with a request of its own (docs/deployment.md has what that
cost). Strategies still see one fp32 array per tensor (Exchange.per_tensor), and their state keeps those
names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.nn import functional as F

from fedgpt.config import Config
from fedgpt.lora import adapter_state

FORMATS = ("fp32", "fp16", "int8", "int4", "sparse")
KINDS = ("weights", "update")
HEADER, FLAT, CODES, SCALES = "header", "flat", "codes", "scales"  # the arrays of a record
OFFSETS, COUNTS = "offsets", "counts"  # a sparse record's positions: uint16 within chunks of CHUNK values
CHUNK = 1 << 16


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


BLOCK_INDEX = re.compile(r"transformer\.h\.(\d+)\.")


def fragment_of(name: str, fragments: int) -> int:
    """The streaming fragment a tensor belongs to: block i's to i % fragments, the rest to 0."""
    m = BLOCK_INDEX.match(name)
    return int(m.group(1)) % fragments if m else 0


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


def sparsify(x: torch.Tensor, fraction: float, block: int) -> dict[str, torch.Tensor]:
    """The `fraction` of x's values largest in magnitude, at 2 bits each (SparseLoCo's top-k): their positions
    as uint16 offsets within chunks of CHUNK values and a count per chunk, and their values on a grid of 4
    levels, +-1/3 and +-1 of one fp32 scale per block of `block` kept values (no zero: the kept are the
    largest), packed four to a byte."""
    k = max(1, min(x.numel(), round(fraction * x.numel())))
    idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
    values = x[idx]
    blocks = F.pad(values, (0, (-k) % block)).view(-1, block)  # (nb, block)
    scales = blocks.abs().amax(dim=1)  # (nb,)
    level = torch.round((blocks / torch.where(scales > 0, scales, 1.0)[:, None] * 3 + 3) / 2).clamp_(0, 3)
    codes = F.pad(level.to(torch.uint8).view(-1)[:k], (0, (-k) % 4)).view(
        -1, 4
    )  # codes 0..3: -1, -1/3, 1/3, 1
    packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
    counts = torch.bincount(idx // CHUNK, minlength=-(-x.numel() // CHUNK)).to(torch.int32)
    return {
        OFFSETS: (idx % CHUNK).to(torch.int32).to(torch.uint16),
        COUNTS: counts,
        CODES: packed,
        SCALES: scales,
    }


def densify(arrays: dict[str, torch.Tensor], block: int, n: int) -> torch.Tensor:
    """The fp32 vector of n values a sparsify() record holds: zero but for its kept values."""
    counts = arrays[COUNTS].long()
    chunk_of = torch.repeat_interleave(torch.arange(len(counts)), counts)
    idx = chunk_of * CHUNK + arrays[OFFSETS].to(torch.int32).long()
    packed = arrays[CODES]
    codes = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=1).view(-1)[: len(idx)].float()
    scales = arrays[SCALES].repeat_interleave(block)[: len(idx)]
    out = torch.zeros(n)
    out[idx] = (codes * 2 - 3) / 3 * scales
    return out


def encode(
    flat: torch.Tensor, kind: str, fmt: str, block: int, base: int = 0, fraction: float = 0.02
) -> ArrayRecord:
    """A flat fp32 vector as a self-describing record: `kind` (weights or update) in `fmt`, based on the
    downlink with id `base` (an update) or carrying that id (weights); "sparse" keeps `fraction` of it."""
    header = torch.tensor(
        [KINDS.index(kind), FORMATS.index(fmt), block, flat.numel(), base], dtype=torch.int64
    )
    if fmt in ("fp32", "fp16"):
        return ArrayRecord({HEADER: header, FLAT: flat.half() if fmt == "fp16" else flat.float()})
    if fmt == "sparse":
        return ArrayRecord({HEADER: header, **sparsify(flat, fraction, block)})
    codes, scales = quantize(flat, 8 if fmt == "int8" else 4, block)
    return ArrayRecord({HEADER: header, CODES: codes, SCALES: scales})


def layout(h: Header, sparse_kept: int = 0) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{array: (dtype, shape)} of a record of encode() with header h; a sparse one keeping `sparse_kept`
    values."""
    n, blocks = h.values, lambda k: -(-k // h.block)
    out = {HEADER: ("int64", (5,))}
    if h.fmt in ("fp32", "fp16"):
        return {**out, FLAT: ("float32" if h.fmt == "fp32" else "float16", (n,))}
    if h.fmt == "sparse":
        k = sparse_kept
        return {
            **out,
            OFFSETS: ("uint16", (k,)),
            COUNTS: ("int32", (-(-n // CHUNK),)),
            CODES: ("uint8", (-(-k // 4),)),
            SCALES: ("float32", (blocks(k),)),
        }
    codes = ("int8", (n,)) if h.fmt == "int8" else ("uint8", (-(-n // 2),))
    return {**out, CODES: codes, SCALES: ("float32", (blocks(n),))}


# Metrics of a train reply (fedgpt.fed.client.fit) the server sums or averages, each a finite number;
# num-examples, the reply's weight in the average, above 0.
TRAIN_METRICS = ("train-loss", "train-seconds", "train-tokens")


def check_metrics(metrics, who: str) -> None:
    """ValueError unless a train reply's metrics are finite numbers and its weight is above 0."""
    for key in (*TRAIN_METRICS, "num-examples"):
        value = metrics.get(key) if metrics is not None else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{who} sent {key}={value!r}, not a finite number")
    if metrics["num-examples"] <= 0:
        raise ValueError(f"{who} sent num-examples={metrics['num-examples']!r}: a weight must be above 0")


@dataclass(frozen=True)
class Header:
    kind: str
    fmt: str
    block: int
    values: int
    base: int


def header(record: ArrayRecord, who: str = "the sender") -> Header:
    if HEADER not in record:
        raise ValueError(f"{who} sent a record without a header: every node must run the same fedgpt")
    kind, fmt, block, values, base = (int(v) for v in record[HEADER].numpy())
    if not (0 <= kind < len(KINDS) and 0 <= fmt < len(FORMATS)):
        raise ValueError(f"{who} sent a record of unknown kind or format ({kind}, {fmt})")
    return Header(KINDS[kind], FORMATS[fmt], block, values, base)


def decode(record: ArrayRecord) -> torch.Tensor:
    """The flat fp32 vector a record of encode() holds."""
    h = header(record)
    if FLAT in record:
        return torch.from_numpy(record[FLAT].numpy()).float()
    if h.fmt == "sparse":
        return densify(
            {k: torch.from_numpy(record[k].numpy()) for k in record if k != HEADER}, h.block, h.values
        )
    codes, scales = torch.from_numpy(record[CODES].numpy()), torch.from_numpy(record[SCALES].numpy())
    return dequantize(codes, scales, h.block, h.values)


@dataclass(frozen=True)
class Exchange:
    """The contract of one run: which tensors travel (names in order, tied aliases once), in which formats."""

    names: tuple[str, ...]  # exchanged tensors, tied aliases left out, in state order
    shapes: tuple[torch.Size, ...]
    aliases: dict[str, str]  # {alias: canonical}: restored on receipt
    adapters: bool  # LoRA: only the adapters travel; the rest of the model is each side's frozen base
    downlink_format: str = "fp32"
    uplink_format: str = "fp32"
    block: int = 256
    error_feedback: bool = False
    sparse_fraction: float = 0.02  # "sparse" uplinks: the share of an update's values that travel
    fragments: int = 1  # > 1: streaming fragments, one synced a round (streaming())

    @classmethod
    def of(cls, model: nn.Module, cfg: Config) -> Exchange:
        """What cfg's run exchanges of `model` (a GPT, with adapters when lora.rank > 0)."""
        adapters = cfg.lora.rank > 0
        aliases = {} if adapters else tied_aliases(model)
        state = adapter_state(model) if adapters else model.state_dict()
        names = tuple(k for k in state if k not in aliases)
        f = cfg.fed
        return cls(
            names,
            tuple(state[k].shape for k in names),
            aliases,
            adapters,
            f.downlink,
            f.uplink,
            f.quant_block,
            cfg.error_feedback,
            f.sparse_fraction,
            f.fragments,
        )

    def part(self, fragment: int) -> Exchange:
        """The contract for one streaming fragment's tensors alone (a tied alias goes with its canonical)."""
        keep = [i for i, k in enumerate(self.names) if fragment_of(k, self.fragments) == fragment]
        names = tuple(self.names[i] for i in keep)
        aliases = {a: c for a, c in self.aliases.items() if c in names}
        shapes = tuple(self.shapes[i] for i in keep)
        return dataclasses.replace(self, names=names, shapes=shapes, aliases=aliases, fragments=1)

    def synced_fragment(self, rnd: int) -> int:
        """The streaming fragment round rnd syncs: each in turn, from 0 in round 1 (always 0 without)."""
        return (rnd - 1) % self.fragments

    def streaming(self, rnd: int) -> tuple[Exchange, Exchange]:
        """What round rnd's message carries down and its reply up: the whole model both ways, or with
        fragments, the fragment the last round synced down (all of it in round 1) and this round's up."""
        if self.fragments == 1:
            return self, self
        down = self if rnd == 1 else self.part(self.synced_fragment(rnd - 1))
        return down, self.part(self.synced_fragment(rnd))

    @property
    def size(self) -> int:
        """Values in one update (tied aliases once)."""
        return sum(s.numel() for s in self.shapes)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What of `model` is exchanged (aliases included, as the model holds them)."""
        return adapter_state(model) if self.adapters else model.state_dict()

    def load(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load exchanged weights into `model` in place (a compiled graph stays valid)."""
        model.load_state_dict(state, strict=not self.adapters)

    def flatten(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The exchanged tensors of `state`, in order, as one fp32 vector."""
        return torch.cat([state[k].detach().float().cpu().reshape(-1) for k in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector back into named tensors, tied aliases restored."""
        sizes = [s.numel() for s in self.shapes]
        state = {k: t.view(s) for k, t, s in zip(self.names, flat.split(sizes), self.shapes)}
        for alias, canonical in self.aliases.items():
            state[alias] = state[canonical]
        return state

    def difference(self, trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> torch.Tensor:
        """trained - base over the exchanged tensors: an update, flat."""
        return self.flatten(trained) - self.flatten(base)

    def downlink(self, state: dict[str, torch.Tensor], base_id: int) -> ArrayRecord:
        """The global weights as the server sends them; updates to them will carry base_id."""
        return encode(self.flatten(state), "weights", self.downlink_format, self.block, base_id)

    def read_downlink(self, record: ArrayRecord, who: str = "the server") -> dict[str, torch.Tensor]:
        """The weights a downlink holds, as the client trains from them (fp32, rounded as sent)."""
        self._check(record, "weights", who)
        return self.unflatten(decode(record))

    def uplink(
        self, update: torch.Tensor, received: ArrayRecord, residual: torch.Tensor | None = None
    ) -> tuple[ArrayRecord, torch.Tensor | None]:
        """A client's update as it sends it, based on the downlink it received; and, with error feedback, what
        quantization cut from it (to add to the next one), else None."""
        if self.error_feedback and residual is not None:
            update = update + residual
        fmt, base = self.uplink_format, header(received).base
        record = encode(update, "update", fmt, self.block, base, self.sparse_fraction)
        return record, (update - decode(record)) if self.error_feedback else None

    def apply(
        self, record: ArrayRecord, global_state: dict[str, torch.Tensor], sent: ArrayRecord, who: str
    ) -> dict[str, torch.Tensor]:
        """The client's weights as the server takes them: its own global model plus the update, which must be
        based on the downlink `sent`. ValueError for a record that is not."""
        h = self._check(record, "update", who)
        if h.base != header(sent).base:
            raise ValueError(f"{who} sent an update against another model than this round's")
        if h.fmt != self.uplink_format or (h.fmt != "fp32" and h.block != self.block):
            raise ValueError(
                f"{who} sent a {h.fmt} update in blocks of {h.block}, where the run's uplink is "
                f"{self.uplink_format} in blocks of {self.block}"
            )
        kept = max(1, min(h.values, round(self.sparse_fraction * h.values))) if h.fmt == "sparse" else 0
        want = layout(h, kept)
        got = {k: (str(record[k].dtype), tuple(record[k].shape)) for k in record}
        if got != want:
            wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            raise ValueError(
                f"{who} sent an update whose arrays differ from the run's {h.fmt} uplink: "
                + "; ".join(f"{k}: {got.get(k, 'missing')}, not {want.get(k, 'none')}" for k in wrong)
            )
        if h.fmt == "sparse":
            counts = record[COUNTS].numpy()
            if counts.min() < 0 or int(counts.sum()) != kept:
                raise ValueError(f"{who} sent a sparse update whose counts do not sum to its {kept} values")
            chunk_of = torch.repeat_interleave(torch.arange(len(counts)), torch.from_numpy(counts).long())
            if (
                kept
                and int((chunk_of * CHUNK + torch.from_numpy(record[OFFSETS].numpy()).long()).max())
                >= h.values
            ):
                raise ValueError(f"{who} sent a sparse update with positions past its {h.values:,} values")
        update = decode(record)
        if not bool(torch.isfinite(update).all()):
            bad = int((~torch.isfinite(update)).sum())
            raise ValueError(f"{who} sent an update with {bad:,} values that are NaN or inf")
        return self.unflatten(self.flatten(global_state) + update)

    def per_tensor(self, state: dict[str, torch.Tensor]) -> ArrayRecord:
        """One fp32 array per exchanged tensor: what strategies average and keep state for."""
        return ArrayRecord({k: state[k].detach().float().cpu() for k in self.names})

    def from_per_tensor(self, record: ArrayRecord) -> dict[str, torch.Tensor]:
        """A strategy's record back into fp32 tensors (FedAdam & co. return float64), aliases restored."""
        arrays = record.to_torch_state_dict()
        return self.unflatten(torch.cat([arrays[k].float().reshape(-1) for k in self.names]))

    def _check(self, record: ArrayRecord, kind: str, who: str) -> Header:
        h = header(record, who)
        if h.kind != kind:
            raise ValueError(f"{who} sent {h.kind} where {kind} belong")
        if h.values != self.size:
            raise ValueError(
                f"{who} sent {h.values:,} values for a model of {self.size:,}: every client must use the "
                "server's model config and tokenizer"
            )
        return h
