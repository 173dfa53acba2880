"""Chaos schedules: which fault hits which member when, generated from a seed. Pure.

A schedule is a list of :class:`Fault` ``(t, fault, target, duration, arg)``: ``t`` seconds
after the fault phase starts, ``fault`` one of :data:`FAULT_KINDS`, ``target`` a member
name (``n2``), a ``member:service`` pair (``service_kill``), partition groups
(``n1|n2,n3,m1,m2``) or ``all`` (``no_quorum``), ``duration`` seconds until the fault is
undone, ``arg`` a fault-specific detail (netem parameters, a clock offset, a log name).

The same seed and duration always give the same schedule, so a failure can be replayed
(``python -m tests.chaos.runner --seed N --duration S``, or ``--schedule FILE``).

Why availability figures mean something: 5 voters (3 nodes, 2 managers) need a majority of
3. Outside an explicit ``no_quorum`` window, at most :data:`MAX_IMPAIRED` members are
impaired at any moment (killed, link down, partitioned into a minority, clock stepped, on a
lossy link, paused, or still restarting after one of these: see RECOVERY_S), so a majority
and at least one node always remain. A ``no_quorum``
window (every member cut off from every other) is exclusive and short.
"""
from __future__ import annotations

import json
import random
from typing import Iterable, NamedTuple

__all__ = ["Fault", "ScheduleError", "FAULT_KINDS", "DEFAULT_KINDS", "MAX_IMPAIRED", "generate",
           "impaired_at", "active_at", "netem_to_tbf", "to_json", "from_json", "format_schedule", "clock_targets",
           "end_time", "NODE_SERVICES", "MANAGER_SERVICES"]


class ScheduleError(ValueError):
    """A bad seed, duration, fault list or schedule file; one-line message."""


class Fault(NamedTuple):
    """One fault: starts ``t`` s into the run, undone ``duration`` s later (0: instant)."""
    t: float
    fault: str
    target: str
    duration: float
    arg: str = ""

    @property
    def end(self) -> float:
        return round(self.t + self.duration, 3)


# kind -> (weight, min duration, max duration); what each does is in the runner
FAULT_KINDS: dict[str, tuple[float, float, float]] = {
    "kill": (2.0, 2.0, 8.0),            # kill -9 of every process of a member, link down; then restart
    "service_kill": (3.0, 0.0, 0.0),    # kill -9 of one supervised program; supervisord restarts it
    "link_down": (1.5, 1.0, 6.0),       # eth0 down, then up
    "partition": (1.5, 3.0, 10.0),      # member-to-member blackholes (client still reaches all); heal
    "netem": (1.0, 3.0, 10.0),          # tc netem delay/loss on the member's veth, both directions
                                        # (a tbf slow link where the kernel has no netem)
    "disk_full": (1.0, 3.0, 8.0),       # the journal's tmpfs filled to the last byte; then emptied
    "clock_jump": (1.0, 3.0, 10.0),     # the member's wall clock stepped by arg seconds; then back
    "no_quorum": (0.3, 3.0, 5.0),       # every member isolated from every other; heal
    "pause": (1.0, 1.0, 4.0),           # SIGSTOP of every process of a member; SIGCONT
}
# pause: a stopped holder cannot unplumb; its address goes when the kernel lifetime the vip
# service set runs out, and a new owner must not plumb before (ARP probe): worth testing
DEFAULT_KINDS = ("kill", "service_kill", "link_down", "partition", "netem", "disk_full", "clock_jump",
                 "pause", "no_quorum")

NODE_SERVICES = ("broker", "membership", "election", "vip", "configsync", "jlog", "control", "as_logger", "smtp")
MANAGER_SERVICES = ("broker", "membership", "election", "configsync", "logagg", "cidr_server", "control")

MAX_IMPAIRED = 2          # of 5 voters: 3 always left, a majority
IMPAIRING = {"kill", "service_kill", "link_down", "netem", "clock_jump", "pause"}
# how long a member stays impaired after its fault is undone (seconds, on a loaded 2-core
# box): a killed member restarts ~10 Python processes; a killed program restarts in ~2 s
RECOVERY_S = {"kill": 10.0, "service_kill": 3.0, "pause": 2.0, "link_down": 1.0, "partition": 1.0,
              "netem": 1.0, "clock_jump": 1.0, "disk_full": 0.5, "no_quorum": 3.0}
NETEM_CHOICES = ("delay 40ms 20ms", "delay 20ms 10ms loss 5%", "loss 10%", "delay 80ms 40ms loss 2%",
                 "loss 30%")
