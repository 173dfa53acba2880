"""cidr_server storage and query execution.

Storage (LMDB, one environment in directory ``path``; numpy does the counting):

* ``hour`` db: one *hour record* per (series, UTC hour), the sum over all nodes
  of every window whose start lies in that hour.  Each window is merged into its
  hour record when it arrives, so a query over an hour reads one record.
* ``day`` db: one *day record* per (series, UTC day).  :meth:`CidrStore.condense`
  merges the hour records of a day into it once the day ended more than
  ``condense_after`` seconds ago (default one day, so "the last 24 hours" is
  always answered from hour records; 0 condenses every day before today).
* ``seen`` db: one key per (node, series, window start) ever counted, so a
  replayed window (at-least-once journal delivery) is never counted twice, even
  after its hour was condensed.  Expired with the data.
* ``meta`` db: the retention watermark.

A record is two sorted numpy arrays per IP version: IPv4 addresses (uint32) with
int64 counts, IPv6 addresses as (high, low) uint64 pairs with int64 counts.  In
sorted arrays every CIDR prefix is a contiguous slice and the groups of any
prefix length are runs, so "sum by /N" is a shift, a diff and an
``add.reduceat``: a top-10 /24 over an hour of 100k addresses takes a few ms.

Time semantics (all UTC, epoch seconds):

* The data has hour resolution for days not yet condensed and day resolution
  for condensed days.  A record counts for a query when its interval (hour or
  day) overlaps the query's range ``[lo, hi)``; a bound inside an hour (or a
  condensed day) therefore takes in the whole hour (day).
* No date clause: the current hour and the 23 before it (``since`` the start of
  the hour 23 hours before ``now``'s hour).  ``since D``: no upper bound.
* A window belongs to the hour (day) that contains its start.
* Retention: :meth:`CidrStore.expire` keeps today and the ``retention_days``
  previous UTC days; older records, and windows that arrive for them later, are
  dropped.

Rows of a count query (:class:`Row`): ``cidr`` text, ``counts`` (one per series
in the order given, or one for a union) and ``day`` (``YYYYMMDD`` with
``aggregate daily``, else None).  Only prefixes with a non-zero count get a row.
``cidrsize N to M`` gives rows for every prefix length N..M inside the block
(without cidrsize, one row for the block itself).  ``threshold T`` keeps rows
whose total (sum over columns) is ≥ T; ``order by count`` sorts by total
descending (ties by address), ``order by cidr`` (the default) by address then
prefix length ascending; ``limit N`` keeps the first N rows.  With ``aggregate
daily`` rows are grouped per day (days ascending), and threshold, order and
limit apply within each day.

Text form (:func:`format_rows`): ``10.79.18.0/24 : 35217,1264``, with
``aggregate daily`` ``20080605 10.79.18.0/24 : 35217,1264``; ``show available``
gives ``connections : 20080601T000000-20080603T000000, 20080605T120000-20080605T140000``
(the time ranges that hold data).  :func:`result_to_dict` gives the JSON form.
"""

from __future__ import annotations

import math
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import lmdb
import msgpack
import numpy as np

from node.audit import SERIES_NAME_PATTERN, Window, format_address
from manager.cidr.query import CountQuery, Query, ShowAvailable, parse_query

__all__ = [
    "CidrStoreError",
    "CidrStore",
    "Row",
    "CountResult",
    "SeriesSpan",
    "AvailableResult",
    "Result",
    "format_rows",
    "result_to_dict",
    "HOUR",
    "DAY",
]

HOUR = 3600
DAY = 86400
_SERIES_RE = re.compile(SERIES_NAME_PATTERN, re.ASCII)
_U64 = np.uint64
_EMPTY_U32 = np.zeros(0, np.uint32)
_EMPTY_U64 = np.zeros(0, np.uint64)
_EMPTY_I64 = np.zeros(0, np.int64)
_LOW32 = np.uint64(0xFFFFFFFF)
_RECORD_TAG = 1


class CidrStoreError(Exception):
    """Bad input to the store or a damaged record; the message is one line."""


