"""Turn probe.py records into failover figures.

Records are (t0, t1, who) attempts -- tuples, probe.ProbeRecord or dicts with those keys --
where `who` is the answering node's name or None. Times are on the time.time() scale.

Definitions used here:
- an *answer instant* is the t1 of an answered attempt (when the name was received);
- a *gap* is the time between consecutive answer instants, clipped to the window asked for
  and to the span the log covers (never claims an outage the probe did not observe).

Attempts overlap (probe.py starts one every few ms without waiting for the previous one), so
an attempt started earlier may be answered later (e.g. its SYN was lost): "the first answer
after t" is the earliest answer instant among attempts started at or after t, not the answer
of the earliest-started attempt.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from typing import Iterable, NamedTuple


class ProbeAnalysisError(Exception):
    """Malformed probe records or a bad query window."""


class Attempt(NamedTuple):
    """One normalised probe attempt."""
    t0: float
    t1: float
    who: str | None


@dataclass(frozen=True)
class Gap:
    """A window without any answer: [start, end]."""
    start: float
    end: float

    @property
    def length(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Run:
    """Consecutive attempts with the same outcome: `who` answered (None: nobody did)."""
    who: str | None
    first_t0: float
    last_t1: float
    attempts: int


def _normalise(record) -> Attempt:
    try:
        if isinstance(record, dict):
            t0, t1, who = record["t0"], record["t1"], record.get("who")
        else:
            t0, t1, who = record[0], record[1], record[2]
        t0, t1 = float(t0), float(t1)
    except (KeyError, IndexError, TypeError, ValueError):
        raise ProbeAnalysisError(f"not a probe record (t0, t1, who): {record!r}") from None
    if t1 < t0:
        raise ProbeAnalysisError(f"probe record ends before it starts: {record!r}")
    if who is not None and not isinstance(who, str):
        raise ProbeAnalysisError(f"'who' must be a string or None: {record!r}")
    return Attempt(t0, t1, who or None)


def parse_lines(lines: str | Iterable[str]) -> list[Attempt]:
    """Records from probe.py's JSON-lines output (text or an iterable of lines)."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            out.append(_normalise(json.loads(line)))
        except json.JSONDecodeError as e:
            raise ProbeAnalysisError(f"line {n} is not JSON: {e}") from None
    return out


class ProbeAnalysis:
    """Queries over one probe log (attempts sorted by start time)."""

    def __init__(self, records: Iterable):
        self.attempts: list[Attempt] = sorted((_normalise(r) for r in records),
                                              key=lambda a: (a.t0, a.t1))

    @property
    def answered(self) -> list[Attempt]:
        return [a for a in self.attempts if a.who is not None]

    def last_answer_before(self, t: float) -> Attempt | None:
        """The last attempt answered (t1) at or before `t`."""
        best = None
        for a in self.answered:
            if a.t1 <= t and (best is None or a.t1 >= best.t1):
                best = a
        return best

    def first_answer(self, t: float, who: str | None = None) -> Attempt | None:
        """The earliest answer (by t1) to an attempt started at or after `t` (by `who` if given)."""
        found = [a for a in self.answered if a.t0 >= t and (who is None or a.who == who)]
        return min(found, key=lambda a: a.t1, default=None)

    def first_answer_by_other(self, t: float, owner: str | None = None) -> Attempt | None:
        """The earliest answer (by t1) to an attempt started at or after `t`, by a node other
        than `owner`.

        `owner` defaults to whoever answered last before `t`.
        """
        if owner is None:
            last = self.last_answer_before(t)
            owner = last.who if last else None
        found = [a for a in self.answered if a.t0 >= t and a.who != owner]
        return min(found, key=lambda a: a.t1, default=None)

    def failover_s(self, t: float, owner: str | None = None) -> float | None:
        """Seconds from `t` to the first answer by another node (None if none came)."""
        a = self.first_answer_by_other(t, owner)
        return None if a is None else a.t1 - t

    def gaps(self, a: float, b: float) -> list[Gap]:
        """Every window without an answer inside [a, b] (clipped to the log's span)."""
        if b < a:
            raise ProbeAnalysisError(f"window end {b} is before its start {a}")
        if not self.attempts:
            return []
        lo = max(a, self.attempts[0].t0)
        hi = min(b, max(x.t1 for x in self.attempts))
        if hi <= lo:
            return []
        instants = sorted(x.t1 for x in self.answered if lo < x.t1 < hi)
        edges = [lo] + instants + [hi]
        return [Gap(s, e) for s, e in zip(edges, edges[1:]) if e > s]

    def longest_gap(self, a: float, b: float) -> Gap:
        """The longest window without an answer inside [a, b] (length 0 if none)."""
        gaps = self.gaps(a, b)
        if not gaps:
            return Gap(a, a)
        return max(gaps, key=lambda g: g.length)

    def runs(self, a: float | None = None, b: float | None = None) -> list[Run]:
        """Who answered when: consecutive attempts (started in [a, b]) grouped by outcome."""
        out: list[Run] = []
        for x in self.attempts:
            if (a is not None and x.t0 < a) or (b is not None and x.t0 > b):
                continue
            if out and out[-1].who == x.who:
                r = out[-1]
                out[-1] = Run(r.who, r.first_t0, x.t1, r.attempts + 1)
            else:
                out.append(Run(x.who, x.t0, x.t1, 1))
        return out

    def who_sequence(self, a: float | None = None, b: float | None = None) -> list[str | None]:
        """Collapsed sequence of answers, e.g. ['m1', None, 'm2']."""
        return [r.who for r in self.runs(a, b)]

    def failed_attempts(self, a: float, b: float) -> int:
        """Attempts started in [a, b] that got no answer."""
        return sum(1 for x in self.attempts if a <= x.t0 <= b and x.who is None)


def analyze(records: Iterable) -> ProbeAnalysis:
    """A ProbeAnalysis over `records` (tuples, ProbeRecords or dicts)."""
    return ProbeAnalysis(records)


def bracketed_holders(reads) -> list[tuple[float, str, list]]:
    """For every read (t, member, held VIPs) and every VIP it shows, the members holding
    that VIP at instant t: the reader itself, plus each other member whose reads just
    before *and* just after t both show the VIP (it held it across t). One pass over the
    members is not an instant (it took up to 30 ms under load), so a member's single read
    is never compared with another's as if simultaneous. Pure; reads in any order."""
    by_member: dict = {}
    for t, m, held in sorted(reads, key=lambda r: r[0]):
        by_member.setdefault(m, []).append((t, frozenset(held)))
    times = {m: [t for t, _ in seq] for m, seq in by_member.items()}
    out = []
    for z, j, held in reads:
        for v in held:
            holders = [j]
            for i, seq in by_member.items():
                if i == j:
                    continue
                k = bisect.bisect_right(times[i], z)
                if 0 < k < len(seq) and v in seq[k - 1][1] and v in seq[k][1]:
                    holders.append(i)
            out.append((z, v, sorted(holders)))
    return out
