"""Pure health-check decisions: one check's rise/fall state, which VIPs a node's checks fail,
and how the coordinator turns the nodes' reports into eligibility.

Nothing here performs I/O or reads a clock: every time is passed in. The probing (sockets,
subprocesses) is services/health.py's; the assignment that uses these answers is
services/election.py's, through :func:`node.vipcore.assign_vips` (``ineligible``, ``avoid``).
docs/CHECKS.md gives the contract and the timing budget.

One check (:class:`CheckState`)::

    unknown ──first result──▶ healthy | unhealthy      (the first result decides at once)
    healthy ──fall failures in a row──▶ unhealthy
    unhealthy ──rise successes in a row──▶ healthy

A node's report (``health.status``) names ``failing`` VIPs (guarded by an unhealthy check)
and ``unknown`` ones (guarded by a check with no result yet): :func:`guarded_vips`.

The coordinator (:class:`HealthBook`) keeps the last report of each node with its arrival
time. A *fresh* report (younger than ``fresh_for``) that lists a VIP as failing makes the
node ineligible for it (hard); one that lists it as unknown makes the node passed over
softly (like HoldRecord's ``avoid``), except for the VIP's current owner (no result yet is
no reason to move an address away). A node with no fresh report is judged by membership
alone, as if it had no checks. A node whose report stopped listing a VIP as failing is
*recovering* for ``anti_flap`` seconds: its preference does not pull the VIP back before
(and while its last report, gone stale, still says failing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

UNKNOWN, HEALTHY, UNHEALTHY = "unknown", "healthy", "unhealthy"
STATES = (UNKNOWN, HEALTHY, UNHEALTHY)
ERROR_MAX = 200          # characters of a probe's error kept in reports


@dataclass
class CheckState:
    """One check's state on one node: rise/fall counting over probe results. Pure."""

    fall: int
    rise: int
    state: str = UNKNOWN
    fails: int = 0                    # failed probes in a row
    rises: int = 0                    # good probes in a row
    since: float | None = None        # wall clock of the last state change (None: never)
    last_error: str | None = None     # the last failed probe's reason
    took: float | None = None         # seconds the last probe took
    probes: int = 0                   # counters since the service started
    failures: int = 0

    def record(self, ok: bool, now: float, error: str | None = None, took: float | None = None) -> str | None:
        """Count one probe result at wall-clock ``now``; the new state when it changed, else None."""
        self.probes += 1
        self.took = took
        if ok:
            self.rises, self.fails = self.rises + 1, 0
        else:
            self.fails, self.rises = self.fails + 1, 0
            self.failures += 1
            self.last_error = (error or "failed")[:ERROR_MAX]
        if self.state == UNKNOWN:
            new = HEALTHY if ok else UNHEALTHY
        elif self.state == HEALTHY and self.fails >= self.fall:
            new = UNHEALTHY
        elif self.state == UNHEALTHY and self.rises >= self.rise:
            new = HEALTHY
        else:
            return None
        self.state, self.since = new, now
        return new

    def report(self) -> dict:
        return {"state": self.state, "fails": self.fails, "rises": self.rises, "since": self.since,
                "last_error": self.last_error, "took": None if self.took is None else round(self.took, 4)}


