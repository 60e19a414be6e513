"""Corpus -> tokenizer -> cached uint16 token files with speaker turns -> random (x, y) batches.

    ds = load_dataset(cfg.data)    # encodes once into data/input-char/{train,val}.bin, turns.json, meta.json
    batches = Batches(ds.train, block_size=256, batch_size=64, device="cuda", seed=1337)
    x, y = next(batches)           # (B, T) int64 each; y is x shifted left by one token

Speaker turns are the paragraphs headed by a "NAME:" line; every turn is an exact token span of the stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgpt.config import TOKENIZERS, DataConfig
from fedgpt.files import atomic_write_bytes

log = logging.getLogger(__name__)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_BYTES = 1_115_394
FORMAT_VERSION = 1  # bump when the layout of the encoded cache changes; old caches are then re-encoded
MAX_UINT16_VOCAB = 65536

# A paragraph whose first line is "NAME:" is a turn spoken by NAME ("First Citizen:", "KING RICHARD III:").
SPEAKER_HEADER = re.compile(r"([A-Z][A-Za-z' .-]*):")
# Paragraphs are separated by one or more blank lines (lines holding only whitespace).
PARAGRAPH_SEP = re.compile(r"(\n\s*\n)")


# --- download -------------------------------------------------------------------------------------------------------


class DataUnavailableError(RuntimeError):
    """The corpus or the BPE ranks could not be fetched (offline, unreachable); the message says where to put them."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_shakespeare(data_dir: str | Path) -> Path:
    """Return data_dir/tinyshakespeare/input.txt, downloading and checksumming it unless it is already there."""
    path = (Path(data_dir) / "tinyshakespeare" / "input.txt").resolve()
    if path.is_file():
        actual = _sha256(path.read_bytes())
        if actual != SHAKESPEARE_SHA256:
            raise ValueError(
                f"{path} exists but its sha256 is {actual}, not Tiny Shakespeare's {SHAKESPEARE_SHA256}: "
                f"delete it to download it again, or pass --data.input_file={path} to train on it as your own corpus"
            )
        return path
    url = SHAKESPEARE_URL  # read at call time so tests can point it elsewhere
    put_it = f"put the file (sha256 {SHAKESPEARE_SHA256}) at {path}, or pass --data.input_file=PATH"
    log.info("downloading Tiny Shakespeare from %s to %s", url, path)
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            data = resp.read()
    except (urllib.error.URLError, OSError) as e:  # URLError, HTTPError, timeouts, connection resets
        reason = getattr(e, "reason", None) or e
        raise DataUnavailableError(f"could not download Tiny Shakespeare from {url} ({reason}); {put_it}") from None
    if len(data) != SHAKESPEARE_BYTES or _sha256(data) != SHAKESPEARE_SHA256:
        raise DataUnavailableError(
            f"downloaded {len(data):,} bytes from {url} with sha256 {_sha256(data)}, expected {SHAKESPEARE_BYTES:,} "
            f"bytes with sha256 {SHAKESPEARE_SHA256}; {put_it}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


# --- tokenizers -----------------------------------------------------------------------------------------------------


def _as_list(ids: Iterable[int]) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


class Tokenizer:
    """Text <-> token ids. meta() is JSON-serialisable and rebuilds the tokenizer through get_tokenizer()."""

    vocab_size: int
    eot_id: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        raise NotImplementedError


class CharTokenizer(Tokenizer):
    """One token per character; the vocabulary is the sorted set of the corpus's characters."""

    def __init__(self, chars: str):
        if not chars or len(set(chars)) != len(chars):
            raise ValueError(f"a char vocabulary must be non-empty and without repeats, got {chars!r}")
        self.chars = chars
        self.vocab_size = len(chars)
        self.eot_id = None
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError:
            unknown = "".join(sorted(set(text) - self._stoi.keys()))
            raise ValueError(
                f"{len(unknown)} character(s) not in the {self.vocab_size}-character vocabulary: {unknown!r}"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return "".join([self.chars[i] for i in _as_list(ids)])
        except IndexError:
            bad = sorted({i for i in _as_list(ids) if not 0 <= i < self.vocab_size})
            raise ValueError(f"token id(s) {bad[:10]} outside the {self.vocab_size}-character vocabulary") from None

    def meta(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}


def _load_tiktoken(encoding: str, cache_dir: str | Path | None):
    """tiktoken.get_encoding(encoding) with its download cache in TIKTOKEN_CACHE_DIR if set, else cache_dir."""
    import tiktoken

    if encoding not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tiktoken encoding {encoding!r}; GPT-2's is 'r50k_base'")
    # tiktoken reads TIKTOKEN_CACHE_DIR when it loads an encoding (then keeps it in memory), so set it only meanwhile.
    env = os.environ.get("TIKTOKEN_CACHE_DIR")
    cache = env if env is not None else (str(Path(cache_dir).resolve()) if cache_dir is not None else None)
    try:
        if env is None and cache is not None:
            os.environ["TIKTOKEN_CACHE_DIR"] = cache
        return tiktoken.get_encoding(encoding)
    except (OSError, ImportError, ValueError) as e:  # requests' errors are OSErrors; ValueError: hash mismatch
        where = cache or os.path.join(tempfile.gettempdir(), "data-gym-cache")
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataUnavailableError(
            f"could not load the tiktoken encoding {encoding!r} ({reason}); tiktoken downloads it on first use: "
            f"offline, copy a filled tiktoken cache into {where} or set TIKTOKEN_CACHE_DIR to one"
        ) from None
    finally:
        if env is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)


class BPETokenizer(Tokenizer):
    """GPT-2's byte-level BPE (tiktoken "r50k_base", 50,257 ids, <|endoftext|> = 50256)."""

    def __init__(self, encoding: str = "r50k_base", cache_dir: str | Path | None = None):
        self.encoding = encoding
        self._enc = _load_tiktoken(encoding, cache_dir)
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: a literal "<|endoftext|>" in the corpus is plain text, not the special token
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(_as_list(ids))

    def meta(self) -> dict[str, Any]:
        return {"kind": "gpt2", "encoding": self.encoding}


def get_tokenizer(meta: dict[str, Any], cache_dir: str | Path | None = None) -> Tokenizer:
    """Rebuild a tokenizer from its meta() (e.g. from a checkpoint); cache_dir: where tiktoken may download to."""
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "gpt2":
        return BPETokenizer(meta.get("encoding", "r50k_base"), cache_dir=cache_dir)
    raise ValueError(f"unknown tokenizer {meta!r}: expected a dict with 'kind' 'char' or 'gpt2'")


# --- dataset --------------------------------------------------------------------------------------------------------


@dataclass
class Turn:
    speaker: str  # e.g. "First Citizen"
    start: int  # token span [start, end) in the full stream (train + val concatenated)
    end: int


@dataclass
class Dataset:
    train: np.ndarray  # uint16 memmap, the first (1 - val_fraction) of the token stream
    val: np.ndarray  # uint16 memmap, the rest
    tokenizer: Tokenizer
    turns: list[Turn]  # speaker turns of the whole stream, sorted, non-overlapping
    meta: dict[str, Any]  # the content of meta.json
    cache_dir: Path


def split_paragraphs(text: str) -> list[str]:
    """Split text into paragraphs, each keeping the blank line(s) after it: "".join(pieces) == text."""
    parts = PARAGRAPH_SEP.split(text)  # [para, sep, para, sep, ..., para]
    pieces = [parts[i] + (parts[i + 1] if i + 1 < len(parts) else "") for i in range(0, len(parts), 2)]
    return [p for p in pieces if p]


def _pretokenized(paragraph: str, last: bool) -> tuple[str, str, str]:
    """Cut a paragraph where GPT-2's pre-tokenizer cuts it inside the whole text: (text, blank-line whitespace
    but its final newline, that newline). At the end of the text the trailing whitespace stays one chunk."""
    body = paragraph.rstrip()
    tail = paragraph[len(body) :]
    if last or not tail:
        return body, tail, ""
    return body, tail[:-1], tail[-1:]


def speaker_of(paragraph: str) -> str | None:
    """NAME if the paragraph's first line is exactly "NAME:" followed by a newline, else None."""
    first, newline, _ = paragraph.partition("\n")
    m = SPEAKER_HEADER.fullmatch(first) if newline else None
    return m.group(1) if m else None


def _read_source(path: Path) -> bytes:
    if not path.is_file():
        raise ValueError(f"input file {path} not found: fix --data.input_file, or leave it empty to download Tiny Shakespeare")
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"input file {path} is empty: pass a UTF-8 text file with --data.input_file")
    return raw


