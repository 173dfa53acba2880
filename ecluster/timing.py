"""Timing presets: every interval and timeout of the cluster, derived in one place.

A preset fixes a handful of base figures; everything else is computed from them
by the formulas below, so that the safety argument of docs/ELECTION.md can be
checked against one table instead of constants scattered through services.

Base figures (seconds):
  probe_interval  P   how often a member's broker pings every peer (a ZMTP PING on its link,
                      answered by the peer's libzmq I/O thread: no Python runs for it)
  suspect_after   S   silence after which a member is *suspected* (S = k_s * P)
  dead_after      D   silence after which a suspect is declared *dead* (D = S + k_d * P)
  lease           L   how long a VIP lease granted by the coordinator lasts
  max_drift           bound on clock-rate drift between members (fraction)

Failure detection (services.membership, bus.broker): every broker keeps one SUB link to each
peer's PUB, pinged every P by libzmq, which tears the link down when nothing came back for
link_timeout T after a ping; the broker reports every link change at once (``bus.link``), and
membership classifies from how long a link has been down:
  link_timeout       T = S - P       a silent peer's link drops at silence in [T, T + P] = [S - P, S]
  link_suspect_after   = P           down this long: suspect (silence about S; a link that a
                                     peer's rebind dropped is back within ~20 ms, see below)
  link_dead_after      = D - T       down this long: dead (silence about D, as before)
  link_reconnect_ms    = 10          a dropped link is retried after 10 ms, backing off to
                                     reconnect_ivl_max: a live peer is back long before suspicion
  member_hb_every      = min(1 s, 10 P)  the membership services' own heartbeat (incarnation,
                                     role, and proof that the peer's Python is not hung)
  hung_after           = 3 member_hb_every + D
                                     link up but no membership heartbeat for this long: dead
                                     (a hung member, or one whose membership service is down)
A killed process closes its connections, so its peers see the link drop at once: death by
crash is known after link_dead_after, death of a host or a cut link after about D.

Derived:
  renew_every     = L / 3           holder renews well before expiry; two renewals may be lost
  handover_wait   = L * (1 + max_drift) + margin
                    a coordinator that moves an address away from a holder it cannot
                    reach waits this long after the holder's last grant before granting
                    it elsewhere, so the old holder's lease has run out on its own clock.
  election_timeout = D              the random part of a candidacy's delay: a follower stands
                                    within U(0, D) of seeing the coordinator's member not alive in
                                    its membership view (after a pre-vote: no term is bumped
                                    without a majority's yes).
  leader_timeout  = hung_after      ... or after hearing no election.assignment for this long
                                    while the member looks alive (its election service hung or
                                    gone). Stickiness: a voter refuses votes while the coordinator
                                    is alive in its view and was heard within leader_timeout.
  reconnect_ivl_max = max(r, min(10 r, D / 4))
                                    zmq's reconnect back-off (r = reconnect_ivl; libzmq adds a
                                    random [0, r) to every wait): links come back within
                                    D/4 + r of a heal.
  connect_timeout = max(50 ms, min(1 s, D / 2))
                                    a TCP connect whose SYN (or SYN-ACK) was lost while a
                                    partition healed is abandoned and tried again after this,
                                    instead of waiting for the kernel's 1 s SYN retransmission.
  new_term_wait   = handover_wait   a fresh coordinator grants nothing for this long, since
                                    its predecessor may have granted leases it cannot know of.
  struggle_after  = 2 handover_wait + D
                                    an assigned owner that has not held its VIP for this long
                                    (two promise periods and a failure detection) cannot keep
                                    it: the coordinator passes it over for owner_penalty
                                    (node.vipcore.HoldRecord); so does one that lost it twice
                                    within lapse_window (60 s) while still assigned.
  owner_penalty   = max(10 s, 10 anti_flap), doubling up to 12 x when it happens again.
  report_refresh  = member_hb_every a periodic report that did not change (the coordinator's
                                    election.assignment, each node's vip.status) is sent again
                                    this often; a changed one goes at once (within P, the tick
                                    that computes it). Nobody reads a member's death from these
                                    any more (membership does, within about D), so they only
                                    have to show that the service behind them runs.
                                    (vip.status: at most services.base.stale_after / 3, 0.7 s
                                    on "lan": its watchers drop a silent node's VIPs after
                                    stale_after.)
  report_fresh    = max(3 D, 3 report_refresh)
                                    a vip.status or health.status counts this long (two copies
                                    may be lost).

Why failover is fast although leases are safe: a holder that is *alive* but partitioned
stops renewing and unplumbs at L (own clock); the majority side declares it dead at D
and may hand its addresses on at max(D, last_grant + handover_wait). With L close to D
the kill-to-takeover time is about D plus one renewal round trip.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

#: the niceness of the time-critical processes: the broker and the membership, election
#: and vip services (a lease renewal starved of CPU by mail work is a false failover; the
#: scheduling assumption of docs/ELECTION.md)
CRITICAL_NICENESS = -10


def raise_priority() -> None:
    """Ask the kernel for CRITICAL_NICENESS; without the right (not root), carry on."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, CRITICAL_NICENESS)
    except OSError:
        pass


