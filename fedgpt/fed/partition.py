"""Split one train token array among federated clients: IID chunks, speakers, roles (a speaker in one play),
contiguous regions, or Dirichlet-sized shares.

    parts = client_partitions(cfg, ds)      # the split cfg.fed describes, as every process computes it
    x = parts[3].train                      # client 3's training tokens, read from the token file when asked
    print(format_summary(summarize_partitions(parts, ds.train, ds.tokenizer.vocab_size)))

Every scheme gives each client disjoint [start, end) spans of the train array. A client's tokens are its
spans concatenated in corpus order; the last val_fraction of them is its validation split. Computing a
split costs spans only, held for all clients in two arrays (Partitions: every client's spans one after the
other, and where each client's begin), about 100 bytes a client for the chunked schemes; a ClientPartition is
built when one is asked for, and a client process reads just its own tokens. The chunked schemes (iid,
dirichlet, contiguous) compute the split without a Python loop over clients, so a simulation of 100,000
clients splits its corpus in well under a second.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedgpt.config import Config
from fedgpt.config_rules import PARTITIONS
from fedgpt.fed.roles import MIN_CLIENT_TOKENS, role_split, speaker_split

if TYPE_CHECKING:
    from fedgpt.data import Dataset, Turn

SCHEMES = PARTITIONS  # "iid", "speaker", "role", "contiguous", "dirichlet"


@dataclass
class ClientPartition:
    client: int
    spans: np.ndarray  # (k, 2) int64 [start, end) spans of the train array, sorted, adjacent spans merged
    n_val: int  # the last n_val of its tokens are its validation split
    speakers: list[str]  # the speakers / roles it holds, largest first ("speaker", "role"); [] otherwise
    scheme: str = ""  # the scheme that made it, for summarize_partitions()
    source: np.ndarray = field(default=None, repr=False)  # the train array the spans index

    @property
    def size(self) -> int:
        return int((self.spans[:, 1] - self.spans[:, 0]).sum())

    @functools.cached_property
    def tokens(self) -> np.ndarray:
        """Its tokens, copied out of the (memory-mapped) train array on first use."""
        return np.concatenate([np.asarray(self.source[a:b]) for a, b in self.spans])

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: self.size - self.n_val]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[self.size - self.n_val :]


@dataclass(eq=False)
class Partitions(Sequence):
    """Every client's partition of one train array: client i's merged spans are spans[offsets[i]:offsets[i +
    1]], its last n_val[i] tokens its validation split. parts[i] builds its ClientPartition (the most recent
    ones are kept, so that a process serving one client reads its tokens once)."""

    spans: np.ndarray  # (K, 2) int64 [start, end) spans, grouped by client, sorted and merged within each
    offsets: np.ndarray  # (N + 1,) int64: client i's spans are spans[offsets[i]:offsets[i + 1]]
    n_val: np.ndarray  # (N,) int64: the last n_val[i] of client i's tokens are its validation split
    scheme: str
    source: np.ndarray = field(repr=False)  # the train array the spans index
    speakers: list[list[str]] | None = None  # per client, largest first ("speaker", "role"); None otherwise

    def __post_init__(self):
        self._built: dict[int, ClientPartition] = {}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if int(i) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"client {i} of {len(self)}")
        if i not in self._built:
            if len(self._built) >= 64:  # a process serves a few clients at a time: keep the newest
                self._built.pop(next(iter(self._built)))
            spans = self.spans[self.offsets[i] : self.offsets[i + 1]]
            names = self.speakers[i] if self.speakers is not None else []
            self._built[i] = ClientPartition(i, spans, int(self.n_val[i]), names, self.scheme, self.source)
        return self._built[i]

    @property
    def sizes(self) -> np.ndarray:
        """(N,) every client's tokens, train and val."""
        lengths = self.spans[:, 1] - self.spans[:, 0]
        return np.add.reduceat(np.r_[lengths, 0], self.offsets[:-1]) * (np.diff(self.offsets) > 0)

    @property
    def train_sizes(self) -> np.ndarray:
        """(N,) every client's train tokens."""
        return self.sizes - self.n_val


# --- helpers
# --------------------------------------------------------------------------------------------------------


def _val_len(total: int, val_fraction: float) -> int:
    return int(round(total * val_fraction))


