"""The splits by who speaks: a client per speaker, or per role (a speaker in one play, McMahan et al.'s and
LEAF's Shakespeare split), from the speaker turns of the train array (fedgpt.data) and the plays and scenes
fedgpt.fed.plays finds in them.

    spans, names = role_split(n, num_clients, turns, rng, min_tokens=0, small="keep")
    spans, names = speaker_split(n, num_clients, turns, rng)

Both give each client a list of [start, end) spans of the train array and the names of what it holds, as
fedgpt.fed.partition's other schemes do.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedgpt.fed.plays import find_plays, find_scenes

if TYPE_CHECKING:
    from fedgpt.data import Turn

MIN_CLIENT_TOKENS = (
    2  # a client needs one (input, target) pair; fewer than a window trains on shorter windows
)


def _turn_spans(n: int, turns: Sequence[Turn]) -> tuple[list[int], np.ndarray]:
    """The indices (into `turns`) of the turns in the train array, and their (T, 2) spans.

    A turn runs to the next turn's start, so stage directions and headers between turns belong to the
    preceding turn, the text before the first turn to the first; the last turn is cut at the end of the
    train array.
    """
    kept = [i for i in sorted(range(len(turns)), key=lambda i: turns[i].start) if turns[i].start < n]
    if not kept:
        raise ValueError(
            f"none of the {n:,} train tokens lies in a speaker turn: "
            "use fed.partition=iid, contiguous or dirichlet"
        )
    starts = np.array([turns[i].start for i in kept], dtype=np.int64)
    starts[0] = 0
    return kept, np.stack([starts, np.r_[starts[1:], n]], axis=1)


def _balance(sizes: np.ndarray, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """Each unit's client: the largest unit first, to the client with the fewest tokens so far."""
    shuffled = rng.permutation(len(sizes))  # the seed breaks ties between equal units ...
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    # ... and between equally full clients, so it decides who gets which units
    rank = rng.permutation(num_clients)
    heap = [(0, int(rank[c]), c) for c in range(num_clients)]  # (tokens so far, tie-break, client)
    heapq.heapify(heap)
    client_of = np.empty(len(sizes), dtype=np.int64)
    for u in order:
        load, r, c = heapq.heappop(heap)
        client_of[u] = c
        heapq.heappush(heap, (load + int(sizes[u]), r, c))
    return client_of


def _group(
    units: list[tuple[str, np.ndarray]], num_clients: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[list[str]]]:
    """Whole units (name, spans) per client, balanced by tokens."""
    sizes = np.array([int((sp[:, 1] - sp[:, 0]).sum()) for _, sp in units])
    client_of = _balance(sizes, num_clients, rng)
    spans = [
        np.concatenate([sp for (_, sp), c in zip(units, client_of) if c == k] or [np.zeros((0, 2), np.int64)])
        for k in range(num_clients)
    ]
    names = [
        [name for (name, _), c, _ in sorted(zip(units, client_of, -sizes), key=lambda x: x[2]) if c == k]
        for k in range(num_clients)
    ]
    return spans, names


def speaker_split(
    n: int, num_clients: int, turns: Sequence[Turn], rng: np.random.Generator
) -> tuple[list[np.ndarray], list[list[str]]]:
    """Whole speakers (all their turns, in every play) per client, balanced by tokens."""
    kept, spans = _turn_spans(n, turns)
    names, owner = np.unique([turns[i].speaker for i in kept], return_inverse=True)  # owner: (T,) into names
    if len(names) < num_clients:
        raise ValueError(
            f"the train split has only {len(names)} speakers for {num_clients} clients: use fewer clients "
            "(fed.num_clients), or fed.partition=role, iid, contiguous or dirichlet"
        )
    return _group([(str(name), spans[owner == k]) for k, name in enumerate(names)], num_clients, rng)