@dataclass(frozen=True)
class Timing:
    """One preset's figures; build with :func:`preset`."""

    name: str
    probe_interval: float
    suspect_after: float
    dead_after: float
    lease: float
    max_drift: float
    margin: float
    garp_repeat_after: float
    reconcile_every: float
    anti_flap: float
    # bus transport settings
    zmq_heartbeat_ivl_ms: int
    zmq_heartbeat_timeout_ms: int
    reconnect_ivl_ms: int
    reconnect_ivl_max_ms: int
    connect_timeout_ms: int

    @property
    def renew_every(self) -> float:
        return self.lease / 3

    @property
    def handover_wait(self) -> float:
        return self.lease * (1 + self.max_drift) + self.margin

    @property
    def election_timeout(self) -> float:
        return self.dead_after

    @property
    def leader_timeout(self) -> float:
        return self.hung_after

    @property
    def report_fresh(self) -> float:
        return max(3 * self.dead_after, 3 * self.report_refresh)

    @property
    def new_term_wait(self) -> float:
        return self.handover_wait

    @property
    def struggle_after(self) -> float:
        return 2 * self.handover_wait + self.dead_after

    @property
    def report_refresh(self) -> float:
        return self.member_hb_every

    @property
    def link_ping_ms(self) -> int:
        return max(1, round(self.probe_interval * 1000))

    @property
    def link_timeout(self) -> float:
        return self.suspect_after - self.probe_interval

    @property
    def link_suspect_after(self) -> float:
        return self.probe_interval

    @property
    def link_dead_after(self) -> float:
        return self.dead_after - self.link_timeout

    @property
    def link_reconnect_ms(self) -> int:
        return 10

    @property
    def member_hb_every(self) -> float:
        return min(1.0, 10 * self.probe_interval)

    @property
    def hung_after(self) -> float:
        return 3 * self.member_hb_every + self.dead_after

    @property
    def owner_penalty(self) -> float:
        return max(10.0, 10 * self.anti_flap)

    @property
    def owner_penalty_max(self) -> float:
        return 12 * self.owner_penalty

    @property
    def lapse_window(self) -> float:
        return 60.0

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for derived in ("renew_every", "handover_wait", "election_timeout", "new_term_wait",
                        "struggle_after", "report_refresh", "report_fresh", "leader_timeout", "link_ping_ms", "link_timeout",
                        "link_suspect_after", "link_dead_after", "link_reconnect_ms", "member_hb_every",
                        "hung_after", "owner_penalty", "owner_penalty_max", "lapse_window"):
            d[derived] = round(getattr(self, derived), 6)
        return d


def _make(name: str, probe_interval: float, k_suspect: float, k_dead: float,
          lease_factor: float, zmq_hb_ms: int, reconnect_ms: int) -> Timing:
    suspect_after = k_suspect * probe_interval
    dead_after = suspect_after + k_dead * probe_interval
    return Timing(
        name=name,
        probe_interval=probe_interval,
        suspect_after=suspect_after,
        dead_after=dead_after,
        lease=lease_factor * dead_after,
        max_drift=0.001,          # 1000 ppm: far above any real quartz, cheap insurance
        margin=max(0.02, probe_interval),
        # Linux ignores an ARP update of a neighbour entry changed less than locktime (1 s by
        # default) before: a client whose entry was refreshed just before the takeover keeps the
        # old owner's MAC until the repeat, so the repeat comes just after locktime
        garp_repeat_after=1.1,
        reconcile_every=max(0.5, 5 * probe_interval),
        anti_flap=max(1.0, 10 * probe_interval),
        zmq_heartbeat_ivl_ms=zmq_hb_ms,
        zmq_heartbeat_timeout_ms=3 * zmq_hb_ms,
        reconnect_ivl_ms=reconnect_ms,
        # back-off of zmq's reconnection attempts, capped at a quarter of dead_after: after a
        # partition heals every link is back well within one failure-detection period
        reconnect_ivl_max_ms=max(reconnect_ms, min(10 * reconnect_ms, round(dead_after * 250))),
        # a SYN lost in the instant a partition heals costs D/2, not the kernel's 1 s retransmit
        connect_timeout_ms=max(50, min(1000, round(dead_after * 500))),
    )


