"""as_logger engine: audit series of counts by source address, per time window.

A *series* (``connections``, ``rejects``, ...) counts events by source address
(IPv4 or IPv6).  Counting happens in windows of ``log_interval`` seconds that are
aligned to the epoch (``start = floor(t / log_interval) * log_interval``), so the
windows of every node in the cluster line up and a (node, series, start) triple
names one window for good.  Every interval the caller ``roll()``s the logger,
encodes each closed window with :func:`encode_window` and appends the bytes to the
node's ``audit`` journal; the manager decodes them with :func:`decode_window`.

Why a dict and not a CIDR tree: the window keeps exactly one dict per series
mapping the integer address to its count.  That *is* the leaf level of the CIDR
tree, and any prefix length can be summed from it in one linear pass
(:func:`sum_by_prefix`).  A real trie would cost one node visit per prefix bit on
every event (32 or 128 steps) in the hot path, while the dict costs one hash
probe; the summing is done rarely (once per query, on the manager, which keeps
sorted arrays where every prefix is a contiguous slice).  So the tree is
implicit: leaves in a dict, inner nodes computed on demand.

Addresses: IPv4 dotted quads and IPv6 text (a ``%scope`` suffix is ignored);
IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) count as the IPv4 address, since
a dual-stack listener reports IPv4 clients that way.

Not thread-safe: one logger belongs to one thread (or one asyncio loop).
"""

from __future__ import annotations

import math
import operator
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Pattern

import msgpack

__all__ = [
    "SERIES_NAME_PATTERN",
    "AuditError",
    "AuditAddressError",
    "AuditSeriesError",
    "AuditDecodeError",
    "Window",
    "AuditLogger",
    "AuditSeries",
    "parse_address",
    "format_address",
    "sum_by_prefix",
    "encode_window",
    "decode_window",
]

#: A series name: what the query language accepts as a name (no spaces, commas
#: or parentheses), short, and safe as part of an on-disk key.
SERIES_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}"
_SERIES_NAME_RE = re.compile(SERIES_NAME_PATTERN, re.ASCII)

_V6_TAG = 1 << 128  # internal key of an IPv6 address: address | _V6_TAG (never collides with IPv4)
_V4_MAPPED_BASE = 0xFFFF << 32
_MAX_COUNT = (1 << 63) - 1  # the manager keeps counts in int64
_FORMAT_TAG = "aw1"  # first element of an encoded window: format name + version


class AuditError(ValueError):
    """Base class of as_logger errors (a ValueError: all are bad input)."""


class AuditAddressError(AuditError):
    """An address that is neither IPv4 nor IPv6 text."""


class AuditSeriesError(AuditError):
    """A series name that does not match :data:`SERIES_NAME_PATTERN`."""


class AuditDecodeError(AuditError):
    """Bytes that are not an encoded audit window."""


@dataclass(frozen=True)
class Window:
    """One closed window of one series.

    ``counts`` maps ``(version, int_address)`` (version 4 or 6) to a count ≥ 1.
    ``start``/``end`` are epoch seconds (ints when ``log_interval`` is an int).
    """

    series: str
    start: float
    end: float
    counts: Mapping[tuple[int, int], int] = field(default_factory=dict)

    def total(self) -> int:
        """Sum of all counts in the window."""
        return sum(self.counts.values())


def parse_address(text: str) -> tuple[int, int]:
    """Parse IPv4/IPv6 text into ``(version, int_address)``.

    IPv4-mapped IPv6 becomes IPv4; an IPv6 ``%scope`` is dropped.
    Raises :class:`AuditAddressError` on anything else.
    """
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, TypeError, ValueError):
        pass
    try:
        host = text.split("%", 1)[0]
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, host), "big")
    except (OSError, TypeError, ValueError, AttributeError):
        raise AuditAddressError(f"not an IPv4 or IPv6 address: {text!r:.80}") from None
    if value >> 32 == 0xFFFF:
        return 4, value - _V4_MAPPED_BASE
    return 6, value


def format_address(version: int, address: int) -> str:
    """Text form of ``(version, int_address)`` (inverse of :func:`parse_address`)."""
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, address.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, address.to_bytes(16, "big"))


def sum_by_prefix(counts: Mapping[tuple[int, int], int], prefixlen: int, version: int) -> dict[int, int]:
    """Sum ``counts`` of one IP version by network prefix of length ``prefixlen``.

    Returns ``{network_int: count}`` where ``network_int`` is the network address
    (host bits zero).  One pass over the leaves; see the module docstring for why
    this replaces a stored tree.
    """
    bits = 32 if version == 4 else 128 if version == 6 else 0
    if not bits:
        raise ValueError(f"version must be 4 or 6, not {version!r}")
    if not 0 <= prefixlen <= bits:
        raise ValueError(f"prefix length {prefixlen} out of range 0..{bits} for IPv{version}")
    shift = bits - prefixlen
    sums: dict[int, int] = {}
    get = sums.get
    for (v, address), count in counts.items():
        if v == version:
            net = address >> shift << shift
            sums[net] = get(net, 0) + count
    return sums


