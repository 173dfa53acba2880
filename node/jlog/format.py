"""On-disk format of a jlog segment: pure functions, bytes in and bytes out.

A segment file is named by the sequence number of its first record, zero-padded to 20
digits: ``00000000000000000001.seg``. It starts with a 16-byte header::

    magic   8 bytes  b"ECJLOG\\x00\\x01"  (format version 1)
    first   u64 LE   sequence number of the first record (equals the file name)

followed by records, back to back, each::

    crc     u32 LE   CRC-32 of the 12 bytes (length, seq) followed by the payload
    length  u32 LE   payload length in bytes
    seq     u64 LE   the record id: global, strictly increasing by 1 within a segment
    payload length bytes

The CRC covers the length and the sequence number as well as the payload, so a torn
header cannot pass for a record. A record whose seq is not the expected next one is
treated as invalid too: zero-filled blocks after a crash never look like records.

Nothing here touches the file system; `node.jlog.journal` does the I/O.
"""

from __future__ import annotations

import re
import struct
import zlib
from bisect import bisect_right
from itertools import accumulate
from dataclasses import dataclass, field
from typing import Sequence

SEGMENT_MAGIC = b"ECJLOG\x00\x01"
SEGMENT_SUFFIX = ".seg"
_SEG_HEADER = struct.Struct("<8sQ")
SEGMENT_HEADER_SIZE = _SEG_HEADER.size  # 16

_REC_HEADER = struct.Struct("<IIQ")  # crc, length, seq
_LEN_SEQ = struct.Struct("<IQ")  # the bytes the crc covers before the payload
RECORD_HEADER_SIZE = _REC_HEADER.size  # 16
MAX_PAYLOAD = 0x7FFF_FFFF  # a u32 length field; keep clear of the sign bit
MAX_SEQ = 0xFFFF_FFFF_FFFF_FFFF

# Every INDEX_STRIDE-th sequence number gets an entry in the in-memory position index.
INDEX_STRIDE = 128

_SEGMENT_NAME_RE = re.compile(r"^(\d{20})\.seg$")


class JournalError(Exception):
    """Base class of every error raised by the journal; the message is one line."""


class JournalConfigError(JournalError):
    """Invalid argument given when opening or using a journal."""


class JournalLocked(JournalError):
    """The log directory is already open for writing by another Journal (or process)."""


class JournalClosed(JournalError):
    """The journal was closed."""


class JournalFull(JournalError):
    """The disk budget does not allow this append (policy "block"); nothing was written."""


class JournalCorrupt(JournalError):
    """A segment holds bytes that are not valid records where valid records must be."""


class CheckpointError(JournalError):
    """A checkpoint would move backwards or beyond the last written record."""


class UnknownSubscriber(JournalError):
    """The subscriber is not declared on this log."""


