"""What crosses the wire between the server and its clients, defined once for both sides.

    ex = Exchange.of(model, cfg)                    # what travels: the whole model, or its LoRA adapters
    down = ex.downlink(global_state, base_id)       # server -> client: the weights, fp32 or fp16
    received = ex.read_downlink(down)               # client: exactly what was sent (fp16-rounded, if so)
    update = ex.difference(trained, received)       # the client's update, flat, against what it received
    up, residual = ex.uplink(update, down, residual)   # client -> server: the update, in fed.uplink's format
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

Formats are fedgpt/formats.py's table (FORMATS: each one's codec, layout and rules): a record is decoded as
the format its header declares, and refused if its arrays are not exactly that format's (decode,
check_layout).
All tensors travel as one flat array, split again by the receiver's own model: Flower moves every array of a
message as its own object, each hop pushing or pulling it with a request of its own (docs/deployment.md has
what that cost). Strategies still see one fp32 array per tensor (Exchange.per_tensor), and their state keeps
those names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedgpt.config import Config
from fedgpt.formats import CHUNK, CODES, COUNTS, FLAT, FORMATS, OFFSETS, SCALES, kept_values  # noqa: F401
from fedgpt.lora import adapter_state

# CODES, FLAT, SCALES: a record's array names, imported from here by the tests that tamper with them
KINDS = ("weights", "update")
HEADER = "header"  # a record's first array: kind, format, block, values, base (int64)
FORMAT_IDS = tuple(FORMATS)  # a header names its format by its place in the table


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


def encode(
    flat: torch.Tensor, kind: str, fmt: str, block: int, base: int = 0, fraction: float = 0.02
) -> ArrayRecord:
    """A flat fp32 vector as a self-describing record: `kind` (weights or update) in `fmt`, based on the
    downlink with id `base` (an update) or carrying that id (weights); "sparse" keeps `fraction` of it."""
    n = flat.numel()
    header = torch.tensor([KINDS.index(kind), FORMAT_IDS.index(fmt), block, n, base], dtype=torch.int64)
    return ArrayRecord({HEADER: header, **FORMATS[fmt].encode(flat, block, kept_values(n, fraction))})


def layout(h: Header, kept: int = 0) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{array: (dtype, shape)} of a record of encode() with header h; a sparse one keeping `kept` values."""
    return {HEADER: ("int64", (5,)), **FORMATS[h.fmt].layout(h.values, h.block, kept)}


def check_layout(record: ArrayRecord, h: Header, kept: int, who: str, what: str) -> None:
    """ValueError unless the record's arrays are exactly those of the format its header declares: a payload
    of another format (an int8 one under an fp8 header, say) is never read as this one."""
    want = layout(h, kept)
    got = {k: (str(record[k].dtype), tuple(record[k].shape)) for k in record}
    if got != want:
        wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise ValueError(
            f"{who} sent {what} whose arrays differ from the {h.fmt} format its header declares: "
            + "; ".join(f"{k}: {got.get(k, 'missing')}, not {want.get(k, 'none')}" for k in wrong)
        )


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
    if record[HEADER].dtype != "int64" or tuple(record[HEADER].shape) != (5,):
        raise ValueError(
            f"{who} sent a header that is not 5 int64 values: every node must run the same fedgpt"
        )
    kind, fmt, block, values, base = (int(v) for v in record[HEADER].numpy())
    if not (0 <= kind < len(KINDS) and 0 <= fmt < len(FORMAT_IDS)):
        raise ValueError(f"{who} sent a record of unknown kind or format ({kind}, {fmt})")
    if block < 1 or values < 0:
        raise ValueError(
            f"{who} sent a record of {values} values in blocks of {block}: not a record of encode()"
        )
    return Header(KINDS[kind], FORMAT_IDS[fmt], block, values, base)


def decode(record: ArrayRecord, who: str = "the sender", kept: int | None = None) -> torch.Tensor:
    """The flat fp32 vector a record of encode() holds, decoded as the format its header declares; a sparse
    record keeps `kept` values (None: as many as it holds). ValueError for arrays of another format."""
    h = header(record, who)
    if kept is None:
        kept = int(record[OFFSETS].shape[0]) if h.fmt == "sparse" and OFFSETS in record else 0
    check_layout(record, h, kept, who, f"a {h.fmt} record")
    arrays = {k: torch.from_numpy(record[k].numpy()) for k in record if k != HEADER}
    return FORMATS[h.fmt].decode(arrays, h.block, h.values)


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
    error_feedback: bool = False  # the client carries what quantization cut into its next update
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
            cfg.uses_error_feedback,
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
        return self.unflatten(decode(record, who))

    def uplink(
        self, update: torch.Tensor, received: ArrayRecord, residual: torch.Tensor | None = None
    ) -> tuple[ArrayRecord, torch.Tensor | None]:
        """A client's update as it sends it, based on the downlink it received; and, with error feedback, what
        quantization cut from it (to add to the next one), else None."""
        if self.error_feedback and residual is not None:
            update = update + residual
        fmt, base = self.uplink_format, header(received).base
        record = encode(update, "update", fmt, self.block, base, self.sparse_fraction)
        return record, (update - decode(record, "this client")) if self.error_feedback else None

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
        kept = kept_values(h.values, self.sparse_fraction) if h.fmt == "sparse" else 0
        check_layout(record, h, kept, who, "an update")
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
        update = decode(record, who, kept)
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