class _Skip:
    """Marker for a series that include/exclude leave out (never counted)."""

    __slots__ = ()


_SKIP = _Skip()


class AuditLogger:
    """Counts events per series and source address in epoch-aligned windows.

    ``include``/``exclude`` are regexes (``re.search`` semantics; anchor them with
    ``^…$`` for exact names): a series is logged when it matches ``include`` (or
    ``include`` is None) and does not match ``exclude``.

    An event lands in the window that contains ``clock()`` at the time of the
    call, so a late :meth:`roll` never moves events across windows.  If the clock
    steps back into a window that was already rolled, the event goes to the
    oldest window still open (a closed window is never reopened).
    """

    def __init__(
        self,
        log_interval: float = 60,
        include: str | Pattern[str] | None = None,
        exclude: str | Pattern[str] | None = None,
        clock: Callable[[], float] = time.time,
        address_cache_size: int = 65536,
    ) -> None:
        if isinstance(log_interval, bool) or not isinstance(log_interval, (int, float)) \
                or not math.isfinite(log_interval) or log_interval <= 0:
            raise ValueError(f"log_interval must be a positive number of seconds, not {log_interval!r}")
        self.log_interval = log_interval
        self._include = re.compile(include) if isinstance(include, str) else include
        self._exclude = re.compile(exclude) if isinstance(exclude, str) else exclude
        self._clock = clock
        self._cache_limit = address_cache_size
        # parsed-address cache: text -> internal int key (v6 tagged); bounded, cleared when full
        self._keys: dict[str, int] = {}
        self._logged: dict[str, bool] = {}
        # open windows: start -> {series: {key: count}}
        self._open: dict[float, dict[str, object]] = {}
        self._closed_until: float = -math.inf
        self._cur_start: float = math.inf  # forces _switch on first event
        self._cur_end: float = -math.inf
        self._cur: dict[str, object] = {}

    # -- configuration --------------------------------------------------------

    def is_logged(self, series: str) -> bool:
        """True when ``series`` is a valid name chosen by include/exclude."""
        decision = self._logged.get(series)
        if decision is None:
            if not isinstance(series, str) or not _SERIES_NAME_RE.fullmatch(series):
                raise AuditSeriesError(f"invalid series name {series!r:.80}: must match {SERIES_NAME_PATTERN}")
            decision = (self._include is None or self._include.search(series) is not None) and (
                self._exclude is None or self._exclude.search(series) is None
            )
            self._logged[series] = decision
        return decision

    # -- hot path -------------------------------------------------------------

    def add(self, series: str, address: str, count: int = 1) -> None:
        """Count ``count`` events of ``series`` from ``address`` now."""
        now = self._clock()
        if not self._cur_start <= now < self._cur_end:
            self._switch(now)
        bucket = self._cur.get(series)
        if bucket is None:
            bucket = self._open_bucket(series)
        if bucket is _SKIP:
            return
        key = self._keys.get(address)
        if key is None:
            key = self._learn(address)
        if count.__class__ is not int or count < 1:
            raise AuditError(f"count must be a positive int, not {count!r:.40}")
        bucket[key] = bucket.get(key, 0) + count  # type: ignore[union-attr]

    def add_batch(self, events: Iterable[tuple[str, str, int]]) -> None:
        """Count many ``(series, address, count)`` events at the current time.

        Events before a bad one are counted; the bad one raises.
        """
        now = self._clock()
        if not self._cur_start <= now < self._cur_end:
            self._switch(now)
        current = self._cur
        keys = self._keys
        for series, address, count in events:
            bucket = current.get(series)
            if bucket is None:
                bucket = self._open_bucket(series)
            if bucket is _SKIP:
                continue
            key = keys.get(address)
            if key is None:
                key = self._learn(address)
            if count.__class__ is not int or count < 1:
                raise AuditError(f"count must be a positive int, not {count!r:.40}")
            bucket[key] = bucket.get(key, 0) + count  # type: ignore[union-attr]

    def _learn(self, address: str) -> int:
        version, value = parse_address(address)
        key = value if version == 4 else value | _V6_TAG
        if len(self._keys) >= self._cache_limit:
            self._keys.clear()  # bounded memory under address spraying; refilled on demand
        self._keys[address] = key
        return key

    def _open_bucket(self, series: str) -> object:
        bucket: object = {} if self.is_logged(series) else _SKIP
        self._cur[series] = bucket
        return bucket

    def _switch(self, now: float) -> None:
        interval = self.log_interval
        start = math.floor(now / interval) * interval
        if start < self._closed_until:
            start = self._closed_until  # clock stepped back into a rolled window
        current = self._open.get(start)
        if current is None:
            current = self._open[start] = {}
        self._cur = current
        self._cur_start = start
        self._cur_end = start + interval

    # -- rolling --------------------------------------------------------------

    def roll(self, now: float | None = None) -> list[Window]:
        """Close every window whose interval ended at or before ``now``.

        Returns one :class:`Window` per series that counted something, oldest
        first; empty series produce no window.  ``now`` defaults to ``clock()``.
        """
        if now is None:
            now = self._clock()
        due = sorted(start for start in self._open if start + self.log_interval <= now)
        return self._close(due)

    def flush(self) -> list[Window]:
        """Close every open window now, ended or not (for shutdown)."""
        return self._close(sorted(self._open))

    def _close(self, starts: list[float]) -> list[Window]:
        windows: list[Window] = []
        for start in starts:
            per_series = self._open.pop(start)
            end = start + self.log_interval
            self._closed_until = max(self._closed_until, end)
            for series, bucket in sorted(per_series.items(), key=lambda item: item[0]):
                if bucket is _SKIP or not bucket:
                    continue
                counts = {
                    ((4, key) if key < _V6_TAG else (6, key ^ _V6_TAG)): count
                    for key, count in bucket.items()  # type: ignore[union-attr]
                }
                windows.append(Window(series, start, end, counts))
            if per_series is self._cur:
                self._cur = {}
                self._cur_start, self._cur_end = math.inf, -math.inf
        return windows

    def open_windows(self) -> list[float]:
        """Starts of the windows still open (for status output)."""
        return sorted(self._open)