def _decode_utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte offset {e.start}): convert it first, "
            f"e.g. iconv -f LATIN1 -t UTF-8 {path.name} > {path.stem}.utf8.txt"
        ) from None


def _cache_is_valid(cache_dir: Path, sha: str, cfg: DataConfig) -> dict[str, Any] | None:
    """meta.json's content if the cache in cache_dir was encoded from this source with this config, else None."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        ok = (
            meta["format_version"] == FORMAT_VERSION
            and meta["source_sha256"] == sha
            and meta["tokenizer"]["kind"] == cfg.tokenizer
            and meta["val_fraction"] == cfg.val_fraction
            and (cache_dir / "train.bin").stat().st_size == 2 * meta["train_tokens"]
            and (cache_dir / "val.bin").stat().st_size == 2 * meta["val_tokens"]
            and (cache_dir / "turns.json").is_file()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if ok else None


def _encode_to_cache(text: str, tokenizer: Tokenizer, cfg: DataConfig, source: Path, sha: str, cache_dir: Path) -> dict[str, Any]:
    """Encode paragraph by paragraph, find the speaker turns, write train.bin, val.bin, turns.json and meta.json."""
    if tokenizer.vocab_size > MAX_UINT16_VOCAB:
        raise ValueError(f"vocabulary of {tokenizer.vocab_size} ids does not fit the uint16 token files")
    # Encoding each paragraph on its own makes every turn's token span exact for BPE too (no token straddles a
    # paragraph boundary); for chars it equals encoding the whole text. Each paragraph is further cut where GPT-2's
    # pre-tokenizer cuts the whole text, so the BPE stream also equals encoding the whole text whenever paragraphs
    # start with a non-blank character (as in Tiny Shakespeare). Without it "\n\n" ending a paragraph would
    # become one token (628) instead of the two "\n" (198, 198) that the same text gets when a prompt is encoded.
    pieces = split_paragraphs(text)
    cuts = [_pretokenized(piece, last=i == len(pieces) - 1) for i, piece in enumerate(pieces)]
    parts = [tokenizer.encode(part) for cut in cuts for part in cut]  # (tiktoken's threaded batch API is slower)
    ids = [a + b + c for a, b, c in zip(parts[0::3], parts[1::3], parts[2::3], strict=True)]
    bounds = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in ids], out=bounds[1:])
    n = int(bounds[-1])
    stream = np.fromiter(chain.from_iterable(ids), dtype=np.uint16, count=n)
    n_train = int(n * (1 - cfg.val_fraction))
    if not 0 < n_train < n:
        raise ValueError(
            f"{source} has only {n:,} token(s): with data.val_fraction={cfg.val_fraction} the train or validation "
            "split would be empty; use a larger corpus"
        )
    speakers: dict[str, int] = {}
    turns = []  # [speaker index, start, end]: a turn covers its paragraph and the blank line(s) after it
    for i, piece in enumerate(pieces):
        name = speaker_of(piece)
        if name is not None:
            turns.append([speakers.setdefault(name, len(speakers)), int(bounds[i]), int(bounds[i + 1])])

    cache_dir.mkdir(parents=True, exist_ok=True)
    # meta.json goes first and comes back last: a crash in between leaves no cache that looks valid
    (cache_dir / "meta.json").unlink(missing_ok=True)
    atomic_write_bytes(cache_dir / "train.bin", memoryview(stream[:n_train]))
    atomic_write_bytes(cache_dir / "val.bin", memoryview(stream[n_train:]))
    atomic_write_bytes(cache_dir / "turns.json", json.dumps({"speakers": list(speakers), "turns": turns}).encode())
    meta = {
        "tokenizer": tokenizer.meta(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "source": str(source),
        "source_sha256": sha,
        "val_fraction": cfg.val_fraction,
        "train_tokens": n_train,
        "val_tokens": n - n_train,
        "format_version": FORMAT_VERSION,
    }
    atomic_write_bytes(cache_dir / "meta.json", json.dumps(meta, indent=2).encode())
    return meta


def _memmap(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=np.uint16, mode="r")


def load_dataset(cfg: DataConfig) -> Dataset:
    """Tokenize cfg.input_file (or Tiny Shakespeare) once into data_dir/<stem>-<tokenizer>/ and memory-map it."""
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"data.tokenizer: {cfg.tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction: {cfg.val_fraction} must be in (0, 1)")
    data_dir = Path(cfg.data_dir)
    source = Path(cfg.input_file).expanduser().resolve() if cfg.input_file else download_shakespeare(data_dir)
    raw = _read_source(source)
    sha = _sha256(raw)
    cache_dir = data_dir / f"{source.stem}-{cfg.tokenizer}"
    tiktoken_dir = data_dir / "tiktoken_cache"

    meta = _cache_is_valid(cache_dir, sha, cfg)
    if meta is None:
        text = _decode_utf8(raw, source)
        log.info("encoding %s with the %s tokenizer into %s", source, cfg.tokenizer, cache_dir)
        tokenizer = CharTokenizer.from_text(text) if cfg.tokenizer == "char" else BPETokenizer(cache_dir=tiktoken_dir)
        meta = _encode_to_cache(text, tokenizer, cfg, source, sha, cache_dir)
    else:
        tokenizer = get_tokenizer(meta["tokenizer"], cache_dir=tiktoken_dir)

    saved = json.loads((cache_dir / "turns.json").read_text())
    names = saved["speakers"]
    turns = [Turn(names[k], start, end) for k, start, end in saved["turns"]]
    return Dataset(
        train=_memmap(cache_dir / "train.bin"),
        val=_memmap(cache_dir / "val.bin"),
        tokenizer=tokenizer,
        turns=turns,
        meta=meta,
        cache_dir=cache_dir,
    )


# --- batches --------------------------------------------------------------------------------------------------------


class Batches:
    """Random (x, y) windows from one 1-D token array."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        if block_size <= 0 or batch_size <= 0:
            raise ValueError(f"block_size={block_size} and batch_size={batch_size} must be > 0")
        n = len(tokens)
        if n <= block_size:
            raise ValueError(
                f"only {n} tokens, need more than block_size={block_size} for one window: "
                "use a larger corpus/partition or a smaller model.block_size"
            )
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        # One copy into RAM as int64 (a memmap, a slice or a concatenation alike): batches then need no conversion.
        self.data = torch.from_numpy(np.array(tokens, dtype=np.int64))
        self.generator = torch.Generator().manual_seed(seed)
        # x and y gathered together: (2, 1, T) + (B, 1) -> (2, B, T); row 0 is x, row 1 (shifted by one) is y,
        # both contiguous, so one gather, one pinned buffer and one host-to-device copy per batch.
        self._window = torch.stack([torch.arange(block_size), torch.arange(1, block_size + 1)])[:, None, :]

    @property
    def num_tokens(self) -> int:
        return self.data.numel()

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(self.num_tokens - self.block_size, (self.batch_size, 1), generator=self.generator)
        xy = self.data[starts + self._window]  # (2, B, T)
        if self.device.type == "cuda":
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            xy = xy.to(self.device)
        return xy[0], xy[1]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
