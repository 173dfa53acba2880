"""Postfix's log file into the node's journal, every line exactly once: the pure parts.

Postfix (postlogd, ``maillog_file``) appends lines to ``<data_dir>/postfix/log/maillog``.
The plug-in reads complete lines from a byte offset of one file (named by its inode), sends
them as one ``jlog.write`` batch, then counts the batch's ``connect from`` lines in
as_logger, and only then moves on. Its position lives in a small state file, written
atomically (:class:`TailState`):

* before a write: ``pending`` = the batch (inode, start, end, lines) and ``seq`` = the
  journal's last sequence number after our previous write;
* after the write's answer: ``offset`` = end, ``seq`` = the answer's last_seq,
  ``audit`` = (inode, start, end) until as_logger has counted that batch.

After a crash, :func:`landed` tells how many lines of a pending batch the journal holds:
the journal's last sequence number minus ``seq`` (this plug-in is the only writer of its
log on a Postfix node: docs/POSTFIX.md). A batch is all-or-nothing for a reader that then
resumes at the right line, so no line is lost or doubled. The as_logger batch carries the
id ``[sender, start]`` (sender names the file), so a batch counted before a crash is
recognised as a replay when it is sent again.

Rotation: ``postfix logrotate`` renames the file and Postfix reopens a new one. The reader
keeps reading the renamed file (same inode) to its end, waits a grace period for the last
lines postlogd wrote before reopening, removes it, then starts on the new file at 0.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

#: ``postfix/smtpd[123]: connect from name[1.2.3.4]`` (any syslog_name ending in /smtpd)
CONNECT_RE = re.compile(rb"[\w.-]+(?:/[\w.-]+)*/smtpd\[\d+\]: connect from [^\s\[]*\[([0-9A-Fa-f.:]+)\]")
MAX_LINE = 64 * 1024       # a longer "line" is cut into pieces of this size


@dataclass
class TailState:
    """What the state file holds (see the module docstring)."""

    ino: int = 0
    offset: int = 0
    seq: int | None = None                   # journal last_seq after our last acknowledged write
    pending: dict | None = None              # {"ino", "start", "end", "lines"}
    audit: dict | None = None                # {"ino", "start", "end"}
    lost_lines_alarms: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> "TailState":
        if not isinstance(d, dict):
            return cls()
        out = cls()
        for k in ("ino", "offset", "lost_lines_alarms"):
            if isinstance(d.get(k), int) and not isinstance(d.get(k), bool) and d[k] >= 0:
                setattr(out, k, d[k])
        if isinstance(d.get("seq"), int) and not isinstance(d.get("seq"), bool):
            out.seq = d["seq"]
        for k in ("pending", "audit"):
            v = d.get(k)
            if isinstance(v, dict) and all(isinstance(v.get(x), int) for x in ("ino", "start", "end")):
                setattr(out, k, v)
        return out


def split_lines(buf: bytes, base: int) -> tuple[list[tuple[int, bytes]], int]:
    """Complete lines of ``buf`` (read at file offset ``base``) as (offset, line without the
    newline), and the offset just past the last complete line. A partial last line stays
    for the next read, except one longer than MAX_LINE, which is cut. Pure."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    n = len(buf)
    while pos < n:
        nl = buf.find(b"\n", pos, pos + MAX_LINE + 1)
        if nl < 0:
            if n - pos > MAX_LINE:
                out.append((base + pos, buf[pos:pos + MAX_LINE]))
                pos += MAX_LINE
                continue
            break
        out.append((base + pos, buf[pos:nl]))
        pos = nl + 1
    return out, base + pos


def landed(journal_last_seq: int, seq_before: int | None, lines: int) -> int:
    """How many lines of a pending batch of ``lines`` the journal holds, given its last
    sequence number now and ours before the batch. Pure."""
    if seq_before is None:
        return 0
    return max(0, min(lines, journal_last_seq - seq_before))


def connect_events(lines: list[bytes]) -> list[list]:
    """as_logger events ``["connections", ip, count]`` for the ``connect from`` lines. Pure."""
    counts: dict[str, int] = {}
    for line in lines:
        m = CONNECT_RE.search(line)
        if m:
            ip = m.group(1).decode("ascii")
            counts[ip] = counts.get(ip, 0) + 1
    return [["connections", ip, n] for ip, n in sorted(counts.items())]


def audit_sender(member: str, ino: int) -> str:
    """The as_logger sender of one log file's batches (its seq is the batch's start offset). Pure."""
    return f"postfix-{member}-{ino}"


@dataclass
class Rotation:
    """A renamed log file being read to its end before the new one is started."""

    ino: int
    seen_at: float                          # monotonic time the rename was noticed
    quiet_since: float = field(default=0.0)  # monotonic time of the last growth seen