#: The brief's other name for the engine.
AuditSeries = AuditLogger


# -- wire form ----------------------------------------------------------------
#
# msgpack array: ["aw1", series, start, end, v4_addrs, v4_counts, v6_addrs, v6_counts]
# v4_addrs: bin of 4-byte big-endian addresses, strictly ascending;
# v6_addrs: bin of 16-byte big-endian addresses, strictly ascending;
# *_counts: arrays of positive ints, one per address (msgpack packs small ints in 1 byte).


def encode_window(window: Window) -> bytes:
    """Encode a window compactly (sorted packed addresses + msgpack ints)."""
    v4: list[tuple[int, int]] = []
    v6: list[tuple[int, int]] = []
    for (version, address), count in window.counts.items():
        (v4 if version == 4 else v6).append((address, count))
    v4.sort()
    v6.sort()
    v4_addrs = struct.pack(f">{len(v4)}I", *(a for a, _ in v4))
    v6_addrs = b"".join(a.to_bytes(16, "big") for a, _ in v6)
    return msgpack.packb(
        [_FORMAT_TAG, window.series, window.start, window.end,
         v4_addrs, [c for _, c in v4], v6_addrs, [c for _, c in v6]],
        use_bin_type=True,
    )


def _fail(why: str) -> AuditDecodeError:
    return AuditDecodeError(f"not an audit window: {why}")


def _check_counts(counts: object, n: int, family: str) -> list[int]:
    if not isinstance(counts, list) or len(counts) != n:
        raise _fail(f"{family} counts must be a list of {n} ints")
    for c in counts:
        if c.__class__ is not int or not 1 <= c <= _MAX_COUNT:
            raise _fail(f"{family} count {c!r:.40} is not an int in 1..2^63-1")
    return counts


def decode_window(data: bytes) -> Window:
    """Decode bytes from :func:`encode_window`; raise :class:`AuditDecodeError` on anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _fail(f"expected bytes, got {type(data).__name__}")
    try:
        item = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage; all mean the same here
        raise _fail(f"bad msgpack ({type(exc).__name__})") from None
    if not isinstance(item, list) or len(item) != 8:
        raise _fail("expected an array of 8 items")
    tag, series, start, end, v4_addrs, v4_counts, v6_addrs, v6_counts = item
    if tag != _FORMAT_TAG:
        raise _fail(f"unknown format tag {tag!r:.40}")
    if not isinstance(series, str) or not _SERIES_NAME_RE.fullmatch(series):
        raise _fail(f"bad series name {series!r:.80}")
    for bound in (start, end):
        if bound.__class__ not in (int, float) or not math.isfinite(bound):
            raise _fail(f"window bound {bound!r:.40} is not a finite number")
    if not start < end:
        raise _fail("window start must be before its end")
    if not isinstance(v4_addrs, bytes) or len(v4_addrs) % 4:
        raise _fail("IPv4 addresses must be bytes of a multiple of 4")
    if not isinstance(v6_addrs, bytes) or len(v6_addrs) % 16:
        raise _fail("IPv6 addresses must be bytes of a multiple of 16")
    a4 = struct.unpack(f">{len(v4_addrs) // 4}I", v4_addrs)
    a6 = [int.from_bytes(v6_addrs[i:i + 16], "big") for i in range(0, len(v6_addrs), 16)]
    c4 = _check_counts(v4_counts, len(a4), "IPv4")
    c6 = _check_counts(v6_counts, len(a6), "IPv6")
    if not all(map(operator.lt, a4, a4[1:])) or not all(map(operator.lt, a6, a6[1:])):
        raise _fail("addresses must be strictly ascending")
    counts: dict[tuple[int, int], int] = {(4, a): c for a, c in zip(a4, c4)}
    counts.update(((6, a), c) for a, c in zip(a6, c6))
    return Window(series, start, end, counts)