# -- records ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """Counts of one record: sorted unique addresses with their counts."""

    a4: np.ndarray  # uint32, ascending
    c4: np.ndarray  # int64
    h6: np.ndarray  # uint64 high half, (h6, l6) ascending
    l6: np.ndarray  # uint64 low half
    c6: np.ndarray  # int64

    def encode(self) -> bytes:
        return msgpack.packb(
            [_RECORD_TAG,
             self.a4.astype("<u4", copy=False).tobytes(), self.c4.astype("<i8", copy=False).tobytes(),
             self.h6.astype("<u8", copy=False).tobytes(), self.l6.astype("<u8", copy=False).tobytes(),
             self.c6.astype("<i8", copy=False).tobytes()],
            use_bin_type=True,
        )

    @staticmethod
    def decode(data: bytes, what: str) -> "_Record":
        try:
            tag, a4, c4, h6, l6, c6 = msgpack.unpackb(data, raw=False)
            if tag != _RECORD_TAG:
                raise ValueError(f"tag {tag!r}")
            rec = _Record(np.frombuffer(a4, "<u4"), np.frombuffer(c4, "<i8"), np.frombuffer(h6, "<u8"),
                          np.frombuffer(l6, "<u8"), np.frombuffer(c6, "<i8"))
        except Exception as exc:  # any malformation of stored bytes means the same
            raise CidrStoreError(f"damaged record {what}: {type(exc).__name__}") from None
        if not (len(rec.a4) == len(rec.c4) and len(rec.h6) == len(rec.l6) == len(rec.c6)):
            raise CidrStoreError(f"damaged record {what}: array lengths differ")
        return rec

    def total(self) -> int:
        return int(self.c4.sum()) + int(self.c6.sum())


def _record_from_window(window: Window) -> _Record:
    """Arrays of one window's counts (validated: versions 4/6, address ranges, counts ≥ 1)."""
    a4: list[int] = []
    c4: list[int] = []
    a6: list[int] = []
    c6: list[int] = []
    try:
        for (version, address), count in window.counts.items():
            if version == 4:
                a4.append(address)
                c4.append(count)
            elif version == 6:
                a6.append(address)
                c6.append(count)
            else:
                raise CidrStoreError(f"window {window.series}@{window.start}: IP version {version!r} is not 4 or 6")
        addr4 = np.array(a4, dtype=np.uint32) if a4 else _EMPTY_U32
        cnt4 = np.array(c4, dtype=np.int64) if c4 else _EMPTY_I64
        if any(not 0 <= a < 1 << 128 for a in a6):
            raise OverflowError("IPv6 address out of range")
        hi6 = np.array([a >> 64 for a in a6], dtype=np.uint64) if a6 else _EMPTY_U64
        lo6 = np.array([a & 0xFFFFFFFFFFFFFFFF for a in a6], dtype=np.uint64) if a6 else _EMPTY_U64
        cnt6 = np.array(c6, dtype=np.int64) if c6 else _EMPTY_I64
    except CidrStoreError:
        raise
    except (OverflowError, TypeError, ValueError, AttributeError) as exc:
        raise CidrStoreError(f"window {getattr(window, 'series', '?')}: bad counts ({exc})") from None
    if (len(cnt4) and cnt4.min() < 1) or (len(cnt6) and cnt6.min() < 1):
        raise CidrStoreError(f"window {window.series}@{window.start}: counts must be ≥ 1")
    order4 = np.argsort(addr4, kind="stable")
    order6 = np.lexsort((lo6, hi6))
    k4, s4 = _reduce_runs((addr4[order4],), cnt4[order4])
    (k6h, k6l), s6 = _reduce_runs((hi6[order6], lo6[order6]), cnt6[order6])
    return _Record(k4[0], s4, k6h, k6l, s6)


