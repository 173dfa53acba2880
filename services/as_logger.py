"""as_logger: audit series on every node, written window by window to the ``audit`` journal.

The MTA (or a plug-in) reports events over the bus::

    as_logger.add(series, address, count=1)          -> {"counted", "ignored"}
    as_logger.add_batch(events=[[series, address, count], ...], batch=None)   (count optional)
        -> {"counted", "ignored"} (+ "duplicate" when ``batch`` is given)
    as_logger.status()

``batch=[sender, seq]`` makes a batch idempotent: a sender (one process: its name must not
be reused by the next one) numbers its batches upwards and resends a batch whose answer it
did not get with the same id. The service remembers the last seq counted per sender
(:class:`BatchLedger`, the :data:`MAX_SENDERS` most recently seen) and answers a batch
whose seq is not above it with ``duplicate: true``, counting nothing. The ledger is in
memory and saved with the state at a graceful stop, so the guarantee (a batch counts at
most once) holds across a graceful restart; after a crash the ledger is gone, together
with the open windows it protected: see docs/CIDR.md.

Events are counted by :class:`node.audit.AuditLogger` (settings from the cluster file's
``[as_logger]`` table: ``log_interval``, ``series_include``, ``series_exclude``). Every
tick the closed windows are encoded (:func:`node.audit.encode_window`) and written, one
record each, to the local ``jlog`` service's ``audit`` log, which the managers'
cidr_server services consume.

Never losing a closed window: a window stays in the pending queue until ``jlog.write``
acknowledged it (a timeout is retried, so a window may reach the journal twice; the
cidr_server counts each (node, series, window start) once). While the journal stays
down the queue is bounded (:data:`MAX_PENDING_BYTES` / :data:`MAX_PENDING_WINDOWS`); past
that the oldest windows are dropped, counted and alarmed, never silently.

A window of more than :data:`PART_ADDRESSES` addresses is written as several records
(:func:`split_window`), because the journal takes at most 4 MiB per record.

On SIGTERM the open windows are flushed and written; what cannot be written is saved to
``<data_dir>/as_logger/state.msgpack`` and written after the restart. The state also
remembers the end of the flushed windows: a restart within that interval counts into
the next window, because a second window with the same start would be taken for a
replay of the first and dropped by the cidr_server.
"""
from __future__ import annotations

import asyncio
import math
import re
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import msgpack

from bus.client import BusError, RemoteError
from node.audit import (SERIES_NAME_PATTERN, AuditError, AuditLogger, Window, encode_window,
                        parse_address)
from node.fsutil import atomic_write
from services.base import Service, ServiceError, rpc
from bus import roles as access
from services.pulling import PullPolicy, next_backoff

JOURNAL_LOG = "audit"
#: bound of the queue of closed windows waiting for the journal
MAX_PENDING_BYTES = 64 << 20
MAX_PENDING_WINDOWS = 100_000
#: one jlog.write call carries at most this much (the journal reads in 4 MiB batches)
WRITE_BATCH_BYTES = 2 << 20
WRITE_BATCH_RECORDS = 1000
WRITE_TIMEOUT = 5.0
#: retry delays while the journal refuses or does not answer: doubling from 0.5 s up to
#: 10 s (only the back-off fields of the policy are used: writes are not a pull loop)
RETRY_POLICY = PullPolicy(idle_wait=0.0, backoff_min=0.5, backoff_max=10.0, read_timeout=WRITE_TIMEOUT)
#: most events in one add_batch call
MAX_BATCH = 200_000
#: senders whose last batch seq is remembered (the least recently seen is forgotten first)
MAX_SENDERS = 10_000
MAX_SENDER_LENGTH = 200
STATE_FILE = "state.msgpack"
#: a window with more addresses is written as several records (the journal takes ≤ 4 MiB each)
PART_ADDRESSES = 100_000
#: part i of a split window starts this much later: its own (node, series, start) for the manager
PART_OFFSET = 1e-3
_SERIES_RE = re.compile(SERIES_NAME_PATTERN, re.ASCII)


def check_event(series: Any, address: Any, count: Any = 1) -> tuple[str, str, int]:
    """Validate one event; return it as a tuple or raise :class:`AuditError` (one line). Pure."""
    if not isinstance(series, str) or not _SERIES_RE.fullmatch(series):
        raise AuditError(f"invalid series name {series!r:.80}: must match {SERIES_NAME_PATTERN}")
    if not isinstance(address, str):
        raise AuditError(f"address must be text (IPv4 or IPv6), not {type(address).__name__}")
    parse_address(address)  # raises AuditAddressError naming the address
    if count.__class__ is not int or not 1 <= count <= (1 << 62):
        raise AuditError(f"count must be a positive integer, not {count!r:.40}")
    return series, address, count


