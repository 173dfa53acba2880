"""election: the quorum coordinator, the VIP assignment, and the lease votes.

Every member runs it and every member is a voter (managers too, so two mail nodes and
one manager make a valid cluster). It plays two roles; docs/ELECTION.md gives the
protocol and the argument why no VIP can have two holders.

1. Coordinator election (Raft's election without a log). Durable ``term`` and
   ``voted_for`` in ``<data_dir>/election.json``. A voter stands (term+1, votes for itself,
   asks every voter) within U(0, ``election_timeout``) of its membership view showing the
   coordinator's member not alive, or after ``leader_timeout`` without an assignment (the
   coordinator's election service hung or gone). A voter grants at most one vote per term,
   and none at all while the coordinator is alive in its view and was heard within
   ``leader_timeout`` (stickiness, so a member that merely lost its link cannot depose a
   working coordinator). A majority of the configured voters makes a coordinator; it
   computes ``election.assignment`` every probe interval and publishes it when it changes
   and every ``report_refresh`` otherwise (formulas: :mod:`ecluster.timing`). A coordinator
   whose membership view shows no majority alive steps down.

2. VIP leases by quorum (the safety mechanism). A node may hold a VIP only while a
   majority of voters have *promised* it to that node. Each voter keeps at most one
   promise per VIP and grants it only to the node the latest assignment names, and
   only when no unexpired promise to another node exists. The holder counts a promise
   from its own clock at the moment *before* it asked, for ``lease`` seconds; the voter
   counts it for ``lease*(1+max_drift) + margin`` from when it granted. Two majorities
   share a voter, and that voter never promised the VIP to two nodes at once, so two
   holders cannot both count a majority at the same instant. A voter that (re)starts
   grants nothing for ``handover_wait``: it may have forgotten promises it made.
   Coordinator changes do not interrupt VIPs: the holder keeps renewing with the voters.

RPC:    vote(term, candidate) · promise(holder, vips) · release(holder, vips) ·
        status() · move(vip, node) · drain(node) · undrain(node) · unpin(vip)
Events: election.assignment {term, leader, seq, owners, drained, pinned, candidates, settled}
        (in) membership.view (own member's), vip.status (every node's), health.status (every
        node's: a VIP guarded by a failing check is not assigned there, docs/CHECKS.md)
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from bus.client import BusError
from node.fsutil import atomic_write
from node.health import HealthBook
from node.vipcore import HoldRecord, VipSpec, assign_vips, vip_key
from services.base import Service, ServiceError, rpc
from bus import roles as access

FOLLOWER, CANDIDATE, LEADER = "follower", "candidate", "leader"
CONFIG_HEIGHT_FILE = "config.height"     # written by configsync: commits on this member's main


def read_config_height(data_dir: Path) -> int:
    """How many configuration commits this member holds durably (0 when none)."""
    try:
        return int((data_dir / CONFIG_HEIGHT_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


class ElectionService(Service):
    name = "election"
    builtin = True
    critical = True
    subscriptions = ("membership.view", "vip.status", "election.assignment", "health.status")

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        type(self).tick_interval = cluster.timing.probe_interval
        t = cluster.timing
        self.voters = cluster.voters
        self.quorum = cluster.quorum
        self.promise_for = t.lease * (1 + t.max_drift) + t.margin
        self.specs = [VipSpec(address=v.address, interface=v.interface, kind=v.kind,
                              preference=v.preference, follow=v.follow) for v in cluster.vips]
        self.state_file = self.data_dir / "election.json"
        self.admin_file = self.data_dir / "election-admin.json"
        # durable
        self.term = 0
        self.voted_for: str | None = None
        # volatile
        self.role = FOLLOWER
        self.leader: str | None = None
        self.leader_heard = 0.0                    # monotonic
        self.election_deadline = 0.0
        self.view: dict = {}
        self.alive_since: dict[str, float] = {}    # monotonic, for anti-flap
        self.returned: set[str] = set()            # nodes seen leaving since we started
        self.ready_at: dict[str, float] = {}       # monotonic: first vip.status saying "ready"
        self.vip_status: dict[str, dict] = {}      # node -> last vip.status body (+ "_at")
        self.assignment: dict = {"term": 0, "leader": None, "seq": 0, "owners": {}, "drained": [],
                                 "pinned": {}, "candidates": [], "settled": time.time()}
        self._assignment_sent: dict | None = None  # the last assignment published, without seq
        self._assignment_sent_at = 0.0             # ... and when (monotonic)
        # vip -> (holder, expires on our monotonic clock, the holder's clock when it last asked)
        self.promises: dict[str, tuple[str, float, float]] = {}
        self.grant_after = 0.0
        self.successors: dict[str, tuple[str, float, float]] = {}  # vip -> (next holder, expires, asked)
        self.drained: set[str] = set()
        self.pinned: dict[str, str] = {}
        self.seq = 0
        self.leader_since = 0.0
        self.lost_in_a_row = 0                     # candidacies lost in a row (back-off)
        self.counters = {"prevotes": 0, "prevotes_won": 0, "candidacies": 0, "elected": 0, "penalties": 0}
        # owners that are alive but cannot keep their VIP (a slow link): passed over for a while
        self.hold_record = HoldRecord(t.struggle_after, t.lapse_window, 2, t.owner_penalty, t.owner_penalty_max)
        # every node's health.status (node/health.py): fresh as long as vip.status is for candidates()
        self.health = HealthBook(t.report_fresh, t.anti_flap)

    # -- persistence ----------------------------------------------------------------
    def _load(self) -> None:
        try:
            d = json.loads(self.state_file.read_text())
            self.term, self.voted_for = int(d["term"]), d.get("voted_for")
        except (OSError, ValueError, KeyError, TypeError):
            pass
        try:
            d = json.loads(self.admin_file.read_text())
            self.drained = set(d.get("drained", []))
            self.pinned = dict(d.get("pinned", {}))
        except (OSError, ValueError, TypeError):
            pass

    def _write(self, path: Path, data: dict) -> None:
        # the vote must survive a crash (two votes in one term elect two coordinators):
        # atomic_write fsyncs the file and, after the rename, its directory
        atomic_write(path, json.dumps(data))

    def _persist_vote(self) -> None:
        self._write(self.state_file, {"term": self.term, "voted_for": self.voted_for})

    def _persist_admin(self) -> None:
        self._write(self.admin_file, {"drained": sorted(self.drained), "pinned": self.pinned})

    # -- life cycle -----------------------------------------------------------------
    async def handle_init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._load()
        now = time.monotonic()
        # We may have promised VIPs before a crash and forgotten: grant nothing until any
        # such promise has run out.
        self.grant_after = now + self.timing.handover_wait
        self._reset_election_deadline(now)
        self.log.info("election up: term %d, voters %s, quorum %d", self.term, self.voters, self.quorum)

    def _reset_election_deadline(self, now: float, backoff: int = 0) -> None:
        """Stand after ``leader_timeout`` + a random part unless news comes first (an
        assignment, or the coordinator leaving the membership view: :meth:`_leader_lost`);
        ``backoff`` (candidacies lost in a row) widens the random part, so candidates that
        split the vote rarely collide again."""
        self.election_deadline = now + self.timing.leader_timeout + self._jitter(backoff)

    def _jitter(self, backoff: int = 0) -> float:
        et = self.timing.election_timeout
        return random.uniform(0, et * min(4, 1 + backoff))

    def _leader_alive(self, now: float) -> bool:
        """Is there a coordinator we still hear: alive in our membership view, and its
        assignment heard within ``leader_timeout``?"""
        if self.leader is None or now - self.leader_heard >= self.timing.leader_timeout:
            return False
        if self.leader == self.member.name:
            return True
        return self.view.get("members", {}).get(self.leader, {}).get("state") == "alive"

    def _leader_lost(self, now: float) -> None:
        """The coordinator's member left our view: stand soon (a random part in, so that
        followers seeing it together rarely collide; pre-vote keeps a false alarm harmless)."""
        if self.role == FOLLOWER:
            self.election_deadline = min(self.election_deadline, now + self._jitter(self.lost_in_a_row))

    async def handle_tick(self) -> None:
        now = time.monotonic()
        if self.role == LEADER:
            if not self._majority_alive():
                self.log.warning("term %d: no majority alive in my view, stepping down", self.term)
                self._become_follower(None)
            else:
                await self._publish_assignment()
                return
        if now >= self.election_deadline and self.role != CANDIDATE:
            asyncio.get_running_loop().create_task(self._stand())

    def _majority_alive(self) -> bool:
        members = self.view.get("members", {})
        alive = sum(1 for v in self.voters if v == self.member.name or members.get(v, {}).get("state") == "alive")
        return alive >= self.quorum

    def _become_follower(self, leader: str | None, lost: bool = False) -> None:
        self.role = FOLLOWER
        self.leader = leader
        self.lost_in_a_row = self.lost_in_a_row + 1 if lost else 0
        self._reset_election_deadline(time.monotonic(), self.lost_in_a_row)

    # -- standing for coordinator ---------------------------------------------------
    async def _prevote(self) -> bool:
        """Would a majority vote for us in term+1? Asked without bumping any term (Raft's
        pre-vote, thesis §9.6): a member cut off from the majority never inflates its term, so
        after a partition heals the terms still agree and one candidacy usually settles it."""
        self.counters["prevotes"] += 1
        term = self.term + 1
        height = read_config_height(self.data_dir)
        timeout = max(0.2, 3 * self.timing.probe_interval)

        async def ask(voter: str) -> bool:
            try:
                r = await self.call(voter, "election", "prevote", timeout=timeout, term=term,
                                    candidate=self.member.name, config_height=height)
            except BusError:
                return False
            if isinstance(r, dict) and isinstance(r.get("term"), int) and r["term"] > self.term:
                self._observe_term(int(r["term"]))
            return bool(isinstance(r, dict) and r.get("granted"))

        others = [v for v in self.voters if v != self.member.name]
        grants = 1 + sum(await asyncio.gather(*(ask(v) for v in others)))
        won = grants >= self.quorum and self.term + 1 == term and self.role == CANDIDATE
        if won:
            self.counters["prevotes_won"] += 1
        return won

    async def _stand(self) -> None:
        self.role = CANDIDATE
        if not await self._prevote():
            if self.role == CANDIDATE:
                self._become_follower(None)
            return
        if self.role != CANDIDATE:
            return
        self.counters["candidacies"] += 1
        self.term += 1
        self.voted_for = self.member.name
        self._persist_vote()
        term = self.term
        self.log.info("standing for coordinator in term %d", term)
        others = [v for v in self.voters if v != self.member.name]
        timeout = max(0.2, 3 * self.timing.probe_interval)

        async def ask(voter: str) -> bool:
            try:
                r = await self.call(voter, "election", "vote", timeout=timeout, term=term,
                                    candidate=self.member.name, config_height=read_config_height(self.data_dir))
            except BusError:
                return False
            if isinstance(r, dict) and r.get("term", 0) > self.term:
                self._observe_term(int(r["term"]))
            return bool(isinstance(r, dict) and r.get("granted"))

        votes = 1 + sum(await asyncio.gather(*(ask(v) for v in others)))
        if self.role != CANDIDATE or self.term != term:
            return
        if votes >= self.quorum:
            self.role = LEADER
            self.leader = self.member.name
            self.leader_since = time.monotonic()
            self.lost_in_a_row = 0
            self.counters["elected"] += 1
            self.log.info("coordinator for term %d with %d of %d votes", term, votes, len(self.voters))
            await self._publish_assignment()
        else:
            self._become_follower(None, lost=True)

    def _observe_term(self, term: int) -> None:
        if term > self.term:
            self.term = term
            self.voted_for = None
            self._persist_vote()
            if self.role != FOLLOWER:
                self._become_follower(None)

    def _vote_refusal(self, term: int, candidate: str, config_height: int, now: float) -> str | None:
        """Why we would not vote for ``candidate`` in ``term`` (None: we would), no state change."""
        if term < self.term:
            return "stale term"
        mine = read_config_height(self.data_dir)
        if config_height < mine:
            return f"config behind ({config_height} < {mine})"
        if self.leader not in (None, candidate) and self.role != LEADER and self._leader_alive(now):
            return f"coordinator {self.leader} is alive"
        if self.role == LEADER and (term == self.term or self._majority_alive()):
            return "I am coordinator" + (" of this term" if term == self.term else " and see a majority")
        if term == self.term and self.voted_for not in (None, candidate):
            return f"voted for {self.voted_for}"
        return None

    @rpc(access.rule(access.SELF, own="candidate"))
    def rpc_prevote(self, term: int, candidate: str, config_height: int = 0) -> dict:
        """Would we vote for ``candidate`` in ``term``? Changes nothing (no term, no vote)."""
        if candidate not in self.voters or not isinstance(term, int) or not isinstance(config_height, int):
            raise ServiceError(f"{candidate!r} is not a voter", "bad_arguments")
        reason = self._vote_refusal(term, candidate, config_height, time.monotonic())
        out = {"granted": reason is None, "term": self.term}
        if reason is not None:
            out["reason"] = reason
        return out

    @rpc(access.rule(access.SELF, own="candidate"))
    def rpc_vote(self, term: int, candidate: str, config_height: int = 0) -> dict:
        now = time.monotonic()
        if candidate not in self.voters or not isinstance(term, int) or not isinstance(config_height, int):
            raise ServiceError(f"{candidate!r} is not a voter", "bad_arguments")
        if term < self.term:
            return {"granted": False, "term": self.term, "reason": "stale term"}
        # Raft's up-to-date rule for the configuration history: a coordinator must hold every
        # commit a majority acknowledged, so nobody behind us gets our vote.
        mine = read_config_height(self.data_dir)
        if config_height < mine:
            self._observe_term(term)
            return {"granted": False, "term": self.term, "reason": f"config behind ({config_height} < {mine})"}
        # Stickiness: while a coordinator is heard, nobody else gets our vote.
        if self.leader not in (None, candidate) and self.role != LEADER and self._leader_alive(now):
            return {"granted": False, "term": self.term, "reason": f"coordinator {self.leader} is alive"}
        if self.role == LEADER and term == self.term:
            return {"granted": False, "term": self.term, "reason": "I am coordinator of this term"}
        self._observe_term(term)
        if self.voted_for in (None, candidate):
            self.voted_for = candidate
            self._persist_vote()
            self._reset_election_deadline(now)
            return {"granted": True, "term": self.term}
        return {"granted": False, "term": self.term, "reason": f"voted for {self.voted_for}"}

    # -- events ---------------------------------------------------------------------
    async def handle_event(self, topic: str, body: Any, env) -> None:
        if not isinstance(body, dict):
            return
        if topic == "membership.view":
            if env.src == self.member.name:
                self._take_view(body)
        elif topic == "vip.status":
            node = env.src
            if node in self.cluster.nodes:
                body["_at"] = time.monotonic()
                self.vip_status[node] = body
                if body.get("ready") is not False and node in self.alive_since:   # absent: does not tell
                    self.ready_at.setdefault(node, body["_at"])
        elif topic == "election.assignment":
            self._take_assignment(body, env.src)
        elif topic == "health.status":
            node = env.src
            if node in self.cluster.nodes and self.health.take(node, body, time.monotonic()):
                self.log.info("health of %s: failing %s, unknown %s", node, body.get("failing"), body.get("unknown"))
                if self.role == LEADER and self._majority_alive():
                    # eligibility changed: reassign now rather than at the next tick, so a VIP
                    # leaves a node whose mail server died within one message
                    await self._publish_assignment()

    def _take_view(self, view: dict) -> None:
        now = time.monotonic()
        members = view.get("members") if isinstance(view.get("members"), dict) else {}
        for name, info in members.items():
            alive = isinstance(info, dict) and info.get("state") == "alive"
            if alive:
                self.alive_since.setdefault(name, now)
            elif name in self.alive_since:
                del self.alive_since[name]
                self.ready_at.pop(name, None)
                self.returned.add(name)         # it went away: when it comes back, anti-flap applies
        had_majority = self._majority_alive()
        self.view = view
        if self.leader not in (None, self.member.name) and members.get(self.leader, {}).get("state") != "alive":
            self._leader_lost(now)
        if not had_majority and self._majority_alive() and self.role == FOLLOWER and not self._leader_alive(now):
            # a majority is back in view (a partition healed, members started) and nobody
            # leads: stand in name order, one probe interval apart, instead of after a random
            # election timeout; candidacies then rarely collide (pre-vote keeps it harmless)
            alive = sorted(v for v in self.voters if v == self.member.name
                           or members.get(v, {}).get("state") == "alive")
            soon = now + alive.index(self.member.name) * self.timing.probe_interval
            self.election_deadline = min(self.election_deadline, soon)

    def _take_assignment(self, a: dict, src: str) -> None:
        term = a.get("term")
        if not isinstance(term, int) or a.get("leader") != src or src not in self.voters:
            return
        if term < self.term:
            return
        if term > self.term:
            self._observe_term(term)
        if src != self.member.name:
            if self.role == LEADER:          # a coordinator of the same term cannot exist twice
                self.log.error("two coordinators in term %d: %s and me", term, src)
                return
            self.role = FOLLOWER
            self.leader = src
            self.leader_heard = time.monotonic()
            self._reset_election_deadline(self.leader_heard)
        if not isinstance(a.get("owners"), dict):
            return
        if (term, a.get("seq", 0)) >= (self.assignment.get("term", 0), self.assignment.get("seq", 0)) or src == self.member.name:
            self.assignment = a
            if src != self.member.name:
                drained = set(a.get("drained") or [])
                pinned = dict(a.get("pinned") or {})
                if drained != self.drained or pinned != self.pinned:
                    self.drained, self.pinned = drained, pinned
                    self._persist_admin()

    # -- coordinator duties ---------------------------------------------------------
    def candidates(self, now: float) -> list[str]:
        """Nodes that may hold VIPs: alive in our view, running a vip service, stable."""
        members = self.view.get("members", {})
        fresh = self.timing.report_fresh
        out = []
        for node in self.cluster.nodes:
            if members.get(node, {}).get("state") != "alive" and node != self.member.name:
                continue
            st = self.vip_status.get(node)
            if st is None or now - st["_at"] > fresh:
                continue
            out.append(node)
        return out

    def _settled(self, node: str, now: float) -> bool:
        """Has ``node`` been alive and ready (every program running) for anti_flap?"""
        if node not in self.ready_at or node not in self.alive_since:
            return False
        return now - max(self.alive_since[node], self.ready_at[node]) >= self.timing.anti_flap

    def compute_owners(self, now: float) -> dict[str, str | None]:
        cands = self.candidates(now)
        current = {k: v for k, v in self.assignment.get("owners", {}).items() if v}
        # anti-flap: a node that came back is not *preferred* again until its programs all
        # run (vip.status "ready") and it has been alive and ready for anti_flap
        unstable = {n for n in cands if n in self.returned and n != self.member.name
                    and not self._settled(n, now)}
        # per VIP: a node whose check guarding it recovered less than anti_flap ago
        recovering = self.health.recovering(now)
        specs = self.specs
        if unstable or recovering:
            specs = [VipSpec(address=s.address, interface=s.interface, kind=s.kind,
                             preference=None if s.preference in unstable
                             or s.preference in recovering.get(s.key, ()) else s.preference,
                             follow=s.follow) for s in self.specs]
        avoid = self.hold_record.avoid(now)
        for vip, nodes in self.health.unknown(now, current).items():
            avoid.setdefault(vip, set()).update(nodes)
        if unstable:
            current = {k: v for k, v in current.items() if v not in unstable}
        pinned = {k: v for k, v in self.pinned.items() if v not in unstable}
        loads = {n: 0.0 for n in cands}
        return assign_vips(specs, cands, loads, self.drained, pinned, current, avoid,
                           ineligible=self.health.ineligible(now))

    def _observe_holders(self, now: float) -> None:
        """Does each VIP's assigned owner hold it? (vip.status, fresh only); a penalty starts
        when one cannot keep it (node.vipcore.HoldRecord)."""
        owners = self.assignment.get("owners", {}) if self.assignment.get("term") == self.term else {}
        fresh = self.timing.report_fresh              # as for candidates(): a slow link delays reports
        for spec in self.specs:
            if spec.follow:
                continue                      # followers go wherever their leader goes
            owner = owners.get(spec.key)
            st = self.vip_status.get(owner) if owner else None
            held = None if st is None or now - st["_at"] > fresh else spec.key in (st.get("held") or [])
            length = self.hold_record.observe(spec.key, owner, held, now)
            if length is not None:
                self.counters["penalties"] += 1
                self.log.warning("%s: %s cannot keep it (lease lapses while alive): passed over for %.0f s",
                                 spec.key, owner, length)
                asyncio.get_running_loop().create_task(self.alarm(
                    "vip_owner_struggling", f"VIP {spec.key}: {owner} cannot keep it; moved elsewhere for {length:.0f} s",
                    vip=spec.key, node=owner, seconds=length))

    async def _publish_assignment(self, force: bool = False) -> None:
        now = time.monotonic()
        self._observe_holders(now)
        self.health.forget_old(now)
        owners = self.compute_owners(now)
        prev = self.assignment.get("owners", {})
        settled = self.assignment.get("settled", time.time())
        if owners != prev or self.assignment.get("term") != self.term:
            settled = time.time()
            if owners != prev:
                self.log.info("term %d assignment: %s", self.term, owners)
        content = {"term": self.term, "leader": self.member.name, "owners": owners,
                   "drained": sorted(self.drained), "pinned": self.pinned,
                   "candidates": self.candidates(now), "settled": settled}
        # computed every tick (P), sent when it changed, else every report_refresh: it is the
        # coordinator's heartbeat too (followers stand after leader_timeout of silence, ecluster.timing)
        if (not force and content == self._assignment_sent
                and now - self._assignment_sent_at < self.timing.report_refresh):
            return
        self.seq += 1
        a = {**content, "seq": self.seq}
        self.assignment = a
        self._assignment_sent, self._assignment_sent_at = content, now
        await self.publish("election.assignment", a)

    # -- lease votes ----------------------------------------------------------------
    def _current(self, vip: str, now: float) -> tuple[str, float, float] | None:
        """The unexpired promise of ``vip``; an expired one gives way to its successor."""
        cur = self.promises.get(vip)
        if cur is not None and cur[1] <= now:
            cur = None
            del self.promises[vip]
        if cur is None:
            nxt = self.successors.pop(vip, None)
            if nxt is not None and nxt[1] > now:
                cur = self.promises[vip] = nxt
        return cur

    @rpc(access.rule(access.SELF, own="holder"))
    def rpc_promise(self, holder: str, vips: list, asked: float | None = None) -> dict:
        """Promise each VIP in ``vips`` to ``holder`` if we safely can. Never blocks.

        Results per VIP: ``{"granted": True}``; ``{"granted": True, "after": H}`` — a
        *successor* promise, valid only once the current holder H has handed the address
        over (the asker must get that confirmation from H itself, see vip.handover); or
        ``{"granted": False, "retry_after": seconds|None, "reason": ...}``.
        A VIP has at most one promise and one successor promise at a voter: nobody else
        is promised anything until both have run out or been released.
        ``asked``: the holder's monotonic clock when it sent this request; a release drops
        only promises asked for before the fence it carries (see :meth:`rpc_release`).
        """
        if holder not in self.cluster.nodes or not isinstance(vips, list):
            raise ServiceError("promise needs a node name and a list of VIPs", "bad_arguments")
        if asked is None:
            asked = -math.inf
        elif isinstance(asked, bool) or not isinstance(asked, (int, float)) or math.isnan(asked):
            raise ServiceError("promise: asked must be a number (the holder's clock)", "bad_arguments")
        now = time.monotonic()
        owners = self.assignment.get("owners", {})
        out: dict[str, dict] = {}
        for raw in vips:
            if not isinstance(raw, str):
                continue
            vip = vip_key(raw)
            if now < self.grant_after:
                out[vip] = {"granted": False, "retry_after": self.grant_after - now, "reason": "voter restarting"}
                continue
            if owners.get(vip) != holder:
                out[vip] = {"granted": False, "retry_after": None, "reason": f"assigned to {owners.get(vip)}"}
                continue
            cur = self._current(vip, now)
            nxt = self.successors.get(vip)
            if nxt is not None and nxt[1] <= now:
                del self.successors[vip]
                nxt = None
            if cur is None:
                self.promises[vip] = (holder, now + self.promise_for, asked)
                out[vip] = {"granted": True}
            elif cur[0] == holder:
                if nxt is not None:
                    # It is being handed on: the holder may already have confirmed the
                    # handover to the successor, so it must not renew its way back in.
                    out[vip] = {"granted": False, "retry_after": nxt[1] - now,
                                "reason": f"being handed over to {nxt[0]}"}
                else:
                    # max: a request overtaken by a later one must not make the promise look older
                    self.promises[vip] = (holder, now + self.promise_for, max(asked, cur[2]))
                    out[vip] = {"granted": True}
            elif nxt is None or nxt[0] == holder:
                prev_asked = nxt[2] if nxt is not None else -math.inf
                self.successors[vip] = (holder, now + self.promise_for, max(asked, prev_asked))
                out[vip] = {"granted": True, "after": cur[0]}
            else:
                out[vip] = {"granted": False, "retry_after": min(cur[1], nxt[1]) - now,
                            "reason": f"promised to {cur[0]}, then {nxt[0]}"}
        return {"voter": self.member.name, "term": self.term, "results": out}

    @rpc(access.rule(access.SELF, own="holder"))
    def rpc_release(self, holder: str, vips: list, before: dict | None = None) -> dict:
        """``holder`` has unplumbed ``vips``: drop its promises; a successor's becomes current.

        ``before`` ({vip: the holder's clock at its fence}): drop only promises asked for at
        or before that instant. A release that arrives after a later request of the holder
        (the holder counts that one) then leaves its promise alone. Without it, drop all.
        """
        released = []
        now = time.monotonic()
        fences = before if isinstance(before, dict) else {}
        for raw in vips if isinstance(vips, list) else []:
            if not isinstance(raw, str):
                continue
            vip = vip_key(raw)
            fence = fences.get(raw, fences.get(vip, math.inf))
            if isinstance(fence, bool) or not isinstance(fence, (int, float)) or math.isnan(fence):
                fence = math.inf
            cur = self.promises.get(vip)
            if cur is not None and cur[0] == holder and cur[2] <= fence:
                del self.promises[vip]
                released.append(vip)
                self._current(vip, now)
            nxt = self.successors.get(vip)
            if nxt is not None and nxt[0] == holder and nxt[2] <= fence:
                del self.successors[vip]
        return {"released": released}

    # -- administration ---------------------------------------------------------------
    async def _forward(self, method: str, caller: access.Principal, **args) -> Any:
        """None on the coordinator (serve it here); elsewhere the coordinator's answer.

        Only this member's own callers are forwarded: a forwarded call carries this
        member's identity, never the original caller's (bus.roles), so a remote caller is
        told where the coordinator is instead (``not_coordinator``) and asks it itself."""
        if self.role == LEADER:
            return None
        if not self.leader:
            raise ServiceError("no coordinator at the moment (no majority?); try again", "no_coordinator")
        if not caller.local:
            raise ServiceError(f"not the coordinator: ask {self.leader}", "not_coordinator")
        # forwarded, the call is this member's: forward only what the coordinator lets this
        # member do (a node may drain itself, not move VIPs), else say where to ask
        as_me = access.Principal(self.member.name, self.member.role)
        rule = getattr(getattr(type(self), f"rpc_{method}"), "rpc_rule", None)
        if rule is None or not access.permits(rule, as_me, args, self._switches):
            raise ServiceError(f"not the coordinator: ask {self.leader} (a {self.member.role}'s own "
                               f"call of election.{method} is not forwarded)", "not_coordinator")
        return await self.call(self.leader, "election", method, timeout=2.0, **args)

    def _check_node(self, node: str) -> None:
        if node not in self.cluster.nodes:
            raise ServiceError(f"unknown node {node!r} (nodes: {', '.join(self.cluster.nodes)})", "unknown_node")

    @rpc(access.OPERATOR, caller=True)
    async def rpc_move(self, vip: str, node: str, caller: access.Principal) -> dict:
        fwd = await self._forward("move", caller, vip=vip, node=node)
        if fwd is not None:
            return fwd
        key = vip_key(vip)
        if key not in {s.key for s in self.specs}:
            raise ServiceError(f"unknown VIP {vip!r}", "unknown_vip")
        self._check_node(node)
        if node not in self.candidates(time.monotonic()):
            raise ServiceError(f"node {node!r} is down or not running its vip service: refusing the move", "node_down")
        if node in self.drained:
            raise ServiceError(f"node {node!r} is drained: undrain it first", "node_drained")
        spec = next(s for s in self.specs if s.key == key)
        if spec.follow:
            raise ServiceError(f"VIP {key} follows {spec.follow}: move that one instead", "follower")
        failing = {v for v, nodes in self.health.ineligible(time.monotonic()).items() if node in nodes}
        follow_of = {s.key: vip_key(s.follow) for s in self.specs if s.follow}

        def leader_of(k: str) -> str:
            seen = set()
            while k in follow_of and k not in seen:   # validated acyclic; the set only guards
                seen.add(k)
                k = follow_of[k]
            return k
        group = {s.key for s in self.specs if leader_of(s.key) == key}     # the VIP and its followers
        if failing & group:
            raise ServiceError(f"node {node!r} fails a health check guarding {', '.join(sorted(failing & group))}:"
                               " refusing the move", "node_unhealthy")
        self.pinned[key] = node
        self._persist_admin()
        await self._publish_assignment()
        return {"vip": key, "node": node, "term": self.term}

    @rpc(access.OPERATOR, caller=True)
    async def rpc_unpin(self, vip: str, caller: access.Principal) -> dict:
        fwd = await self._forward("unpin", caller, vip=vip)
        if fwd is not None:
            return fwd
        self.pinned.pop(vip_key(vip), None)
        self._persist_admin()
        await self._publish_assignment()
        return {"vip": vip_key(vip)}

    @rpc(access.rule(access.ADMIN, access.MANAGER, access.SELF, own="node"), caller=True)
    async def rpc_drain(self, node: str, caller: access.Principal) -> dict:
        fwd = await self._forward("drain", caller, node=node)
        if fwd is not None:
            return fwd
        self._check_node(node)
        self.drained.add(node)
        self.pinned = {k: v for k, v in self.pinned.items() if v != node}
        self._persist_admin()
        await self._publish_assignment()
        return {"drained": sorted(self.drained)}

    @rpc(access.rule(access.ADMIN, access.MANAGER, access.SELF, own="node"), caller=True)
    async def rpc_undrain(self, node: str, caller: access.Principal) -> dict:
        fwd = await self._forward("undrain", caller, node=node)
        if fwd is not None:
            return fwd
        self._check_node(node)
        self.drained.discard(node)
        self._persist_admin()
        await self._publish_assignment()
        return {"drained": sorted(self.drained)}

    @rpc(access.ANYONE)
    def rpc_status(self) -> dict:
        now = time.monotonic()
        return {
            "member": self.member.name, "role": self.role, "term": self.term, "leader": self.leader,
            "voted_for": self.voted_for, "quorum": self.quorum, "voters": self.voters,
            "assignment": self.assignment, "view": self.view, "counters": self.counters,
            "vips": self.vip_table(now),
            "health": self.health.table(now),
            "promises": {v: {"holder": h, "expires_in": round(e - now, 3)} for v, (h, e, _) in self.promises.items()},
            "successors": {v: {"holder": h, "expires_in": round(e - now, 3)} for v, (h, e, _) in self.successors.items()},
        }

    def vip_table(self, now: float) -> list[dict]:
        """address, owner, candidates, state (owned/unsafe/broken/unowned), settled_for."""
        a = self.assignment
        owners = a.get("owners", {})
        holders: dict[str, list[str]] = {}
        # unchanged statuses come every report_refresh: two may be late before a holder is dropped
        fresh = max(self.timing.suspect_after, 2 * self.timing.report_refresh)
        for node, st in self.vip_status.items():
            if now - st.get("_at", 0) > fresh:
                continue
            for vip in st.get("held", []) or []:
                holders.setdefault(vip, []).append(node)
        rows = []
        avoid = self.hold_record.penalties(now)
        unhealthy = self.health.ineligible(now)
        untested = self.health.unknown(now, {})
        for s in self.specs:
            owner = owners.get(s.key)
            held = sorted(holders.get(s.key, []))
            if len(held) > 1:
                state = "unsafe"
            elif owner is None:
                state = "unowned"
            elif held == [owner]:
                state = "owned"
            else:
                state = "broken"
            rows.append({"address": s.address, "kind": s.kind, "interface": s.interface, "owner": owner,
                         "holders": held, "preference": s.preference, "follow": s.follow,
                         "candidates": a.get("candidates", []), "state": state,
                         "pinned": self.pinned.get(s.key),
                         # nodes passed over for this VIP (they could not keep it): seconds left
                         "avoided": {n: round(left, 1) for n, left in sorted(avoid.get(s.key, {}).items())},
                         # nodes whose health checks guarding this VIP fail / have no result yet
                         "unhealthy": sorted(unhealthy.get(s.key, ())),
                         "health_unknown": sorted(untested.get(s.key, ())),
                         "settled_for": round(time.time() - a.get("settled", time.time()), 3)})
        return rows