@dataclass
class _Role:
    name: str  # "NAME (play P)", with ", part K" once split
    spans: np.ndarray  # (k, 2) its turns
    scenes: np.ndarray  # (k,) the scene of each turn

    @property
    def size(self) -> int:
        return int((self.spans[:, 1] - self.spans[:, 0]).sum())

    def halves(self) -> tuple[_Role, _Role] | None:
        """Two roles of about half the tokens each: at a scene boundary if it spans scenes, else between its
        turns, else inside its one turn; None if it cannot be split (fewer than 2 * MIN_CLIENT_TOKENS)."""
        cum = np.cumsum(self.spans[:, 1] - self.spans[:, 0])
        if len(np.unique(self.scenes)) > 1:
            cuts = np.flatnonzero(self.scenes[1:] != self.scenes[:-1]) + 1  # first turn of each later scene
        elif len(self.spans) > 1:
            cuts = np.arange(1, len(self.spans))
        elif self.size >= 2 * MIN_CLIENT_TOKENS:
            a, b = self.spans[0]
            mid = (a + b) // 2
            return (
                _Role(self.name + ", part 1", np.array([[a, mid]]), self.scenes),
                _Role(self.name + ", part 2", np.array([[mid, b]]), self.scenes),
            )
        else:
            return None
        cut = cuts[np.argmin(np.abs(cum[cuts - 1] - cum[-1] / 2))]
        return (
            _Role(self.name + ", part 1", self.spans[:cut], self.scenes[:cut]),
            _Role(self.name + ", part 2", self.spans[cut:], self.scenes[cut:]),
        )


def role_split(
    n: int, num_clients: int, turns: Sequence[Turn], rng: np.random.Generator, min_tokens: int, small: str
) -> tuple[list[np.ndarray], list[list[str]]]:
    """A client per role, a speaker in one play (McMahan et al.'s and LEAF's Shakespeare split); roles under
    min_tokens kept, dropped or merged per play as `small` says. Fewer clients than roles: roles are grouped,
    balanced by tokens. More: the largest role is split in two, at a scene boundary where it has one, until
    there are as many as clients."""
    plays, scenes = (
        find_plays(turns),
        find_scenes(turns),
    )  # on the whole corpus: the val split changes nothing
    kept, spans = _turn_spans(n, turns)
    groups: dict[tuple[int, str], list[int]] = {}
    for row, i in enumerate(kept):
        groups.setdefault((plays[i], turns[i].speaker), []).append(row)
    roles = []
    for (play, speaker), rows in groups.items():
        role = _Role(f"{speaker} (play {play + 1})", spans[rows], np.array([scenes[kept[r]] for r in rows]))
        if role.size < min_tokens and small != "keep":
            if small == "drop":
                continue
            role.name = f"minor roles (play {play + 1})"
        roles.append(role)
    if small == "merge":
        merged: dict[str, list[_Role]] = {}
        for r in roles:
            merged.setdefault(r.name, []).append(r)
        roles = [
            _Role(k, np.concatenate([r.spans for r in rs]), np.concatenate([r.scenes for r in rs]))
            for k, rs in merged.items()
        ]
    if len(roles) >= num_clients:
        return _group([(r.name, r.spans) for r in roles], num_clients, rng)
    heap = [(-r.size, k, r) for k, r in enumerate(roles)]
    heapq.heapify(heap)
    done, counter = [], len(roles)
    while heap and len(heap) + len(done) < num_clients:
        _, _, role = heapq.heappop(heap)
        halves = role.halves()
        if halves is None:
            done.append(role)
            continue
        for half in halves:
            heapq.heappush(heap, (-half.size, counter, half))
            counter += 1
    units = sorted(done + [r for _, _, r in heap], key=lambda u: int(u.spans[:, 0].min()))
    if len(units) < num_clients:
        raise ValueError(
            f"the train split's roles give at most {len(units)} clients of at least "
            f"{MIN_CLIENT_TOKENS} tokens, not {num_clients}: use fewer clients (fed.num_clients)"
        )
    return [u.spans for u in units], [[u.name] for u in units]
