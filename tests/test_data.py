"""fedgpt.data on real files: the Tiny Shakespeare corpus, tiktoken's offline cache, temp dirs. Nothing is
mocked."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgpt import data, download
from fedgpt.bench.common import write_plays
from fedgpt.config import DataConfig
from fedgpt.data import Batches, load_dataset
from fedgpt.download import download_shakespeare
from fedgpt.tokenizer import BPETokenizer, CharTokenizer, get_tokenizer

SHAKESPEARE_CHARS = 1_115_394
SHAKESPEARE_BPE_TOKENS = (
    338_025  # equals tiktoken's encoding of the whole text (nanoGPT reports the same total)
)
SHAKESPEARE_TURNS = 7_220  # of 7,222 paragraphs; the other two start "Senators, &C:"
SHAKESPEARE_SPEAKERS = 308
CLOSED_PORT_URL = (
    "http://127.0.0.1:9/input.txt"  # loopback "discard" port: nothing listens, connecting fails at once
)


@pytest.fixture(scope="module")
def shakespeare_text(shakespeare_file: Path) -> str:
    return shakespeare_file.read_text(encoding="utf-8")


@pytest.fixture
def offline(monkeypatch):
    """Point the download at a closed port, so any attempt to use the network fails loudly."""
    monkeypatch.setattr(download, "SHAKESPEARE_URL", CLOSED_PORT_URL)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


# --- tokenizers
# -----------------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip(shakespeare_text):
    tok = CharTokenizer.from_text(shakespeare_text)
    assert tok.vocab_size == 65 and tok.eot_id is None
    ids = tok.encode(shakespeare_text)
    assert len(ids) == SHAKESPEARE_CHARS and max(ids) == 64
    assert tok.decode(ids) == shakespeare_text
    assert tok.decode(np.array(ids[:100], dtype=np.uint16)) == shakespeare_text[:100]
    rebuilt = get_tokenizer(json.loads(json.dumps(tok.meta())))
    assert rebuilt.meta() == {"kind": "char", "chars": tok.chars} and rebuilt.encode("First") == tok.encode(
        "First"
    )


def test_char_encode_unknown_characters():
    tok = CharTokenizer("abc\n")
    with pytest.raises(ValueError, match=r"2 character\(s\) not in the 4-character vocabulary: 'xé'"):
        tok.encode("abxcé")


def test_bpe_tokenizer_round_trip(shakespeare_text):
    tok = BPETokenizer()
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.meta() == {"kind": "gpt2", "encoding": "r50k_base"}
    ids = tok.encode(shakespeare_text)
    assert len(ids) == SHAKESPEARE_BPE_TOKENS
    assert tok.decode(ids) == shakespeare_text
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids
    assert 50256 not in tok.encode("<|endoftext|>")  # corpus text is never the special token
    assert get_tokenizer(tok.meta()).decode(ids[:50]) == shakespeare_text[: len(tok.decode(ids[:50]))]


def test_get_tokenizer_unknown_kind():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer({"kind": "sentencepiece"})
    with pytest.raises(ValueError, match="unknown tiktoken encoding"):
        get_tokenizer({"kind": "gpt2", "encoding": "nope"})


# --- load_dataset on the real corpus
# --------------------------------------------------------------------------------


def test_load_dataset_shakespeare_char(data_dir, shakespeare_file, shakespeare_text, offline):
    ds = load_dataset(DataConfig(data_dir=str(data_dir)))
    assert ds.cache_dir == data_dir / "input-char"
    assert ds.train.dtype == np.uint16 and isinstance(ds.train, np.memmap)
    assert len(ds.train) + len(ds.val) == SHAKESPEARE_CHARS
    assert len(ds.train) == int(SHAKESPEARE_CHARS * 0.9) == 1_003_854
    meta = json.loads((ds.cache_dir / "meta.json").read_text())
    assert meta == ds.meta
    assert meta == {
        "tokenizer": {"kind": "char", "chars": "".join(sorted(set(shakespeare_text)))},
        "vocab_size": 65,
        "eot_id": None,
        "source": str(shakespeare_file.resolve()),
        "source_sha256": download.SHAKESPEARE_SHA256,
        "val_fraction": 0.1,
        "train_tokens": 1_003_854,
        "val_tokens": 111_540,
        "format_version": 1,
    }
    tok = get_tokenizer(meta["tokenizer"])
    assert tok.decode(np.concatenate([ds.train, ds.val])) == shakespeare_text


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_turns_are_exact_token_spans(data_dir, shakespeare_text, tokenizer, offline):
    ds = load_dataset(DataConfig(data_dir=str(data_dir), tokenizer=tokenizer))
    stream = np.concatenate([ds.train, ds.val])
    if tokenizer == "gpt2":
        assert len(stream) == SHAKESPEARE_BPE_TOKENS and ds.meta["eot_id"] == 50256
        # paragraph-wise == whole-text encoding
        assert stream.tolist() == ds.tokenizer.encode(shakespeare_text)
    assert len(ds.turns) == SHAKESPEARE_TURNS
    assert len({t.speaker for t in ds.turns}) == SHAKESPEARE_SPEAKERS
    assert ds.turns[0] == data.Turn("First Citizen", 0, ds.turns[0].end)
    assert {"KING RICHARD III", "ROMEO", "JULIET", "MENENIUS"} <= {t.speaker for t in ds.turns}
    for turn in ds.turns:
        assert ds.tokenizer.decode(stream[turn.start : turn.end]).startswith(turn.speaker + ":\n")
    spans = np.array([(t.start, t.end) for t in ds.turns])
    assert (spans[:, 0] < spans[:, 1]).all() and (
        spans[1:, 0] >= spans[:-1, 1]
    ).all()  # sorted, non-overlapping
    assert spans[-1, 1] == len(stream)  # the last turn runs to the end of the corpus


def test_split_paragraphs_keeps_every_character():
    text = "A:\nhi\n\n\n[stage direction]\n \nBOB JR.:\nyo\n"
    pieces = data.split_paragraphs(text)
    assert "".join(pieces) == text
    assert [data.speaker_of(p) for p in pieces] == ["A", None, "BOB JR."]
    assert data.split_paragraphs("no headers at all") == ["no headers at all"]


def test_corpus_without_speaker_headers_has_no_turns(tmp_path):
    corpus = tmp_path / "notes.txt"
    corpus.write_text(
        "Plain prose, no speakers.\n\nA second paragraph: still nobody talking.\n" * 20, encoding="utf-8"
    )
    ds = load_dataset(DataConfig(input_file=str(corpus), data_dir=str(tmp_path / "data")))
    assert ds.turns == [] and ds.cache_dir.name == "notes-char"
    assert len(ds.train) + len(ds.val) == len(corpus.read_text(encoding="utf-8"))


# --- cache
# ----------------------------------------------------------------------------------------------------------


def test_cache_is_reused(small_corpus, tmp_path):
    cfg = DataConfig(input_file=str(small_corpus), data_dir=str(tmp_path / "data"))
    first = load_dataset(cfg)
    files = ["train.bin", "val.bin", "turns.json", "meta.json"]
    stamps = {f: _stamp(first.cache_dir / f) for f in files}
    second = load_dataset(cfg)
    assert {f: _stamp(second.cache_dir / f) for f in files} == stamps
    assert (
        np.array_equal(first.train, second.train)
        and first.turns == second.turns
        and first.meta == second.meta
    )
    assert sorted(p.name for p in first.cache_dir.iterdir()) == sorted(files)  # no temp files left behind
    assert first.cache_dir.name == "small-char" and len(first.turns) > 50


def test_cache_is_rebuilt_when_source_tokenizer_or_split_change(small_corpus, tmp_path):
    cfg = DataConfig(input_file=str(small_corpus), data_dir=str(tmp_path / "data"))
    kept = [load_dataset(cfg)]  # open memmaps keep old inodes alive, so a rewritten file has a new one
    train_bin = kept[0].cache_dir / "train.bin"
    stamp = _stamp(train_bin)

    kept.append(load_dataset(DataConfig(input_file=cfg.input_file, data_dir=cfg.data_dir, val_fraction=0.2)))
    assert _stamp(train_bin) != stamp and kept[-1].meta["val_fraction"] == 0.2
    assert len(kept[-1].train) == int(len(small_corpus.read_text()) * 0.8)
    stamp = _stamp(train_bin)

    small_corpus.write_text(small_corpus.read_text() + "\n\nZED:\nOne more line.\n", encoding="utf-8")
    kept.append(load_dataset(DataConfig(input_file=cfg.input_file, data_dir=cfg.data_dir, val_fraction=0.2)))
    assert _stamp(train_bin) != stamp and kept[-1].turns[-1].speaker == "ZED"
    assert kept[-1].meta["source_sha256"] != kept[-2].meta["source_sha256"]

    bpe = load_dataset(DataConfig(input_file=cfg.input_file, data_dir=cfg.data_dir, tokenizer="gpt2"))
    assert bpe.cache_dir.name == "small-gpt2" and bpe.meta["tokenizer"]["kind"] == "gpt2"
    assert bpe.tokenizer.decode(np.concatenate([bpe.train, bpe.val])) == small_corpus.read_text()


def test_cache_without_meta_is_not_trusted(small_corpus, tmp_path):
    cfg = DataConfig(input_file=str(small_corpus), data_dir=str(tmp_path / "data"))
    ds = load_dataset(cfg)
    (ds.cache_dir / "meta.json").unlink()  # what a crash before the last write leaves behind
    stamp = _stamp(ds.cache_dir / "train.bin")
    again = load_dataset(cfg)
    assert _stamp(ds.cache_dir / "train.bin") != stamp and again.meta == ds.meta


# --- bad input
# ------------------------------------------------------------------------------------------------------


def test_vocab_file_gives_a_char_corpus_another_texts_vocabulary(tmp_path):
    # A base model's vocabulary for a fine-tuning corpus that uses fewer characters, and a refusal of one that
    # uses characters the base never saw.
    base, small, odd = tmp_path / "base.txt", tmp_path / "small.txt", tmp_path / "odd.txt"
    base.write_text("ALICE:\nhello, world!\n\nBOB:\nhi.\n" * 50)
    small.write_text("BOB:\nhello hello\n\n" * 50)
    odd.write_text("BOB:\nhello $3\n\n" * 50)
    own = load_dataset(DataConfig(input_file=str(small), data_dir=str(tmp_path / "d")))
    ds = load_dataset(DataConfig(input_file=str(small), data_dir=str(tmp_path / "d"), vocab_file=str(base)))
    assert ds.tokenizer.meta() == CharTokenizer.from_text(base.read_text()).meta()
    assert own.tokenizer.vocab_size < ds.tokenizer.vocab_size
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == small.read_text()
    with pytest.raises(ValueError, match=r"characters that data.vocab_file=.* lacks \('\$3'\)"):
        load_dataset(DataConfig(input_file=str(odd), data_dir=str(tmp_path / "d"), vocab_file=str(base)))


def test_load_dataset_rejects_bad_files(tmp_path):
    def load(path: Path):
        return load_dataset(DataConfig(input_file=str(path), data_dir=str(tmp_path / "data")))

    with pytest.raises(ValueError, match=r"input file .*missing\.txt not found"):
        load(tmp_path / "missing.txt")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"hello \xff\xfe world")
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text \(byte offset 6\)"):
        load(latin1)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load(empty)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("h")
    with pytest.raises(ValueError, match=r"only 1 token\(s\)"):
        load(tiny)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("meta.json"))


# --- download
# -------------------------------------------------------------------------------------------------------


def test_download_uses_a_present_file(tmp_path, shakespeare_file, offline):
    target = tmp_path / "tinyshakespeare" / "input.txt"
    target.parent.mkdir()
    shutil.copyfile(shakespeare_file, target)
    assert download_shakespeare(tmp_path) == target.resolve()


def test_download_rejects_a_present_file_with_wrong_content(tmp_path, offline):
    target = tmp_path / "tinyshakespeare" / "input.txt"
    target.parent.mkdir()
    target.write_text("not Shakespeare\n")
    with pytest.raises(ValueError, match=r"exists but its sha256 is .*delete it"):
        download_shakespeare(tmp_path)


def test_the_results_plays_refuse_a_corpus_that_is_not_tiny_shakespeare(tmp_path, offline):
    target = tmp_path / "tinyshakespeare" / "input.txt"
    target.parent.mkdir()
    target.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")  # a corpus cut short
    with pytest.raises(ValueError, match=r"exists but its sha256 is .*delete it"):
        write_plays(
            argparse.Namespace(data_dir=str(tmp_path)),
            Path(__file__).parents[1],
            tmp_path / "plays",
            {"a": "1"},
        )
    assert not (tmp_path / "plays").exists()


def test_download_offline_says_where_to_put_the_file(tmp_path, offline):
    with pytest.raises(RuntimeError) as err:
        download_shakespeare(tmp_path / "data")
    msg = str(err.value)
    assert "\n" not in msg and CLOSED_PORT_URL in msg
    assert str((tmp_path / "data" / "tinyshakespeare" / "input.txt").resolve()) in msg
    assert download.SHAKESPEARE_SHA256 in msg and "--data.input_file=PATH" in msg
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no partial file


def test_load_dataset_offline_error_comes_from_the_download(tmp_path, offline):
    with pytest.raises(RuntimeError, match="could not download Tiny Shakespeare"):
        load_dataset(DataConfig(data_dir=str(tmp_path)))


# --- batches
# --------------------------------------------------------------------------------------------------------


def test_batches_are_shifted_windows_of_the_source():
    tokens = np.arange(5000, dtype=np.uint16)  # value == position, so a window reveals its offset
    batches = Batches(tokens, block_size=64, batch_size=12, seed=1)
    assert batches.num_tokens == 5000 and iter(batches) is batches
    for _ in range(20):
        x, y = next(batches)
        assert x.shape == y.shape == (12, 64) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        offsets = x[:, :1]
        assert ((offsets >= 0) & (offsets <= 5000 - 65)).all()
        assert torch.equal(x, offsets + torch.arange(64)) and torch.equal(y, x + 1)


def test_batches_from_a_memmap_and_a_concatenation(small_corpus, tmp_path):
    ds = load_dataset(DataConfig(input_file=str(small_corpus), data_dir=str(tmp_path / "data")))
    for tokens in (ds.train, ds.train[100:400], np.concatenate([ds.val, ds.train[:50]])):
        x, y = next(Batches(tokens, block_size=16, batch_size=4))
        source = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        for row_x, row_y in zip(x, y, strict=True):
            hits = [o for o in range(len(source) - 16) if torch.equal(source[o : o + 16], row_x)]
            assert any(torch.equal(source[o + 1 : o + 17], row_y) for o in hits)
    x, y = next(Batches(np.arange(17), block_size=16, batch_size=3))  # one possible window
    assert torch.equal(x, torch.arange(16).expand(3, 16)) and torch.equal(y, x + 1)


def test_batches_are_seeded_and_resumable():
    tokens = np.arange(10_000)
    a, b, c = (Batches(tokens, 32, 8, seed=s) for s in (7, 7, 8))
    first = [next(a) for _ in range(3)]
    assert all(
        torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, [next(b) for _ in range(3)], strict=True)
    )
    assert not torch.equal(first[0][0], next(c)[0])

    state = a.state_dict()
    expected = [next(a)[0] for _ in range(5)]
    resumed = Batches(tokens, 32, 8, seed=999)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, next(resumed)[0]) for x in expected)


def test_fewer_tokens_than_the_block_give_shorter_windows_of_real_text():
    x, y = next(Batches(np.arange(10), block_size=64, batch_size=2))  # a small client: 10 tokens
    assert x.shape == y.shape == (2, 9)
    assert x[0].tolist() == list(range(9)) and y[0].tolist() == list(range(1, 10))  # no padding
    assert next(Batches(np.arange(65), block_size=64, batch_size=2))[0].shape == (2, 64)
    with pytest.raises(ValueError, match=r"only 1 token\(s\), need at least 2"):
        Batches(np.arange(1), block_size=64, batch_size=2)


def test_all_windows_cover_every_target_once_or_twice_at_the_tail():
    b = Batches(np.arange(100), block_size=16, batch_size=2)
    x, y = b.all_windows()
    assert x.shape == (7, 16)  # 6 windows of 16 cover targets 1..96; the 7th ends at the last token
    targets = y.flatten().tolist()
    assert set(targets) == set(range(1, 100)) and targets[-1] == 99
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    small = Batches(np.arange(5), block_size=16, batch_size=2).all_windows()
    assert small[0].tolist() == [[0, 1, 2, 3]] and small[1].tolist() == [[1, 2, 3, 4]]


def test_node_tokens_are_its_own_text_in_the_runs_tokenizer_and_cached(tmp_path):
    from fedgpt.data import load_node_tokens

    tok = CharTokenizer("\n :ABCabc")
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "a.txt").write_text("A:\nabc\n", encoding="utf-8")
    (tmp_path / "own" / "b.txt").write_text("B:\ncab\n", encoding="utf-8")
    folder = load_node_tokens(tmp_path / "own", tok, tmp_path / "cache")
    assert tok.decode(folder) == "A:\nabc\nB:\ncab\n"  # the folder's *.txt in name order
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert np.array_equal(
        load_node_tokens(tmp_path / "own", tok, tmp_path / "cache"), folder
    )  # from the cache
    (tmp_path / "odd.txt").write_text("A:\nabé€\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"odd.txt: 2 character\(s\) not in the 9-character vocabulary: 'é€' of this run"
    ):
        load_node_tokens(tmp_path / "odd.txt", tok, tmp_path / "cache")
    with pytest.raises(ValueError, match="holds no \\*.txt file"):
        load_node_tokens(tmp_path / "cache", tok, tmp_path / "cache")
