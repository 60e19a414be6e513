"""Plays and scenes of a corpus in Shakespeare's "NAME:" format, found from who speaks when.

    plays, scenes = find_plays(turns), find_scenes(turns)   # one play / scene index per speaker turn

Tiny Shakespeare has no play or scene headers, so both come from the speakers alone:

- a scene boundary is a turn where the cast changes: of the speakers of the W turns before it and the W
  turns after it, few are the same (the share of new names on each side, multiplied, is at least
  SCENE_NOVELTY);
- a play boundary is a scene boundary where the principal characters (names in capitals; "First Citizen",
  "Messenger" and their like are minor) of the PLAY_WINDOW turns before and after have next to nothing in
  common: the turns each side gives to names also speaking on the other side are under PLAY_OVERLAP of its
  turns. The lowest-overlap boundaries are taken first, and no play is shorter than MIN_PLAY_TURNS turns.

On Tiny Shakespeare this finds the nine plays of the corpus (Coriolanus, Richard III, Richard II, Romeo and
Juliet, Henry VI part 3, The Winter's Tale, Measure for Measure, The Taming of the Shrew, The Tempest) at
the turns where each excerpt begins (tests/test_plays.py holds the first lines). Plays whose casts continue
into each other (sequels next to each other) would be joined.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedgpt.data import Turn

SCENE_WINDOW, SCENE_NOVELTY, MIN_SCENE_TURNS = 30, 0.5, 10
PLAY_WINDOW, PLAY_OVERLAP, MIN_PLAY_TURNS = 300, 0.1, 200


def principal(name: str) -> bool:
    """Principal characters are named in capitals in this format ("MENENIUS", "KING RICHARD III")."""
    return name.upper() == name and any(c.isalpha() for c in name)


def scene_starts(speakers: Sequence[str]) -> list[int]:
    """Indices of the turns that begin a scene (0 included), from changes of cast."""
    n, w = len(speakers), SCENE_WINDOW
    novelty = {}
    for i in range(w, n - w + 1):
        before, after = set(speakers[i - w : i]), set(speakers[i : i + w])
        novelty[i] = len(after - before) / len(after) * len(before - after) / len(before)
    starts = [0]
    for i in sorted(novelty, key=lambda i: (-novelty[i], i)):
        if novelty[i] < SCENE_NOVELTY:
            break
        if all(abs(i - s) >= MIN_SCENE_TURNS for s in starts):
            starts.append(i)
    return sorted(starts)


def play_starts(speakers: Sequence[str], scenes: list[int]) -> list[int]:
    """Indices of the turns that begin a play (0 included): scene starts where the principal casts before and
    after barely overlap."""

    def overlap(i: int) -> float:
        before = Counter(s for s in speakers[max(0, i - PLAY_WINDOW) : i] if principal(s))
        after = Counter(s for s in speakers[i : i + PLAY_WINDOW] if principal(s))
        share_after = sum(c for s, c in after.items() if s in before) / max(1, sum(after.values()))
        share_before = sum(c for s, c in before.items() if s in after) / max(1, sum(before.values()))
        return min(share_after, share_before)

    scores = {i: overlap(i) for i in scenes[1:]}
    starts = [0]
    for i in sorted(scores, key=lambda i: (scores[i], i)):
        if scores[i] >= PLAY_OVERLAP:
            break
        if all(abs(i - s) >= MIN_PLAY_TURNS for s in starts) and len(speakers) - i >= MIN_PLAY_TURNS:
            starts.append(i)
    return sorted(starts)


def _index(starts: list[int], n: int) -> list[int]:
    """For each of n turns, the number of the segment (of those beginning at `starts`) it is in."""
    out, k = [], 0
    for i in range(n):
        while k + 1 < len(starts) and starts[k + 1] <= i:
            k += 1
        out.append(k)
    return out


def find_scenes(turns: Sequence[Turn]) -> list[int]:
    """The scene of every turn, numbered through the whole corpus."""
    speakers = [t.speaker for t in turns]
    return _index(scene_starts(speakers), len(speakers))


def find_plays(turns: Sequence[Turn]) -> list[int]:
    """The play of every turn, numbered in corpus order."""
    speakers = [t.speaker for t in turns]
    return _index(play_starts(speakers, scene_starts(speakers)), len(speakers))


def play_texts(text: str) -> list[str]:
    """The text of each play of a "NAME:" corpus, in order; together they are the whole text."""
    from fedgpt.data import Turn, speaker_of, split_paragraphs

    turns, pos = [], 0
    for piece in split_paragraphs(text):
        name = speaker_of(piece)
        if name is not None:
            turns.append(Turn(name, pos, pos + len(piece)))
        pos += len(piece)
    plays = find_plays(turns)
    starts = [0] + [turns[i].start for i in range(1, len(turns)) if plays[i] != plays[i - 1]] + [len(text)]
    return [text[a:b] for a, b in zip(starts, starts[1:])]


def main(argv: list[str] | None = None) -> None:
    """python -m fedgpt.fed.plays CORPUS OUT_DIR [--group NAME=1,4 ...]: one file per play, or per group."""
    import argparse
    from pathlib import Path

    from fedgpt.files import atomic_write_bytes

    p = argparse.ArgumentParser(prog="python -m fedgpt.fed.plays", description=main.__doc__.split(": ", 1)[1])
    p.add_argument(
        "corpus", help="a UTF-8 text file in the NAME: format, e.g. data/tinyshakespeare/input.txt"
    )
    p.add_argument("out_dir", help="where to write play_1.txt, ... (or NAME.txt per group)")
    p.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME=1,4",
        help="write the plays numbered 1 and 4 (in corpus order) together as NAME.txt",
    )
    a = p.parse_args(argv)
    texts = play_texts(Path(a.corpus).read_text(encoding="utf-8"))
    out = Path(a.out_dir)
    groups = (
        dict(g.split("=", 1) for g in a.group)
        if a.group
        else {f"play_{k + 1}": str(k + 1) for k in range(len(texts))}
    )
    for name, numbers in groups.items():
        picked = [int(n) for n in numbers.split(",")]
        if not all(1 <= n <= len(texts) for n in picked):
            raise SystemExit(f"error: --group {name}={numbers}: the corpus has plays 1 to {len(texts)}")
        atomic_write_bytes(out / f"{name}.txt", "".join(texts[n - 1] for n in picked).encode())
        first_lines = [texts[n - 1].split(":", 1)[0] for n in picked]
        print(f"{out / (name + '.txt')}: plays {numbers} (opening with {', '.join(first_lines)})")


if __name__ == "__main__":
    main()
