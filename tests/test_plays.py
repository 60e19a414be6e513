"""Plays, scenes and the role split on Tiny Shakespeare: the plays found from who speaks are the nine plays of
the corpus, beginning at their excerpts' first lines; a role is a speaker in one play; more clients than
roles split roles along their scenes."""

from __future__ import annotations

import numpy as np
import pytest

from fedgpt.config import DataConfig
from fedgpt.data import load_dataset
from fedgpt.fed.partition import MIN_CLIENT_TOKENS, partition
from fedgpt.fed.plays import find_plays, find_scenes

# Each play's first turn in Tiny Shakespeare, read off the text by hand: (speaker, start of the first line).
PLAY_OPENINGS = [
    ("First Citizen", "Before we proceed any further"),  # Coriolanus
    ("GLOUCESTER", "Now is the winter of our discontent"),  # Richard III
    ("KING RICHARD II", "Old John of Gaunt"),  # Richard II
    ("SAMPSON", "Gregory, o' my word"),  # Romeo and Juliet
    ("WARWICK", "I wonder how the king escaped our hands"),  # Henry VI, part 3
    ("ARCHIDAMUS", "If you shall chance, Camillo"),  # The Winter's Tale
    ("DUKE VINCENTIO", "Escalus."),  # Measure for Measure
    ("SLY", "I'll pheeze you, in faith."),  # The Taming of the Shrew
    ("Master", "Boatswain!"),  # The Tempest
]


@pytest.fixture(scope="module")
def shakespeare(data_dir):
    return load_dataset(DataConfig(data_dir=str(data_dir)))


@pytest.fixture(scope="module")
def text(shakespeare_file):
    return shakespeare_file.read_text(encoding="utf-8")


def test_the_plays_found_are_the_nine_plays_of_tiny_shakespeare(shakespeare, text):
    plays = find_plays(shakespeare.turns)
    firsts = [i for i in range(len(plays)) if i == 0 or plays[i] != plays[i - 1]]
    assert len(firsts) == len(PLAY_OPENINGS) and plays == sorted(plays)
    for i, (speaker, line) in zip(firsts, PLAY_OPENINGS, strict=True):
        turn = shakespeare.turns[i]  # char tokens: token offsets are character offsets
        assert turn.speaker == speaker and text[turn.start :].startswith(f"{speaker}:\n{line}"), (i, speaker)


def test_scenes_nest_in_plays(shakespeare):
    plays, scenes = find_plays(shakespeare.turns), find_scenes(shakespeare.turns)
    assert scenes == sorted(scenes) and 50 < max(scenes) + 1 < 300
    assert all(plays[i] == plays[i - 1] for i in range(1, len(scenes)) if scenes[i] == scenes[i - 1])


def test_role_split_gives_a_client_per_speaker_and_play(shakespeare):
    train, turns = shakespeare.train, shakespeare.turns
    plays = find_plays(turns)
    roles = {(plays[i], t.speaker) for i, t in enumerate(turns) if t.start < len(train)}
    parts = partition(train, len(roles), "role", turns=turns, seed=0, val_fraction=0.0)
    names = [p.speakers for p in parts]
    assert all(len(n) == 1 for n in names) and len({n[0] for n in names}) == len(roles)
    assert {n[0] for n in names} == {f"{speaker} (play {play + 1})" for play, speaker in roles}
    # GLOUCESTER of Richard III and of Henry VI part 3 are two roles
    assert {"GLOUCESTER (play 2)", "GLOUCESTER (play 5)"} <= {n[0] for n in names}
    covered = np.concatenate([p.spans for p in parts])
    assert (covered[:, 1] - covered[:, 0]).sum() == len(train)


def test_more_clients_than_roles_split_roles_by_scene_then_by_turns(shakespeare):
    train, turns = shakespeare.train, shakespeare.turns
    parts = partition(train, 1000, "role", turns=turns, seed=0, val_fraction=0.0)
    assert len(parts) == 1000 and min(p.size for p in parts) >= MIN_CLIENT_TOKENS
    spans = np.concatenate([p.spans for p in parts])
    spans = spans[np.argsort(spans[:, 0])]
    assert spans[0, 0] == 0 and spans[-1, 1] == len(train) and np.array_equal(spans[1:, 0], spans[:-1, 1])
    split = [p.speakers[0] for p in parts if ", part" in p.speakers[0]]
    assert split and all(" (play " in name for name in split)
    assert sum(p.size < 64 for p in parts) > 0  # some clients hold less than one 64-token window


@pytest.mark.parametrize("small", ["drop", "merge"])
def test_small_roles_are_dropped_or_merged_per_play(shakespeare, small):
    train, turns = shakespeare.train, shakespeare.turns
    keep = partition(train, 333, "role", turns=turns, seed=0, val_fraction=0.0)
    small_roles = [p for p in keep if p.size < 500]
    parts = partition(
        train, 100, "role", turns=turns, seed=0, val_fraction=0.0, min_role_tokens=500, small_roles=small
    )
    held = {name for p in parts for name in p.speakers}
    total = sum(p.size for p in parts)
    if small == "drop":  # LEAF's rule: their text trains no one
        assert total == len(train) - sum(p.size for p in small_roles)
        assert not held & {p.speakers[0] for p in small_roles}
    else:
        plays = {p.speakers[0].split(" (play ")[1] for p in small_roles}  # e.g. "3)"
        assert total == len(train) and held >= {f"minor roles (play {k}" for k in plays}


def test_play_texts_cut_the_corpus_where_the_plays_begin(text):
    from fedgpt.fed.plays import play_texts

    plays = play_texts(text)
    assert "".join(plays) == text and len(plays) == len(PLAY_OPENINGS)
    for play, (speaker, line) in zip(plays, PLAY_OPENINGS, strict=True):
        assert play.startswith(f"{speaker}:\n{line}")