CLOCK_STEPS = (-30.0, -5.0, -2.0, 2.0, 5.0, 30.0)
FULL_LOG = "chaoslog"     # the journal that lives on a small tmpfs (see the runner)
NO_QUORUM_EVERY_S = 150.0
QUIET_S = 2.0             # nothing else this close to a no-quorum window
START_S = 3.0             # the first fault comes this long after the fault phase starts
GAP_S = (0.8, 3.5)        # between two fault starts


def _members(n_nodes: int, n_managers: int) -> list[str]:
    return [f"n{i}" for i in range(1, n_nodes + 1)] + [f"m{i}" for i in range(1, n_managers + 1)]


def _groups(target: str) -> list[list[str]]:
    return [g.split(",") for g in target.split("|")]


def _fault_impairs(f: Fault, members: list[str]) -> set[str]:
    """Members that ``f`` cuts off from a majority while it lasts."""
    if f.fault in IMPAIRING:
        return {f.target.split(":")[0]}
    if f.fault == "partition":
        groups = _groups(f.target)
        big = max(groups, key=len)
        return {m for g in groups if g is not big for m in g}
    if f.fault == "no_quorum":
        return set(members)
    return set()


def _fault_busy(f: Fault) -> set[str]:
    """Members that ``f`` occupies (no second fault on them meanwhile)."""
    if f.fault == "service_kill":
        return {f.target.split(":")[0]}
    if f.fault == "partition":
        return {m for g in _groups(f.target) for m in g}
    if f.fault == "no_quorum":
        return {"*"}
    return {f.target}


def _overlaps(f: Fault, a: float, b: float) -> bool:
    # a fault's effect outlasts it: a restarted member or program needs a while to be back
    return f.t <= b and a <= f.end + RECOVERY_S[f.fault]


def active_at(schedule: Iterable[Fault], t: float) -> list[Fault]:
    """The faults whose effect lasts at ``t``: in force, or undone less than its
    :data:`RECOVERY_S` ago."""
    return [f for f in schedule if _overlaps(f, t, t)]


def impaired_at(schedule: Iterable[Fault], t: float, members: list[str]) -> set[str]:
    """Members impaired at ``t`` (see the module docstring)."""
    out: set[str] = set()
    for f in active_at(schedule, t):
        out |= _fault_impairs(f, members)
    return out


