"""Per-member data directory: its layout and the lock that makes it single-owner.

Layout (see docs/ARCHITECTURE.md)::

    <data_dir>/.lock              held by `ecluster node run` / `manager run` (and its supervisord)
    <data_dir>/run/               0700: bus.ipc, events.ipc, broker.lock, supervisor.sock,
                                  supervisord.conf, supervisord.pid
    <data_dir>/log/               supervisord's and every program's stdout/stderr

A data directory may live on shared storage, so two nodes could be pointed at the same
one by mistake; :class:`DirLock` makes the second one refuse with a one-line message
instead of both writing to it. The lock is ``flock(2)`` on a file that is never removed:
unlinking a lock file lets a third process lock a fresh inode while the second still
holds the old one. The kernel drops the lock when the last holder of the open file
description dies, so a crashed owner never leaves a stale lock behind.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ecluster.clusterfile import Member

LOCK_NAME = ".lock"


class LockedError(RuntimeError):
    """The directory is in use by another live process; one-line message."""


def describe_holder(text: str) -> tuple[int | None, str]:
    """Parse a lock file's content (``<pid>\\n<what>\\n``) into (pid, what). Pure."""
    lines = text.splitlines()
    pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
    what = lines[1].strip() if len(lines) > 1 and lines[1].strip() else "another process"
    return pid, what


def locked_message(kind: str, directory: Path, text: str) -> str:
    """The one-line refusal, e.g. ``data directory /x is in use by node n1 (pid 1234)``. Pure."""
    pid, what = describe_holder(text)
    return f"{kind} {directory} is in use by {what}" + (f" (pid {pid})" if pid else "")


class DirLock:
    """An exclusive ``flock`` on ``path`` recording this pid and ``what`` holds it.

    ``kind`` names the guarded thing in the refusal message ("data directory", "run
    directory"); the directory named is ``path``'s parent. Use as a context manager or
    :meth:`acquire` / :meth:`release`. :attr:`fd` may be handed to a child process
    (``pass_fds``) so that the lock lives exactly as long as the child too.

    ``unlink_on_release`` removes the file on release, for a lock beside a directory that
    goes away with it (the demo's): the file is unlinked while still locked, and
    :meth:`acquire` re-checks after locking that the path still names the inode it locked,
    so a process that locked a just-unlinked file retries instead of holding a phantom.
    """

    def __init__(self, path: Path, what: str, kind: str = "data directory", unlink_on_release: bool = False):
        self.path = Path(path)
        self.what = what
        self.kind = kind
        self.unlink_on_release = unlink_on_release
        self.fd: int | None = None

    def acquire(self) -> "DirLock":
        if self.fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):                 # only an unlinking holder makes this loop
            fd = self._lock_once()
            if not self.unlink_on_release or self._still_named(fd):
                break
            os.close(fd)
        else:
            raise LockedError(f"{self.kind} {self.path.parent}: its lock file keeps being replaced")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{self.what}\n".encode(), 0)
        self.fd = fd
        return self

    def _still_named(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _lock_once(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            finally:
                os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockedError(locked_message(self.kind, self.path.parent, text)) from None
            raise
        return fd

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        if self.unlink_on_release:
            try:
                os.unlink(self.path)     # while still locked: see the class docstring
            except FileNotFoundError:
                pass
        try:
            os.ftruncate(fd, 0)      # no stale "in use by" text for whoever looks next
        except OSError:
            pass
        os.close(fd)                 # closing the last descriptor drops the flock

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def ensure_data_dir(member: Member, keep_search: bool = False) -> Path:
    """Create ``member``'s data, run and log directories (0700); return the data dir.

    ``keep_search``: leave a search bit (x) for group or others that the data directory was
    given on purpose (x without r; read and write bits always go). A plug-in whose daemons run as another user
    (Postfix, under <data_dir>/postfix) grants it; the broker, restarted in a running
    member, must not take it away again. run/ and log/ are always 0700."""
    for d in (member.data_dir, member.run_dir, member.data_dir / "log"):
        d.mkdir(parents=True, exist_ok=True)
        mode = d.stat().st_mode
        # only a search bit given on purpose (x without r: 0701, 0711), never one left by a
        # umask (0755): a directory made by mkdir becomes 0700 as always
        granted = keep_search and d == member.data_dir and not mode & 0o044
        os.chmod(d, 0o700 | (mode & 0o011 if granted else 0))
    return member.data_dir


def data_dir_lock(member: Member) -> DirLock:
    """The lock that makes ``member``'s data directory single-owner."""
    return DirLock(member.data_dir / LOCK_NAME, f"{member.role} {member.name}")


def broker_lock(member: Member) -> DirLock:
    """The lock that makes sure one broker at most serves ``member``'s run directory."""
    return DirLock(member.run_dir / "broker.lock", f"the bus broker of {member.name}", kind="run directory")
