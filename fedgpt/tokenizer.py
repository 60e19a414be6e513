"""Text <-> token ids: one token per character, or GPT-2's byte-level BPE (tiktoken "r50k_base").

    tok = CharTokenizer.from_text(text)          # vocabulary: the sorted characters of the corpus
    tok = BPETokenizer()                         # 50,257 ids, <|endoftext|> = 50256
    tok = get_tokenizer(tok.meta())              # rebuilt from its metadata (e.g. from a checkpoint)

meta() is JSON: it travels in checkpoints and in every federated message.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedgpt.download import DataUnavailableError


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
            raise ValueError(
                f"token id(s) {bad[:10]} outside the {self.vocab_size}-character vocabulary"
            ) from None

    def meta(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}


def _load_tiktoken(encoding: str, cache_dir: str | Path | None):
    """tiktoken.get_encoding(encoding), its download cache in TIKTOKEN_CACHE_DIR if set, else in cache_dir."""
    import tiktoken

    if encoding not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tiktoken encoding {encoding!r}; GPT-2's is 'r50k_base'")
    # tiktoken reads TIKTOKEN_CACHE_DIR when it loads an encoding (then keeps it in memory), so set it only
    # meanwhile.
    env = os.environ.get("TIKTOKEN_CACHE_DIR")
    cache = env if env is not None else (str(Path(cache_dir).resolve()) if cache_dir is not None else None)
    try:
        if env is None and cache is not None:
            os.environ["TIKTOKEN_CACHE_DIR"] = cache
        return tiktoken.get_encoding(encoding)
    except (
        OSError,
        ImportError,
        ValueError,
    ) as e:  # requests' errors are OSErrors; ValueError: hash mismatch
        where = cache or os.path.join(tempfile.gettempdir(), "data-gym-cache")
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataUnavailableError(
            f"could not load the tiktoken encoding {encoding!r} ({reason}); tiktoken downloads it on first "
            f"use: offline, copy a filled tiktoken cache into {where} or set TIKTOKEN_CACHE_DIR to one"
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
    """Rebuild a tokenizer from its meta() (e.g. from a checkpoint); cache_dir: where tiktoken may download
    to."""
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "gpt2":
        return BPETokenizer(meta.get("encoding", "r50k_base"), cache_dir=cache_dir)
    raise ValueError(f"unknown tokenizer {meta!r}: expected a dict with 'kind' 'char' or 'gpt2'")
