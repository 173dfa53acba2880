"""The aggregated log files on a manager, written so that each record stands exactly once.

Layout under the root (``[managers.<m>].logs_root``, default ``<data_dir>/logs``)::

    <root>/%Y/%m/%d/<log>/<node>         one record a line (line format 2, below)
    <root>/.logagg/LOCK                  held by the one aggregator writing this root
    <root>/.logagg/<node>/<log>.state    the sink state of one (node, log)

Line format 2 (docs/LOGS.md). A record is written as its payload followed by ``\\n``;
inside a payload, a newline becomes backslash + ``n``, and a run of backslashes right
before a newline or an ``n`` is doubled. Nothing else is changed (payloads need not be
UTF-8, a backslash elsewhere stays one). So a line is always one record, and
:func:`decode_line` gives back exactly the payload: a run of ``k`` backslashes before an
``n`` on a line stands for ``k // 2`` backslashes, then a newline if ``k`` is odd, else the
``n``. (Format 1 escaped newlines only, so a payload holding backslash + ``n`` and one
holding a newline there gave the same line.)

Exactly once. The sink state of a (node, log) is ``(seq, path, size)``: every record up to
``seq`` is in the files, and ``path`` (the file written last) is exactly ``size`` bytes of
committed lines. A batch is handled as:

1. drop records with ``seq <= state.seq`` (already written: the dedup);
2. if the target file is not ``state.path`` (a new day), record ``(seq, new path, its
   current size)`` first, durably;
3. append the lines, ``fdatasync`` the file;
4. record ``(last seq, path, new size)`` durably (step 2 and 4 use the state file);
5. only then the caller checkpoints at the node.

After a crash anywhere, :meth:`Sink.open` cuts ``state.path`` back to ``state.size``
(a torn last line, or whole lines whose state update never happened: they will be read
again from the node, whose checkpoint did not move) and the dedup drops whatever the node
sends again that is already in the files. So every record the node acknowledged stands
exactly once, in seq order per node.

The state file holds two 512-byte slots written alternately, each with a generation
number and a CRC-32: a write torn by a crash spoils only the slot being written, and
the other one still holds the previous state.
"""
from __future__ import annotations

import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from node.fsutil import fsync_dir

STATE_DIR = ".logagg"
SLOT_SIZE = 512
_STATE_MAGIC = b"ECLS"
_STATE_HEAD = struct.Struct(">4sQQQH")  # magic, generation, seq, size, path length
_MAX_PATH = SLOT_SIZE - _STATE_HEAD.size - 4


class SinkError(RuntimeError):
    """The sink cannot write (disk error, bad state); one-line message."""


# -- pure helpers ---------------------------------------------------------------------------

def day_of(now: float | None = None) -> str:
    """The UTC day directory ``%Y/%m/%d`` for ``now`` (default: the current time)."""
    return time.strftime("%Y/%m/%d", time.gmtime(now))


def relative_path(day: str, log: str, node: str) -> str:
    """``<day>/<log>/<node>``: where one node's records of one log for one day go."""
    return f"{day}/{log}/{node}"


#: the version of the line format (see the module docstring and docs/LOGS.md)
LINE_FORMAT = 2
# what encoding changes: a newline (after any run of backslashes), or an "n" after one or more
_TO_ESCAPE = re.compile(rb"(\\*)\n|(\\+)n")
# what decoding changes: an "n" after one or more backslashes
_ESCAPED = re.compile(rb"(\\+)n")


def _escape(m: re.Match) -> bytes:
    if m.group(1) is not None:                  # backslashes, then a newline
        return m.group(1) * 2 + b"\\n"
    return m.group(2) * 2 + b"n"


