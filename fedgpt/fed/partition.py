"""Split one train token array among federated clients: IID chunks, whole speaking roles, contiguous regions,
or Dirichlet-sized shares.

    # the split cfg.fed describes, as every federated process computes it
    parts = client_partitions(cfg, ds)
    # client 3's training tokens; parts[3].val is its own held-out tail
    x = parts[3].train
    print(format_summary(summarize(parts, ds.train, ds.tokenizer.vocab_size)))

Every scheme gives each client disjoint [start, end) spans of the train array, and together they cover it
exactly. A client's tokens are its spans concatenated in corpus order; the last val_fraction of them is its
validation split.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedgpt.config import PARTITIONS, Config

if TYPE_CHECKING:
    from fedgpt.data import Dataset, Turn

SCHEMES = PARTITIONS  # "iid", "speaker", "contiguous", "dirichlet"


@dataclass
class ClientPartition:
    client: int
    spans: np.ndarray  # (k, 2) int64 [start, end) spans of the train array, sorted, adjacent spans merged
    train: np.ndarray  # (n_train,) the concatenated spans minus the validation tail
    val: np.ndarray  # (n_val,) the last val_fraction of the concatenated spans
    speakers: list[str]  # the speaking roles it owns, largest first ("speaker" scheme); [] otherwise
    scheme: str = ""  # the scheme that made it, for summarize()


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


def _merge(spans: np.ndarray) -> np.ndarray:
    """Sort (k, 2) spans, drop empty ones and join those that touch: [[0, 5], [5, 9]] -> [[0, 9]]."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    spans = spans[spans[:, 1] > spans[:, 0]]
    if len(spans) == 0:
        return spans
    spans = spans[np.argsort(spans[:, 0], kind="stable")]
    gap = spans[1:, 0] != spans[:-1, 1]  # (k-1,) True where span j+1 does not continue span j
    return np.stack([spans[np.r_[True, gap], 0], spans[np.r_[gap, True], 1]], axis=1)


# --- schemes: each returns one (k, 2) span array per client (unmerged, any order)
# -----------------------------------


