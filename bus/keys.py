"""CURVE key pairs of a cluster: one per member, one for the admin CLI.

The key directory (0700) holds ``<name>.key`` (public, 0644) and ``<name>.key_secret``
(0600), in ZeroMQ's certificate format. During a rotation (``ecluster keys rotate``) a
name may also have a staged pair ``<name>.next.key`` / ``<name>.next.key_secret`` and,
once the new pair is promoted, the previous public key as ``<name>.old.key``. Every
public key in the directory is a cluster key: ZAP lets in exactly those (see
:mod:`bus.transport`), and maps each to its name (``n1`` for ``n1.key``, ``n1.next.key``
and ``n1.old.key`` alike), which becomes the message's authenticated User-Id.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

ADMIN = "admin"
NEXT = "next"         # staged pair: <name>.next.key, <name>.next.key_secret
OLD = "old"           # previous public key, still accepted until the rotation ends


class KeyError_(RuntimeError):
    """A key that is missing or unreadable; one-line message."""


@dataclass(frozen=True)
class KeyPair:
    name: str
    public: bytes
    secret: bytes | None


def _private_dir(keys_dir: Path) -> None:
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)


def _write_pair(keys_dir: Path, base: str) -> None:
    """``base.key`` (0644) and ``base.key_secret`` (0600), never readable by others on the way."""
    old = os.umask(0o077)
    try:
        pub_path, sec_path = zmq.auth.create_certificates(str(keys_dir), base)
    finally:
        os.umask(old)
    os.chmod(sec_path, 0o600)
    os.chmod(pub_path, 0o644)


def create(keys_dir: Path, name: str, overwrite: bool = False) -> KeyPair:
    """Make ``name``'s key pair in ``keys_dir`` (0700); keep an existing pair unless overwrite."""
    _private_dir(keys_dir)
    pub = keys_dir / f"{name}.key"
    sec = keys_dir / f"{name}.key_secret"
    if pub.exists() and sec.exists() and not overwrite:
        return load(keys_dir, name)
    _write_pair(keys_dir, name)
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


def key_name(stem: str) -> str:
    """The name a key file's stem belongs to: ``n1``, ``n1.next`` and ``n1.old`` -> ``n1``. Pure."""
    base, dot, tag = stem.rpartition(".")
    return base if dot and tag in (NEXT, OLD) else stem


def public_keys(keys_dir: Path) -> dict[bytes, str]:
    """Every cluster public key in ``keys_dir`` (current, staged, old) -> the name it belongs to."""
    out: dict[bytes, str] = {}
    if not keys_dir.is_dir():
        return out
    for p in sorted(keys_dir.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(str(p))
        except (OSError, ValueError):
            continue
        out[public] = key_name(p.stem)
    return out


# -- rotation: stage, promote, retire ----------------------------------------------------

def stage(keys_dir: Path, name: str) -> KeyPair:
    """Write a new pair for ``name`` as ``<name>.next.*`` (replacing an earlier staged one)."""
    _private_dir(keys_dir)
    _write_pair(keys_dir, f"{name}.{NEXT}")
    return load(keys_dir, f"{name}.{NEXT}")


def promote(keys_dir: Path, name: str) -> KeyPair:
    """Make the staged pair current: ``<name>.key`` -> ``<name>.old.key``, ``next`` -> current.

    The secret and the public key are each replaced by a rename, so ``<name>.key`` never
    goes missing. The old
    secret key is deleted; the old public key stays accepted until :func:`retire`.
    """
    nxt_pub, nxt_sec = keys_dir / f"{name}.{NEXT}.key", keys_dir / f"{name}.{NEXT}.key_secret"
    if not (nxt_pub.exists() and nxt_sec.exists()):
        raise KeyError_(f"no staged key pair for {name!r} in {keys_dir}")
    cur_pub, cur_sec = keys_dir / f"{name}.key", keys_dir / f"{name}.key_secret"
    if cur_pub.exists():
        old = keys_dir / f"{name}.{OLD}.key"
        shutil.copyfile(cur_pub, old)
        os.chmod(old, 0o644)
    os.replace(nxt_sec, cur_sec)
    os.replace(nxt_pub, cur_pub)
    return load(keys_dir, name)


def retire(keys_dir: Path, name: str) -> bool:
    """Forget ``name``'s previous public key (end of a rotation); True if there was one."""
    try:
        (keys_dir / f"{name}.{OLD}.key").unlink()
        return True
    except FileNotFoundError:
        return False
