"""Tiny Shakespeare, fetched once and checked against its sha256; offline, the error says where to put it.

    path = download_shakespeare("data")    # data/tinyshakespeare/input.txt

A file already there is used if its sha256 is Tiny Shakespeare's, and refused otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from pathlib import Path

from fedgpt.files import atomic_write_bytes

log = logging.getLogger(__name__)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_BYTES = 1_115_394


class DataUnavailableError(RuntimeError):
    """The corpus or the BPE ranks could not be fetched (offline, unreachable); the message says where to put
    them."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_shakespeare(data_dir: str | Path) -> Path:
    """data_dir/tinyshakespeare/input.txt, downloaded and checksummed unless it is already there."""
    path = (Path(data_dir) / "tinyshakespeare" / "input.txt").resolve()
    if path.is_file():
        actual = _sha256(path.read_bytes())
        if actual != SHAKESPEARE_SHA256:
            raise ValueError(
                f"{path} exists but its sha256 is {actual}, not Tiny Shakespeare's {SHAKESPEARE_SHA256}: "
                "delete it to download it again, "
                f"or pass --data.input_file={path} to train on it as your own corpus"
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
        raise DataUnavailableError(
            f"could not download Tiny Shakespeare from {url} ({reason}); {put_it}"
        ) from None
    if len(data) != SHAKESPEARE_BYTES or _sha256(data) != SHAKESPEARE_SHA256:
        raise DataUnavailableError(
            f"downloaded {len(data):,} bytes from {url} with sha256 {_sha256(data)}, expected "
            f"{SHAKESPEARE_BYTES:,} bytes with sha256 {SHAKESPEARE_SHA256}; {put_it}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path