# "lan": tolerant of a loaded 2-core box (GC pauses, scheduler delays of 100+ ms).
#   P = 0.1 s, suspect after 4 P = 0.4 s, dead after 4 P + 3 P = 0.7 s, lease = 0.7 s.
# "fast": for benchmarks and quiet machines.
#   P = 0.03 s, suspect after 3 P = 0.09 s, dead after 3 P + 2 P = 0.15 s, lease = 0.15 s.
PRESETS: dict[str, Timing] = {
    "lan": _make("lan", probe_interval=0.1, k_suspect=4, k_dead=3, lease_factor=1.0,
                 zmq_hb_ms=500, reconnect_ms=100),
    "fast": _make("fast", probe_interval=0.03, k_suspect=3, k_dead=2, lease_factor=1.0,
                  zmq_hb_ms=200, reconnect_ms=20),
}


def preset(name: str) -> Timing:
    """The named preset; KeyError names the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown timing preset {name!r} (known: {', '.join(sorted(PRESETS))})") from None


def idle_message_rate(t: Timing, nodes: int, managers: int, vips: int = 1, logs: int = 1,
                      catch_up_every: float = 3.0, pull_idle_wait: float = 2.0) -> dict:
    """Bus messages per second an idle member's broker handles, by role (the mean over the
    members of that role), as ``bus.status`` counts them: calls and replies it routes,
    events its own services publish, events it takes from peers. Pure; bench/scale.py puts
    it beside the measured rate and extrapolates with it.

    With N = nodes + managers members (every one a voter), H = min(vips, nodes) holders,
    hb = member_hb_every, rr = report_refresh, re = renew_every (L/3)::

      membership   2/hb local (heartbeat, view) + (N-1)/hb from peers + 2/hb routed
                   (its bus.status snapshot)                 -- the pings are libzmq's: 0
      vip.status   nodes: 1/rr local; everyone: the other nodes' (nodes or nodes-1)/rr
      assignment   1/rr (the coordinator's own, or taken from it)
      leases       per holder and round: 2N at the holder (a promise and its reply per
                   voter), 2 at every other voter: node mean H(2N + 2(nodes-1))/(nodes re),
                   manager 2H/re
      configsync   catch-up call to the coordinator: 2/c per member, and the coordinator's
                   2(N-1)/c spread over all: 2/c + 2(N-1)/(N c)
      logagg       every manager pulls every node's logs each idle wait w: manager
                   2 nodes logs/w, node 2 managers logs/w

    Every term is constant or linear in N: per member the idle cost grows linearly with the
    cluster (the membership and vip.status terms, and leases through N voters), the whole
    cluster's with N^2 (all-to-all). At the "lan" preset with one VIP: 3 + 1 members, 30
    (node) and 24 (manager) per second; 7 + 2, 42 and 37; 29 + 3, 87 and 104. Leases are
    the largest term while clusters are small (17 of a node's 30 at 3 + 1).
    """
    n_all = nodes + managers
    holders = min(vips, nodes)
    hb, rr, re = t.member_hb_every, t.report_refresh, t.renew_every
    terms_node = {
        "membership": (2 + (n_all - 1) + 2) / hb,
        "vip.status": (1 + (nodes - 1)) / rr,
        "assignment": 1 / rr,
        "leases": holders * (2 * n_all + 2 * (nodes - 1)) / (nodes * re) if nodes else 0.0,
        "configsync": 2 / catch_up_every + 2 * (n_all - 1) / (n_all * catch_up_every),
        "logagg": 2 * managers * logs / pull_idle_wait,
    }
    terms_manager = {
        "membership": terms_node["membership"],
        "vip.status": nodes / rr,
        "assignment": 1 / rr,
        "leases": 2 * holders / re,
        "configsync": terms_node["configsync"],
        "logagg": 2 * nodes * logs / pull_idle_wait,
    }
    return {"node": round(sum(terms_node.values()), 3), "manager": round(sum(terms_manager.values()), 3),
            "terms": {"node": {k: round(v, 3) for k, v in terms_node.items()},
                      "manager": {k: round(v, 3) for k, v in terms_manager.items()}}}