def _split_tail(chunks: np.ndarray, n: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(full chunks, the short remainder chunk as a (0 or 1, 2) array)."""
    return (chunks, chunks[:0]) if n % chunk == 0 else (chunks[:-1], chunks[-1:])


def _iid(n: int, num_clients: int, chunk: int, rng: np.random.Generator) -> list[np.ndarray]:
    full, tail = _split_tail(_chunks(n, chunk), n, chunk)
    order = rng.permutation(len(full))
    # Full chunks dealt round-robin, the short remainder to a client with one chunk fewer than the rest:
    # token counts then differ by at most one chunk.
    out = [full[order[i::num_clients]] for i in range(num_clients)]
    fewest = len(full) % num_clients  # the first client dealt one chunk fewer (0 when all got the same)
    out[fewest] = np.concatenate([out[fewest], tail])
    return out


def _contiguous(n: int, num_clients: int) -> list[np.ndarray]:
    bounds = np.round(np.linspace(0, n, num_clients + 1)).astype(np.int64)
    return [bounds[i : i + 2].reshape(1, 2) for i in range(num_clients)]


def _dirichlet(
    n: int, num_clients: int, chunk: int, alpha: float, floor_tokens: int, rng: np.random.Generator
) -> list[np.ndarray]:
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
    offsets = np.r_[0, np.cumsum(counts)]
    out = [full[order[offsets[i] : offsets[i + 1]]] for i in range(num_clients)]
    big = int(np.argmax(counts))
    out[big] = np.concatenate([out[big], tail])
    return out


def _speaker(
    n: int, num_clients: int, turns: Sequence[Turn], rng: np.random.Generator
) -> tuple[list[np.ndarray], list[list[str]]]:
    """Whole speaking roles per client, balanced by tokens: largest role first to the emptiest client."""
    # turns in the val split are dropped
    turns = sorted((t for t in turns if t.start < n), key=lambda t: t.start)
    if not turns:
        raise ValueError(
            f"none of the {n:,} train tokens lies in a speaker turn: "
            "use fed.partition=iid, contiguous or dirichlet"
        )
    # A turn runs to the next turn's start, so stage directions and headers between turns belong to the
    # preceding turn, the text before the first turn to the first; the last turn is cut at the end of the
    # train array.
    starts = np.array([t.start for t in turns], dtype=np.int64)
    starts[0] = 0
    spans = np.stack([starts, np.r_[starts[1:], n]], axis=1)  # (T, 2)
    names, owner = np.unique([t.speaker for t in turns], return_inverse=True)  # owner: (T,) index into names
    if len(names) < num_clients:
        raise ValueError(
            f"the train split has only {len(names)} speakers for {num_clients} clients: use fewer clients "
            "(fed.num_clients) or fed.partition=iid, contiguous or dirichlet"
        )
    sizes = np.bincount(owner, weights=spans[:, 1] - spans[:, 0], minlength=len(names))
    shuffled = rng.permutation(len(names))  # the seed breaks ties between equal roles ...
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    # ... and between equally full clients, so it decides who gets which roles
    rank = rng.permutation(num_clients)
    heap = [(0, int(rank[c]), c) for c in range(num_clients)]  # (tokens so far, tie-break, client)
    heapq.heapify(heap)
    client_of = np.empty(len(names), dtype=np.int64)
    held: list[list[str]] = [[] for _ in range(num_clients)]
    for s in order:
        load, r, c = heapq.heappop(heap)
        client_of[s] = c
        held[c].append(str(names[s]))
        heapq.heappush(heap, (load + int(sizes[s]), r, c))
    turn_client = client_of[owner]  # (T,)
    return [spans[turn_client == c] for c in range(num_clients)], held


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
    if scheme == "speaker" and not turns:
        raise ValueError(
            'fed.partition=speaker needs speaker turns, but the corpus has no "NAME:" speaker headers: '
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
) -> list[ClientPartition]:
    """Split train_tokens among num_clients by scheme (see SCHEMES); deterministic given seed.

    iid: shuffled chunk_tokens-long chunks (0: default_chunk_tokens) dealt evenly. speaker: whole speaking
    roles of turns, balanced by size. contiguous: num_clients equal regions in corpus order. dirichlet:
    shuffled chunks in Dirichlet(alpha)-distributed amounts, at least min_client_tokens per client. Raises
    ValueError, before copying any tokens, if some client would get block_size tokens or fewer in its train
    or its val part.
    """
    _check_arguments(train_tokens, num_clients, scheme, turns, block_size, val_fraction, alpha, chunk_tokens)
    n = len(train_tokens)
    rng = np.random.default_rng(seed)
    chunk = chunk_tokens or default_chunk_tokens(n, num_clients, block_size)
    speakers: list[list[str]] = [[] for _ in range(num_clients)]
    if scheme == "iid":
        raw = _iid(n, num_clients, chunk, rng)
    elif scheme == "contiguous":
        raw = _contiguous(n, num_clients)
    elif scheme == "dirichlet":
        raw = _dirichlet(n, num_clients, chunk, alpha, min_client_tokens(block_size, val_fraction), rng)
    else:
        raw, speakers = _speaker(n, num_clients, turns, rng)
    spans = [_merge(s) for s in raw]

    # Check every client before copying any tokens.
    for c, s in enumerate(spans):
        total = int((s[:, 1] - s[:, 0]).sum())
        n_val = _val_len(total, val_fraction)
        if total - n_val <= block_size or (val_fraction > 0 and n_val <= block_size):
            raise ValueError(
                f"client {c} of {num_clients} gets {total - n_val} train / {n_val} val tokens, need more "
                f"than model.block_size={block_size} in {'each' if val_fraction else 'train'}: "
                "use fewer clients (fed.num_clients), a smaller block_size, or a larger corpus"
            )

    parts = []
    for c, s in enumerate(spans):
        tokens = np.concatenate([np.asarray(train_tokens[a:b]) for a, b in s])  # a copy in RAM, not a memmap
        n_train = len(tokens) - _val_len(len(tokens), val_fraction)
        parts.append(ClientPartition(c, s, tokens[:n_train], tokens[n_train:], speakers[c], scheme))
    return parts


def client_partitions(cfg: Config, ds: Dataset, num_clients: int | None = None) -> list[ClientPartition]:
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


def summarize(parts: list[ClientPartition], train_tokens: np.ndarray, vocab_size: int) -> dict:
    """Per-client sizes, speaker counts and unigram skew: the JS divergence (bits) of each client's tokens
    (train and val) from the whole train array's; also size_cv, the coefficient of variation of the
    clients' train sizes."""
    total = np.bincount(np.asarray(train_tokens), minlength=vocab_size)
    v = len(total)  # vocab_size, or more if some token id is out of range
    js = [_js_bits(np.bincount(np.concatenate([p.train, p.val]), minlength=v), total) for p in parts]
    sizes = np.array([len(p.train) for p in parts], dtype=np.float64)
    return {
        "scheme": parts[0].scheme if parts else "",
        "num_clients": len(parts),
        "tokens": [len(p.train) for p in parts],
        "val_tokens": [len(p.val) for p in parts],
        "speakers": [len(p.speakers) for p in parts],
        "js_divergence": js,
        "mean_js": float(np.mean(js)),
        "size_cv": float(sizes.std() / sizes.mean()),
    }


def format_summary(summary: dict) -> str:
    """An aligned table: one row per client, then the means."""
    header = f"{'client':>6}  {'train':>10}  {'val':>9}  {'speakers':>8}  {'JS bits':>8}"
    rows = [f"partition {summary['scheme'] or '?'}: {summary['num_clients']} clients", header]
    for c, (t, v, s, j) in enumerate(
        zip(
            summary["tokens"],
            summary["val_tokens"],
            summary["speakers"],
            summary["js_divergence"],
            strict=True,
        )
    ):
        rows.append(f"{c:>6}  {t:>10,}  {v:>9,}  {s:>8}  {j:>8.4f}")
    rows.append(
        f"{'mean':>6}  {np.mean(summary['tokens']):>10,.0f}  {'':>9}  {'':>8}  {summary['mean_js']:>8.4f}"
    )
    rows.append(f"client size CV {summary['size_cv']:.3f}")
    return "\n".join(rows)
