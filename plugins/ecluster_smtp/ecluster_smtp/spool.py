"""The spool: one file per accepted message under ``<data_dir>/<spool>/``.

Layout::

    <data_dir>/spool/<id>.eml     an accepted message: envelope headers, then the message
    <data_dir>/spool/tmp/<id>     being written (never acknowledged; removed at open)
    <data_dir>/spool/.lock        flock held by the one smtp service using this spool

A message is written to ``tmp/`` and fsynced (:meth:`Spool.stage`), then renamed into
place and the directory fsynced (:meth:`Spool.commit`); :meth:`Spool.write` does both.
The SMTP service journals the message's reception record between the two steps, so a
file in the spool always has its reception record, and a crash before the commit leaves
at most a file in ``tmp/`` that no client was told about (removed at the next open). The lock is the
same kind as the data-directory lock (:class:`node.datadir.DirLock`): a second process
pointed at the same spool, on this machine or another one sharing the storage, refuses.

The file format (:func:`spool_bytes`, :func:`parse_spool`) is the message exactly as
received, after three kinds of header lines an MTA would add::

    Return-Path: <sender>
    X-Ecluster-Rcpt: <recipient>            (one line per recipient)
    Received: from <helo> ([<peer>]) by <hostname> (<vip>) with ESMTP id <id>; <date>
"""
from __future__ import annotations

import email.utils
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from node.datadir import DirLock
from node.fsutil import fsync_dir

SUFFIX = ".eml"
TMP_DIR = "tmp"
LOCK_NAME = ".lock"
_UNSAFE = re.compile(r"[^\x21-\x7e]")
_ID_RE = re.compile(r"^[0-9a-f]{16}-[a-z0-9_-]{1,32}-[0-9a-f]{8}$")


class SpoolError(RuntimeError):
    """A spool file that cannot be parsed, or a bad message id; one-line message."""


@dataclass(frozen=True)
class SpooledMessage:
    """A spool file read back: the envelope and the message bytes as received."""

    mail_from: str
    rcpts: list[str]
    received: str
    message: bytes


def new_message_id(node: str, now_ns: int | None = None, rand: str | None = None) -> str:
    """A message id unique across the cluster: time, node, randomness (sorts by time)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    rand = secrets.token_hex(4) if rand is None else rand
    msg_id = f"{now_ns:016x}-{node}-{rand}"
    check_id(msg_id)
    return msg_id


def check_id(msg_id: str) -> str:
    """``msg_id`` if it is a well-formed message id (safe as a file name), else SpoolError. Pure."""
    if not isinstance(msg_id, str) or not _ID_RE.match(msg_id):
        raise SpoolError(f"bad message id {msg_id!r:.80}")
    return msg_id


def header_text(value: str) -> str:
    """``value`` made safe for one header line: no control characters or spaces. Pure."""
    return _UNSAFE.sub("?", value)[:255] or "unknown"


def spool_bytes(msg_id: str, mail_from: str, rcpts: list[str], peer: str, helo: str, vip: str,
                hostname: str, message: bytes, received_at: float) -> bytes:
    """The content of a spool file: envelope header lines, then ``message`` unchanged. Pure."""
    date = email.utils.formatdate(received_at, usegmt=True)
    lines = [f"Return-Path: <{header_text(mail_from) if mail_from else ''}>"]
    lines += [f"X-Ecluster-Rcpt: <{header_text(r)}>" for r in rcpts]
    lines.append(f"Received: from {header_text(helo or 'unknown')} ([{header_text(peer)}]) by "
                 f"{header_text(hostname)} ({header_text(vip)}) with ESMTP id {msg_id}; {date}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii") + message


def parse_spool(data: bytes) -> SpooledMessage:
    """Read a spool file's content back (the inverse of :func:`spool_bytes`). Pure."""
    rest = data
    header_lines: list[str] = []
    while True:
        line, sep, after = rest.partition(b"\r\n")
        if not sep:
            raise SpoolError("spool file ends inside its envelope headers")
        text = line.decode("ascii", "replace")
        header_lines.append(text)
        rest = after
        if text.startswith("Received: "):
            break
        if len(header_lines) > 100_000:
            raise SpoolError("spool file has no Received line")
    first = header_lines[0]
    if not first.startswith("Return-Path: <") or not first.endswith(">"):
        raise SpoolError("spool file does not start with Return-Path")
    rcpts = []
    for text in header_lines[1:-1]:
        if not text.startswith("X-Ecluster-Rcpt: <") or not text.endswith(">"):
            raise SpoolError(f"unexpected envelope line {text!r:.80}")
        rcpts.append(text[len("X-Ecluster-Rcpt: <"):-1])
    return SpooledMessage(first[len("Return-Path: <"):-1], rcpts, header_lines[-1][len("Received: "):], rest)


class Spool:
    """A node's spool directory, locked for as long as it is open (blocking calls)."""

    def __init__(self, directory: Path, owner: str):
        self.directory = Path(directory)
        self.tmp = self.directory / TMP_DIR
        self.lock = DirLock(self.directory / LOCK_NAME, owner, kind="spool directory")

    def open(self) -> int:
        """Lock the spool (LockedError if another process holds it); remove unfinished
        files left by a crash. Returns how many were removed."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self.lock.acquire()
        removed = 0
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def close(self) -> None:
        self.lock.release()

    def path(self, msg_id: str) -> Path:
        return self.directory / f"{check_id(msg_id)}{SUFFIX}"

    def write(self, msg_id: str, data: bytes) -> Path:
        """Store ``data`` as message ``msg_id``; durable when this returns."""
        self.stage(msg_id, data)
        return self.commit(msg_id)

    def stage(self, msg_id: str, data: bytes) -> Path:
        """Write ``data`` durably under ``tmp/`` (not yet in the spool); returns that path."""
        tmp = self.tmp / check_id(msg_id)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def commit(self, msg_id: str) -> Path:
        """Move a staged message into the spool; durable when this returns."""
        final = self.path(msg_id)
        os.rename(self.tmp / msg_id, final)
        fsync_dir(self.directory)
        return final

    def discard(self, msg_id: str) -> bool:
        """Drop a staged message that will not be committed."""
        try:
            (self.tmp / check_id(msg_id)).unlink()
        except FileNotFoundError:
            return False
        return True

    def remove(self, msg_id: str) -> bool:
        """Withdraw message ``msg_id`` (its reception could not be made durable)."""
        try:
            self.path(msg_id).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.directory)
        return True

    def ids(self) -> list[str]:
        """The ids of the spooled messages, oldest first."""
        return sorted(p.name[:-len(SUFFIX)] for p in self.directory.glob(f"*{SUFFIX}"))

    def read(self, msg_id: str) -> SpooledMessage:
        return parse_spool(self.path(msg_id).read_bytes())
