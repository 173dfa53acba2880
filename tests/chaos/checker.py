"""The verdict of a chaos run, computed from its recorded history. Pure: no I/O, no clock.

What must hold (docs: /work/shared/SPEC.md §2), each a row of the verdict table:

* ``double holders`` (and ``ARP rounds, two answers``, the client's view of the wire): at no instant do two members hold one VIP (property 1). The address
  sampler reads member namespaces one after another, so member j's read at z showing a VIP
  counts against member i only when i's reads just before *and* just after z show it too.
* ``records missing`` / ``records doubled`` / ``records unknown``: every journal record
  acknowledged to the writer is in each manager's aggregated files exactly once, and nothing
  else is there but records that were written (property 3).
* ``commits missing`` / ``not caught up``: every acknowledged config commit is on every
  member's history and every member applied the final head (property 4).
* ``dead services``: every supervised program is RUNNING at the end (property 5, P).
* ``mail missing``: every message answered 250 by the SMTP plug-in is in some node's spool.
* ``VIP down at end``: each VIP answers the client again once the faults are over.

Reported, not judged: how long each VIP went without an answer during and just after each
fault (no-quorum windows are expected to take every VIP away).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from probe_analysis import bracketed_holders

__all__ = ["History", "AppliedFault", "Verdict", "Row", "check", "double_holders", "longest_gap",
           "format_verdict", "GRACE_S", "END_ANSWER_S"]

GRACE_S = 5.0          # a fault's effect on availability is looked for until this long after it ends
END_ANSWER_S = 3.0     # a VIP must have answered within this long before the probes stopped


@dataclass
class AppliedFault:
    """A scheduled fault as applied: wall-clock start and end, and what happened (note)."""
    t: float
    fault: str
    target: str
    duration: float
    arg: str
    start: float
    end: float
    note: str = ""


@dataclass
class History:
    """Everything a run recorded. Times are on the time.time() scale.

    reads            (t, member, VIPs it held) from the address sampler, every ~10 ms per member
    arp_doubles      (t, VIP, members) ARP rounds from the client that two members answered
    probes           VIP -> [(t0, t1, who or None)] client connection attempts
    faults           the faults as applied
    journal_acked    "node/log" -> record ids whose write was acknowledged
    journal_maybe    "node/log" -> record ids whose write failed or timed out (may or may not exist)
    sinks            manager -> "node/log" -> record ids in the order of its aggregated files
    commits_acked    config revisions whose commit was acknowledged
    member_revs      member -> every revision on its config main (None: could not be read)
    applied          member -> the revision it applied last (None: none)
    final_head       the coordinator's head at the end
    process_states   member -> supervised program -> supervisord state at the end
    mail_accepted    message ids the SMTP plug-in answered 250 to
    mail_spooled     node -> message ids in its spool
    phase            (start, end) of the fault phase
    probe_end        when the probes stopped
    """
    vips: list[str]
    members: list[str]
    reads: list[tuple[float, str, tuple[str, ...]]] = field(default_factory=list)
    arp_doubles: list[tuple[float, str, list[str]]] = field(default_factory=list)
    probes: dict[str, list[tuple[float, float, str | None]]] = field(default_factory=dict)
    faults: list[AppliedFault] = field(default_factory=list)
    journal_acked: dict[str, list[int]] = field(default_factory=dict)
    journal_maybe: dict[str, list[int]] = field(default_factory=dict)
    sinks: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    commits_acked: list[str] = field(default_factory=list)
    member_revs: dict[str, list[str] | None] = field(default_factory=dict)
    applied: dict[str, str | None] = field(default_factory=dict)
    final_head: str | None = None
    process_states: dict[str, dict[str, str]] = field(default_factory=dict)
    mail_accepted: list[str] = field(default_factory=list)
    mail_spooled: dict[str, list[str]] = field(default_factory=dict)
    phase: tuple[float, float] = (0.0, 0.0)
    probe_end: float = 0.0
    seed: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        """Rebuild from ``dataclasses.asdict`` output (e.g. read back from JSON)."""
        d = dict(d)
        d["faults"] = [AppliedFault(**f) for f in d.get("faults", [])]
        d["reads"] = [(t, m, tuple(h)) for t, m, h in d.get("reads", [])]
        d["arp_doubles"] = [(t, v, list(m)) for t, v, m in d.get("arp_doubles", [])]
        d["probes"] = {v: [tuple(a) for a in att] for v, att in d.get("probes", {}).items()}
        d["phase"] = tuple(d.get("phase", (0.0, 0.0)))
        return cls(**d)


@dataclass
class Row:
    """One line of the verdict: what was checked, the figure, pass or not, details."""
    check: str
    value: Any
    ok: bool
    detail: str = ""


@dataclass
class Verdict:
    rows: list[Row]
    fault_rows: list[tuple[AppliedFault, dict[str, float]]]
    unavailable_s: dict[str, float]

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.rows)

    def failed(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]


# -- VIP holders ---------------------------------------------------------------------------------------

def double_holders(reads: list[tuple[float, str, tuple[str, ...]]]) -> list[tuple[float, str, list[str]]]:
    """Every (t, vip, members) where more than one member held ``vip`` at instant t (see above)."""
    return [(t, v, h) for t, v, h in bracketed_holders(reads) if len(h) > 1]


def arp_doubles_judged(h: History) -> tuple[list, list]:
    """(judged, excused) two-answer ARP rounds. A round is excused when one of the members
    that answered had a delaying link then (a netem fault, until 1 s after it): the ARP
    sampler counts a late reply in the round it arrives in, so a member whose replies are
    held back by a queue seems to answer after it let the address go. The address sampler
    (the interfaces themselves) still judges those instants."""
    delayed = [f for f in h.faults if f.fault == "netem"]
    judged, excused = [], []
    for t, v, ms in h.arp_doubles:
        if any(f.target in ms and f.start <= t <= f.end + 1.0 for f in delayed):
            excused.append((t, v, ms))
        else:
            judged.append((t, v, ms))
    return judged, excused


# -- availability --------------------------------------------------------------------------------------

def longest_gap(attempts: list[tuple[float, float, str | None]], a: float, b: float) -> float:
    """Longest time inside [a, b] without an answer (answer instants are the t1 of answered
    attempts), clipped to the span the probe covered; 0.0 when the probe saw nothing there."""
    if not attempts or b <= a:
        return 0.0
    lo = max(a, min(x[0] for x in attempts))
    hi = min(b, max(x[1] for x in attempts))
    if hi <= lo:
        return 0.0
    instants = sorted(x[1] for x in attempts if x[2] is not None and lo < x[1] < hi)
    edges = [lo, *instants, hi]
    return max(e - s for s, e in zip(edges, edges[1:]))


def _unavailable_total(attempts: list[tuple[float, float, str | None]], a: float, b: float,
                       threshold: float = 0.2) -> float:
    """Sum of the gaps between answers inside [a, b] longer than ``threshold`` seconds."""
    if not attempts or b <= a:
        return 0.0
    instants = sorted(x[1] for x in attempts if x[2] is not None and a < x[1] < b)
    edges = [max(a, min(x[0] for x in attempts)), *instants, min(b, max(x[1] for x in attempts))]
    return sum(e - s for s, e in zip(edges, edges[1:]) if e - s > threshold)


# -- the verdict ---------------------------------------------------------------------------------------

def _journal_rows(h: History) -> list[Row]:
    missing, doubled, unknown = {}, {}, {}
    for manager in sorted(h.sinks) or ["(no manager)"]:
        got_by_key = h.sinks.get(manager, {})
        for key, acked in sorted(h.journal_acked.items()):
            got = got_by_key.get(key, [])
            seen, dups = set(), 0
            for r in got:
                if r in seen:
                    dups += 1
                seen.add(r)
            lost = set(acked) - seen
            if lost:
                missing[f"{manager} {key}"] = sorted(lost)
            if dups:
                doubled[f"{manager} {key}"] = dups
        for key, got in sorted(got_by_key.items()):
            extra = set(got) - set(h.journal_acked.get(key, ())) - set(h.journal_maybe.get(key, ()))
            if extra:
                unknown[f"{manager} {key}"] = sorted(extra)
    n_acked = sum(len(v) for v in h.journal_acked.values())

    def brief(d):
        return "; ".join(f"{k}: {v if isinstance(v, int) else _ids(v)}" for k, v in d.items())
    return [
        Row("records acknowledged", n_acked, n_acked > 0, "" if n_acked else "the workload wrote nothing"),
        Row("records missing", sum(len(v) for v in missing.values()), not missing, brief(missing)),
        Row("records doubled", sum(doubled.values()), not doubled, brief(doubled)),
        Row("records unknown", sum(len(v) for v in unknown.values()), not unknown, brief(unknown)),
    ]


def _ids(ids: list) -> str:
    return ", ".join(map(str, ids[:8])) + (f" ... ({len(ids)})" if len(ids) > 8 else "")


def _config_rows(h: History) -> list[Row]:
    missing = {}
    for m in h.members:
        revs = h.member_revs.get(m)
        if revs is None:
            missing[m] = ["(history unreadable)"]
            continue
        lost = [r for r in h.commits_acked if r not in set(revs)]
        if lost:
            missing[m] = lost
    behind = {m: (h.applied.get(m) or "-")[:12] for m in h.members if h.applied.get(m) != h.final_head}
    return [
        Row("commits acknowledged", len(h.commits_acked), len(h.commits_acked) > 0,
            "" if h.commits_acked else "no commit was acknowledged"),
        Row("commits missing", sum(len(v) for v in missing.values()), not missing,
            "; ".join(f"{m}: {', '.join(r[:12] for r in v)}" for m, v in missing.items())),
        Row("members not caught up", len(behind), not behind and h.final_head is not None,
            f"head {(h.final_head or '-')[:12]}; " + ", ".join(f"{m} at {r}" for m, r in behind.items())
            if behind or h.final_head is None else ""),
    ]


def check(h: History) -> Verdict:
    """Compute the verdict of ``h`` (see the module docstring)."""
    rows: list[Row] = []
    doubles = double_holders(h.reads)
    worst = max((len(m) for _, _, m in doubles), default=1 if any(r[2] for r in h.reads) else 0)
    rows.append(Row("max holders of one VIP", worst, not doubles,
                    "; ".join(f"{t:.3f} {v} {'+'.join(m)}" for t, v, m in doubles[:5])
                    + (f" ... ({len(doubles)} instants)" if len(doubles) > 5 else "")))
    rows.append(Row("double-holder instants", len(doubles), not doubles))
    arp, excused = arp_doubles_judged(h)
    rows.append(Row("ARP rounds, two answers", len(arp), not arp,
                    "; ".join(f"{t:.3f} {v} {'+'.join(m)}" for t, v, m in arp[:5])
                    + (f" ({len(excused)} more while an answering member's link delayed packets: "
                       "not judged)" if excused else "")))

    down_at_end = []
    for v in h.vips:
        att = h.probes.get(v, [])
        last = max((x[1] for x in att if x[2] is not None), default=None)
        if last is None or last < h.probe_end - END_ANSWER_S:
            down_at_end.append(v)
    rows.append(Row("VIPs down at the end", len(down_at_end), not down_at_end, ", ".join(down_at_end)))

    rows += _journal_rows(h)
    rows += _config_rows(h)

    dead = [f"{m}:{p} {s}" for m, progs in sorted(h.process_states.items())
            for p, s in sorted(progs.items()) if s != "RUNNING"]
    missing_members = [m for m in h.members if m not in h.process_states]
    rows.append(Row("services not running", len(dead) + len(missing_members), not dead and not missing_members,
                    ", ".join(dead + [f"{m}: no supervisord" for m in missing_members])))

    if h.mail_accepted:
        spooled = set().union(*map(set, h.mail_spooled.values())) if h.mail_spooled else set()
        lost = [i for i in h.mail_accepted if i not in spooled]
        rows.append(Row("mail accepted", len(h.mail_accepted), True))
        rows.append(Row("mail missing", len(lost), not lost, _ids(lost)))

    fault_rows = []
    for f in h.faults:
        gaps = {v: round(longest_gap(h.probes.get(v, []), f.start, f.end + GRACE_S), 3) for v in h.vips}
        fault_rows.append((f, gaps))
    a, b = h.phase
    unavailable = {v: round(_unavailable_total(h.probes.get(v, []), a, b), 3) for v in h.vips}
    return Verdict(rows, fault_rows, unavailable)


def format_verdict(v: Verdict, seed: int | None = None) -> str:
    """The verdict as text: per-fault availability, then the checks, then PASS/FAIL."""
    out = []
    if v.fault_rows:
        vips = list(v.fault_rows[0][1])
        out.append(f"{'t':>7} {'dur':>5}  {'fault':<12} {'target':<22} {'arg':<24} "
                   + " ".join(f"{'gap ' + x:>16}" for x in vips) + "  note")
        for f, gaps in v.fault_rows:
            out.append(f"{f.t:7.2f} {f.duration:5.1f}  {f.fault:<12} {f.target:<22} {f.arg:<24} "
                       + " ".join(f"{gaps[x]:15.3f}s" for x in vips) + (f"  {f.note}" if f.note else ""))
        out.append("(gap: longest time without an answer from the VIP from the fault's start until "
                   f"{GRACE_S:g} s after its end)")
        out.append("")
    if v.unavailable_s:
        out.append("VIP unavailable over the fault phase (gaps > 0.2 s summed): "
                   + ", ".join(f"{k} {s:.2f} s" for k, s in v.unavailable_s.items()))
    out.append(f"{'check':<26} {'value':>8}  result  detail")
    for r in v.rows:
        out.append(f"{r.check:<26} {str(r.value):>8}  {'ok' if r.ok else 'FAIL':<6}  {r.detail}")
    out.append(("PASS" if v.passed else "FAIL") + (f" (seed {seed})" if seed is not None else ""))
    return "\n".join(out)
