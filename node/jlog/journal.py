"""The durable journal: append-only segment files plus LMDB checkpoints, one writer per log.

Layout (one directory per log, everything about the log inside it)::

    <root>/<name>/00000000000000000001.seg   segments, named by their first seq
    <root>/<name>/state.lmdb/                LMDB env: checkpoints, alarms, counters
    <root>/<name>/LOCK                       flock'ed by the one writer; holds its pid

One LMDB env per log directory (not per root) so a log is self-contained: it can be
copied, moved or deleted as a unit, and the writer's lock on the directory covers it.

Sequence numbers (record ids) start at 1 and increase by one per record; they are never
reused, even after a crash that lost records (see Recovery). A segment rolls when the next
record would take it past ``segment_size`` (default 16 MiB; a record larger than that gets
a segment of its own).

Subscribers
    Declared when the log is opened (``subscribers=[...]``) or with ``add_subscriber``; a
    subscriber is kept until ``remove_subscriber`` (leaving it out of a later ``open`` does
    not remove it). A new subscriber starts at the oldest retained record, so one declared
    before anything is written sees every record. ``read`` returns records after the
    subscriber's checkpoint and does not move it: delivery is at-least-once until the
    subscriber calls ``checkpoint(name, seq)``. A checkpoint never moves backwards and
    never beyond the last written seq (``CheckpointError``). A segment is deleted only when
    every subscriber's checkpoint has passed its last record; a log with no subscribers
    keeps everything (until the disk budget applies).

Durability (``fsync=``)
    Every append is written to the kernel with one ``write`` before it returns, so a
    process killed with SIGKILL never loses an acknowledged record. The policy decides
    when the data is also forced to the disk (``fdatasync``), which is what protects
    against a power loss or kernel crash:

    ``"always"``       every ``append`` and ``append_batch`` call syncs before returning.
    ``"batch"``        (default) every ``append_batch`` call syncs once before returning;
                       a single ``append`` is synced by the next ``append_batch``,
                       ``sync()``, segment roll or ``close()``. Use ``append_batch([x])``
                       or "always" when one record must be on disk at once.
    ``"interval:<ms>"`` a background thread syncs at most every <ms> milliseconds.
                       RISK: a power loss or kernel crash can lose up to <ms> worth of
                       acknowledged records (a process kill still loses nothing).

    A segment is always synced before the next one is created, so only the newest
    segment can ever end in a torn record.

Disk budget (``disk_budget=`` bytes of segment files, ``budget_policy=``)
    ``"block"``        an append that does not fit raises ``JournalFull`` and writes
                       nothing; the refusal is counted (``stats()["full_rejections"]``) and
                       raises the ``journal_full`` alarm, which clears itself at the next
                       successful append. Callers back off and retry.
    ``"drop_oldest"``  the oldest segments are deleted even if subscribers have not read
                       them; every subscriber whose checkpoint was inside them is moved to
                       the end of what was dropped, and the number of records it lost is
                       added to its ``records_dropped`` alarm in LMDB (written before the
                       file is unlinked). ``read`` reports it (``ReadBatch.dropped``) until
                       ``clear_alarm``.
    Segments every subscriber has passed are always deleted first. A batch larger than
    the whole budget raises ``JournalFull`` under either policy. The budget must be at
    least twice the segment size. A full disk (ENOSPC) also raises ``JournalFull``; the
    partial write is cut off again.

Recovery (on open, after a crash)
    The newest segment is scanned; everything after the last valid record (partial
    record, bad CRC, wrong seq, garbage) is truncated and the number of bytes cut is
    reported (``stats()["torn_bytes"]``, ``repair()``, ``inspect()``). Only unacknowledged
    data can be cut under "always"/"batch" unless the disk itself lost data.

    A subscriber checkpoint beyond the recovered last record (acknowledged records lost,
    e.g. under "interval" after a power loss) is never moved silently: the subscriber gets
    a ``checkpoint_ahead`` alarm and its reads raise ``SubscriberStalled`` until
    ``repair(force=True)``. Its checkpoint is kept as it was, and the next seq is set past
    every checkpoint (and past the last seq ever recorded as written), so ids are never
    reused: a sink that drops duplicate ids will not drop new records. Subscribers that
    had not read the missing seqs get a ``records_lost`` alarm with the count; so do
    subscribers whose checkpoint points before the oldest segment still on disk (their
    checkpoint is moved to the oldest retained record, loudly).

Concurrency
    One writer per log: ``open`` takes an exclusive ``flock`` on ``LOCK``; a second open
    (from any process, or the same one) raises ``JournalLocked``. A Journal is thread-safe;
    readers share the writer's object (one lock serialises appends, reads, checkpoints).
    ``inspect(root, name)`` reads a log without the lock (from the CLI, beside a writer).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import json
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import lmdb

from node.fsutil import atomic_write, fsync_dir

from .format import (
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    CheckpointError,
    JournalClosed,
    JournalConfigError,
    JournalCorrupt,
    JournalError,
    JournalFull,
    JournalLocked,
    SubscriberStalled,
    UnknownSubscriber,
    decode_records,
    encode_records,
    encode_segment_header,
    parse_segment_name,
    scan_segment,
    segment_name,
    skip_records,
)

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
MIN_SEGMENT_SIZE = 256
LMDB_DIR = "state.lmdb"
LOCK_FILE = "LOCK"
_LMDB_MAP_SIZE = 16 * 1024 * 1024
_READ_CHUNK_MIN = 64 * 1024
_READ_CHUNK_MAX = 8 * 1024 * 1024
_POS_CACHE_MAX = 4096
_CKPT = struct.Struct(">Q")

ALARM_DROPPED = "records_dropped"
ALARM_LOST = "records_lost"
ALARM_AHEAD = "checkpoint_ahead"
ALARM_FULL = "journal_full"

_LOG_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# Open journals by log directory: LMDB must not be opened twice in one process, so
# inspect() asks an open Journal instead of opening the env again.
_OPEN_JOURNALS: dict[str, "Journal"] = {}
_OPEN_JOURNALS_LOCK = threading.Lock()


# ---------------------------------------------------------------------------
# Pure decisions (no I/O)


@dataclass(frozen=True)
class FsyncPolicy:
    """Parsed ``fsync=`` policy: kind is "always", "batch" or "interval"."""

    kind: str
    interval_ms: int = 0

    def __str__(self) -> str:
        return f"interval:{self.interval_ms}" if self.kind == "interval" else self.kind


def parse_fsync_policy(text: str) -> FsyncPolicy:
    """Parse "always" | "batch" | "interval:<ms>" (1..600000 ms)."""
    if not isinstance(text, str):
        raise JournalConfigError(f"fsync policy must be a string, got {type(text).__name__}")
    if text in ("always", "batch"):
        return FsyncPolicy(text)
    if text.startswith("interval:"):
        raw = text[len("interval:") :]
        if raw.isdigit() and 1 <= int(raw) <= 600_000:
            return FsyncPolicy("interval", int(raw))
    raise JournalConfigError(f"bad fsync policy {text!r}: use 'always', 'batch' or 'interval:<ms>'")


def validate_log_name(name: str) -> str:
    """A log name is a safe directory name: letters, digits, '_', '.', '-'."""
    if not isinstance(name, str) or not _LOG_NAME_RE.match(name):
        raise JournalConfigError(f"bad log name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def validate_subscriber_name(name: str) -> str:
    """A subscriber name is 1..200 bytes (UTF-8) of printable characters."""
    if (
        not isinstance(name, str)
        or not 0 < len(name.encode("utf-8", "replace")) <= 200
        or not name.isprintable()
        or not name.strip()
    ):
        raise JournalConfigError(f"bad subscriber name {name!r}: use 1..200 bytes of printable characters")
    return name


def deletable_segment_count(segment_last_seqs: Sequence[int], checkpoints: Iterable[int]) -> int:
    """How many leading segments every subscriber has passed.

    ``segment_last_seqs`` lists the last seq of each segment, oldest first, the current
    (still written) segment last; it is never deletable. With no subscribers nothing is.
    """
    checkpoints = list(checkpoints)
    if not checkpoints:
        return 0
    floor = min(checkpoints)
    count = 0
    for last in segment_last_seqs[:-1]:
        if last > floor:
            break
        count += 1
    return count


def records_lost_by_drop(checkpoint: int, first_seq: int, last_seq: int) -> int:
    """Records in [first_seq, last_seq] that a subscriber at ``checkpoint`` had not read."""
    return max(0, last_seq - max(checkpoint, first_seq - 1))


def estimate_append_bytes(payload_lengths_total: int, count: int, segment_size: int) -> int:
    """Upper bound on the disk bytes an append of ``count`` records adds (incl. new segment headers)."""
    data = payload_lengths_total + RECORD_HEADER_SIZE * count
    return data + SEGMENT_HEADER_SIZE * (data // segment_size + 1)


# ---------------------------------------------------------------------------


class ReadBatch(list):
    """A list of ``(seq, payload)`` returned by ``Journal.read``.

    ``dropped`` is the number of records this subscriber will never see, per its active
    ``records_dropped``/``records_lost`` alarms (0 when nothing was lost).
    """

    dropped: int = 0


@dataclass
class _Segment:
    first: int
    size: int  # bytes in the file, header included (for the current segment: written so far)
    end_seq: int  # one past the last seq in the file (exact once scanned/written, else assumed)
    exact: bool  # end_seq and size known from a scan or from writing
    index_seqs: list[int] | None = None  # sparse position index, None until built
    index_offs: list[int] | None = None


def _now() -> float:
    return round(time.time(), 3)


def _alarm_key(kind: str, subscriber: str | None) -> bytes:
    return f"{kind}\x00{subscriber or ''}".encode()


class Journal:
    """A durable append-only journal with named subscribers; see the module docstring."""

    def __init__(self, *_args, **_kwargs) -> None:
        raise TypeError("use Journal.open(root, name, subscribers=[...])")

    # ------------------------------------------------------------------ open/close

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        name: str,
        subscribers: Iterable[str] = (),
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        fsync: str = "batch",
        disk_budget: int | None = None,
        budget_policy: str = "block",
    ) -> "Journal":
        """Open (creating if needed) log ``name`` under ``root`` for writing, recovering it.

        Raises JournalLocked if another Journal holds the log, JournalConfigError on bad
        arguments.
        """
        validate_log_name(name)
        policy = parse_fsync_policy(fsync)
        if not isinstance(segment_size, int) or isinstance(segment_size, bool) or segment_size < MIN_SEGMENT_SIZE:
            raise JournalConfigError(f"segment_size must be an int >= {MIN_SEGMENT_SIZE}, got {segment_size!r}")
        if budget_policy not in ("block", "drop_oldest"):
            raise JournalConfigError(f"bad budget_policy {budget_policy!r}: use 'block' or 'drop_oldest'")
        if disk_budget is not None:
            if not isinstance(disk_budget, int) or isinstance(disk_budget, bool) or disk_budget < 2 * segment_size:
                raise JournalConfigError(
                    f"disk_budget must be an int >= 2 * segment_size ({2 * segment_size}), got {disk_budget!r}"
                )
        if subscribers is None:
            subscribers = ()
        if isinstance(subscribers, str):
            raise JournalConfigError("subscribers must be a list of names, not a string")
        subs = [validate_subscriber_name(s) for s in subscribers]

        self = object.__new__(cls)
        self._name = name
        self._root = os.fspath(root)
        self._path = os.path.realpath(os.path.join(self._root, name))
        self._segment_size = segment_size
        self._policy = policy
        self._budget = disk_budget
        self._budget_policy = budget_policy
        self._lock = threading.RLock()
        self._closed = True
        self._lock_fd = -1
        self._env = None
        self._wfd = -1
        self._rfds: dict[int, int] = {}
        self._segs: list[_Segment] = []
        self._firsts: list[int] = []
        self._pos_cache: dict[int, tuple[int, int]] = {}
        self._ckpts: dict[str, int] = {}
        self._alarms: dict[bytes, dict] = {}
        self._meta: dict[str, int] = {}
        self._stalled: set[str] = set()
        self._dirty = False
        self._broken = ""
        self._appended_records = 0
        self._appended_bytes = 0
        self._fsyncs = 0
        self._torn_bytes = 0
        self._torn_reason = ""
        self._recovery_notes: list[str] = []
        self._stop_interval = threading.Event()
        self._interval_thread: threading.Thread | None = None

        try:
            os.makedirs(self._path, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create log directory {self._path}: {exc.strerror}") from exc
        self._take_lock()
        try:
            self._open_env()
            self._recover()
            for sub in subs:
                if sub not in self._ckpts:
                    self._add_subscriber_locked(sub)
            self._delete_passed_segments()
        except BaseException:
            self._release_everything()
            raise
        self._closed = False
        with _OPEN_JOURNALS_LOCK:
            _OPEN_JOURNALS[self._path] = self
        if policy.kind == "interval":
            self._interval_thread = threading.Thread(
                target=self._interval_loop, name=f"jlog-fsync-{name}", daemon=True
            )
            self._interval_thread.start()
        return self

    def _take_lock(self) -> None:
        lock_path = os.path.join(self._path, LOCK_FILE)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (pid {holder})" if holder else ""
                raise JournalLocked(f"log {self._name!r} at {self._path} is already open for writing{who}") from None
            raise JournalError(f"cannot lock {lock_path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _open_env(self) -> None:
        try:
            self._env = lmdb.open(
                os.path.join(self._path, LMDB_DIR),
                subdir=True,
                map_size=_LMDB_MAP_SIZE,
                max_dbs=4,
                sync=True,
                metasync=True,
                readahead=False,
            )
        except lmdb.Error as exc:
            raise JournalError(f"cannot open checkpoint store of log {self._name!r}: {exc}") from exc
        self._db_ckpt = self._env.open_db(b"checkpoints")
        self._db_alarm = self._env.open_db(b"alarms")
        self._db_meta = self._env.open_db(b"meta")
        with self._env.begin() as txn:
            for key, value in txn.cursor(db=self._db_ckpt):
                self._ckpts[bytes(key).decode()] = _CKPT.unpack(value)[0]
            for key, value in txn.cursor(db=self._db_alarm):
                self._alarms[bytes(key)] = json.loads(bytes(value))
            for key, value in txn.cursor(db=self._db_meta):
                self._meta[bytes(key).decode()] = json.loads(bytes(value))
        self._stalled = {a["subscriber"] for a in self._alarms.values() if a["kind"] == ALARM_AHEAD}

    def close(self) -> None:
        """Sync, record the high-water seq, release the lock. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop_interval.set()
            try:
                if self._wfd >= 0 and self._dirty:
                    self._fdatasync()
                self._put_meta({"high_water": self._next_seq - 1})
            finally:
                self._release_everything()
        if self._interval_thread is not None and self._interval_thread is not threading.current_thread():
            self._interval_thread.join(timeout=5)

    def _release_everything(self) -> None:
        with _OPEN_JOURNALS_LOCK:
            if _OPEN_JOURNALS.get(self._path) is self:
                del _OPEN_JOURNALS[self._path]
        if self._wfd >= 0:
            os.close(self._wfd)
            self._wfd = -1
        for fd in self._rfds.values():
            os.close(fd)
        self._rfds.clear()
        if self._env is not None:
            self._env.close()
            self._env = None
        if self._lock_fd >= 0:
            os.ftruncate(self._lock_fd, 0)  # no pid: nobody writes this log now
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = -1

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # ------------------------------------------------------------------ recovery

    def _seg_path(self, first: int) -> str:
        return os.path.join(self._path, segment_name(first))

    def _list_segment_firsts(self) -> list[int]:
        firsts = []
        for entry in os.listdir(self._path):
            if entry.endswith(".seg.tmp"):
                os.unlink(os.path.join(self._path, entry))  # an unfinished segment creation
                continue
            first = parse_segment_name(entry)
            if first is not None:
                firsts.append(first)
        return sorted(firsts)

    def _recover(self) -> None:
        firsts = self._list_segment_firsts()
        cut = 0
        recovered_last = 0
        if firsts:
            last_first = firsts[-1]
            path = self._seg_path(last_first)
            with open(path, "rb") as fh:
                data = fh.read()
            try:
                scan = scan_segment(data, last_first)
                valid_end, end_seq, reason = scan.valid_end, scan.next_seq, scan.reason
                index = scan.index
            except JournalCorrupt as exc:
                # Segments are created by rename after their header is synced, so a bad
                # header means outside damage: keep the name, rewrite an empty segment.
                valid_end, end_seq, reason, index = 0, last_first, str(exc), []
            cut = len(data) - valid_end
            if cut:
                if valid_end < SEGMENT_HEADER_SIZE:
                    self._write_new_segment_file(last_first)
                    valid_end = SEGMENT_HEADER_SIZE
                else:
                    with open(path, "r+b") as fh:
                        fh.truncate(valid_end)
                        fh.flush()
                        os.fdatasync(fh.fileno())
                self._torn_reason = reason
            for i, first in enumerate(firsts[:-1]):
                size = os.path.getsize(self._seg_path(first))
                self._segs.append(_Segment(first, size, firsts[i + 1], exact=False))
            seg = _Segment(last_first, valid_end, end_seq, exact=True)
            seg.index_seqs = [s for s, _ in index]
            seg.index_offs = [o for _, o in index]
            self._segs.append(seg)
            recovered_last = end_seq - 1
        self._torn_bytes = cut

        high_water = int(self._meta.get("high_water", 0))
        floor = max([high_water, *self._ckpts.values()])
        next_seq = max(recovered_last, floor) + 1
        meta_updates: dict[str, int] = {}
        alarm_updates: list[tuple[str, str | None, int, str]] = []
        ckpt_updates: dict[str, int] = {}
        if cut:
            meta_updates["torn_bytes_last"] = cut
            meta_updates["torn_bytes_total"] = int(self._meta.get("torn_bytes_total", 0)) + cut
            self._recovery_notes.append(f"cut {cut} torn bytes from {segment_name(firsts[-1])} ({self._torn_reason})")
        elif self._meta.get("torn_bytes_last"):
            meta_updates["torn_bytes_last"] = 0

        if next_seq > recovered_last + 1:
            for sub, ckpt in self._ckpts.items():
                if ckpt > recovered_last:
                    alarm_updates.append(
                        (
                            ALARM_AHEAD,
                            sub,
                            ckpt - recovered_last,
                            f"checkpoint {ckpt} is beyond the recovered last record {recovered_last}; "
                            "reads refused until repair(force=True)",
                        )
                    )
            self._recovery_notes.append(
                f"seqs {recovered_last + 1}..{next_seq - 1} missing after recovery; next seq is {next_seq}"
            )

        if not self._segs or next_seq != self._segs[-1].end_seq:
            if self._segs and self._segs[-1].end_seq == self._segs[-1].first:
                # The newest segment is empty: replace it by one starting at next_seq.
                empty = self._segs.pop()
                os.unlink(self._seg_path(empty.first))
            self._write_new_segment_file(next_seq)
            self._segs.append(_Segment(next_seq, SEGMENT_HEADER_SIZE, next_seq, exact=True, index_seqs=[], index_offs=[]))
        self._firsts = [s.first for s in self._segs]
        self._next_seq = next_seq

        # Every seq after a checkpoint that is on no segment any more was lost: count it
        # once per subscriber, and move checkpoints that point before the oldest segment.
        oldest = self.first_seq
        for sub, ckpt in self._ckpts.items():
            present = sum(max(0, seg.end_seq - max(seg.first, ckpt + 1)) for seg in self._segs)
            lost = max(0, next_seq - 1 - ckpt) - present
            if lost > 0:
                alarm_updates.append((ALARM_LOST, sub, lost, f"{lost} records after seq {ckpt} missing at recovery"))
                self._recovery_notes.append(f"subscriber {sub!r} lost {lost} records")
            if ckpt < oldest - 1:
                ckpt_updates[sub] = oldest - 1
                self._recovery_notes.append(f"subscriber {sub!r} moved from {ckpt} to {oldest - 1} (records missing)")
        if meta_updates or alarm_updates or ckpt_updates:
            with self._wtxn() as txn:
                self._txn_put_meta(txn, meta_updates)
                for kind, sub, count, message in alarm_updates:
                    self._txn_raise_alarm(txn, kind, sub, count, message)
                for sub, ckpt in ckpt_updates.items():
                    txn.put(sub.encode(), _CKPT.pack(ckpt), db=self._db_ckpt)
            self._ckpts.update(ckpt_updates)
        self._stalled = {a["subscriber"] for a in self._alarms.values() if a["kind"] == ALARM_AHEAD}
        self._wfd = os.open(self._seg_path(self._segs[-1].first), os.O_WRONLY | os.O_APPEND)

    def _write_new_segment_file(self, first: int) -> None:
        """Create a segment atomically and durably: header synced under a temp name (a
        ``.seg.tmp`` left by a crash is removed at open), renamed, directory synced."""
        final = self._seg_path(first)
        atomic_write(final, encode_segment_header(first), mode=0o644, tmp=final + ".tmp")

    # ------------------------------------------------------------------ LMDB helpers

    @contextlib.contextmanager
    def _wtxn(self):
        """A write transaction whose failure (full map, I/O error) is a JournalError."""
        try:
            with self._env.begin(write=True) as txn:
                yield txn
        except lmdb.Error as exc:
            raise JournalError(f"log {self._name!r}: checkpoint store write failed: {exc}") from exc

    def _txn_put_meta(self, txn, updates: dict[str, int]) -> None:
        for key, value in updates.items():
            txn.put(key.encode(), json.dumps(value).encode(), db=self._db_meta)
        self._meta.update(updates)

    def _put_meta(self, updates: dict[str, int]) -> None:
        with self._wtxn() as txn:
            self._txn_put_meta(txn, updates)

    def _txn_raise_alarm(self, txn, kind: str, subscriber: str | None, count: int, message: str) -> None:
        key = _alarm_key(kind, subscriber)
        now = _now()
        alarm = self._alarms.get(key)
        if alarm is None:
            alarm = {"kind": kind, "subscriber": subscriber, "count": 0, "since": now}
        alarm = dict(alarm, count=alarm["count"] + count, updated=now, message=message)
        txn.put(key, json.dumps(alarm).encode(), db=self._db_alarm)
        self._alarms[key] = alarm

    def _txn_clear_alarm(self, txn, key: bytes) -> None:
        txn.delete(key, db=self._db_alarm)
        alarm = self._alarms.pop(key, None)
        if alarm is not None and alarm["kind"] == ALARM_AHEAD:
            self._stalled.discard(alarm["subscriber"])

    # ------------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        """The log name."""
        return self._name

    @property
    def path(self) -> str:
        """The log directory."""
        return self._path

    @property
    def last_seq(self) -> int:
        """Seq of the last record written (0 when none ever was)."""
        return self._next_seq - 1

    @property
    def first_seq(self) -> int:
        """Seq of the oldest retained record (last_seq + 1 when none is retained)."""
        for seg in self._segs:
            if seg.end_seq > seg.first:
                return seg.first
        return self._next_seq

    # ------------------------------------------------------------------ writing

    def _check_writable(self) -> None:
        if self._closed:
            raise JournalClosed(f"log {self._name!r} is closed")
        if self._broken:
            raise JournalError(f"log {self._name!r} is unusable: {self._broken}")

    def append(self, payload: bytes) -> int:
        """Append one record; returns its seq. See the module docstring for durability."""
        with self._lock:
            self._check_writable()
            try:
                n = len(payload)
            except TypeError:
                raise JournalError(f"payload must be bytes, got {type(payload).__name__}") from None
            if self._budget is not None:
                self._make_room(estimate_append_bytes(n, 1, self._segment_size))
            cur = self._segs[-1]
            if cur.end_seq > cur.first and cur.size + RECORD_HEADER_SIZE + n > self._segment_size:
                self._roll()
                cur = self._segs[-1]
            blob, _count, index = encode_records(self._next_seq, (payload,), 0, None, cur.size)
            self._write(blob)
            self._after_write(cur, blob, 1, index)
            if self._policy.kind == "always":
                self._fdatasync()
            else:
                self._dirty = True
            self._appended_bytes += n
            return self._next_seq - 1

    def append_batch(self, payloads: Sequence[bytes]) -> int:
        """Append records in order with one write per segment touched and one sync; returns the last seq.

        An empty batch returns last_seq. If the process dies (or the call fails) after part
        of a batch that spans segments was written, that prefix stays (never a partial
        record); the caller was not acknowledged.
        """
        if isinstance(payloads, (bytes, bytearray, memoryview, str)):
            raise JournalError("append_batch takes a list of payloads, not a single payload")
        with self._lock:
            self._check_writable()
            payloads = payloads if isinstance(payloads, (list, tuple)) else list(payloads)
            count = len(payloads)
            if count == 0:
                return self._next_seq - 1
            try:
                total = sum(map(len, payloads))
            except TypeError:
                bad = next(p for p in payloads if not hasattr(p, "__len__"))
                raise JournalError(f"payload must be bytes, got {type(bad).__name__}") from None
            if self._budget is not None:
                self._make_room(estimate_append_bytes(total, count, self._segment_size))
            plan = self._plan_batch(payloads)
            for roll_first, blob, n, index in plan:
                if roll_first:
                    self._roll()
                cur = self._segs[-1]
                self._write(blob)
                self._after_write(cur, blob, n, index)
            if self._policy.kind != "interval":
                self._fdatasync()
            else:
                self._dirty = True
            self._appended_bytes += total
            return self._next_seq - 1

    def _plan_batch(self, payloads: Sequence[bytes]) -> list[tuple[bool, bytes, int, list[tuple[int, int]]]]:
        """Encode the whole batch into per-segment blobs before writing anything (pure)."""
        plan = []
        cur = self._segs[-1]
        size = cur.size
        has_records = cur.end_seq > cur.first
        seq = self._next_seq
        i = 0
        limit = len(payloads)
        seg_size = self._segment_size
        while i < limit:
            roll = False
            if has_records and size + RECORD_HEADER_SIZE + len(payloads[i]) > seg_size:
                roll = True
                size = SEGMENT_HEADER_SIZE
            blob, n, index = encode_records(seq, payloads, i, seg_size - size, size)
            plan.append((roll, blob, n, index))
            size += len(blob)
            has_records = True
            seq += n
            i += n
        return plan

    def _after_write(self, cur: _Segment, blob: bytes, count: int, index: list[tuple[int, int]]) -> None:
        cur.size += len(blob)
        cur.end_seq += count
        if index:
            cur.index_seqs.extend(s for s, _ in index)
            cur.index_offs.extend(o for _, o in index)
        self._next_seq += count
        self._appended_records += count
        if self._alarms and _alarm_key(ALARM_FULL, None) in self._alarms:
            with self._wtxn() as txn:
                self._txn_clear_alarm(txn, _alarm_key(ALARM_FULL, None))

    def _write(self, blob: bytes) -> None:
        """One write (looping on short writes); on failure cut the partial record off again."""
        cur = self._segs[-1]
        view = memoryview(blob)
        done = 0
        try:
            while done < len(view):
                done += os.write(self._wfd, view[done:])
        except OSError as exc:
            try:
                os.ftruncate(self._wfd, cur.size)
            except OSError as exc2:
                self._broken = f"write failed ({exc.strerror}) and the partial record could not be cut ({exc2.strerror})"
                raise JournalError(f"log {self._name!r}: {self._broken}") from exc
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._count_full(f"disk full: {exc.strerror}")
                raise JournalFull(f"log {self._name!r}: disk full ({exc.strerror}); nothing written") from exc
            raise JournalError(f"log {self._name!r}: write failed: {exc.strerror}") from exc

    def _fdatasync(self) -> None:
        try:
            os.fdatasync(self._wfd)
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the dirty pages: stop writing.
            self._broken = f"fdatasync failed: {exc.strerror}"
            raise JournalError(f"log {self._name!r}: {self._broken}") from exc
        self._fsyncs += 1
        self._dirty = False

    def sync(self) -> None:
        """Force every record written so far to disk now."""
        with self._lock:
            self._check_writable()
            self._fdatasync()

    def _roll(self) -> None:
        """Close the current segment (synced) and start a new one at the next seq."""
        new_first = self._next_seq
        # Sync the old segment before the new one exists: then only the newest segment
        # can ever hold a torn record, and recovery only needs to scan that one.
        self._fdatasync()
        try:
            self._write_new_segment_file(new_first)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._count_full(f"disk full: {exc.strerror}")
                raise JournalFull(f"log {self._name!r}: disk full creating a segment ({exc.strerror})") from exc
            raise JournalError(f"log {self._name!r}: cannot create segment: {exc.strerror}") from exc
        os.close(self._wfd)
        self._wfd = os.open(self._seg_path(new_first), os.O_WRONLY | os.O_APPEND)
        self._segs[-1].exact = True
        self._segs.append(_Segment(new_first, SEGMENT_HEADER_SIZE, new_first, exact=True, index_seqs=[], index_offs=[]))
        self._firsts.append(new_first)
        self._put_meta({"high_water": new_first - 1})

    def _interval_loop(self) -> None:
        seconds = self._policy.interval_ms / 1000.0
        while not self._stop_interval.wait(seconds):
            with self._lock:
                if self._closed:
                    return
                if self._dirty and not self._broken:
                    try:
                        self._fdatasync()
                    except JournalError:
                        return

    # ------------------------------------------------------------------ disk budget

    @property
    def _disk_bytes(self) -> int:
        return sum(seg.size for seg in self._segs)

    def _count_full(self, message: str) -> None:
        with self._wtxn() as txn:
            self._txn_put_meta(txn, {"full_rejections": int(self._meta.get("full_rejections", 0)) + 1})
            self._txn_raise_alarm(txn, ALARM_FULL, None, 1, message)

    def _make_room(self, need: int) -> None:
        budget = self._budget
        if self._disk_bytes + need <= budget:
            return
        self._delete_passed_segments()
        if self._disk_bytes + need <= budget:
            return
        cur = self._segs[-1]
        if cur.end_seq > cur.first and self._ckpts and min(self._ckpts.values()) >= self._next_seq - 1:
            # Everyone has read the current segment: close it so it can go.
            self._roll()
            self._delete_passed_segments()
            if self._disk_bytes + need <= budget:
                return
        if need + SEGMENT_HEADER_SIZE > budget:
            self._count_full(f"a batch of {need} bytes exceeds the disk budget of {budget}")
            raise JournalFull(f"log {self._name!r}: a batch of {need} bytes exceeds the disk budget of {budget} bytes")
        if self._budget_policy == "block":
            used = self._disk_bytes
            self._count_full(f"disk budget of {budget} bytes reached ({used} used, {need} needed)")
            raise JournalFull(
                f"log {self._name!r}: disk budget of {budget} bytes reached ({used} used, {need} needed); "
                "subscribers must catch up"
            )
        while self._disk_bytes + need > budget:
            if len(self._segs) == 1:
                self._roll()
            self._drop_oldest_segment()

    def _drop_oldest_segment(self) -> None:
        """Delete the oldest segment whatever the subscribers have read; count and alarm the loss."""
        seg = self._segs[0]
        last = seg.end_seq - 1
        moved: dict[str, int] = {}
        total_lost = 0
        for sub, ckpt in self._ckpts.items():
            lost = records_lost_by_drop(ckpt, seg.first, last)
            if lost:
                moved[sub] = lost
                total_lost += lost
        with self._wtxn() as txn:
            for sub, lost in moved.items():
                txn.put(sub.encode(), _CKPT.pack(last), db=self._db_ckpt)
                self._txn_raise_alarm(
                    txn, ALARM_DROPPED, sub, lost, f"disk budget: seqs up to {last} deleted before being read"
                )
            self._txn_put_meta(
                txn,
                {
                    "records_dropped": int(self._meta.get("records_dropped", 0)) + total_lost,
                    "segments_dropped": int(self._meta.get("segments_dropped", 0)) + 1,
                },
            )
        for sub in moved:
            self._ckpts[sub] = last
        self._unlink_segments(1)

    def _delete_passed_segments(self) -> None:
        count = deletable_segment_count([s.end_seq - 1 for s in self._segs], self._ckpts.values())
        if count:
            self._unlink_segments(count)

    def _unlink_segments(self, count: int) -> None:
        gone = self._segs[:count]
        del self._segs[:count]
        del self._firsts[:count]
        for seg in gone:
            fd = self._rfds.pop(seg.first, None)
            if fd is not None:
                os.close(fd)
            os.unlink(self._seg_path(seg.first))
        gone_firsts = {seg.first for seg in gone}
        self._pos_cache = {k: v for k, v in self._pos_cache.items() if v[0] not in gone_firsts}
        fsync_dir(self._path)

    # ------------------------------------------------------------------ subscribers

    def _require(self, subscriber: str) -> int:
        try:
            return self._ckpts[subscriber]
        except (KeyError, TypeError):
            raise UnknownSubscriber(f"log {self._name!r} has no subscriber {subscriber!r}") from None

    def subscribers(self) -> list[str]:
        """Names of the declared subscribers, sorted."""
        with self._lock:
            return sorted(self._ckpts)

    def get_checkpoint(self, subscriber: str) -> int:
        """The subscriber's checkpoint: the last seq it acknowledged (0 before any)."""
        with self._lock:
            return self._require(subscriber)

    def add_subscriber(self, subscriber: str) -> int:
        """Declare a subscriber; it starts at the oldest retained record. Returns its checkpoint.

        Adding one that exists changes nothing.
        """
        validate_subscriber_name(subscriber)
        with self._lock:
            self._check_open()
            if subscriber in self._ckpts:
                return self._ckpts[subscriber]
            return self._add_subscriber_locked(subscriber)

    def _add_subscriber_locked(self, subscriber: str) -> int:
        ckpt = self.first_seq - 1
        with self._wtxn() as txn:
            txn.put(subscriber.encode(), _CKPT.pack(ckpt), db=self._db_ckpt)
        self._ckpts[subscriber] = ckpt
        return ckpt

    def remove_subscriber(self, subscriber: str) -> None:
        """Forget a subscriber and its alarms; segments only it still needed are deleted."""
        with self._lock:
            self._check_open()
            self._require(subscriber)
            with self._wtxn() as txn:
                txn.delete(subscriber.encode(), db=self._db_ckpt)
                for key in [k for k, a in self._alarms.items() if a["subscriber"] == subscriber]:
                    self._txn_clear_alarm(txn, key)
            del self._ckpts[subscriber]
            self._stalled.discard(subscriber)
            self._delete_passed_segments()

    def checkpoint(self, subscriber: str, seq: int) -> None:
        """Acknowledge every record up to ``seq`` for ``subscriber`` (durable in LMDB on return)."""
        with self._lock:
            self._check_open()
            current = self._require(subscriber)
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise CheckpointError(f"checkpoint must be an int seq, got {type(seq).__name__}")
            if seq < current:
                raise CheckpointError(
                    f"checkpoint of {subscriber!r} cannot move backwards (from {current} to {seq})"
                )
            if seq > self._next_seq - 1:
                raise CheckpointError(
                    f"checkpoint {seq} of {subscriber!r} is beyond the last written seq {self._next_seq - 1}"
                )
            if seq == current:
                return
            with self._wtxn() as txn:
                txn.put(subscriber.encode(), _CKPT.pack(seq), db=self._db_ckpt)
            self._ckpts[subscriber] = seq
            self._delete_passed_segments()

    def _check_open(self) -> None:
        if self._closed:
            raise JournalClosed(f"log {self._name!r} is closed")

    # ------------------------------------------------------------------ reading

    def _read_fd(self, first: int) -> int:
        fd = self._rfds.get(first)
        if fd is None:
            fd = os.open(self._seg_path(first), os.O_RDONLY)
            self._rfds[first] = fd
        return fd

    def _corrupt(self, seg: _Segment, offset: int, reason: str) -> JournalCorrupt:
        return JournalCorrupt(
            f"log {self._name!r}: segment {segment_name(seg.first)} is corrupt at offset {offset}: {reason}; "
            "run repair(force=True)"
        )

    def _build_index(self, seg_i: int) -> None:
        """Scan a closed segment once (headers only) for its position index and exact end."""
        seg = self._segs[seg_i]
        fd = self._read_fd(seg.first)
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        scan = scan_segment(data, seg.first, verify_crc=False)
        if scan.torn_bytes and seg_i < len(self._segs) - 1:
            # Closed segments are synced before the next one is created: this is damage.
            raise self._corrupt(seg, scan.valid_end, scan.reason)
        seg.index_seqs = [s for s, _ in scan.index]
        seg.index_offs = [o for _, o in scan.index]
        if seg_i < len(self._segs) - 1:
            seg.end_seq = scan.next_seq
            seg.size = scan.valid_end
            seg.exact = True

    def _locate(self, seq: int) -> tuple[int, int, int]:
        """Position of the first record with seq >= ``seq``: (segment index, offset, its seq)."""
        hit = self._pos_cache.get(seq)
        if hit is not None:
            seg_i = bisect.bisect_left(self._firsts, hit[0])
            if seg_i < len(self._firsts) and self._firsts[seg_i] == hit[0]:
                return seg_i, hit[1], seq
        seg_i = bisect.bisect_right(self._firsts, seq) - 1
        if seg_i < 0:
            return 0, SEGMENT_HEADER_SIZE, self._segs[0].first
        seg = self._segs[seg_i]
        if seg.index_seqs is None:
            self._build_index(seg_i)
        if seq >= seg.end_seq:
            # seq falls in a gap left by a crash (or is the tail): the next record is next.
            if seg_i + 1 < len(self._segs):
                return seg_i + 1, SEGMENT_HEADER_SIZE, self._segs[seg_i + 1].first
            return seg_i, seg.size, seg.end_seq
        k = bisect.bisect_right(seg.index_seqs, seq) - 1
        pos, cur = (seg.index_offs[k], seg.index_seqs[k]) if k >= 0 else (SEGMENT_HEADER_SIZE, seg.first)
        fd = self._read_fd(seg.first)
        while cur < seq:
            buf = os.pread(fd, max(0, min(_READ_CHUNK_MIN, seg.size - pos)), pos)
            if not buf:
                raise self._corrupt(seg, pos, f"seq {seq} not found")
            rel, cur, stop = skip_records(buf, 0, cur, seq)
            if stop == "corrupt":
                raise self._corrupt(seg, pos + rel, f"bad record header while looking for seq {seq}")
            pos += rel
        return seg_i, pos, cur

    def read(self, subscriber: str, max_records: int = 1000, max_bytes: int = 1 << 20) -> ReadBatch:
        """Records after the subscriber's checkpoint, oldest first, as ``[(seq, payload)]``.

        At most ``max_records`` records and ``max_bytes`` payload bytes, except that one
        record is returned even if it alone is larger. Does not move the checkpoint.
        Raises SubscriberStalled while a ``checkpoint_ahead`` alarm is active for it.
        """
        if not isinstance(max_records, int) or max_records < 1:
            raise JournalConfigError(f"max_records must be a positive int, got {max_records!r}")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise JournalConfigError(f"max_bytes must be a positive int, got {max_bytes!r}")
        with self._lock:
            self._check_open()
            ckpt = self._require(subscriber)
            if subscriber in self._stalled:
                alarm = self._alarms.get(_alarm_key(ALARM_AHEAD, subscriber), {})
                raise SubscriberStalled(
                    f"log {self._name!r}: subscriber {subscriber!r}: {alarm.get('message', 'checkpoint ahead')}"
                )
            out = ReadBatch()
            out.dropped = self._dropped_for(subscriber)
            start = ckpt + 1
            if start >= self._next_seq:
                return out
            seg_i, off, seq = self._locate(start)
            nbytes = 0
            min_want = 0
            segs = self._segs
            while len(out) < max_records:
                seg = segs[seg_i]
                end = seg.size
                if off >= end or seq >= seg.end_seq:
                    if seg_i + 1 < len(segs):
                        seg_i += 1
                        off = SEGMENT_HEADER_SIZE
                        seq = segs[seg_i].first
                        continue
                    break
                left_records = max_records - len(out)
                want = (max_bytes - nbytes) + RECORD_HEADER_SIZE * left_records
                want = min(end - off, max(want, _READ_CHUNK_MIN, min_want), max(_READ_CHUNK_MAX, min_want))
                buf = os.pread(self._read_fd(seg.first), want, off)
                res = decode_records(buf, 0, seq, left_records, max_bytes - nbytes, not out)
                out.extend(res.records)
                nbytes += res.payload_bytes
                off += res.pos
                seq = res.next_seq
                if res.stop == "limit":
                    break
                if res.stop == "corrupt":
                    raise self._corrupt(seg, off, res.reason)
                if res.stop == "partial":
                    # Only whole records are ever counted in seg.size, so this is damage.
                    if off + res.need > end:
                        raise self._corrupt(seg, off, "record runs past the end of the segment")
                    min_want = res.need if not res.records else 0
            if out:
                if len(self._pos_cache) >= _POS_CACHE_MAX:
                    self._pos_cache.clear()
                self._pos_cache[seq] = (segs[seg_i].first, off)
            return out

    def _dropped_for(self, subscriber: str) -> int:
        if not self._alarms:
            return 0
        return sum(
            self._alarms.get(_alarm_key(kind, subscriber), {}).get("count", 0) for kind in (ALARM_DROPPED, ALARM_LOST)
        )

    # ------------------------------------------------------------------ reporting

    def _lag_locked(self, subscriber: str) -> tuple[int, int]:
        ckpt = self._require(subscriber)
        records = sum(max(0, seg.end_seq - max(seg.first, ckpt + 1)) for seg in self._segs)
        if records == 0:
            return 0, 0
        seg_i, off, _seq = self._locate(ckpt + 1)
        nbytes = self._segs[seg_i].size - off
        nbytes += sum(seg.size - SEGMENT_HEADER_SIZE for seg in self._segs[seg_i + 1 :])
        return records, nbytes

    def lag(self, subscriber: str) -> tuple[int, int]:
        """(records, bytes) the subscriber has yet to acknowledge; bytes are on-disk record bytes."""
        with self._lock:
            self._check_open()
            return self._lag_locked(subscriber)

    def alarms(self) -> list[dict]:
        """Active alarms: dicts with kind, subscriber (or None), count, since, updated, message."""
        with self._lock:
            return [dict(a) for a in sorted(self._alarms.values(), key=lambda a: (a["kind"], a["subscriber"] or ""))]

    def clear_alarm(self, kind: str, subscriber: str | None = None) -> bool:
        """Acknowledge (remove) one alarm; returns whether it existed. Counters in stats() stay."""
        with self._lock:
            self._check_open()
            key = _alarm_key(kind, subscriber)
            if key not in self._alarms:
                return False
            with self._wtxn() as txn:
                self._txn_clear_alarm(txn, key)
            return True

    def repair(self, force: bool = False) -> dict:
        """Report (and with ``force=True`` fix) what recovery could not settle on its own.

        Verifies every closed segment's records (CRCs included). Returns a dict: torn_bytes
        cut at open and why, recovery notes, stalled subscribers, corrupt segments, and the
        actions taken. ``force=True`` releases stalled subscribers (their checkpoint stays:
        seqs after it are new records) and truncates a corrupt closed segment at its last
        valid record, raising ``records_lost`` alarms for subscribers that had not read the
        cut records.
        """
        with self._lock:
            self._check_open()
            corrupt = []
            for seg_i, seg in enumerate(self._segs[:-1]):
                fd = self._read_fd(seg.first)
                data = os.pread(fd, os.fstat(fd).st_size, 0)
                try:
                    scan = scan_segment(data, seg.first)
                except JournalCorrupt as exc:
                    corrupt.append({"segment": segment_name(seg.first), "offset": 0, "reason": str(exc), "seg_i": seg_i})
                    continue
                nxt = self._segs[seg_i + 1].first
                if scan.torn_bytes:
                    corrupt.append(
                        {
                            "segment": segment_name(seg.first),
                            "offset": scan.valid_end,
                            "reason": scan.reason,
                            "valid_end": scan.valid_end,
                            "end_seq": scan.next_seq,
                            "expected_end_seq": max(seg.end_seq, nxt) if not seg.exact else seg.end_seq,
                            "seg_i": seg_i,
                        }
                    )
            actions: list[str] = []
            if force:
                for item in corrupt:
                    if "valid_end" not in item:
                        continue  # a bad header: nothing here is safe to keep or cut
                    seg = self._segs[item["seg_i"]]
                    with open(self._seg_path(seg.first), "r+b") as fh:
                        fh.truncate(item["valid_end"])
                        os.fdatasync(fh.fileno())
                    lost_first, lost_last = item["end_seq"], item["expected_end_seq"] - 1
                    with self._wtxn() as txn:
                        for sub, ckpt in self._ckpts.items():
                            lost = records_lost_by_drop(ckpt, lost_first, lost_last)
                            if lost:
                                self._txn_raise_alarm(
                                    txn, ALARM_LOST, sub, lost, f"seqs {lost_first}..{lost_last} corrupt, cut by repair"
                                )
                    seg.size, seg.end_seq, seg.exact = item["valid_end"], item["end_seq"], True
                    seg.index_seqs = seg.index_offs = None
                    actions.append(f"truncated {item['segment']} at {item['valid_end']} ({item['reason']})")
                self._pos_cache.clear()
                stalled = sorted(self._stalled)
                if stalled:
                    with self._wtxn() as txn:
                        for sub in stalled:
                            self._txn_clear_alarm(txn, _alarm_key(ALARM_AHEAD, sub))
                    actions.extend(f"released stalled subscriber {sub!r}" for sub in stalled)
            for item in corrupt:
                item.pop("seg_i", None)
            return {
                "torn_bytes": self._torn_bytes,
                "torn_reason": self._torn_reason,
                "recovery": list(self._recovery_notes),
                "stalled": {
                    sub: self._alarms[_alarm_key(ALARM_AHEAD, sub)]["message"] for sub in sorted(self._stalled)
                },
                "corrupt_segments": corrupt,
                "actions": actions,
                "forced": bool(force),
            }

    def stats(self) -> dict:
        """Counters and state of the log (see keys); persisted counters cover all sessions."""
        with self._lock:
            self._check_open()
            subs = {}
            for sub in sorted(self._ckpts):
                records, nbytes = self._lag_locked(sub)
                subs[sub] = {
                    "checkpoint": self._ckpts[sub],
                    "lag_records": records,
                    "lag_bytes": nbytes,
                    "stalled": sub in self._stalled,
                    "dropped": self._dropped_for(sub),
                }
            return {
                "name": self._name,
                "path": self._path,
                "fsync": str(self._policy),
                "segment_size": self._segment_size,
                "disk_budget": self._budget,
                "budget_policy": self._budget_policy,
                "segments": len(self._segs),
                "disk_bytes": self._disk_bytes,
                "first_seq": self.first_seq,
                "last_seq": self._next_seq - 1,
                "appended_records": self._appended_records,
                "appended_bytes": self._appended_bytes,
                "fsyncs": self._fsyncs,
                "full_rejections": int(self._meta.get("full_rejections", 0)),
                "records_dropped": int(self._meta.get("records_dropped", 0)),
                "segments_dropped": int(self._meta.get("segments_dropped", 0)),
                "torn_bytes": self._torn_bytes,
                "torn_bytes_total": int(self._meta.get("torn_bytes_total", 0)),
                "subscribers": subs,
                "alarms": len(self._alarms),
                "broken": self._broken or None,
            }

    def _inspect_live(self) -> dict:
        with self._lock:
            return self._inspect_live_locked()

    def _inspect_live_locked(self) -> dict:
        st = self.stats()
        return {
            "name": self._name,
            "path": self._path,
            "writer_pid": os.getpid(),
            "segments": [
                {"file": segment_name(s.first), "first_seq": s.first, "bytes": s.size} for s in self._segs
            ],
            "first_seq": st["first_seq"],
            "last_seq": st["last_seq"],
            "disk_bytes": st["disk_bytes"],
            "subscribers": {
                sub: {"checkpoint": v["checkpoint"], "lag_records": v["lag_records"], "lag_bytes": v["lag_bytes"]}
                for sub, v in st["subscribers"].items()
            },
            "alarms": self.alarms(),
            "torn_bytes_last": st["torn_bytes"],
            "torn_bytes_total": st["torn_bytes_total"],
            "tail_unverified_bytes": 0,
            "counters": {k: st[k] for k in ("full_rejections", "records_dropped", "segments_dropped")},
        }