def min_client_tokens(block_size: int, val_fraction: float) -> int:
    """The fewest tokens a client may hold: more than block_size in its train part, and in its val part when
    it has one (val_fraction > 0)."""
    if val_fraction == 0:
        return block_size + 1
    total = math.ceil((block_size + 1) / min(val_fraction, 1 - val_fraction))
    while not (
        _val_len(total, val_fraction) > block_size and total - _val_len(total, val_fraction) > block_size
    ):
        total += 1  # rounding of the val length can leave one side a token short
    return total


def default_chunk_tokens(n: int, num_clients: int, block_size: int) -> int:
    """Chunk length of "iid" / "dirichlet" when chunk_tokens=0: max(4 * (block_size + 1), 1024) tokens, so a
    chunk holds a few training windows, but at most n / (4 * num_clients), so every client gets at least ~4
    chunks."""
    return max(1, min(max(4 * (block_size + 1), 1024), n // (4 * num_clients)))


def _chunks(n: int, size: int) -> np.ndarray:
    """(M, 2) spans of length size covering [0, n); the last one holds the shorter remainder."""
    starts = np.arange(0, n, size, dtype=np.int64)
    return np.stack([starts, np.minimum(starts + size, n)], axis=1)


# --- schemes: each returns the client of each span and the (k, 2) spans (unmerged, any order)
# -----------------------------------


def _split_tail(chunks: np.ndarray, n: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(full chunks, the short remainder chunk as a (0 or 1, 2) array)."""
    return (chunks, chunks[:0]) if n % chunk == 0 else (chunks[:-1], chunks[-1:])


def _iid(n: int, num_clients: int, chunk: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    full, tail = _split_tail(_chunks(n, chunk), n, chunk)
    order = rng.permutation(len(full))
    # Full chunks dealt round-robin (chunk order[j] to client j mod N), the short remainder to a client with
    # one chunk fewer than the rest: token counts then differ by at most one chunk.
    client_of = np.empty(len(full), dtype=np.int64)
    client_of[order] = np.arange(len(full)) % num_clients
    fewest = len(full) % num_clients  # the first client dealt one chunk fewer (0 when all got the same)
    return np.r_[client_of, np.full(len(tail), fewest)], np.concatenate([full, tail])


def _contiguous(n: int, num_clients: int) -> tuple[np.ndarray, np.ndarray]:
    bounds = np.round(np.linspace(0, n, num_clients + 1)).astype(np.int64)
    return np.arange(num_clients), np.stack([bounds[:-1], bounds[1:]], axis=1)


def _dirichlet(
    n: int, num_clients: int, chunk: int, alpha: float, floor_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Client shares p ~ Dirichlet(alpha); every client first gets a floor of ceil(floor_tokens / chunk) full
    chunks (one train and one val window), the remaining full chunks are split by p (largest remainder
    rounding), and the short remainder chunk of the array goes to the largest client."""
    full, tail = _split_tail(_chunks(n, chunk), n, chunk)
    m = len(full)
    # too little data: the size check names a client
    floor = min(math.ceil(floor_tokens / chunk), m // num_clients)
    p = rng.dirichlet(np.full(num_clients, alpha))
    if not np.all(np.isfinite(p)):  # numerical underflow for tiny alpha: all mass on one client
        p = np.eye(num_clients)[rng.integers(num_clients)]
    extra = p * (m - floor * num_clients)
    counts = np.floor(extra).astype(np.int64)
    short = m - floor * num_clients - counts.sum()
    # the largest fractional parts get the leftovers
    counts[np.argsort(counts - extra, kind="stable")[:short]] += 1
    counts += floor
    order = rng.permutation(m)
    client_of = np.empty(m, dtype=np.int64)
    client_of[order] = np.repeat(np.arange(num_clients), counts)  # the next counts[i] chunks of order to i
    big = int(np.argmax(counts))
    return np.r_[client_of, np.full(len(tail), big)], np.concatenate([full, tail])


# --- entry points
# ---------------------------------------------------------------------------------------------------


def _check_arguments(
    train_tokens: np.ndarray,
    num_clients: int,
    scheme: str,
    turns: Sequence[Turn] | None,
    block_size: int,
    val_fraction: float,
    alpha: float,
    chunk_tokens: int,
) -> None:
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown partition scheme {scheme!r} (fed.partition): use one of {', '.join(SCHEMES)}"
        )
    if num_clients < 1:
        raise ValueError(f"fed.num_clients={num_clients} must be >= 1")
    if block_size < 1 or not 0 <= val_fraction < 1 or alpha <= 0 or chunk_tokens < 0:
        raise ValueError(
            "need block_size >= 1, 0 <= val_fraction < 1, alpha > 0 and chunk_tokens >= 0; got "
            f"block_size={block_size}, val_fraction={val_fraction}, alpha={alpha}, "
            f"chunk_tokens={chunk_tokens}"
        )
    if np.ndim(train_tokens) != 1:
        raise ValueError(f"train_tokens must be a 1-D token array, got shape {np.shape(train_tokens)}")
    if num_clients * MIN_CLIENT_TOKENS > len(train_tokens):
        raise ValueError(
            f"{num_clients} clients need at least {MIN_CLIENT_TOKENS} tokens each, and the train split has "
            f"{len(train_tokens):,}: use fewer clients (fed.num_clients) or a larger corpus"
        )
    if scheme in ("speaker", "role") and not turns:
        raise ValueError(
            f'fed.partition={scheme} needs speaker turns, but the corpus has no "NAME:" speaker headers: '
            "use fed.partition=iid, contiguous or dirichlet"
        )


def partition(
    train_tokens: np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    turns: Sequence[Turn] | None = None,
    seed: int = 0,
    block_size: int = 64,
    val_fraction: float = 0.1,
    alpha: float = 0.5,
    chunk_tokens: int = 0,
    min_role_tokens: int = 0,
    small_roles: str = "keep",
) -> Partitions:
    """Split train_tokens among num_clients by scheme (see SCHEMES); deterministic given seed.

    iid: shuffled chunk_tokens-long chunks (0: default_chunk_tokens) dealt evenly. speaker: whole speakers,
    balanced by size. role: a speaker in one play per client (see _role; small_roles says what becomes of
    roles under min_role_tokens). contiguous: num_clients equal regions in corpus order. dirichlet:
    shuffled chunks in Dirichlet(alpha)-distributed amounts, at least min_client_tokens per client. Raises
    ValueError if some client would get fewer than MIN_CLIENT_TOKENS in its train part (or, with
    val_fraction > 0, its val part).
    """
    _check_arguments(train_tokens, num_clients, scheme, turns, block_size, val_fraction, alpha, chunk_tokens)
    n = len(train_tokens)
    rng = np.random.default_rng(seed)
    chunk = chunk_tokens or default_chunk_tokens(n, num_clients, block_size)
    speakers = None
    if scheme == "iid":
        client_of, spans = _iid(n, num_clients, chunk, rng)
    elif scheme == "contiguous":
        client_of, spans = _contiguous(n, num_clients)
    elif scheme == "dirichlet":
        client_of, spans = _dirichlet(
            n, num_clients, chunk, alpha, min_client_tokens(block_size, val_fraction), rng
        )
    else:
        per_client, speakers = (
            role_split(n, num_clients, turns, rng, min_role_tokens, small_roles)
            if scheme == "role"
            else speaker_split(n, num_clients, turns, rng)
        )
        client_of = np.repeat(np.arange(num_clients), [len(x) for x in per_client])
        spans = np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in per_client])
    spans, offsets = _by_client(client_of, spans, num_clients)
    parts = Partitions(spans, offsets, np.zeros(num_clients, np.int64), scheme, train_tokens, speakers)
    total = parts.sizes
    parts.n_val = np.round(total * val_fraction).astype(np.int64)  # as _val_len: half to even
    n_val, n_train = parts.n_val, total - parts.n_val
    short = (n_train < MIN_CLIENT_TOKENS) | ((val_fraction > 0) & (n_val < MIN_CLIENT_TOKENS))
    if short.any():
        c = int(np.flatnonzero(short)[0])
        raise ValueError(
            f"client {c} of {num_clients} gets {n_train[c]} train / {n_val[c]} val tokens, "
            f"need at least {MIN_CLIENT_TOKENS} in {'each' if val_fraction else 'train'}: "
            "use fewer clients (fed.num_clients) or a larger corpus"
        )
    return parts


def _by_client(client_of: np.ndarray, spans: np.ndarray, num_clients: int) -> tuple[np.ndarray, np.ndarray]:
    """Spans grouped by client, each client's sorted and merged (those that touch joined, empty ones
    dropped), and the offsets of each client's, for every client at once."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    keep = spans[:, 1] > spans[:, 0]
    client_of, spans = np.asarray(client_of, dtype=np.int64)[keep], spans[keep]
    order = np.lexsort((spans[:, 0], client_of))
    client_of, spans = client_of[order], spans[order]
    # (k-1,) True where span j+1 does not continue span j of the same client
    gap = (spans[1:, 0] != spans[:-1, 1]) | (client_of[1:] != client_of[:-1])
    first, last = np.r_[True, gap], np.r_[gap, True]
    merged = np.stack([spans[first, 0], spans[last, 1]], axis=1) if len(spans) else spans
    counts = np.bincount(client_of[first], minlength=num_clients) if len(spans) else np.zeros(num_clients)
    return merged, np.r_[0, np.cumsum(counts)].astype(np.int64)


def client_partitions(cfg: Config, ds: Dataset, num_clients: int | None = None) -> Partitions:
    """The split cfg.fed describes of ds's train tokens: the server and every client compute the same one.

    A client holds out fed.client_val_fraction of its tokens only when client evaluation is on
    (fed.client_eval_interval > 0); otherwise it trains on all of them.
    """
    f = cfg.fed
    val_fraction = f.client_val_fraction if f.client_eval_interval > 0 else 0.0
    return partition(
        ds.train,
        num_clients or f.num_clients,
        f.partition,
        turns=ds.turns,
        seed=cfg.train.seed,
        block_size=cfg.model.block_size,
        val_fraction=val_fraction,
        alpha=f.dirichlet_alpha,
        min_role_tokens=f.min_role_tokens,
        small_roles=f.small_roles,
    )


def _js_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits between two count vectors (0 for equal distributions, at most 1)."""
    p = p / p.sum()
    q = q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return min(1.0, max(0.0, (kl(p) + kl(q)) / 2))


SUMMARY_JS_CLIENTS = (
    1000  # clients whose unigram skew the summary measures: all up to this many, else a sample
)


def summarize_partitions(parts: Partitions, train_tokens: np.ndarray, vocab_size: int, seed: int = 0) -> dict:
    """Per-client sizes, speaker counts and unigram skew: the JS divergence (bits) of each client's tokens
    (train and val) from the whole train array's, for every client up to SUMMARY_JS_CLIENTS and for a seeded
    sample of that many beyond (js_clients says which); also size_cv, the coefficient of variation of the
    clients' train sizes. Sizes come from the spans: only the measured clients' tokens are read."""
    total = np.bincount(np.asarray(train_tokens), minlength=vocab_size)
    v = len(total)  # vocab_size, or more if some token id is out of range
    n = len(parts)
    measured = (
        np.arange(n)
        if n <= SUMMARY_JS_CLIENTS
        else np.sort(np.random.default_rng(seed).choice(n, SUMMARY_JS_CLIENTS, replace=False))
    )
    js = [_js_bits(np.bincount(parts[int(i)].tokens, minlength=v), total) for i in measured]
    sizes = parts.train_sizes.astype(np.float64)
    return {
        "scheme": parts.scheme if n else "",
        "num_clients": n,
        "tokens": parts.train_sizes.tolist(),
        "val_tokens": parts.n_val.tolist(),
        "speakers": [len(x) for x in parts.speakers] if parts.speakers is not None else [0] * n,
        "js_divergence": js,
        **({} if n <= SUMMARY_JS_CLIENTS else {"js_clients": measured.tolist()}),
        "mean_js": float(np.mean(js)),
        "size_cv": float(sizes.std() / sizes.mean()),
    }


def format_summary(summary: dict, rows: int = 32) -> str:
    """An aligned table: a row per client (past `rows` clients, the size distribution), then the means."""
    header = f"{'client':>6}  {'train':>10}  {'val':>9}  {'speakers':>8}  {'JS bits':>8}"
    out = [f"partition {summary['scheme'] or '?'}: {summary['num_clients']} clients"]
    if summary["num_clients"] <= rows:
        out.append(header)
        cols = zip(
            summary["tokens"],
            summary["val_tokens"],
            summary["speakers"],
            summary["js_divergence"],
            strict=True,
        )
        out += [f"{c:>6}  {t:>10,}  {v:>9,}  {s:>8}  {j:>8.4f}" for c, (t, v, s, j) in enumerate(cols)]
        out.append(
            f"{'mean':>6}  {np.mean(summary['tokens']):>10,.0f}  {'':>9}  {'':>8}  {summary['mean_js']:>8.4f}"
        )
    else:
        lo, p10, p50, p90, hi = np.percentile(summary["tokens"], [0, 10, 50, 90, 100])
        out.append(
            f"train tokens per client: min {lo:,.0f} | 10% {p10:,.0f} | median {p50:,.0f} | "
            f"90% {p90:,.0f} | max {hi:,.0f} | mean JS bits {summary['mean_js']:.4f}"
        )
    out.append(f"client size CV {summary['size_cv']:.3f}")
    return "\n".join(out)