class SubscriberStalled(JournalError):
    """The subscriber's checkpoint is beyond the records recovered after a crash."""


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first record is ``first_seq``."""
    if not 0 < first_seq <= MAX_SEQ:
        raise JournalConfigError(f"segment first seq out of range: {first_seq}")
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """First sequence number encoded in a segment file name, or None if it is not one."""
    match = _SEGMENT_NAME_RE.match(name)
    if match is None:
        return None
    first = int(match.group(1))
    return first if first > 0 else None


def encode_segment_header(first_seq: int) -> bytes:
    """The 16-byte header that opens a segment file."""
    return _SEG_HEADER.pack(SEGMENT_MAGIC, first_seq)


def decode_segment_header(data: bytes) -> int:
    """First seq stored in a segment header; JournalCorrupt if the header is not ours."""
    if len(data) < SEGMENT_HEADER_SIZE:
        raise JournalCorrupt(f"segment header truncated ({len(data)} of {SEGMENT_HEADER_SIZE} bytes)")
    magic, first = _SEG_HEADER.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        raise JournalCorrupt(f"bad segment magic {magic!r}")
    return first


def record_size(payload_len: int) -> int:
    """Bytes a record with a payload of ``payload_len`` bytes takes on disk."""
    return RECORD_HEADER_SIZE + payload_len


def encode_record(seq: int, payload: bytes) -> bytes:
    """One record, header and payload."""
    blob, _count, _index = encode_records(seq, [payload])
    return blob


def encode_records(
    first_seq: int,
    payloads: Sequence[bytes],
    start: int = 0,
    room: int | None = None,
    base_offset: int = 0,
) -> tuple[bytes, int, list[tuple[int, int]]]:
    """Encode ``payloads[start:]`` as records numbered from ``first_seq``.

    Stops before the record that would make the blob exceed ``room`` bytes, except that
    the first record is always taken (a record larger than a segment gets a segment of
    its own). Returns ``(blob, count, index)`` where ``index`` lists ``(seq, offset)``
    for every seq divisible by INDEX_STRIDE, offsets counted from ``base_offset``.
    Raises JournalError for a payload that is not bytes-like or too large.
    """
    chunk = payloads[start:] if start else payloads
    try:
        lengths = list(map(len, chunk))
    except TypeError:
        bad = next(p for p in chunk if not hasattr(p, "__len__"))
        raise JournalError(f"payload must be bytes, got {type(bad).__name__}") from None
    # Cumulative payload bytes before each record: offsets without a per-record add.
    before = list(accumulate(lengths, initial=0))
    count = len(chunk)
    if room is not None and before[count] + RECORD_HEADER_SIZE * count > room:
        # Largest count that fits, but at least one record.
        fits = bisect_right(range(1, count + 1), room, key=lambda k: before[k] + RECORD_HEADER_SIZE * k)
        count = max(1, fits)
        chunk = chunk[:count]
    if max(lengths[:count], default=0) > MAX_PAYLOAD:
        raise JournalError(f"payload of {max(lengths[:count])} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    parts: list[bytes] = []
    append = parts.append
    pack = _REC_HEADER.pack
    pack_len_seq = _LEN_SEQ.pack
    crc32 = zlib.crc32
    seq = first_seq
    try:
        for payload, n in zip(chunk, lengths):
            append(pack(crc32(payload, crc32(pack_len_seq(n, seq))), n, seq))
            append(payload)
            seq += 1
    except TypeError:
        bad = chunk[seq - first_seq]
        raise JournalError(f"payload must be bytes, got {type(bad).__name__}") from None
    first_indexed = -(-first_seq // INDEX_STRIDE) * INDEX_STRIDE
    index = [
        (s, base_offset + before[s - first_seq] + RECORD_HEADER_SIZE * (s - first_seq))
        for s in range(first_indexed, first_seq + count, INDEX_STRIDE)
    ]
    return b"".join(parts), count, index


@dataclass
class DecodeResult:
    """What `decode_records` found: records, where it stopped and why.

    ``stop`` is one of: ``"limit"`` (max_records or max_bytes reached), ``"end"`` (the
    buffer ended exactly on a record boundary), ``"partial"`` (the buffer ends inside a
    record; ``need`` is the full size of that record), ``"corrupt"`` (a complete record
    fails its checks; ``reason`` says which).
    """

    records: list[tuple[int, bytes]]
    pos: int
    next_seq: int
    payload_bytes: int
    stop: str
    need: int = 0
    reason: str = ""


def _check_record(buf, pos: int, expected_seq: int, end: int) -> tuple[str, int, str]:
    """Validate the record at ``pos``: ("ok"|"partial"|"corrupt", payload length, reason)."""
    if end - pos < RECORD_HEADER_SIZE:
        return "partial", 0, ""
    crc, n, seq = _REC_HEADER.unpack_from(buf, pos)
    if seq != expected_seq:
        return "corrupt", n, f"seq {seq} where {expected_seq} was expected"
    if n > MAX_PAYLOAD:
        return "corrupt", n, f"impossible length {n}"
    if end - pos < RECORD_HEADER_SIZE + n:
        return "partial", n, ""
    body = pos + RECORD_HEADER_SIZE
    actual = zlib.crc32(buf[body : body + n], zlib.crc32(_LEN_SEQ.pack(n, seq)))
    if actual != crc:
        return "corrupt", n, f"crc mismatch at seq {seq}"
    return "ok", n, ""


def decode_records(
    buf: bytes,
    pos: int,
    expected_seq: int,
    max_records: int,
    max_bytes: int,
    take_first_oversize: bool = True,
) -> DecodeResult:
    """Decode verified records from ``buf`` starting at ``pos``.

    Takes at most ``max_records`` records and stops before the payload total would exceed
    ``max_bytes`` -- except that when ``take_first_oversize`` is true the first record is
    taken whatever its size, so a big record cannot block a reader forever.
    """
    records: list[tuple[int, bytes]] = []
    append = records.append
    unpack = _REC_HEADER.unpack_from
    pack_len_seq = _LEN_SEQ.pack
    crc32 = zlib.crc32
    end = len(buf)
    seq = expected_seq
    total = 0
    while True:
        if len(records) >= max_records:
            return DecodeResult(records, pos, seq, total, "limit")
        if pos == end:
            return DecodeResult(records, pos, seq, total, "end")
        if end - pos < RECORD_HEADER_SIZE:
            return DecodeResult(records, pos, seq, total, "partial", need=RECORD_HEADER_SIZE)
        crc, n, rseq = unpack(buf, pos)
        if rseq != seq or n > MAX_PAYLOAD:
            _status, _n, reason = _check_record(buf, pos, seq, end)
            return DecodeResult(records, pos, seq, total, "corrupt", reason=reason)
        if total + n > max_bytes and (records or not take_first_oversize):
            return DecodeResult(records, pos, seq, total, "limit")
        body = pos + RECORD_HEADER_SIZE
        stop = body + n
        if stop > end:
            return DecodeResult(records, pos, seq, total, "partial", need=RECORD_HEADER_SIZE + n)
        payload = buf[body:stop]
        if crc32(payload, crc32(pack_len_seq(n, rseq))) != crc:
            return DecodeResult(records, pos, seq, total, "corrupt", reason=f"crc mismatch at seq {rseq}")
        append((rseq, payload))
        total += n
        pos = stop
        seq += 1


@dataclass
class ScanResult:
    """Outcome of scanning a segment body: how much of it is a valid record prefix."""

    valid_end: int  # offset just after the last valid record
    next_seq: int  # seq the next record must carry
    count: int  # valid records found
    index: list[tuple[int, int]] = field(default_factory=list)  # (seq, offset) every INDEX_STRIDE
    torn_bytes: int = 0  # bytes after valid_end (a torn tail or garbage)
    reason: str = ""  # why scanning stopped before the end, if it did


def scan_segment(data: bytes, first_seq: int, verify_crc: bool = True) -> ScanResult:
    """Find the longest valid prefix of records in a whole segment file's bytes.

    ``data`` includes the segment header. Everything after the first record that is
    partial, has the wrong seq, an impossible length or a bad CRC is a torn tail: the
    writer only ever appends, so valid records never follow an invalid one unless the
    disk itself corrupted data, which this format cannot tell from a torn write.
    """
    header_first = decode_segment_header(data)
    if header_first != first_seq:
        raise JournalCorrupt(f"segment header says first seq {header_first}, file name says {first_seq}")
    unpack = _REC_HEADER.unpack_from
    pack_len_seq = _LEN_SEQ.pack
    crc32 = zlib.crc32
    view = memoryview(data)
    end = len(data)
    pos = SEGMENT_HEADER_SIZE
    seq = first_seq
    index: list[tuple[int, int]] = []
    reason = ""
    while pos < end:
        if end - pos < RECORD_HEADER_SIZE:
            reason = "partial record header"
            break
        crc, n, rseq = unpack(data, pos)
        if rseq != seq:
            reason = f"seq {rseq} where {seq} was expected"
            break
        stop = pos + RECORD_HEADER_SIZE + n
        if stop > end:
            reason = f"partial record {seq}"
            break
        if verify_crc and crc32(view[pos + RECORD_HEADER_SIZE : stop], crc32(pack_len_seq(n, rseq))) != crc:
            reason = f"crc mismatch at seq {seq}"
            break
        if seq % INDEX_STRIDE == 0:
            index.append((seq, pos))
        pos = stop
        seq += 1
    return ScanResult(
        valid_end=pos,
        next_seq=seq,
        count=seq - first_seq,
        index=index,
        torn_bytes=end - pos,
        reason=reason,
    )


def skip_records(buf: bytes, pos: int, seq: int, target_seq: int) -> tuple[int, int, str]:
    """Walk record headers (no CRC check) from ``pos``/``seq`` towards ``target_seq``.

    Returns ``(pos, seq, stop)`` with stop ``"found"`` (seq == target_seq), ``"end"``
    (buffer exhausted on a record boundary or inside a header/payload -- read more from
    ``pos``) or ``"corrupt"`` (a header carries the wrong seq).
    """
    unpack = _REC_HEADER.unpack_from
    end = len(buf)
    while seq < target_seq:
        if end - pos < RECORD_HEADER_SIZE:
            return pos, seq, "end"
        _crc, n, rseq = unpack(buf, pos)
        if rseq != seq:
            return pos, seq, "corrupt"
        stop = pos + RECORD_HEADER_SIZE + n
        if stop > end:
            # The payload continues past the buffer; the next header is at `stop`.
            return stop, seq + 1, "end" if seq + 1 < target_seq else "found"
        pos = stop
        seq += 1
    return pos, seq, "found"
