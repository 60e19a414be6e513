"""Node identities for SecAgg+ against a server that lies: a node's signing key, the roster of its peers'
public keys (both given to the node out of band, never by the server), and the statements they sign.

    me = load_identity("node.key")                  # OpenSSH or PEM; ECDSA (P-256/384/521) or Ed25519
    peers = load_roster("roster.pub")               # one OpenSSH public key a line (or PEM blocks)
    sig = me.sign(advertisement(run, rnd, node, pk1, pk2))
    peers.verify(me.fingerprint, sig, advertisement(run, rnd, node, pk1, pk2))   # True

The keys can be the SuperNode authentication keys Flower already uses (`ssh-keygen -t ecdsa -b 384`). Every
statement names what it is, the run, the round and the node that signs it, so a signature from another
stage, run or round never verifies. What the signatures are for is fedgpt.fed.secagg's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def fingerprint(key: PublicKey) -> bytes:
    """A public key's name on the wire: SHA-256 of its DER SubjectPublicKeyInfo (32 bytes)."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def _ecdsa(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> ec.ECDSA:
    """ECDSA with the hash that matches the curve (SHA-256 for P-256, SHA-384 for P-384, SHA-512 above)."""
    size = key.curve.key_size
    return ec.ECDSA(hashes.SHA256() if size <= 256 else hashes.SHA384() if size <= 384 else hashes.SHA512())


@dataclass(frozen=True)
class Identity:
    """A node's own signing key."""

    key: PrivateKey
    fingerprint: bytes

    def sign(self, message: bytes) -> bytes:
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(message)
        return self.key.sign(message, _ecdsa(self.key))


@dataclass(frozen=True)
class Roster:
    """The public keys of the nodes this node accepts as peers, by fingerprint."""

    keys: dict[bytes, PublicKey]

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, fp: bytes) -> bool:
        return fp in self.keys

    def verify(self, fp: bytes, signature: bytes, message: bytes) -> bool:
        """Whether the roster member named `fp` signed `message` (False for a key not on the roster)."""
        key = self.keys.get(fp)
        if key is None:
            return False
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, message)
            else:
                key.verify(signature, message, _ecdsa(key))
        except InvalidSignature:
            return False
        return True


def _checked(key, path: str, what: str):
    kinds = (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)
    kinds += (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)
    if not isinstance(key, kinds):
        raise ValueError(
            f"{what} {path}: a {type(key).__name__}; use an ECDSA or Ed25519 key "
            "(ssh-keygen -t ecdsa -b 384, or -t ed25519)"
        )
    return key


def load_identity(path: str) -> Identity:
    """A node's private key from an OpenSSH or PEM file (unencrypted: a SuperNode starts unattended)."""
    return _load_identity(path, _stamp(path))


def load_roster(path: str) -> Roster:
    """The roster at `path`: OpenSSH public keys, one a line ('#' comments and blank lines skipped), and/or
    PEM public key blocks."""
    return _load_roster(path, _stamp(path))


def _stamp(path: str) -> int:
    """The file's modification time: a key or roster replaced on disk is read again."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


@lru_cache(maxsize=64)
def _load_identity(path: str, stamp: int) -> Identity:
    data = open(path, "rb").read()
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"secagg-identity-key {path}: not an unencrypted OpenSSH or PEM private key ({e})"
        ) from None
    key = _checked(key, path, "secagg-identity-key")
    return Identity(key, fingerprint(key.public_key()))


@lru_cache(maxsize=64)
def _load_roster(path: str, stamp: int) -> Roster:
    keys, pem = [], []
    for n, line in enumerate(open(path, encoding="utf-8").read().splitlines(), 1):
        line = line.strip()
        if pem or line.startswith("-----BEGIN"):
            pem.append(line)
            if line.startswith("-----END"):
                keys.append(_public("\n".join(pem).encode(), path, n, serialization.load_pem_public_key))
                pem = []
        elif line and not line.startswith("#"):
            keys.append(_public(line.encode(), path, n, serialization.load_ssh_public_key))
    if not keys:
        raise ValueError(f"secagg-roster {path}: no public keys in it")
    return Roster({fingerprint(k): k for k in keys})


def _public(data: bytes, path: str, line: int, load) -> PublicKey:
    try:
        key = load(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"secagg-roster {path}, line {line}: not a public key ({e})") from None
    return _checked(key, f"{path}, line {line}", "secagg-roster")


def _statement(kind: str, run: int, rnd: int, node: int, *fields) -> bytes:
    """The bytes a node signs: what the statement is, its run, round and signer, then its fields (bytes as
    hex, lists as given: callers sort them)."""
    encode = lambda f: (
        f.hex() if isinstance(f, bytes) else [encode(x) for x in f] if isinstance(f, list) else f
    )
    return json.dumps(["fedgpt-secagg/1", kind, run, rnd, node, *map(encode, fields)]).encode()


def advertisement(run: int, rnd: int, node: int, pk1: bytes, pk2: bytes) -> bytes:
    """A node's two SecAgg+ public keys of one round (setup)."""
    return _statement("advertise", run, rnd, node, pk1, pk2)


def share_list(run: int, rnd: int, node: int, peers: dict[int, bytes]) -> bytes:
    """The nodes a node gave shares of its secrets to (itself included), each with its roster key (share
    keys): who must agree before any of those shares is revealed."""
    return _statement("shares", run, rnd, node, [[p, peers[p]] for p in sorted(peers)])


def survivors(run: int, rnd: int, node: int, active: list[int], dead: list[int]) -> bytes:
    """The survivor set a node agrees the server unmasks with (consistency check)."""
    return _statement("survivors", run, rnd, node, sorted(active), sorted(dead))
