"""Durable file writes: the fsync steps that make a write survive a power loss.

``write`` + ``close`` only hands data to the kernel; after a crash of the machine (not
just of the process) the file can be empty, short, or missing. Three things are needed:

* the file's data synced (``fsync``) before it is given its final name, so the name
  never points at a file whose content is not on disk;
* the rename (``os.replace``) for atomicity: readers see the old content or the new,
  never a mix;
* the *directory* synced after a file is created, renamed or removed in it: the entry is
  directory data, and without that fsync a rename acknowledged to the caller can be
  undone by a crash (ext4, xfs), bringing the old file back or losing the new one.

:func:`atomic_write` does the three in order; :func:`fsync_dir` and :func:`fsync_file`
serve callers that create files by other means (appends, git checkouts, segment rolls).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "fsync_file"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` (files created, renamed or removed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Make the content of the file at ``path`` durable (a file written by another process)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str, mode: int = 0o666,
                 tmp: str | os.PathLike | None = None) -> None:
    """Replace the file at ``path`` with ``data``, atomically and durably.

    The data goes to a temporary file beside ``path`` (``tmp``, by default
    ``.<name>.tmp-<pid>-<thread>`` so concurrent writers never share one), which is
    fsynced, renamed over ``path``, and the directory fsynced (see the module docstring).
    A ``str`` is written as UTF-8. ``mode`` is the permission of a new file before the
    umask, as for :func:`open`. The parent directory must exist. A failure before the
    rename removes the temporary file and leaves ``path`` as it was; any ``OSError``
    propagates (one from the final directory fsync means the new content is in place but
    its durability is not known).
    """
    final = Path(path)
    tmp_path = Path(tmp) if tmp is not None else \
        final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(payload)
            while view:                      # os.write may write less than asked
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, final)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise
    fsync_dir(final.parent)
