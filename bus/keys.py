"""CURVE key pairs of a cluster: one per member, one for the admin CLI.

The key directory holds ``<name>.key`` (public, 0644) and ``<name>.key_secret`` (0600),
in ZeroMQ's certificate format. Every public key in the directory is a cluster key:
ZAP lets in exactly those (see :mod:`bus.transport`), and maps each to its file name,
which becomes the message's authenticated User-Id.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

ADMIN = "admin"


class KeyError_(RuntimeError):
    """A key that is missing or unreadable; one-line message."""


@dataclass(frozen=True)
class KeyPair:
    name: str
    public: bytes
    secret: bytes | None


def create(keys_dir: Path, name: str, overwrite: bool = False) -> KeyPair:
    """Make ``name``'s key pair in ``keys_dir`` (0700); keep an existing pair unless overwrite."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    pub = keys_dir / f"{name}.key"
    sec = keys_dir / f"{name}.key_secret"
    if pub.exists() and sec.exists() and not overwrite:
        return load(keys_dir, name)
    old = os.umask(0o077)
    try:
        pub_path, sec_path = zmq.auth.create_certificates(str(keys_dir), name)
    finally:
        os.umask(old)
    os.chmod(sec_path, 0o600)
    os.chmod(pub_path, 0o644)
    return load(keys_dir, name)


def load(keys_dir: Path, name: str, secret: bool = True) -> KeyPair:
    """Load ``name``'s pair (or only its public key when secret=False)."""
    path = keys_dir / (f"{name}.key_secret" if secret else f"{name}.key")
    if not path.exists():
        raise KeyError_(f"no key for {name!r} in {keys_dir} (run: ecluster keys init --config FILE)")
    try:
        public, sec = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise KeyError_(f"cannot read key {path}: {e}") from None
    if secret and not sec:
        raise KeyError_(f"key file {path} holds no secret key")
    return KeyPair(name, public, sec if secret else None)


def public_keys(keys_dir: Path) -> dict[bytes, str]:
    """Every cluster public key in ``keys_dir`` -> the name it belongs to."""
    out: dict[bytes, str] = {}
    if not keys_dir.is_dir():
        return out
    for p in sorted(keys_dir.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(str(p))
        except (OSError, ValueError):
            continue
        out[public] = p.stem
    return out
