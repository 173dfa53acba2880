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
from typing import Any

import zmq.auth
from zmq.utils import z85

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


def public_of(keys_dir: Path, base: str) -> bytes | None:
    """The public key in ``<base>.key`` (or None when there is no readable one)."""
    try:
        public, _ = zmq.auth.load_certificate(str(keys_dir / f"{base}.key"))
    except (OSError, ValueError):
        return None
    return public


def _write_public(path: Path, public: bytes) -> None:
    """A public-only certificate at ``path`` (0644), replaced atomically."""
    text = ("#   ZeroMQ CURVE Public Certificate (ecluster)\n"
            "#   Exchange securely, or use a secure mechanism to verify the contents\n"
            "#   of this file after exchange. Store public certificates in your home\n"
            "#   directory, in the .curve subdirectory.\n\n"
            f"metadata\ncurve\n    public-key = \"{public.decode('ascii')}\"\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def check_public(public: Any) -> bytes:
    """A Z85 CURVE public key given as text, checked (40 characters of Z85). Pure."""
    if isinstance(public, str):
        public = public.encode("ascii", "replace")
    if not isinstance(public, bytes) or len(public) != 40:
        raise KeyError_("a public key is 40 characters of Z85 text")
    try:
        z85.decode(public)
    except (ValueError, KeyError, TypeError):
        raise KeyError_("a public key is 40 characters of Z85 text") from None
    return public


def put_public(keys_dir: Path, name: str, public: bytes, slot: str = NEXT) -> bool:
    """Hold ``public`` as ``name``'s staged public key (``<name>.next.key``), for a host that
    must accept a key whose secret is on another host. True if the file changed.

    A name with a staged secret here (a shared directory) is left alone: its own pair wins."""
    if slot != NEXT:
        raise KeyError_(f"unknown key slot {slot!r}")
    public = check_public(public)
    base = f"{name}.{NEXT}"
    if (keys_dir / f"{base}.key_secret").exists() or public_of(keys_dir, base) == public:
        return False
    _private_dir(keys_dir)
    _write_public(keys_dir / f"{base}.key", public)
    return True


def promote_public(keys_dir: Path, name: str, public: bytes) -> bool:
    """Make ``public`` ``name``'s current public key here; the previous one is kept as
    ``<name>.old.key`` until :func:`retire`. Idempotent (True if anything changed).

    For the names whose secret is elsewhere: this host only accepts their key. When this
    directory holds ``name``'s staged secret (a shared directory), promoting is the owner's
    business (:func:`promote`) and only the public file is brought forward."""
    public = check_public(public)
    current = public_of(keys_dir, name)
    if current == public:
        return False
    if current is not None:
        _write_public(keys_dir / f"{name}.{OLD}.key", current)
    _write_public(keys_dir / f"{name}.key", public)
    nxt = keys_dir / f"{name}.{NEXT}.key"
    if not (keys_dir / f"{name}.{NEXT}.key_secret").exists() and public_of(keys_dir, f"{name}.{NEXT}") == public:
        nxt.unlink()
    return True


def promote_own(keys_dir: Path, name: str, expect: bytes | None = None) -> bool:
    """:func:`promote` for the host that holds ``name``'s staged secret, idempotent: when
    nothing is staged and the current secret already is ``expect``'s, nothing to do (False).

    The old public key kept is the one of the secret being replaced (not whatever
    ``<name>.key`` says: in a shared directory another host may have written it already)."""
    nxt_sec = keys_dir / f"{name}.{NEXT}.key_secret"
    if not nxt_sec.exists():
        cur = load(keys_dir, name)
        if expect is not None and cur.public != check_public(expect):
            raise KeyError_(f"no staged key pair for {name!r} in {keys_dir}")
        return False
    new = load(keys_dir, f"{name}.{NEXT}")
    if expect is not None and new.public != check_public(expect):
        raise KeyError_(f"the staged key of {name!r} in {keys_dir} is not the one expected")
    cur_sec = keys_dir / f"{name}.key_secret"
    if cur_sec.exists():
        try:
            old_public = load(keys_dir, name).public
        except KeyError_:
            old_public = None
        if old_public is not None and old_public != new.public:
            _write_public(keys_dir / f"{name}.{OLD}.key", old_public)
    os.replace(nxt_sec, cur_sec)
    _write_public(keys_dir / f"{name}.key", new.public)
    (keys_dir / f"{name}.{NEXT}.key").unlink(missing_ok=True)
    return True


# -- per-host bundles ---------------------------------------------------------------------

def bundle(source: Path, out: Path, secret_of: str) -> list[str]:
    """Write into ``out`` (0700) the key directory one host needs: ``secret_of``'s pair
    and the current public key of every name in ``source``, nothing else. Returns the file
    names written. ``out`` must be empty or absent (a bundle is never merged into keys)."""
    load(source, secret_of)       # the secret must be there: a clear error if not
    if out.exists() and any(out.iterdir()):
        raise KeyError_(f"{out} is not empty: a bundle goes into a new directory")
    _private_dir(out)
    written = []
    for p in sorted(source.glob("*.key")):
        stem = p.stem
        if key_name(stem) != stem:          # staged / old keys of a rotation in progress
            continue
        public = public_of(source, stem)
        if public is None:
            continue
        _write_public(out / p.name, public)
        written.append(p.name)
    old = os.umask(0o077)
    try:
        shutil.copyfile(source / f"{secret_of}.key_secret", out / f"{secret_of}.key_secret")
    finally:
        os.umask(old)
    os.chmod(out / f"{secret_of}.key_secret", 0o600)
    written.append(f"{secret_of}.key_secret")
    return written


def secrets_in(keys_dir: Path) -> list[str]:
    """The names whose (current) secret key is in ``keys_dir``."""
    return sorted(p.name[: -len(".key_secret")] for p in keys_dir.glob("*.key_secret")
                  if key_name(p.name[: -len(".key_secret")]) == p.name[: -len(".key_secret")])


def retire(keys_dir: Path, name: str) -> bool:
    """Forget ``name``'s previous public key (end of a rotation); True if there was one."""
    try:
        (keys_dir / f"{name}.{OLD}.key").unlink()
        return True
    except FileNotFoundError:
        return False