def _unescape(m: re.Match) -> bytes:
    k = len(m.group(1))
    return b"\\" * (k // 2) + (b"\n" if k % 2 else b"n")


def encode_record(payload: bytes | str) -> bytes:
    """One payload as the content of a line (without its ``\\n``): line format 2. Pure.

    Injective, and :func:`decode_line` reverses it; a ``str`` is taken as UTF-8 (as the
    journal does). A payload without a newline and without backslash + ``n`` is unchanged.
    """
    if isinstance(payload, str):
        payload = payload.encode()
    if b"\n" not in payload and b"\\n" not in payload:
        return payload
    return _TO_ESCAPE.sub(_escape, payload)


def decode_line(line: bytes) -> bytes:
    """The payload a line of an aggregated file holds (the line without its ``\\n``). Pure."""
    if b"\\n" not in line:
        return line
    return _ESCAPED.sub(_unescape, line)


def render_lines(payloads: Sequence[bytes]) -> bytes:
    """Payloads as lines: each encoded (:func:`encode_record`) and followed by ``\\n``. Pure."""
    if not payloads:
        return b""
    parts = list(payloads)
    parts.append(b"")                           # the last line's end, without a second copy
    data = b"\n".join(parts)
    # the usual case: no payload holds a newline or a backslash + "n", so nothing changes
    # (a payload ending in a backslash is followed by the newline byte, not by an "n")
    if data.count(b"\n") == len(payloads) and b"\\n" not in data:
        return data
    return b"\n".join([encode_record(p) for p in payloads] + [b""])


def split_lines(data: bytes) -> list[bytes]:
    """The payloads of the complete lines in ``data`` (a line still being written is left
    out: the text after the last ``\\n``). Pure."""
    return [decode_line(line) for line in data.split(b"\n")[:-1]]


@dataclass(frozen=True)
class SinkState:
    """Every record up to ``seq`` is written; ``path`` holds exactly ``size`` committed bytes."""

    seq: int = 0
    path: str = ""
    size: int = 0
    generation: int = 0


def encode_state(state: SinkState) -> bytes:
    """One state slot (SLOT_SIZE bytes, CRC-protected)."""
    path = state.path.encode()
    if len(path) > _MAX_PATH:
        raise SinkError(f"sink path too long for the state file: {state.path!r}")
    body = _STATE_HEAD.pack(_STATE_MAGIC, state.generation, state.seq, state.size, len(path)) + path
    body += struct.pack(">I", zlib.crc32(body))
    return body.ljust(SLOT_SIZE, b"\0")


def decode_state(slot: bytes) -> SinkState | None:
    """A state slot back, or None if it is empty or damaged."""
    if len(slot) < _STATE_HEAD.size + 4:
        return None
    magic, gen, seq, size, plen = _STATE_HEAD.unpack_from(slot)
    if magic != _STATE_MAGIC or plen > _MAX_PATH:
        return None
    end = _STATE_HEAD.size + plen
    (crc,) = struct.unpack_from(">I", slot, end)
    if zlib.crc32(slot[:end]) != crc:
        return None
    return SinkState(seq=seq, path=slot[_STATE_HEAD.size:end].decode(), size=size, generation=gen)


def newest_state(data: bytes) -> SinkState | None:
    """The valid slot with the highest generation in a state file's content."""
    states = [decode_state(data[i:i + SLOT_SIZE]) for i in (0, SLOT_SIZE)]
    states = [s for s in states if s is not None]
    return max(states, key=lambda s: s.generation) if states else None


def new_records(records: Sequence[Sequence], done_seq: int) -> list:
    """The records of a batch not yet written: seq greater than ``done_seq``."""
    if not records or records[0][0] > done_seq:
        return list(records)
    return [r for r in records if r[0] > done_seq]


# -- I/O ----------------------------------------------------------------------------------

def _makedirs_durable(root: Path, rel_dir: str) -> None:
    """Create ``root/rel_dir`` and fsync every parent whose entry was added."""
    cur = root
    for part in Path(rel_dir).parts:
        nxt = cur / part
        if not nxt.is_dir():
            os.makedirs(nxt, exist_ok=True)
            fsync_dir(cur)
        cur = nxt


class Sink:
    """The files of one (node, log) under a root, with their state (see the module docstring).

    Blocking; not thread-safe (one caller at a time per sink).
    """

    def __init__(self, root: Path, node: str, log: str):
        self.root = Path(root)
        self.node = node
        self.log = log
        self.state_path = self.root / STATE_DIR / node / f"{log}.state"
        self.state = SinkState()
        self.recovered_bytes = 0       # bytes cut from the tail at open
        self.notes: list[str] = []     # what open() found and accepted (for the service's log)
        self._state_fd = -1
        self._fd = -1
        self._fd_path = ""

    # -- open / close ------------------------------------------------------------------------
    def open(self) -> "Sink":
        """Load the state and cut the last file back to its committed size."""
        _makedirs_durable(self.root, f"{STATE_DIR}/{self.node}")
        fresh = not self.state_path.exists()
        self._state_fd = os.open(self.state_path, os.O_RDWR | os.O_CREAT, 0o600)
        if fresh:
            os.ftruncate(self._state_fd, 2 * SLOT_SIZE)
            os.fsync(self._state_fd)
            fsync_dir(self.state_path.parent)
        data = os.pread(self._state_fd, 2 * SLOT_SIZE, 0)
        state = newest_state(data)
        if state is None and any(data):
            raise SinkError(f"{self.state_path}: both state slots are damaged")
        self.state = state or SinkState()
        if self.state.path:
            path = self.root / self.state.path
            try:
                have = path.stat().st_size
            except FileNotFoundError:
                have = 0
            if have > self.state.size:
                with open(path, "r+b") as fh:
                    fh.truncate(self.state.size)
                    os.fsync(fh.fileno())
                self.recovered_bytes = have - self.state.size
            elif have < self.state.size:
                # Removed or shortened by someone else (an archived day, say): nothing to cut;
                # the records up to state.seq were written, so only the size is taken as found.
                self.notes.append(f"{path}: {have} bytes on disk, {self.state.size} were committed "
                                  "(removed or shortened outside the aggregator)")
                self._save(self.state.seq, self.state.path, have)
        return self

    def close(self) -> None:
        for fd in (self._fd, self._state_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._state_fd = -1
        self._fd_path = ""

    # -- writing -------------------------------------------------------------------------------
    def _save(self, seq: int, path: str, size: int) -> None:
        new = SinkState(seq=seq, path=path, size=size, generation=self.state.generation + 1)
        os.pwrite(self._state_fd, encode_state(new), (new.generation % 2) * SLOT_SIZE)
        os.fdatasync(self._state_fd)
        self.state = new

    def _switch(self, rel: str) -> None:
        """Make ``rel`` the current file: recorded (with its committed size) before any write."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        parent, _name = rel.rsplit("/", 1)
        _makedirs_durable(self.root, parent)
        path = self.root / rel
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        if not existed:
            os.fsync(fd)
            fsync_dir(path.parent)
        size = os.fstat(fd).st_size
        if rel != self.state.path:
            self._save(self.state.seq, rel, size)
        self._fd, self._fd_path = fd, rel

    def append(self, records: Sequence[Sequence], day: str | None = None) -> int:
        """Write the new records of a batch ([seq, payload], seq ascending) durably.

        Returns how many were written (records already in the files are skipped).
        """
        todo = new_records(records, self.state.seq)
        if not todo:
            return 0
        rel = relative_path(day or day_of(), self.log, self.node)
        try:
            if rel != self._fd_path or rel != self.state.path:
                self._switch(rel)
            data = render_lines([p for _s, p in todo])
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.write(self._fd, view[done:])
            os.fdatasync(self._fd)
            self._save(todo[-1][0], rel, self.state.size + len(data))
        except OSError as e:
            # The committed size stays as it was: cut what was written so the files and the
            # state agree again before anything else is appended.
            if self._fd >= 0:
                if self._fd_path == self.state.path:
                    try:
                        os.ftruncate(self._fd, self.state.size)
                    except OSError:
                        pass        # open() cuts it at the next start
                os.close(self._fd)
                self._fd = -1
            self._fd_path = ""
            raise SinkError(f"{self.root / rel}: {e.strerror or e}") from None
        return len(todo)

    def reset_seq(self, seq: int) -> None:
        """Move the dedup floor (only after the node's journal was found to restart lower)."""
        self._save(seq, self.state.path, self.state.size)


# -- reading (for `ecluster logs tail` and checks) ---------------------------------------------

def read_records(path: Path) -> list[bytes]:
    """The payloads of an aggregated file's complete lines, in order (decoded, format 2)."""
    return split_lines(Path(path).read_bytes())


def aggregated_files(root: Path, node: str | None = None, log: str | None = None) -> Iterator[tuple[str, str, str, Path]]:
    """Every aggregated file under ``root`` as (day, log, node, path), oldest day first."""
    root = Path(root)
    if not root.is_dir():
        return
    for y in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        for m in sorted(p for p in y.iterdir() if p.is_dir() and p.name.isdigit()):
            for d in sorted(p for p in m.iterdir() if p.is_dir() and p.name.isdigit()):
                day = f"{y.name}/{m.name}/{d.name}"
                for lg in sorted(p for p in d.iterdir() if p.is_dir()):
                    if log is not None and lg.name != log:
                        continue
                    for f in sorted(p for p in lg.iterdir() if p.is_file()):
                        if node is not None and f.name != node:
                            continue
                        yield day, lg.name, f.name, f