def check_batch(events: Any) -> list[tuple[str, str, int]]:
    """Validate a whole batch of ``[series, address(, count)]`` items before counting any. Pure."""
    if not isinstance(events, (list, tuple)):
        raise AuditError(f"events must be a list of [series, address, count], not {type(events).__name__}")
    if len(events) > MAX_BATCH:
        raise AuditError(f"too many events in one batch ({len(events)}, at most {MAX_BATCH})")
    out = []
    for i, item in enumerate(events):
        if not isinstance(item, (list, tuple)) or len(item) not in (2, 3):
            raise AuditError(f"event {i}: expected [series, address, count], got {item!r:.80}")
        try:
            out.append(check_event(*item))
        except AuditError as e:
            raise AuditError(f"event {i}: {e}") from None
    return out


def check_batch_id(batch: Any) -> tuple[str, int]:
    """Validate an ``add_batch`` id ``[sender, seq]``; raise :class:`AuditError` (one line). Pure."""
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise AuditError(f"batch must be [sender, seq], not {batch!r:.80}")
    sender, seq = batch
    if not isinstance(sender, str) or not 1 <= len(sender) <= MAX_SENDER_LENGTH:
        raise AuditError(f"batch sender must be text of 1 to {MAX_SENDER_LENGTH} characters, not {sender!r:.80}")
    if seq.__class__ is not int or not 0 <= seq < (1 << 63):
        raise AuditError(f"batch seq must be an integer from 0 to 2**63-1, not {seq!r:.40}")
    return sender, seq


class BatchLedger:
    """The last batch seq counted per sender, for at most ``max_senders`` senders (the least
    recently seen is forgotten first). Pure: no I/O, no clock."""

    def __init__(self, max_senders: int = MAX_SENDERS):
        self.max_senders = max_senders
        self._last: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def is_replay(self, sender: str, seq: int) -> bool:
        """Whether batch ``seq`` of ``sender`` was counted already (its seq is not above the last)."""
        last = self._last.get(sender)
        return last is not None and seq <= last

    def record(self, sender: str, seq: int) -> None:
        """Batch ``seq`` of ``sender`` is counted."""
        self._last[sender] = max(seq, self._last.get(sender, seq))
        self._last.move_to_end(sender)
        while len(self._last) > self.max_senders:
            self._last.popitem(last=False)

    def entries(self) -> list[list]:
        """``[[sender, seq], ...]``, least recently seen first (for the state file)."""
        return [[sender, seq] for sender, seq in self._last.items()]

    @classmethod
    def from_entries(cls, entries: Any, max_senders: int = MAX_SENDERS) -> "BatchLedger":
        """A ledger from :meth:`entries`; raises :class:`AuditError` on a malformed list."""
        ledger = cls(max_senders)
        if not isinstance(entries, list):
            raise AuditError(f"batch ledger must be a list, not {type(entries).__name__}")
        for item in entries:
            ledger.record(*check_batch_id(item))
        return ledger


def split_window(window: Window, max_addresses: int = PART_ADDRESSES) -> list[Window]:
    """``window`` as parts of at most ``max_addresses`` addresses each. Pure.

    Part ``i`` starts ``i * PART_OFFSET`` seconds after the window (same hour, same end),
    so the manager, which counts each (node, series, start) once, takes every part.
    """
    if len(window.counts) <= max_addresses:
        return [window]
    items = sorted(window.counts.items())
    return [Window(window.series, window.start + i * PART_OFFSET if i else window.start, window.end,
                   dict(items[at:at + max_addresses]))
            for i, at in enumerate(range(0, len(items), max_addresses))]


def take_batch(pending: deque, max_bytes: int = WRITE_BATCH_BYTES, max_records: int = WRITE_BATCH_RECORDS) -> list:
    """The oldest pending items ``(record, events)`` that fit one write (at least one). Pure."""
    out, size = [], 0
    for item in pending:
        if out and (size + len(item[0]) > max_bytes or len(out) >= max_records):
            break
        out.append(item)
        size += len(item[0])
    return out