def guarded_vips(checks: Iterable[Any], states: dict[str, str], vip_keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """(failing, unknown): sorted bare VIP addresses guarded by an unhealthy check, and by a
    check with no result yet. ``checks`` have ``name`` and ``guards(vip)``
    (:class:`ecluster.clusterfile.Check`); ``states`` is {check name: state}. Pure."""
    keys = list(vip_keys)
    failing: set[str] = set()
    unknown: set[str] = set()
    for c in checks:
        state = states.get(c.name, UNKNOWN)
        if state == HEALTHY:
            continue
        into = failing if state == UNHEALTHY else unknown
        into.update(k for k in keys if c.guards(k))
    return sorted(failing), sorted(unknown)


def _addresses(value: Any) -> frozenset[str]:
    """A report's list of bare addresses as a set (anything malformed is left out)."""
    if not isinstance(value, (list, tuple)):
        return frozenset()
    return frozenset(v.split("/")[0] for v in value if isinstance(v, str))


@dataclass
class NodeReport:
    failing: frozenset[str]
    unknown: frozenset[str]
    at: float                                   # arrival, coordinator's monotonic clock
    checks: dict = field(default_factory=dict)  # the report's per-check table
    seq: int | None = None


class HealthBook:
    """The coordinator's record of every node's ``health.status``: pure (times passed in)."""

    def __init__(self, fresh_for: float, anti_flap: float):
        self.fresh_for = fresh_for
        self.anti_flap = anti_flap
        self.reports: dict[str, NodeReport] = {}
        self.recovered: dict[tuple[str, str], float] = {}    # (vip, node) -> when it stopped failing

    def _fresh(self, node: str, now: float) -> NodeReport | None:
        r = self.reports.get(node)
        return r if r is not None and now - r.at <= self.fresh_for else None

    def take(self, node: str, body: Any, now: float) -> bool:
        """Record ``node``'s report arriving at ``now``; True when it changes what the
        assignment sees (failing or unknown VIPs, or the node's report was not fresh)."""
        if not isinstance(body, dict):
            return False
        failing, unknown = _addresses(body.get("failing")), _addresses(body.get("unknown"))
        before = self._fresh(node, now)
        prev = self.reports.get(node)
        if prev is not None:
            for vip in prev.failing - failing:
                self.recovered[(vip, node)] = now
        for vip in failing:
            self.recovered.pop((vip, node), None)
        checks = body.get("checks") if isinstance(body.get("checks"), dict) else {}
        seq = body.get("seq") if isinstance(body.get("seq"), int) else None
        self.reports[node] = NodeReport(failing, unknown, now, checks, seq)
        if before is None:
            return bool(failing or unknown)
        return (before.failing, before.unknown) != (failing, unknown)

    def ineligible(self, now: float) -> dict[str, set[str]]:
        """{vip: nodes whose fresh report lists it failing}: assign_vips's ``ineligible``."""
        out: dict[str, set[str]] = {}
        for node, r in self.reports.items():
            if now - r.at <= self.fresh_for:
                for vip in r.failing:
                    out.setdefault(vip, set()).add(node)
        return out

    def unknown(self, now: float, current: dict[str, str | None]) -> dict[str, set[str]]:
        """{vip: nodes passed over softly}: fresh reports with no result yet for a check
        guarding it, except the VIP's current owner."""
        out: dict[str, set[str]] = {}
        for node, r in self.reports.items():
            if now - r.at <= self.fresh_for:
                for vip in r.unknown - r.failing:
                    if current.get(vip) != node:
                        out.setdefault(vip, set()).add(node)
        return out

    def recovering(self, now: float) -> dict[str, set[str]]:
        """{vip: nodes whose preference must not pull it back yet}: stopped failing less than
        ``anti_flap`` ago, or last said failing in a report that has gone stale."""
        out: dict[str, set[str]] = {}
        for (vip, node), at in self.recovered.items():
            if now - at < self.anti_flap:
                out.setdefault(vip, set()).add(node)
        for node, r in self.reports.items():
            if now - r.at > self.fresh_for:
                for vip in r.failing:
                    out.setdefault(vip, set()).add(node)
        return out

    def forget_old(self, now: float) -> None:
        """Drop recoveries older than anti_flap (they no longer matter)."""
        for k in [k for k, at in self.recovered.items() if now - at >= self.anti_flap]:
            del self.recovered[k]

    def table(self, now: float) -> dict[str, dict]:
        """Per node, for status displays: fresh, age, failing/unknown VIPs, failing checks."""
        out = {}
        for node, r in sorted(self.reports.items()):
            checks = {n: c for n, c in r.checks.items() if isinstance(c, dict)}
            out[node] = {"fresh": now - r.at <= self.fresh_for, "age": round(now - r.at, 3),
                         "seq": r.seq, "failing": sorted(r.failing), "unknown": sorted(r.unknown),
                         "failing_checks": sorted(n for n, c in checks.items() if c.get("state") == UNHEALTHY),
                         "unknown_checks": sorted(n for n, c in checks.items() if c.get("state") == UNKNOWN),
                         "checks": {n: c.get("state") for n, c in sorted(checks.items())}}
        return out


def check_summary(entry: dict | None) -> str:
    """A node's health checks as one word or list, from election.status["health"][node]. Pure.

    "-": no report (no checks, or not heard lately); "ok"; "failing: a, b"; "starting: a"."""
    if not isinstance(entry, dict) or not entry.get("fresh"):
        return "-"
    failing, unknown = entry.get("failing_checks") or [], entry.get("unknown_checks") or []
    if failing:
        return "failing: " + ", ".join(failing)
    if unknown:
        return "starting: " + ", ".join(unknown)
    return "ok"
