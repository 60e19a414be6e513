"""Corpus -> cached uint16 token files with speaker turns -> random (x, y) batches.

    ds = load_dataset(cfg.data)    # encodes once into data/input-char/{train,val}.bin, turns.json, meta.json
    batches = Batches(ds.train, block_size=256, batch_size=64, device="cuda", seed=1337)
    x, y = next(batches)           # (B, T) int64 each; y is x shifted left by one token

Speaker turns are the paragraphs headed by a "NAME:" line; every turn is an exact token span of the stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgpt.config import DataConfig
from fedgpt.config_rules import TOKENIZERS
from fedgpt.download import download_shakespeare
from fedgpt.files import atomic_write_bytes
from fedgpt.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, get_tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the layout of the encoded cache changes; old caches are then re-encoded
MAX_UINT16_VOCAB = 65536

# A paragraph whose first line is "NAME:" is a turn spoken by NAME ("First Citizen:", "KING RICHARD III:").
SPEAKER_HEADER = re.compile(r"([A-Z][A-Za-z' .-]*):")
# Paragraphs are separated by one or more blank lines (lines holding only whitespace).
PARAGRAPH_SEP = re.compile(r"(\n\s*\n)")


# --- dataset
# --------------------------------------------------------------------------------------------------------


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
        raise ValueError(
            f"input file {path} not found: "
            "fix --data.input_file, or leave it empty to download Tiny Shakespeare"
        )
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"input file {path} is empty: pass a UTF-8 text file with --data.input_file")
    return raw


def _decode_utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte offset {e.start}): convert it first, e.g. iconv -f LATIN1 -t "
            f"UTF-8 {path.name} > {path.stem}.utf8.txt"
        ) from None


def _cache_is_valid(cache_dir: Path, sha: str, cfg: DataConfig) -> dict[str, Any] | None:
    """meta.json's content if the cache in cache_dir was encoded from this source and config, else None."""
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


def _encode_to_cache(
    text: str, tokenizer: Tokenizer, cfg: DataConfig, source: Path, sha: str, cache_dir: Path
) -> dict[str, Any]:
    """Encode paragraph by paragraph, find the speaker turns, write train.bin, val.bin, turns.json and
    meta.json."""
    if tokenizer.vocab_size > MAX_UINT16_VOCAB:
        raise ValueError(f"vocabulary of {tokenizer.vocab_size} ids does not fit the uint16 token files")
    # Encoding each paragraph on its own makes every turn's token span exact for BPE too (no token straddles a
    # paragraph boundary); for chars it equals encoding the whole text. Each paragraph is further cut where
    # GPT-2's pre-tokenizer cuts the whole text, so the BPE stream also equals encoding the whole text
    # whenever paragraphs start with a non-blank character (as in Tiny Shakespeare). Without it "\n\n" ending
    # a paragraph would become one token (628) instead of the two "\n" (198, 198) that the same text gets when
    # a prompt is encoded.
    pieces = split_paragraphs(text)
    cuts = [_pretokenized(piece, last=i == len(pieces) - 1) for i, piece in enumerate(pieces)]
    parts = [
        tokenizer.encode(part) for cut in cuts for part in cut
    ]  # (tiktoken's threaded batch API is slower)
    ids = [a + b + c for a, b, c in zip(parts[0::3], parts[1::3], parts[2::3], strict=True)]
    bounds = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in ids], out=bounds[1:])
    n = int(bounds[-1])
    stream = np.fromiter(chain.from_iterable(ids), dtype=np.uint16, count=n)
    n_train = int(n * (1 - cfg.val_fraction))
    if not 0 < n_train < n:
        raise ValueError(
            f"{source} has only {n:,} token(s): with data.val_fraction={cfg.val_fraction} the train or "
            "validation split would be empty; use a larger corpus"
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
    atomic_write_bytes(
        cache_dir / "turns.json", json.dumps({"speakers": list(speakers), "turns": turns}).encode()
    )
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
    """Tokenize cfg.input_file (or Tiny Shakespeare) once into data_dir/<stem>-<tokenizer>/; memory-map it."""
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"data.tokenizer: {cfg.tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction: {cfg.val_fraction} must be in (0, 1)")
    data_dir = Path(cfg.data_dir)
    source = Path(cfg.input_file).expanduser().resolve() if cfg.input_file else download_shakespeare(data_dir)
    raw = _read_source(source)
    sha = hashlib.sha256(raw).hexdigest()
    vocab = _vocab(cfg) if cfg.tokenizer == "char" and cfg.vocab_file else None
    suffix = f"-{hashlib.sha256(vocab.chars.encode()).hexdigest()[:8]}" if vocab else ""
    cache_dir = data_dir / f"{source.stem}-{cfg.tokenizer}{suffix}"
    tiktoken_dir = data_dir / "tiktoken_cache"

    meta = _cache_is_valid(cache_dir, sha, cfg)
    if meta is None:
        text = _decode_utf8(raw, source)
        log.info("encoding %s with the %s tokenizer into %s", source, cfg.tokenizer, cache_dir)
        if cfg.tokenizer == "gpt2":
            tokenizer = BPETokenizer(cache_dir=tiktoken_dir)
        else:
            tokenizer = vocab or CharTokenizer.from_text(text)
            if vocab and set(text) - set(vocab.chars):
                raise ValueError(
                    f"{source} has characters that data.vocab_file={cfg.vocab_file} lacks "
                    f"({''.join(sorted(set(text) - set(vocab.chars)))!r}): give a vocab_file that holds them"
                )
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