class AsLoggerService(Service):
    """Counts audit events per series and source address; journals each closed window."""

    name = "as_logger"
    roles = ("node",)
    builtin = True
    tick_interval = 0.5

    def __init__(self, cluster, member: str):
        super().__init__(cluster, member)
        settings = cluster.section("as_logger")
        self.log_interval = settings["log_interval"]
        self.include = settings["series_include"] or None
        self.exclude = settings["series_exclude"] or None
        self.state_path = Path(self.data_dir) / "as_logger" / STATE_FILE
        # events never go into a window that ended before the last graceful stop (see module doc)
        self._resume_at = 0.0
        self.logger = AuditLogger(self.log_interval, include=self.include, exclude=self.exclude,
                                  clock=self._clock)
        self.pending: deque[tuple[bytes, int]] = deque()   # (encoded window, its event total)
        self.pending_bytes = 0
        self.retry_at = 0.0
        self.retry_delay = 0.0
        self.dropping = False
        self.saved_pending = False      # the state file holds windows not yet journalled
        self.ledger = BatchLedger()     # last add_batch seq counted per sender
        self.stats = {"events_counted": 0, "events_ignored": 0, "events_refused": 0, "batches_duplicate": 0,
                      "windows_closed": 0, "windows_written": 0, "write_calls": 0, "write_failures": 0,
                      "windows_dropped": 0, "events_dropped": 0}
        self.last_write_error: str | None = None
        self.last_write_at: float | None = None

    def _clock(self) -> float:
        now = time.time()
        return now if now >= self._resume_at else self._resume_at

    # -- lifecycle ----------------------------------------------------------------
    async def handle_init(self) -> None:
        state = await self.offload(self._load_state)
        if state:
            self._resume_at = float(state.get("closed_until") or 0.0)
            for record in state.get("pending") or []:
                self._enqueue(bytes(record[0]), int(record[1]))
            self.saved_pending = bool(self.pending)
            try:
                self.ledger = BatchLedger.from_entries(state.get("batches") or [])
            except AuditError as e:     # only replays of earlier batches are at stake: go on
                self.log.error("ignoring the batch ledger of %s: %s", self.state_path, e)
            self.log.info("resumed: %d pending window(s), counting from %.0f", len(self.pending), self._resume_at)

    async def handle_tick(self) -> None:
        self._queue_windows(self.logger.roll())
        if self.pending and time.monotonic() >= self.retry_at:
            await self._write_pending(WRITE_TIMEOUT)

    async def handle_stop(self) -> None:
        flushed = self.logger.flush()
        self._queue_windows(flushed)
        closed_until = max([self._resume_at, *(w.end for w in flushed)])
        if self.pending:
            await self._write_pending(1.0)
        await self.offload(self._save_state, closed_until, self.ledger.entries())

    # -- RPC ------------------------------------------------------------------------
    @rpc(access.ADMIN_ONLY)
    def rpc_add(self, series: str, address: str, count: int = 1) -> dict:
        """Count ``count`` events of ``series`` from ``address`` in the current window."""
        try:
            event = check_event(series, address, count)
        except AuditError as e:
            self.stats["events_refused"] += 1
            raise ServiceError(f"as_logger.add: {e}", "bad_event") from None
        return self._count([event])

    @rpc(access.LOCAL_ONLY)
    def rpc_add_batch(self, events: list, batch: list | None = None) -> dict:
        """Count many ``[series, address, count]`` events; a bad one refuses the whole batch.

        ``batch=[sender, seq]``: a batch whose seq is not above the last one counted for
        ``sender`` is a replay, answered ``duplicate: true`` without counting anything.
        """
        try:
            checked = check_batch(events)
        except AuditError as e:
            self.stats["events_refused"] += 1
            raise ServiceError(f"as_logger.add_batch: {e}", "bad_event") from None
        if batch is None:
            return self._count(checked)
        try:
            sender, seq = check_batch_id(batch)
        except AuditError as e:
            self.stats["events_refused"] += 1
            raise ServiceError(f"as_logger.add_batch: {e}", "bad_batch") from None
        if self.ledger.is_replay(sender, seq):
            self.stats["batches_duplicate"] += 1
            return {"counted": 0, "ignored": 0, "duplicate": True}
        out = self._count(checked)
        self.ledger.record(sender, seq)
        return {**out, "duplicate": False}

    @rpc(access.ANYONE)
    def rpc_status(self) -> dict:
        """Settings, counters, open windows and the journal queue."""
        return {"member": self.member.name, "log_interval": self.log_interval,
                "series_include": self.include, "series_exclude": self.exclude,
                "open_windows": self.logger.open_windows(), "pending_windows": len(self.pending),
                "pending_bytes": self.pending_bytes, "last_write_at": self.last_write_at,
                "last_write_error": self.last_write_error, "resume_at": self._resume_at,
                "batch_senders": len(self.ledger), **self.stats}

    # -- internals -------------------------------------------------------------------
    def _count(self, events: list[tuple[str, str, int]]) -> dict:
        logged = [e for e in events if self.logger.is_logged(e[0])]
        try:
            self.logger.add_batch(logged)
        except AuditError as e:        # checked above; kept so a gap there is still one line
            raise ServiceError(f"as_logger: {e}", "bad_event") from None
        counted = sum(e[2] for e in logged)
        ignored = sum(e[2] for e in events) - counted
        self.stats["events_counted"] += counted
        self.stats["events_ignored"] += ignored
        return {"counted": counted, "ignored": ignored}

    def _queue_windows(self, windows: list[Window]) -> None:
        for w in windows:
            self.stats["windows_closed"] += 1
            for part in split_window(w):
                self._enqueue(encode_window(part), part.total())

    def _enqueue(self, record: bytes, events: int) -> None:
        self.pending.append((record, events))
        self.pending_bytes += len(record)
        while len(self.pending) > 1 and (self.pending_bytes > MAX_PENDING_BYTES
                                         or len(self.pending) > MAX_PENDING_WINDOWS):
            old, n = self.pending.popleft()
            self.pending_bytes -= len(old)
            self.stats["windows_dropped"] += 1
            self.stats["events_dropped"] += n
            if not self.dropping:
                self.dropping = True
                self.log.error("audit journal unavailable too long: dropping the oldest windows")
                self._alarm_soon("audit_windows_dropped",
                                 f"as_logger on {self.member.name} dropped audit windows: the journal "
                                 f"has not accepted writes ({self.last_write_error})")

    def _alarm_soon(self, kind: str, message: str) -> None:
        try:
            asyncio.get_running_loop().create_task(self.alarm(kind, message, dropped=self.stats["windows_dropped"]))
        except RuntimeError:
            pass

    async def _write_pending(self, timeout: float) -> None:
        """Write queued windows, oldest first, until the queue is empty or a write fails."""
        while self.pending:
            batch = take_batch(self.pending)
            self.stats["write_calls"] += 1
            try:
                await self.call(None, "jlog", "write", timeout=timeout, log=JOURNAL_LOG,
                                records=[record for record, _ in batch])
            except RemoteError as e:
                if e.code != "bad_records":
                    self._write_failed(e)
                    return
                # refused for good (cannot happen with split windows): do not block the rest
                self._drop_head(batch)
                self.log.error("the journal refused %d audit window(s) for good: %s", len(batch), e)
                self._alarm_soon("audit_windows_dropped", f"as_logger on {self.member.name}: the journal "
                                                          f"refused {len(batch)} audit window(s): {e}")
                continue
            except BusError as e:
                self._write_failed(e)
                return
            self._drop_head(batch, written=True)
            self.last_write_at = time.time()
            self.last_write_error = None
            self.retry_delay = 0.0
            self.retry_at = 0.0
            self.dropping = False
        if self.saved_pending:
            # the windows saved at the last stop are in the journal now: forget them
            self.saved_pending = False
            await self.offload(self._save_state, self._resume_at, self.ledger.entries())

    def _write_failed(self, e: BusError) -> None:
        self.stats["write_failures"] += 1
        self.last_write_error = str(e)
        self.retry_delay = next_backoff(self.retry_delay, RETRY_POLICY)
        self.retry_at = time.monotonic() + self.retry_delay
        if self.retry_delay >= RETRY_POLICY.backoff_max or self.stats["write_failures"] == 1:
            self.log.warning("audit journal write failed (%d windows waiting): %s", len(self.pending), e)

    def _drop_head(self, batch: list, written: bool = False) -> None:
        """Take ``batch`` off the head of the queue (still the head unless dropped meanwhile)."""
        for item in batch:
            if self.pending and self.pending[0] is item:
                self.pending.popleft()
                self.pending_bytes -= len(item[0])
                if written:
                    self.stats["windows_written"] += 1
                else:
                    self.stats["windows_dropped"] += 1
                    self.stats["events_dropped"] += item[1]

    # -- state file (blocking: run through offload) --------------------------------------
    def _load_state(self) -> dict | None:
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            self.log.error("cannot read %s: %s", self.state_path, e)
            return None
        try:
            state = msgpack.unpackb(data, raw=False)
            if not isinstance(state, dict):
                raise ValueError("not a map")
            until = state.get("closed_until", 0)
            if until.__class__ not in (int, float) or not math.isfinite(until):
                raise ValueError("bad closed_until")
            pending = state.get("pending") or []
            if not isinstance(pending, list) or not all(
                    isinstance(p, list) and len(p) == 2 and isinstance(p[0], bytes) and p[1].__class__ is int
                    for p in pending):
                raise ValueError("bad pending windows")
            return state
        except Exception as e:  # a damaged state file must not stop the service
            self.log.error("ignoring damaged %s: %s", self.state_path, e)
            return None

    def _save_state(self, closed_until: float, batches: list) -> None:
        """Write what a restart needs (pending windows, end of flushed windows, the batch
        ledger); remove the file if nothing."""
        if not self.pending and closed_until <= time.time() and not batches:
            try:
                self.state_path.unlink()
            except FileNotFoundError:
                pass
            return
        data = msgpack.packb({"closed_until": closed_until, "batches": batches,
                              "pending": [[record, n] for record, n in self.pending]}, use_bin_type=True)
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_path, data)