# ---------------------------------------------------------------------------


def inspect(root: str | os.PathLike, name: str) -> dict:
    """Describe log ``name`` under ``root`` without taking the writer lock.

    Returns segments, first/last seq, subscribers with checkpoint and lag, active alarms,
    torn bytes (cut at the last recovery, total, and any unverified bytes at the tail
    right now -- a live writer may be mid-write), counters and the writer's pid if alive.
    """
    validate_log_name(name)
    path = os.path.realpath(os.path.join(os.fspath(root), name))
    with _OPEN_JOURNALS_LOCK:
        live = _OPEN_JOURNALS.get(path)
    if live is not None:
        try:
            return live._inspect_live()
        except JournalClosed:
            pass
    if not os.path.isdir(path):
        raise JournalError(f"no log named {name!r} under {os.fspath(root)}")
    firsts = sorted(f for f in (parse_segment_name(e) for e in os.listdir(path)) if f is not None)
    segments = []
    datas: dict[int, bytes] = {}
    for first in firsts:
        seg_path = os.path.join(path, segment_name(first))
        segments.append({"file": segment_name(first), "first_seq": first, "bytes": os.path.getsize(seg_path)})
    ends: list[int] = [firsts[i + 1] for i in range(len(firsts) - 1)]
    tail_bad = 0
    if firsts:
        with open(os.path.join(path, segment_name(firsts[-1])), "rb") as fh:
            datas[firsts[-1]] = fh.read()
        try:
            scan = scan_segment(datas[firsts[-1]], firsts[-1])
            ends.append(scan.next_seq)
            tail_bad = scan.torn_bytes
        except JournalCorrupt:
            ends.append(firsts[-1])
            tail_bad = len(datas[firsts[-1]])
    last_seq = ends[-1] - 1 if ends else 0

    ckpts: dict[str, int] = {}
    alarms: list[dict] = []
    meta: dict[str, int] = {}
    env_path = os.path.join(path, LMDB_DIR)
    if os.path.isdir(env_path):
        try:
            env = lmdb.open(env_path, subdir=True, readonly=True, max_dbs=4, lock=True)
        except lmdb.Error as exc:
            raise JournalError(f"cannot read checkpoint store of log {name!r}: {exc}") from exc
        try:
            with env.begin() as txn:
                for dbname, target in ((b"checkpoints", "c"), (b"alarms", "a"), (b"meta", "m")):
                    try:
                        db = env.open_db(dbname, txn=txn, create=False)
                    except lmdb.NotFoundError:
                        continue
                    for key, value in txn.cursor(db=db):
                        key, value = bytes(key), bytes(value)
                        if target == "c":
                            ckpts[key.decode()] = _CKPT.unpack(value)[0]
                        elif target == "a":
                            alarms.append(json.loads(value))
                        else:
                            meta[key.decode()] = json.loads(value)
        finally:
            env.close()
    first_seq = next((f for f, e in zip(firsts, ends) if e > f), last_seq + 1)
    if last_seq < max(ckpts.values(), default=0):
        last_seq = max(ckpts.values())

    def lag_of(ckpt: int) -> tuple[int, int]:
        records = sum(max(0, e - max(f, ckpt + 1)) for f, e in zip(firsts, ends))
        if records == 0:
            return 0, 0
        i = max(0, bisect.bisect_right(firsts, ckpt + 1) - 1)
        f = firsts[i]
        if f not in datas:
            with open(os.path.join(path, segment_name(f)), "rb") as fh:
                datas[f] = fh.read()
        data = datas[f]
        pos, _seq, _stop = skip_records(data, SEGMENT_HEADER_SIZE, f, max(f, ckpt + 1))
        size = len(data) if i < len(firsts) - 1 else len(data) - tail_bad
        nbytes = max(0, size - pos) + sum(s["bytes"] - SEGMENT_HEADER_SIZE for s in segments[i + 1 :])
        return records, nbytes

    subscribers = {}
    for sub in sorted(ckpts):
        records, nbytes = lag_of(ckpts[sub])
        subscribers[sub] = {"checkpoint": ckpts[sub], "lag_records": records, "lag_bytes": nbytes}
    writer_pid = None
    try:
        with open(os.path.join(path, LOCK_FILE)) as fh:
            pid = int(fh.read().strip() or 0)
        if pid:
            os.kill(pid, 0)
            writer_pid = pid
    except (OSError, ValueError):
        writer_pid = None
    return {
        "name": name,
        "path": path,
        "writer_pid": writer_pid,
        "segments": segments,
        "first_seq": first_seq,
        "last_seq": last_seq,
        "disk_bytes": sum(s["bytes"] for s in segments),
        "subscribers": subscribers,
        "alarms": sorted(alarms, key=lambda a: (a["kind"], a["subscriber"] or "")),
        "torn_bytes_last": int(meta.get("torn_bytes_last", 0)),
        "torn_bytes_total": int(meta.get("torn_bytes_total", 0)),
        "tail_unverified_bytes": tail_bad,
        "counters": {k: int(meta.get(k, 0)) for k in ("full_rejections", "records_dropped", "segments_dropped")},
    }