def check_windows(block_size: int, ds: Dataset, client_tokens: list[int] | None = None) -> None:
    """Refuse a context longer than the data can fill: the validation split (central evaluation needs one
    window), the train split, or (federated) every client's data. Small clients may train on shorter windows;
    a model none of whose data fills one window is a mistaken config, and an expensive one."""
    val, train = len(ds.val) - 1, len(ds.train) - 1
    largest = max(client_tokens) - 1 if client_tokens else train
    for what, n in (
        ("the validation split", val),
        ("the train split", train),
        ("any client's data", largest),
    ):
        if n < 1:  # no (input, target) pair at all
            raise ValueError(
                f"{what} has only {n + 1} token(s), need at least 2 for one (input, target) pair: use a "
                "larger corpus"
            )
        if block_size > n:
            raise ValueError(
                f"model.block_size={block_size} is longer than {what} ({n + 1:,} tokens): lower it to "
                f"{n:,} or less"
            )


def _vocab(cfg: DataConfig) -> CharTokenizer:
    """The char vocabulary of data.vocab_file."""
    path = Path(cfg.vocab_file).expanduser()
    if not path.is_file():
        raise ValueError(
            f"data.vocab_file={cfg.vocab_file} is not a file: give the text whose characters to use"
        )
    return CharTokenizer.from_text(_decode_utf8(_read_source(path), path))


def load_node_tokens(path: str | Path, tokenizer: Tokenizer, cache_dir: str | Path) -> np.ndarray:
    """A federated node's own text (a file, or every *.txt of a folder, in name order), encoded with the run's
    tokenizer and cached in cache_dir by content: the tokens it trains on, all of them.

    A char-level run's vocabulary is the server's: text with characters outside it is refused, naming them.
    """
    path = Path(path).expanduser()
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(
            f"node data folder {path} holds no *.txt file: give input-file a text file or a folder of them"
        )
    raws = [_read_source(f) for f in files]
    sha = hashlib.sha256(b"".join(hashlib.sha256(r).digest() for r in raws)).hexdigest()
    kind = json.dumps(tokenizer.meta(), sort_keys=True)
    cache = Path(cache_dir) / f"node-{hashlib.sha256((sha + kind).encode()).hexdigest()[:16]}.bin"
    if cache.is_file():
        return _memmap(cache)
    text = "".join(_decode_utf8(r, f) for r, f in zip(raws, files))
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:  # a char-level vocabulary that lacks some of this node's characters
        raise ValueError(
            f"{path}: {e} of this run (the server's corpus): give the node text in the run's "
            "alphabet, or train with data.tokenizer=gpt2, which encodes any text"
        ) from None
    if len(ids) < 2:
        raise ValueError(f"{path} holds {len(ids)} token(s): a node needs at least 2 to train on")
    atomic_write_bytes(cache, np.asarray(ids, dtype=np.uint16).tobytes())
    return _memmap(cache)


# --- batches
# --------------------------------------------------------------------------------------------------------


class Batches:
    """Random (x, y) windows from one 1-D token array.

    An array of block_size tokens or fewer (a small federated client) gives windows of all but its last token:
    shorter than the model's context, with no padding, so every position trained on is real text.
    """

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
        if n < 2:
            raise ValueError(
                f"only {n} token(s), need at least 2 for one (input, target) pair: use a larger corpus"
            )
        self.block_size = min(block_size, n - 1)  # the window length
        self.batch_size = batch_size
        self.device = torch.device(device)
        # One copy into RAM as int64 (a memmap, a slice or a concatenation alike): batches then need no
        # conversion.
        self.data = torch.from_numpy(np.array(tokens, dtype=np.int64))
        self.generator = torch.Generator().manual_seed(seed)
        # x and y gathered together: (2, 1, T) + (B, 1) -> (2, B, T); row 0 is x, row 1 (shifted by one) is y,
        # both contiguous, so one gather, one pinned buffer and one host-to-device copy per batch.
        T = self.block_size
        self._window = torch.stack([torch.arange(T), torch.arange(1, T + 1)])[:, None, :]

    @property
    def num_tokens(self) -> int:
        return self.data.numel()

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_device(self.draw())

    def draw(self) -> torch.Tensor:
        """The next batch's windows on the CPU: (2, B, T), x then y."""
        starts = torch.randint(
            self.num_tokens - self.block_size, (self.batch_size, 1), generator=self.generator
        )
        return self.data[starts + self._window]  # (2, B, T)

    def to_device(self, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) on this stream's device: on CUDA one pinned, asynchronous copy of both."""
        if self.device.type == "cuda":
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            xy = xy.to(self.device)
        return xy[0], xy[1]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def all_windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every window of the array once: consecutive, not overlapping, the last one as far as the data goes
        (a full batch, for FedSGD's one gradient of a client's whole data)."""
        T, n = self.block_size, self.num_tokens
        starts = torch.arange(0, n - T, T)
        if len(starts) == 0 or starts[-1] + T < n - 1:
            starts = torch.cat([starts, torch.tensor([n - 1 - T])])  # the tail, in a window ending at the end
        xy = self.data[starts[:, None] + self._window]  # (2, W, T)
        return xy[0].to(self.device), xy[1].to(self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