def _reduce_runs(keys: tuple[np.ndarray, ...], counts: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Collapse runs of equal keys (keys sorted) into one key with the summed count."""
    n = len(counts)
    if n <= 1:
        return keys, counts
    change = keys[0][1:] != keys[0][:-1]
    for k in keys[1:]:
        change |= k[1:] != k[:-1]
    if change.all():
        return keys, counts
    starts = np.concatenate(([0], np.flatnonzero(change) + 1))
    return tuple(k[starts] for k in keys), np.add.reduceat(counts, starts)


def _sort_merge(keys: tuple[np.ndarray, ...], counts: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Sort (keys, counts) by key and sum equal keys.

    One 32-bit key with counts below 2**32 is packed into one uint64 per entry
    and sorted with numpy's (SIMD) sort, several times faster than an argsort.
    """
    if len(keys) == 1 and len(counts) and int(keys[0].max()) < 1 << 32 and int(counts.max()) < 1 << 32:
        packed = (keys[0].astype(_U64) << _U64(32)) | counts.astype(_U64)
        packed.sort()
        sorted_keys = (packed >> _U64(32)).astype(keys[0].dtype)
        return _reduce_runs((sorted_keys,), (packed & _LOW32).astype(np.int64))
    order = np.argsort(keys[0], kind="stable") if len(keys) == 1 else np.lexsort(keys[::-1])
    return _reduce_runs(tuple(k[order] for k in keys), counts[order])


def _merge_records(records: Sequence[_Record]) -> _Record:
    """One record holding the sums of ``records``."""
    if len(records) == 1:
        return records[0]
    (a4,), c4 = _sort_merge((np.concatenate([r.a4 for r in records]),), np.concatenate([r.c4 for r in records]))
    (h6, l6), c6 = _sort_merge((np.concatenate([r.h6 for r in records]), np.concatenate([r.l6 for r in records])),
                               np.concatenate([r.c6 for r in records]))
    return _Record(a4, c4, h6, l6, c6)


# -- prefix keys ----------------------------------------------------------------------
#
# Keys of prefix length p: IPv4 one uint64 array (address >> (32 - p)); IPv6 a pair:
# p <= 64 -> (high >> (64 - p), 0), p > 64 -> (high, low >> (128 - p)).
# Shifts of 64 or more are done by hand (numpy leaves them undefined).


def _shr(x: np.ndarray, s: int) -> np.ndarray:
    return np.zeros_like(x) if s >= 64 else x >> _U64(s) if s else x


def _shl(x: np.ndarray, s: int) -> np.ndarray:
    return np.zeros_like(x) if s >= 64 else x << _U64(s) if s else x


def _coarsen(keys: tuple[np.ndarray, ...], version: int, src: int, dst: int) -> tuple[np.ndarray, ...]:
    """Keys of prefix length ``src`` turned into keys of the shorter length ``dst``."""
    if version == 4:
        return (_shr(keys[0], src - dst),)
    hi, lo = keys
    if dst > 64:
        return hi, _shr(lo, src - dst)
    if src > 64:
        return _shr(hi, 64 - dst), np.zeros_like(lo)
    return _shr(hi, src - dst), lo


def _networks(keys: tuple[np.ndarray, ...], version: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) uint64 network addresses of prefix keys of length ``p`` (for ordering)."""
    if version == 4:
        return np.zeros_like(keys[0]), _shl(keys[0], 32 - p)
    hi, lo = keys
    if p > 64:
        return hi, _shl(lo, 128 - p)
    return _shl(hi, 64 - p), lo


def _slice_block(rec: _Record, block) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """The record's addresses (at full length) and counts inside ``block``."""
    if block.version == 4:
        lo = np.searchsorted(rec.a4, np.uint32(block.network), "left")
        hi = np.searchsorted(rec.a4, np.uint32(block.last()), "right")
        return (rec.a4[lo:hi].astype(_U64),), rec.c4[lo:hi]
    first, last = block.network, block.last()
    # (h, l) pairs are sorted lexicographically, so the block is one slice:
    # from the first pair >= first to the last pair <= last.
    # numpy scalars of the array's type: a Python int would make searchsorted compare in float64
    f_hi, f_lo, l_hi, l_lo = (_U64(x) for x in (first >> 64, first & (2**64 - 1), last >> 64, last & (2**64 - 1)))
    start = np.searchsorted(rec.h6, f_hi, "left")
    run_end = np.searchsorted(rec.h6, f_hi, "right")
    start += np.searchsorted(rec.l6[start:run_end], f_lo, "left")
    stop = np.searchsorted(rec.h6, l_hi, "left")
    run_end = np.searchsorted(rec.h6, l_hi, "right")
    stop += np.searchsorted(rec.l6[stop:run_end], l_lo, "right")
    return (rec.h6[start:stop], rec.l6[start:stop]), rec.c6[start:stop]


def _groups_at(records: Sequence[_Record], block, level: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Prefix keys of length ``level`` within ``block`` and their summed counts, over ``records``."""
    bits = block.bits
    parts_k: list[tuple[np.ndarray, ...]] = []
    parts_c: list[np.ndarray] = []
    for rec in records:
        keys, counts = _slice_block(rec, block)
        if not len(counts):
            continue
        keys, counts = _reduce_runs(_coarsen(keys, block.version, bits, level), counts)
        parts_k.append(keys)
        parts_c.append(counts)
    width = 1 if block.version == 4 else 2
    if not parts_c:
        return tuple(_EMPTY_U64 for _ in range(width)), _EMPTY_I64
    if len(parts_c) == 1:
        return parts_k[0], parts_c[0]
    keys = tuple(np.concatenate([k[i] for k in parts_k]) for i in range(width))
    return _sort_merge(keys, np.concatenate(parts_c))


def _join(columns: list[tuple[tuple[np.ndarray, ...], np.ndarray]]) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Outer-join per-column (keys, counts) into (keys, matrix[rows, columns])."""
    if len(columns) == 1:
        keys, counts = columns[0]
        return keys, counts.reshape(-1, 1)
    width = len(columns[0][0])
    keys = tuple(np.concatenate([c[0][i] for c in columns]) for i in range(width))
    col = np.concatenate([np.full(len(c[1]), j, np.int64) for j, c in enumerate(columns)])
    counts = np.concatenate([c[1] for c in columns])
    order = np.lexsort(keys[::-1])
    keys = tuple(k[order] for k in keys)
    col, counts = col[order], counts[order]
    n = len(counts)
    if n == 0:
        return keys, np.zeros((0, len(columns)), np.int64)
    change = np.zeros(n, bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    group = np.cumsum(change) - 1
    matrix = np.zeros((int(group[-1]) + 1, len(columns)), np.int64)
    matrix[group, col] = counts  # keys are unique within a column
    return tuple(k[change] for k in keys), matrix


# -- results --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One result row: ``cidr`` text, one count per column, ``day`` (YYYYMMDD) with aggregate daily."""

    cidr: str
    counts: tuple[int, ...]
    day: str | None = None

    @property
    def total(self) -> int:
        """Sum of the row's counts (what threshold and order by count use)."""
        return sum(self.counts)


@dataclass(frozen=True)
class CountResult:
    """Answer to a count query; ``start``/``end`` is the resolved range (``end`` None: open)."""

    query: CountQuery
    columns: tuple[str, ...]
    start: int
    end: int | None
    rows: tuple[Row, ...]
    unknown_series: tuple[str, ...] = ()


@dataclass(frozen=True)
class SeriesSpan:
    """The time ranges ``[(start, end), …]`` for which a series holds data."""

    series: str
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class AvailableResult:
    """Answer to ``show available``."""

    series: tuple[SeriesSpan, ...]


Result = CountResult | AvailableResult


def _stamp(epoch: int) -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(epoch))


def format_rows(result: Result) -> list[str]:
    """Momentum's text form, one string per row (see module docstring)."""
    if isinstance(result, AvailableResult):
        return [f"{span.series} : " + ", ".join(f"{_stamp(a)}-{_stamp(b)}" for a, b in span.ranges)
                for span in result.series]
    lines = []
    for row in result.rows:
        text = f"{row.cidr} : {','.join(str(c) for c in row.counts)}"
        lines.append(f"{row.day} {text}" if row.day else text)
    return lines


def result_to_dict(result: Result) -> dict:
    """JSON-able form of a result."""
    if isinstance(result, AvailableResult):
        return {"kind": "available", "series": [
            {"name": span.series, "ranges": [{"start": a, "end": b, "start_text": _stamp(a), "end_text": _stamp(b)}
                                            for a, b in span.ranges]}
            for span in result.series]}
    return {
        "kind": "count",
        "query": result.query.to_text(),
        "columns": list(result.columns),
        "start": result.start,
        "end": result.end,
        "rows": [{"cidr": r.cidr, "counts": list(r.counts), "total": r.total, **({"day": r.day} if r.day else {})}
                 for r in result.rows],
        "unknown_series": list(result.unknown_series),
    }


# -- the store ------------------------------------------------------------------------


def _floor(t: float, unit: int) -> int:
    return int(t // unit) * unit


def _rkey(series: str, start: int) -> bytes:
    return series.encode() + b"\0" + struct.pack(">q", start)


def _split_rkey(key: bytes) -> tuple[str, int]:
    return key[:-9].decode(), struct.unpack(">q", key[-8:])[0]


class CidrStore:
    """Audit windows of every node on disk, with condensation, retention and queries.

    One process owns a store (LMDB allows concurrent readers in other processes).
    ``map_size`` is LMDB's initial address-space reservation; it doubles when full.
    """

    def __init__(self, path: str | os.PathLike, retention_days: int = 30, condense_after: int = DAY,
                 map_size: int = 1 << 32) -> None:
        if isinstance(retention_days, bool) or not isinstance(retention_days, int) or retention_days < 0:
            raise CidrStoreError(f"retention_days must be an int ≥ 0, not {retention_days!r}")
        if isinstance(condense_after, bool) or not isinstance(condense_after, int) or condense_after < 0:
            raise CidrStoreError(f"condense_after must be an int ≥ 0 seconds, not {condense_after!r}")
        self.path = os.fspath(path)
        self.retention_days = retention_days
        self.condense_after = condense_after
        try:
            os.makedirs(self.path, exist_ok=True)
            self._env = lmdb.open(self.path, map_size=map_size, max_dbs=4, subdir=True)
        except (OSError, lmdb.Error) as exc:
            raise CidrStoreError(f"cannot open CIDR store at {self.path}: {exc}") from None
        self._hour = self._env.open_db(b"hour")
        self._day = self._env.open_db(b"day")
        self._seen = self._env.open_db(b"seen")
        self._meta = self._env.open_db(b"meta")

    def close(self) -> None:
        """Close the LMDB environment."""
        self._env.close()

    def __enter__(self) -> "CidrStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, work: Callable[[lmdb.Transaction], object]) -> object:
        """Run ``work`` in one write transaction, growing the map when it is full."""
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    return work(txn)
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)

    def _watermark(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"expired_before", db=self._meta)
        return struct.unpack(">q", raw)[0] if raw else 0

    # -- input --

    def add_window(self, node: str, window: Window) -> bool:
        """Count one window from ``node``; False if it was already counted or is past retention."""
        return self.add_windows(node, [window]) == 1

    def add_windows(self, node: str, windows: Iterable[Window]) -> int:
        """Count many windows from ``node`` in one transaction; returns how many were new.

        Idempotent per (node, series, window start).  Raises :class:`CidrStoreError`
        on a malformed window (then nothing of the batch is stored).
        """
        if not isinstance(node, str) or not node:
            raise CidrStoreError(f"node must be a non-empty name, not {node!r:.40}")
        batch = list(windows)
        for w in batch:
            if not isinstance(w, Window):
                raise CidrStoreError(f"expected a Window, got {type(w).__name__}")
            if not isinstance(w.series, str) or not _SERIES_RE.fullmatch(w.series):
                raise CidrStoreError(f"invalid series name {w.series!r:.80}")
            if w.start.__class__ not in (int, float) or not math.isfinite(w.start) or w.start < 0:
                raise CidrStoreError(f"window start {w.start!r:.40} is not a time after 1970")
        records = [_record_from_window(w) for w in batch]  # numpy work outside the write lock

        def work(txn: lmdb.Transaction) -> int:
            watermark = self._watermark(txn)
            targets: dict[tuple[bool, bytes], list[_Record]] = {}
            applied = 0
            for w, rec in zip(batch, records):
                day = _floor(w.start, DAY)
                if day < watermark:
                    continue
                seen = struct.pack(">qd", day, w.start) + w.series.encode() + b"\0" + node.encode()
                if not txn.put(seen, b"", db=self._seen, overwrite=False):
                    continue
                applied += 1
                day_key = _rkey(w.series, day)
                condensed = txn.get(day_key, db=self._day) is not None
                target = (True, day_key) if condensed else (False, _rkey(w.series, _floor(w.start, HOUR)))
                targets.setdefault(target, []).append(rec)
            for (is_day, key), recs in targets.items():
                db = self._day if is_day else self._hour
                old = txn.get(key, db=db)
                if old is not None:
                    recs.insert(0, _Record.decode(old, key.hex()))
                txn.put(key, _merge_records(recs).encode(), db=db)
            return applied

        return int(self._write(work))  # type: ignore[arg-type]

    # -- maintenance --

    def condense(self, now: float) -> int:
        """Merge the hour records of every day that ended ``condense_after`` ago into day records.

        Returns the number of day records written.  Totals are unchanged.
        """
        limit = _floor(now - self.condense_after, DAY)  # days starting before this have ended long enough

        def work(txn: lmdb.Transaction) -> int:
            groups: dict[tuple[str, int], list[bytes]] = {}
            for key in txn.cursor(db=self._hour).iternext(keys=True, values=False):
                series, start = _split_rkey(bytes(key))
                day = _floor(start, DAY)
                if day + DAY <= limit:
                    groups.setdefault((series, day), []).append(bytes(key))
            for (series, day), keys in groups.items():
                day_key = _rkey(series, day)
                recs = [_Record.decode(txn.get(k, db=self._hour), k.hex()) for k in keys]
                old = txn.get(day_key, db=self._day)
                if old is not None:
                    recs.insert(0, _Record.decode(old, day_key.hex()))
                txn.put(day_key, _merge_records(recs).encode(), db=self._day)
                for k in keys:
                    txn.delete(k, db=self._hour)
            return len(groups)

        return int(self._write(work))  # type: ignore[arg-type]

    def expire(self, now: float) -> int:
        """Drop every record of a UTC day before today minus ``retention_days``; returns records dropped."""
        cutoff = _floor(now, DAY) - self.retention_days * DAY

        def work(txn: lmdb.Transaction) -> int:
            watermark = max(self._watermark(txn), cutoff, 0)
            txn.put(b"expired_before", struct.pack(">q", watermark), db=self._meta)
            dropped = 0
            for db in (self._hour, self._day):
                doomed = [bytes(k) for k in txn.cursor(db=db).iternext(keys=True, values=False)
                          if _split_rkey(bytes(k))[1] < watermark]
                for k in doomed:
                    txn.delete(k, db=db)
                dropped += len(doomed)
            cursor = txn.cursor(db=self._seen)
            end = struct.pack(">q", watermark)
            if cursor.first():
                while cursor.key()[:8] < end:
                    if not cursor.delete():
                        break
            return dropped

        return int(self._write(work))  # type: ignore[arg-type]

    def maintain(self, now: float) -> tuple[int, int]:
        """:meth:`condense` then :meth:`expire`; returns (days condensed, records dropped)."""
        return self.condense(now), self.expire(now)

    # -- queries --

    def series_names(self) -> list[str]:
        """Every series that holds data, sorted."""
        with self._env.begin() as txn:
            return sorted(self._spans(txn))

    def _spans(self, txn: lmdb.Transaction) -> dict[str, list[tuple[int, int]]]:
        spans: dict[str, list[tuple[int, int]]] = {}
        for db, unit in ((self._day, DAY), (self._hour, HOUR)):
            for key in txn.cursor(db=db).iternext(keys=True, values=False):
                series, start = _split_rkey(bytes(key))
                spans.setdefault(series, []).append((start, start + unit))
        return spans

    def execute(self, query: Query | str, now: float | None = None) -> Result:
        """Answer a parsed query (or query text, parsed here); ``now`` defaults to the clock."""
        if isinstance(query, str):
            query = parse_query(query)
        if now is None:
            now = time.time()
        with self._env.begin() as txn:
            if isinstance(query, ShowAvailable):
                return self._available(txn)
            if isinstance(query, CountQuery):
                return self._count(txn, query, now)
        raise CidrStoreError(f"not a query: {type(query).__name__}")

    def _available(self, txn: lmdb.Transaction) -> AvailableResult:
        out = []
        for series, spans in sorted(self._spans(txn).items()):
            merged: list[list[int]] = []
            for a, b in sorted(spans):
                if merged and a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            out.append(SeriesSpan(series, tuple((a, b) for a, b in merged)))
        return AvailableResult(tuple(out))

    def _records(self, txn: lmdb.Transaction, series: str, lo: int, hi: int | None) -> list[tuple[int, _Record]]:
        """(start, record) of every hour/day record of ``series`` overlapping ``[lo, hi)``."""
        found = []
        prefix = series.encode() + b"\0"
        for db, unit in ((self._day, DAY), (self._hour, HOUR)):
            cursor = txn.cursor(db=db)
            if not cursor.set_range(_rkey(series, max(0, lo - unit + 1))):
                continue
            for key, value in cursor:
                if not key.startswith(prefix):
                    break
                start = struct.unpack(">q", key[-8:])[0]
                if hi is not None and start >= hi:
                    break
                found.append((start, _Record.decode(value, key.hex())))
        return found

    def _count(self, txn: lmdb.Transaction, query: CountQuery, now: float) -> CountResult:
        if query.when is None:
            lo, hi = _floor(now, HOUR) - 23 * HOUR, None
        else:
            lo, hi = query.when.bounds()
        per_series = {s: self._records(txn, s, lo, hi) for s in query.series}
        unknown = tuple(s for s, recs in per_series.items() if not recs and not self._has_series(txn, s))
        if query.aggregate_daily:
            days = sorted({_floor(start, DAY) for recs in per_series.values() for start, _ in recs})
            parts = [(time.strftime("%Y%m%d", time.gmtime(day)),
                      {s: [r for start, r in recs if _floor(start, DAY) == day] for s, recs in per_series.items()})
                     for day in days]
        else:
            parts = [(None, {s: [r for _, r in recs] for s, recs in per_series.items()})]
        rows: list[Row] = []
        for day, records in parts:
            if query.union:
                columns = [[r for s in query.series for r in records[s]]]
            else:
                columns = [records[s] for s in query.series]
            rows.extend(_rows(query, columns, day))
        return CountResult(query, query.columns(), lo, hi, tuple(rows), unknown)

    def _has_series(self, txn: lmdb.Transaction, series: str) -> bool:
        prefix = series.encode() + b"\0"
        for db in (self._day, self._hour):
            cursor = txn.cursor(db=db)
            if cursor.set_range(prefix) and cursor.key().startswith(prefix):
                return True
        return False


def _rows(query: CountQuery, columns: list[list[_Record]], day: str | None) -> list[Row]:
    """Rows of one partition (all data, or one day): group, join, threshold, order, limit."""
    block = query.block
    levels = query.prefix_lengths()
    finest = levels[-1]
    base = [_groups_at(recs, block, finest) for recs in columns]
    chunks = []  # (level, keys, matrix)
    for level in reversed(levels):
        if level == finest:
            per_col = base
        else:
            per_col = [_reduce_runs(_coarsen(keys, block.version, finest, level), counts) for keys, counts in base]
        keys, matrix = _join(per_col)
        chunks.append((level, keys, matrix))
    chunks.reverse()  # shortest prefix first
    level_arr = np.concatenate([np.full(len(m), lv, np.int64) for lv, _, m in chunks])
    net_parts = [_networks(k, block.version, lv) for lv, k, _ in chunks]
    net_hi = np.concatenate([h for h, _ in net_parts])
    net_lo = np.concatenate([l for _, l in net_parts])
    matrix = np.concatenate([m for _, _, m in chunks]) if chunks else np.zeros((0, len(columns)), np.int64)
    total = matrix.sum(axis=1)
    keep = total > 0
    if query.threshold is not None:
        keep &= total >= query.threshold
    idx = np.flatnonzero(keep)
    if query.order == "count":
        if query.limit is not None and query.limit < len(idx):
            # only rows whose total reaches the limit-th largest can make the cut
            kth = np.partition(total[idx], len(idx) - query.limit)[len(idx) - query.limit]
            idx = idx[total[idx] >= kth]
        order = np.lexsort((level_arr[idx], net_lo[idx], net_hi[idx], -total[idx]))
        idx = idx[order]
    elif len(chunks) > 1:
        idx = idx[np.lexsort((level_arr[idx], net_lo[idx], net_hi[idx]))]
    # (one prefix length: groups are already in address order)
    if query.limit is not None:
        idx = idx[:query.limit]
    version = block.version
    rows = []
    for i in idx.tolist():
        address = int(net_lo[i]) if version == 4 else (int(net_hi[i]) << 64) | int(net_lo[i])
        cidr = f"{format_address(version, address)}/{int(level_arr[i])}"
        rows.append(Row(cidr, tuple(int(c) for c in matrix[i]), day))
    return rows