def _candidates(rng: random.Random, kind: str, members: list[str], nodes: list[str], managers: list[str],
                services: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(target, arg) choices for ``kind``, in a fixed order (the rng picks among them)."""
    if kind == "service_kill":
        return [(f"{m}:{s}", "") for m in members for s in services["node" if m in nodes else "manager"]]
    if kind == "disk_full":
        return [(n, FULL_LOG) for n in nodes]
    if kind == "netem":
        return [(m, rng.choice(NETEM_CHOICES)) for m in members]
    if kind == "clock_jump":
        return [(m, f"{rng.choice(CLOCK_STEPS):+g}") for m in members]
    if kind == "partition":
        out = []
        for m in members:                       # one member alone
            rest = [x for x in members if x != m]
            out.append((f"{m}|{','.join(rest)}", ""))
        for i, a in enumerate(members):         # two against three
            for b in members[i + 1:]:
                rest = [x for x in members if x not in (a, b)]
                out.append((f"{a},{b}|{','.join(rest)}", ""))
        return out
    if kind == "no_quorum":
        return [("all", "")]
    return [(m, "") for m in members]


def _no_quorum_windows(rng: random.Random, duration: float) -> list[Fault]:
    """One no-quorum window per started :data:`NO_QUORUM_EVERY_S` of run (none in short runs)."""
    _, lo, hi = FAULT_KINDS["no_quorum"]
    if duration < START_S + hi + 2 * QUIET_S:
        return []
    count = max(1, int(duration // NO_QUORUM_EVERY_S))
    span = (duration - START_S) / count
    out = []
    for k in range(count):
        dur = round(rng.uniform(lo, hi), 2)
        a = START_S + k * span + QUIET_S
        b = START_S + (k + 1) * span - dur - QUIET_S
        out.append(Fault(round(rng.uniform(a, max(a, b)), 2), "no_quorum", "all", dur))
    return out


def generate(seed: int, duration: float, n_nodes: int = 3, n_managers: int = 2,
             kinds: Iterable[str] = DEFAULT_KINDS,
             services: dict[str, tuple[str, ...]] | None = None) -> list[Fault]:
    """A schedule of faults over ``duration`` s of fault phase, the same for the same inputs.

    Every fault is undone by ``duration``. At most :data:`MAX_IMPAIRED` members are impaired
    at any time outside a ``no_quorum`` window, which overlaps no other fault; a member
    suffers at most one fault at a time; there is at most one partition at a time.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ScheduleError(f"seed must be an integer, got {seed!r}")
    if not isinstance(duration, (int, float)) or isinstance(duration, bool) or not 5 <= duration <= 86400:
        raise ScheduleError(f"duration must be a number of seconds in 5..86400, got {duration!r}")
    kinds = list(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise ScheduleError(f"unknown fault kind(s) {unknown or kinds!r} (known: {', '.join(FAULT_KINDS)})")
    if n_nodes < 1 or n_managers < 0 or n_nodes + n_managers < 3:
        raise ScheduleError("need at least one node and three members")
    services = services or {"node": NODE_SERVICES, "manager": MANAGER_SERVICES}
    members = _members(n_nodes, n_managers)
    nodes, managers = members[:n_nodes], members[n_nodes:]
    max_impaired = min(MAX_IMPAIRED, (len(members) - 1) // 2, n_nodes - 1)
    rng = random.Random(seed)
    out: list[Fault] = []
    if "no_quorum" in kinds:
        out.extend(_no_quorum_windows(rng, duration))
    others = [k for k in kinds if k != "no_quorum"]
    weights = [FAULT_KINDS[k][0] for k in others]
    t = START_S
    while others and t < duration - 1.0:
        kind = rng.choices(others, weights)[0]
        _, lo, hi = FAULT_KINDS[kind]
        dur = round(min(rng.uniform(lo, hi), duration - t), 2)
        choices = _candidates(rng, kind, members, nodes, managers, services)
        rng.shuffle(choices)
        start = round(t, 2)
        t += rng.uniform(*GAP_S)
        if dur < lo:
            continue                            # too close to the end for this kind
        overlapping = [f for f in out if _overlaps(f, start, start + dur)]
        if any(f.fault == "no_quorum" and _overlaps(f, start - QUIET_S, start + dur + QUIET_S) for f in out):
            continue                            # the no-quorum windows stand alone
        busy = set().union(*(_fault_busy(f) for f in overlapping))
        impaired = set().union(*(_fault_impairs(f, members) for f in overlapping))
        partitioned = any(f.fault == "partition" for f in overlapping)
        for target, arg in choices:
            f = Fault(start, kind, target, dur, arg)
            if _fault_busy(f) & busy:
                continue
            if kind == "partition" and partitioned:
                continue
            if len(impaired | _fault_impairs(f, members)) > max_impaired:
                continue
            out.append(f)
            break
    return sorted(out)


def netem_to_tbf(arg: str) -> str:
    """A tbf (token bucket) stand-in for a netem spec, for kernels without sch_netem.

    tbf cannot delay every packet nor drop at random; a slow link can do both under load:
    packets queue (up to ``latency``) and the excess is dropped. More loss asked for, a
    slower link; more delay asked for, a longer queue.
    """
    words = arg.split()
    delay_ms, loss = 0.0, 0.0
    for i, w in enumerate(words[:-1]):
        if w == "delay":
            delay_ms = float(words[i + 1].removesuffix("ms"))
        elif w == "loss":
            loss = float(words[i + 1].removesuffix("%"))
    rate = "128kbit" if loss >= 10 else "512kbit" if loss > 0 else "1mbit"
    latency = max(20, int(2 * delay_ms))
    return f"tbf rate {rate} burst 16kb latency {latency}ms"


def end_time(schedule: Iterable[Fault]) -> float:
    """When the last fault is undone (0.0 for an empty schedule)."""
    return max((f.end for f in schedule), default=0.0)


def clock_targets(schedule: Iterable[Fault]) -> set[str]:
    """Members whose processes need the clock hook (their clock is stepped at some point)."""
    return {f.target for f in schedule if f.fault == "clock_jump"}


def to_json(schedule: Iterable[Fault]) -> str:
    """One JSON object per line, in order: replayable with :func:`from_json`."""
    return "\n".join(json.dumps(f._asdict()) for f in schedule)


def from_json(text: str) -> list[Fault]:
    """Parse :func:`to_json` output (blank lines and lines starting with # are skipped)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            d = json.loads(line)
            f = Fault(float(d["t"]), str(d["fault"]), str(d["target"]), float(d["duration"]), str(d.get("arg", "")))
        except (ValueError, KeyError, TypeError) as e:
            raise ScheduleError(f"schedule line {n} is not a fault: {e}") from None
        if f.fault not in FAULT_KINDS:
            raise ScheduleError(f"schedule line {n}: unknown fault {f.fault!r}")
        if f.t < 0 or f.duration < 0:
            raise ScheduleError(f"schedule line {n}: negative time or duration")
        out.append(f)
    return sorted(out)


def format_schedule(schedule: Iterable[Fault]) -> str:
    """A human-readable table of the schedule."""
    lines = [f"{'t':>7} {'until':>7}  {'fault':<12} {'target':<22} arg"]
    for f in schedule:
        lines.append(f"{f.t:7.2f} {f.end:7.2f}  {f.fault:<12} {f.target:<22} {f.arg}")
    return "\n".join(lines)
