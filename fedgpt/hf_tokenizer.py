"""fedgpt's tokenizers as Hugging Face tokenizer files: transformers' AutoTokenizer loads them, same ids.

    files = tokenizer_files(tok, model_max_length=256)    # {file name: text}, for a model folder

GPT-2's BPE becomes the byte-level BPE of transformers' GPT-2 tokenizer, its vocabulary and merges rebuilt
from tiktoken's ranks (no download); a char vocabulary becomes a word-level model over single characters.
Written as JSON by hand: neither transformers nor tokenizers is needed to write them.
"""

from __future__ import annotations

import functools
import json

from fedgpt.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

BPE_ENCODINGS = ("r50k_base", "gpt2")  # tiktoken's names for GPT-2's BPE; others split text differently


def tokenizer_files(tok: Tokenizer, model_max_length: int) -> dict[str, str]:
    """The tokenizer files of a Hugging Face model folder: tokenizer.json and tokenizer_config.json (GPT-2's
    BPE: vocab.json and merges.txt too, for readers of the older files)."""
    if isinstance(tok, CharTokenizer):
        return _char_files(tok, model_max_length)
    if isinstance(tok, BPETokenizer) and tok.encoding in BPE_ENCODINGS:
        return _bpe_files(tok, model_max_length)
    raise ValueError(
        f"tokenizer {tok.meta()} has no Hugging Face export: fedgpt exports char vocabularies and GPT-2's "
        f"BPE ({' or '.join(BPE_ENCODINGS)})"
    )


def _json(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def _tokenizer_json(model: dict, pre_tokenizer: dict, decoder: dict, added: list[dict]) -> str:
    """tokenizer.json in the `tokenizers` library's serialization (version 1.0)."""
    return _json(
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": None,
            "decoder": decoder,
            "model": model,
        }
    )


def _char_files(tok: CharTokenizer, model_max_length: int) -> dict[str, str]:
    # Every character its own word: the pre-tokenizer isolates each code point (as Python iterates a str),
    # the word-level model looks it up, and Fuse joins tokens back without the spaces decode would put
    # between words. The vocabulary has no unknown token: a character outside it is an error, as in fedgpt.
    vocab = {c: i for i, c in enumerate(tok.chars)}
    model = {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    split = {"type": "Split", "pattern": {"Regex": r"[\s\S]"}, "behavior": "Isolated", "invert": False}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # it would drop the space before "." and "'s"
    }
    return {
        "tokenizer.json": _tokenizer_json(model, split, {"type": "Fuse"}, []),
        "tokenizer_config.json": _json(config),
    }


def _bpe_files(tok: BPETokenizer, model_max_length: int) -> dict[str, str]:
    vocab, merges, special = _byte_level_bpe(tok.encoding)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": merges,
    }
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
        | {"special": True}
        for i, s in sorted(special.items())
    ]
    eot = dict.fromkeys(("bos_token", "eos_token", "unk_token"), special[tok.eot_id])
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        # fedgpt encodes a literal "<|endoftext|>" in a text as plain text (tiktoken's encode_ordinary), and
        # so does this tokenizer; the token itself is still eos_token_id
        "split_special_tokens": True,
        **eot,
    }
    return {
        "tokenizer.json": _tokenizer_json(model, byte_level, byte_level, added),
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json(eot),
        "vocab.json": _json(vocab),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
    }


@functools.cache
def _byte_level_bpe(encoding: str) -> tuple[dict[str, int], list[list[str]], dict[int, str]]:
    """Vocabulary, merges and special tokens of tiktoken's `encoding` in transformers' byte-level form
    (about a second for GPT-2's 50,000 merges, hence kept)."""
    import tiktoken

    # get_tokenizer loaded the encoding (or said why it could not); tiktoken keeps it in memory since.
    enc = tiktoken.get_encoding(encoding)
    special = {enc.encode_single_token(s): s for s in enc.special_tokens_set}
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in special}
    char = _byte_to_char()
    text = lambda b: "".join(char[x] for x in b)
    vocab = {text(b): i for b, i in ranks.items()} | {s: i for i, s in special.items()}
    return vocab, [[text(a), text(b)] for a, b in _merges(ranks)], special


def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (openai/gpt-2 encoder.py's bytes_to_unicode): printable
    Latin-1 bytes stand for themselves, the others for the code points from 256 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    out, shifted = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shifted)
            shifted += 1
    return out


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that makes each multi-byte token, in rank order: tiktoken's BPE run on the token's own bytes
    with only the lower ranks ends in the two parts that the token's merge joins."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while True:
            pairs = [(ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            pairs = [(r, i) for r, i in pairs if r is not None and r < rank]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2, f"token {token!r} of rank {rank} is not one merge of two lower-rank tokens"
        merges.append((parts[0], parts[1]))
    return merges
