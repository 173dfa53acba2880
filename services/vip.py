"""vip: the only service that touches interfaces ("DuraVIP" plumbing), on every node.

Loop, per VIP (state machine: :class:`node.vipcore.VipOwnerFSM`):

* The coordinator's ``election.assignment`` names an owner per VIP. For each VIP
  assigned here, ask every voter for a promise (``election.promise``), noting our
  monotonic clock *before* asking; a granted promise is good for ``lease`` seconds from
  then. With promises from a majority of voters the VIP is ours: plumb (pyroute2,
  replace), send a gratuitous-ARP (IPv6: unsolicited NA) burst, schedule a repeat. Renew
  every ``lease/3`` (a request waits up to ``lease`` for its reply, and two may overlap per voter, so a
  starved voter's late reply still counts and does not hold the next renewal up).
* A *successor* promise ("after H") counts only once H, asked **after** that promise
  arrived, confirms it no longer holds the VIP (``vip.handover``; H fences itself as it
  answers); a renewal of it waits for a new confirmation while the old entry keeps
  counting. The bookkeeping is :class:`node.vipcore.LeaseBook`, the rule is model-checked
  in docs/model/election.pml. Only with such a confirmed successor promise do we plumb
  without an ARP (IPv6: DAD) probe.
* The moment fewer than a majority of promises are unexpired (a timer fires at that
  instant, minus a small guard), unplumb. No message is needed for that: a partitioned
  owner fences itself on its own clock.
* When the assignment names another node, an owner keeps serving (HANDING_OVER: no
  renewals, the lease still counted) until the next owner, holding successor promises from
  a majority, asks for the handover: then unplumb, fence, answer, and tell the voters
  (``release``, carrying the fence so a voter drops only promises asked for before it) and
  publish ``vip.released``. Clients are answered here while the successor collects its
  promises, so a graceful move costs one message, not a promise round (release, then
  acquire). If nobody asks before the lease runs out, it lapses as any other.
* On start every managed address found on our interfaces is removed first: a restarted
  service has forgotten its leases, so it must not hold anything it cannot prove.
* Every ``reconcile_every`` the interfaces are compared with the state machine; another
  node reporting an address we hold raises the ``two_owners`` alarm.
* After a partition heals (a member comes back alive in our view) every owned VIP is
  announced again (gratuitous ARP / unsolicited NA), so no client keeps a stale neighbour entry.

Publishes ``vip.status`` {node, held, states, load, ready} when it changes (checked every
probe interval) and unchanged every ``min(report_refresh, stale_after / 3)`` (0.7 s on lan): the
coordinator's evidence that this node can hold VIPs. ``ready`` turns true once every
program of this member runs (supervisord's RUNNING): a node that comes back gets its
preferred VIPs back only then (plus the anti-flap time), not while it is still starting.
``vip_dry_run = true`` in the cluster file records addresses in memory instead of plumbing
them, and says so in its status. Without it, a service lacking CAP_NET_ADMIN or CAP_NET_RAW
(not root) refuses to start with a one-line message and a non-zero exit: pretending to hold
VIPs it cannot plumb would look healthy while no client is served.

IPv6 VIPs go through the same machine: plumbed without DAD (usable at once), announced with
unsolicited Neighbour Advertisements wherever IPv4 sends gratuitous ARP (burst, repeat, after
a heal), and probed before a takeover with a DAD Neighbour Solicitation where IPv4 sends an
ARP probe (node/netlink.py builds and parses both). "GARP" below means either.
"""
from __future__ import annotations

import asyncio
import math
import os
import socket
import time
from typing import Any

from bus.client import BusError
from node.vipcore import (Action, Event, LeaseBook, State, VipError, VipOwnerFSM, effective_capabilities,
                          vip_key, vip_plumbing_refusal)
from services.base import Service, rpc, stale_after
from bus import roles as access


READY_AT_THE_LATEST = 60.0      # s: a supervisord that never reports every program running


class DryRunPlumber:
    """Stands in for node.netlink.Plumber when we may not (or must not) plumb."""

    dry_run = True

    def __init__(self):
        self.held: set[tuple[str, str]] = set()

    def add(self, address: str, ifname: str, lifetime: int | None = None) -> bool:
        self.held.add((address, ifname))
        return True

    def remove(self, address: str, ifname: str) -> bool:
        present = (address, ifname) in self.held
        self.held.discard((address, ifname))
        return present

    def holds(self, address: str, ifname: str) -> bool:
        return any(a.split("/")[0] == address.split("/")[0] and i == ifname for a, i in self.held)

    def close(self) -> None:
        pass


class VipService(Service):
    name = "vip"
    roles = ("node",)
    builtin = True
    critical = True
    subscriptions = ("election.assignment", "vip.released", "vip.status", "membership.view")

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        t = cluster.timing
        type(self).tick_interval = t.probe_interval
        # the VIP watchers (base.watch_vips: the Postfix plug-in, hooks) count everything
        # released after stale_after of silence: three copies within it, so one late is harmless
        self.status_refresh = min(t.report_refresh, stale_after(t) / 3)
        self.specs = {vip_key(v.address): v for v in cluster.vips}
        self.fsm = {k: VipOwnerFSM(k) for k in self.specs}
        self.guard = min(0.02, t.margin / 4)
        # per VIP: counted promises, successor promises awaiting their handover confirmation,
        # and the fence (node.vipcore.LeaseBook; the rule is checked by docs/model/election.pml)
        self.books = {k: LeaseBook(cluster.quorum, t.lease, self.guard) for k in self.specs}
        self.handover_in_flight: set[tuple[str, str]] = set()
        self.handover_again: set[tuple[str, str]] = set()
        self.assignment: dict = {"term": -1, "seq": -1, "owners": {}}
        self._status_sent: dict | None = None          # the last vip.status body published
        self._status_sent_at = 0.0                     # ... and when (monotonic)
        self.in_flight: dict[str, int] = {}        # voter -> promise requests awaiting a reply
        self.retry_soon: set[str] = set()             # voters to ask again shortly (stale assignment)
        self.quick_retries: dict[str, int] = {}       # ... how many in a row (at most 3)
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.garp_timers: dict[str, asyncio.TimerHandle] = {}
        self.alive: set[str] = set()
        self.acquire_poll = max(0.01, t.probe_interval / 3)
        self.retry_stale = max(0.003, t.probe_interval / 20)
        # A graceful release waits this long for the successor's handover request (answered
        # at once): the successor then plumbs on confirmed successor promises, without the
        # ARP probe a plain current promise needs. The release goes out right after the
        # answer, or at this delay when no successor asks (it only speeds the next owner up;
        # safety never waits on it).
        self.release_delay = max(0.01, t.probe_interval / 2)
        self.delayed_release: dict[str, asyncio.TimerHandle] = {}
        self.counters = {"acquired": 0, "released": 0, "expired": 0, "garp": 0, "alarms": 0, "plumb_errors": 0,
                         "probe_answered": 0}
        self.acquired_at: dict[str, float] = {}       # wall clock of the last plumb / unplumb
        self.released_at: dict[str, float] = {}
        self.refreshed: dict[str, float] = {}
        self._garp_cache: dict[str, tuple] = {}
        self.unplumbed: dict[str, asyncio.Event] = {}
        self.probing: set[str] = set()
        self.probed_clear: dict[str, float] = {}
        self.last_probe_alarm: dict[str, float] = {}
        self.probe_wait = 0.015
        # The kernel deletes the address this long after our last refresh if we all die
        # (kill -9 of the whole node): whole seconds, at least 2 so one late refresh is harmless.
        self.kernel_lifetime = max(2, math.ceil(2 * t.lease))
        self.ready = False

    # -- set-up -------------------------------------------------------------------
    def refusal(self) -> str | None:
        """Why this process must not run (it could not plumb), or None."""
        try:
            with open("/proc/self/status") as f:
                caps = effective_capabilities(f.read())
        except (OSError, VipError):
            caps = -1 if os.geteuid() == 0 else 0      # no /proc: root is all we can tell
        return vip_plumbing_refusal(self.cluster.vip_dry_run, caps, str(self.cluster.path))

    async def run(self) -> None:
        # Checked before the bus connects: a vip service that cannot plumb must not announce
        # itself as able to hold VIPs (its status would draw assignments it never serves).
        reason = self.refusal()
        if reason:
            self.log.error("%s", reason)
            raise SystemExit(2)
        await super().run()

    async def handle_init(self) -> None:
        if self.cluster.vip_dry_run:
            self.plumber = DryRunPlumber()
            self.log.warning("VIP dry-run: addresses are recorded, not plumbed (vip_dry_run = true)")
        else:
            from node.netlink import Plumber
            self.plumber = Plumber()
            self.plumber.dry_run = False
        # A restarted service has forgotten its leases: hold nothing it cannot prove.
        for key, spec in self.specs.items():
            try:
                if self.plumber.remove(spec.address, spec.interface):
                    self.log.warning("removed %s from %s at start (left from an earlier run)", spec.address, spec.interface)
            except Exception as e:
                self.log.error("cannot check %s on %s: %s", spec.address, spec.interface, e)
        self.loop = asyncio.get_running_loop()
        self.loop.create_task(self._renew_loop())
        self.loop.create_task(self._reconcile_loop())
        self.loop.create_task(self._readiness_loop())
        await self._publish_status()

    async def _readiness_loop(self) -> None:
        """Until every program of this member runs: the coordinator hands a returning node
        its preferred VIPs only once it is ready, so a failback does not land on a node
        whose services (the mail server's among them) are still starting. Not supervised:
        ready at once; supervisord not answering for READY_AT_THE_LATEST: ready anyway."""
        from node.supervisor import all_started, program_states
        give_up = time.monotonic() + READY_AT_THE_LATEST
        while not self.ready:
            try:
                states = await asyncio.wait_for(self.loop.run_in_executor(None, program_states, self.member), 2.0)
            except Exception as e:  # noqa: BLE001 - supervisord starting, or gone: ask again
                self.log.debug("supervisord not answering yet: %s", e)
                states = {}
            if states is None or all_started(states) or time.monotonic() > give_up:
                if states and not all_started(states):
                    self.log.warning("programs not all running after %.0f s (%s): ready anyway",
                                     READY_AT_THE_LATEST, states)
                self.ready = True
                await self._publish_status()
                return
            await asyncio.sleep(0.2)

    async def handle_stop(self) -> None:
        # Leaving cleanly: unplumb and release so the next owner need not wait for expiry.
        for handle in self.delayed_release.values():
            handle.cancel()
        self.delayed_release.clear()
        for key in self.specs:
            if self.fsm[key].holds:
                self._drive(key, Event.RELEASE_ORDERED)
            self._fence(key)
        await self._release_everywhere([k for k in self.specs if self.fsm[k].state == State.RELEASED])
        if hasattr(self, "plumber"):       # absent when set-up failed before making it
            self.plumber.close()

    # -- assignment -----------------------------------------------------------------
    def mine(self) -> list[str]:
        owners = self.assignment.get("owners", {})
        return [k for k in self.specs if owners.get(k) == self.member.name]

    async def handle_event(self, topic: str, body: Any, env) -> None:
        if not isinstance(body, dict):
            return
        if topic == "election.assignment":
            await self._take_assignment(body, env.src)
        elif topic == "vip.released":
            vip = body.get("vip")
            if isinstance(vip, str) and vip in self.mine() and not self.fsm[vip].holds:
                await self._request([vip], fast=True)
        elif topic == "vip.status":
            if env.src != self.member.name:
                await self._check_other(env.src, body)
        elif topic == "membership.view" and env.src == self.member.name:
            members = body.get("members") if isinstance(body.get("members"), dict) else {}
            alive = {n for n, i in members.items() if isinstance(i, dict) and i.get("state") == "alive"}
            if alive - self.alive and self.alive:
                # members came back: a partition may have healed, re-announce what we hold
                for key in self.specs:
                    if self.fsm[key].state == State.OWNED:
                        self._garp(key)
            self.alive = alive

    async def _take_assignment(self, a: dict, src: str) -> None:
        term, seq = a.get("term"), a.get("seq")
        if not isinstance(term, int) or not isinstance(seq, int) or a.get("leader") != src:
            return
        if not isinstance(a.get("owners"), dict):
            return
        if (term, seq) < (self.assignment["term"], self.assignment["seq"]) and term >= self.assignment["term"]:
            return
        if term < self.assignment["term"]:
            return
        before = set(self.mine())
        self.assignment = a
        after = set(self.mine())
        to_release = set()
        for key in self.specs:
            if key in after:
                continue
            fsm = self.fsm[key]
            if fsm.state == State.OWNED:
                # keep serving until the next owner asks for the handover (or the lease ends)
                self._drive(key, Event.REASSIGNED)
                if key in self.unplumbed:          # ... which it already did
                    self._hand_over_now(key)
                continue
            if fsm.state == State.HANDING_OVER:
                continue
            if fsm.holds:
                self._drive(key, Event.REASSIGNED)
                to_release.add(key)
            elif key in before:
                to_release.add(key)
            self._fence(key)
        if to_release:
            self._release_soon(sorted(to_release))
        gained = [k for k in after - before if not self.fsm[k].holds]
        if gained:
            await self._request(gained, fast=True)

    # -- promises -----------------------------------------------------------------
    async def _renew_loop(self) -> None:
        every = self.timing.renew_every
        while True:
            mine = self.mine()
            if mine:
                await self._request(mine)
            # while something is wanted but not held, poll faster
            wanted = [k for k in mine if not self.fsm[k].holds]
            await asyncio.sleep(self.acquire_poll if wanted else every)

    async def _request(self, vips: list[str], fast: bool = False) -> None:
        """Ask every voter for ``vips``. A renewal is not sent to a voter that still owes us
        replies to two earlier ones; ``fast`` (newly assigned) is sent regardless."""
        for voter in self.cluster.voters:
            if not fast and self.in_flight.get(voter, 0) >= 2:
                continue
            self._start_ask(voter, list(vips))

    def _start_ask(self, voter: str, vips: list[str]) -> None:
        self.in_flight[voter] = self.in_flight.get(voter, 0) + 1
        self.loop.create_task(self._ask(voter, vips))

    async def _ask(self, voter: str, vips: list[str]) -> None:
        t_req = time.monotonic()
        try:
            # ``asked`` (our clock) lets the voter tell which of our releases a promise predates.
            # Timeout = lease: a reply delayed by a starved CPU still counts until t_req + lease,
            # and later renewals are not held up meanwhile (up to two overlap).
            r = await self.call(voter, "election", "promise", timeout=self.timing.lease,
                                holder=self.member.name, vips=vips, asked=t_req)
        except BusError:
            return
        finally:
            left = self.in_flight.get(voter, 1) - 1
            if left > 0:
                self.in_flight[voter] = left
            else:
                self.in_flight.pop(voter, None)
        now = time.monotonic()
        results = r.get("results", {}) if isinstance(r, dict) else {}
        for key, res in results.items():
            if key not in self.specs or not isinstance(res, dict) or key not in self.mine():
                continue
            after = res.get("after") if isinstance(res.get("after"), str) else None
            self.books[key].take_reply(voter, t_req, bool(res.get("granted")), after, now)
            if res.get("granted"):
                self.quick_retries.pop(voter, None)
            elif (res.get("retry_after") is None and not self.fsm[key].holds and voter not in self.retry_soon
                    and self.quick_retries.get(voter, 0) < 3):
                self.quick_retries[voter] = self.quick_retries.get(voter, 0) + 1
                # the voter has not heard the assignment we act on yet: ask again shortly
                # rather than at the next poll (a graceful move waits on this)
                self.retry_soon.add(voter)
                self.loop.call_later(self.retry_stale, self._retry, voter)
            for holder in {a for _, a, _ in self.books[key].pending.values()}:
                if self._round_done(key, holder):
                    self._ask_handover(key, holder)
            self._evaluate(key)

    def _retry(self, voter: str) -> None:
        self.retry_soon.discard(voter)
        wanted = [k for k in self.mine() if not self.fsm[k].holds]
        if wanted:
            self._start_ask(voter, wanted)

    def _round_done(self, key: str, holder: str) -> bool:
        """Ask ``holder`` for the handover now? Once enough successor promises wait to make a
        majority: the holder unplumbs when asked, and one confirmation then covers them all
        (it covers only promises received before it was asked for)."""
        book = self.books[key]
        waiting = sum(1 for _, after, _ in book.pending.values() if after == holder)
        # not before a majority: the holder unplumbs when asked
        return waiting + len(book.counted) >= self.cluster.quorum

    # -- handover: a successor promise counts once the previous holder confirms ----------
    def _ask_handover(self, key: str, holder: str) -> None:
        if (key, holder) in self.handover_in_flight:
            self.handover_again.add((key, holder))     # promises received since it was sent
            return
        self.handover_in_flight.add((key, holder))
        self.loop.create_task(self._handover(key, holder))

    async def _handover(self, key: str, holder: str) -> None:
        asked_at = time.monotonic()
        try:
            r = await self.call(holder, "vip", "handover", timeout=1.0, vip=key, to=self.member.name)
        except BusError:
            r = None
        finally:
            self.handover_in_flight.discard((key, holder))
        again = (key, holder) in self.handover_again
        self.handover_again.discard((key, holder))
        if key not in self.mine():
            return
        if isinstance(r, dict) and r.get("released") is True:
            # covers exactly the successor promises received before we asked
            if self.books[key].confirm(holder, asked_at):
                self._evaluate(key)
            if again and self.books[key].awaiting(holder):
                self._ask_handover(key, holder)

    @rpc(access.rule(access.SELF, own="to"))
    async def rpc_handover(self, vip: str, to: str) -> dict:
        """Answer once ``vip`` is not plumbed here (at most 0.9 s): the asker's successor
        promises then count. We can never get it back while those promises last.

        Handing over (the assignment names another node): unplumb now. Still assigned here
        (the new assignment has not reached us yet): wait for it, or for the lease's end."""
        key = vip_key(vip) if isinstance(vip, str) else ""
        if key not in self.specs:
            return {"released": False, "reason": "unknown VIP"}
        deadline = time.monotonic() + 0.9
        while self.fsm[key].state not in (State.RELEASED, State.FENCED) or self.fsm[key].pending_io:
            if self.fsm[key].state == State.HANDING_OVER:
                self._hand_over_now(key)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return {"released": False, "reason": "still held"}
            ev = self.unplumbed.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(ev.wait(), left)
            except asyncio.TimeoutError:
                pass
        # Not holding now, and we must not start to on promises we already have: the asker
        # will count its successor promises from here on.
        self._fence(key)
        if key in self.delayed_release:
            self.loop.call_soon(self._release_due, key)       # after this answer has gone out
        return {"released": True, "vip": key}

    def _hand_over_now(self, key: str) -> None:
        """The next owner asked: unplumb; the release goes out once the answer has."""
        self._drive(key, Event.RELEASE_ORDERED)
        self._release_soon([key])

    def _release_soon(self, keys: list[str]) -> None:
        """Release ``keys`` at the voters after ``release_delay`` (or once a successor's
        handover request has been answered, whichever comes first)."""
        for key in keys:
            if key not in self.delayed_release:
                self.delayed_release[key] = self.loop.call_later(self.release_delay, self._release_due, key)

    def _release_due(self, key: str) -> None:
        handle = self.delayed_release.pop(key, None)
        if handle is None:
            return
        handle.cancel()
        self.loop.create_task(self._release_everywhere([key]))

    def _fence(self, key: str) -> None:
        """Forget every promise of ``key`` and void replies to requests sent before now."""
        self.books[key].fence(time.monotonic())

    def _quorum_until(self, key: str) -> float:
        """Monotonic instant until which a majority of promises is valid (0: none now)."""
        return self.books[key].quorum_until()

    def _evaluate(self, key: str) -> None:
        now = time.monotonic()
        until = self._quorum_until(key)
        fsm = self.fsm[key]
        if key not in self.mine():
            if fsm.state == State.HANDING_OVER and until <= now:
                # the next owner did not ask before our lease ran out: it lapses as any other
                self.log.info("%s: lease ran out before the next owner asked for the handover", key)
                self._lapse(key)
            return
        if until > now:
            if fsm.state == State.RELEASED:
                if not self._probe_clear(key, now):
                    return
                self._drive(key, Event.LEASE_GRANTED)
            elif fsm.state in (State.OWNED, State.ACQUIRING, State.HANDING_OVER):
                fsm.handle(Event.LEASE_RENEWED)      # HANDING_OVER: assigned back, owner again
                self._refresh_lifetime(key, now)
            self._arm_expiry(key, until)
        elif fsm.holds:
            self.counters["expired"] += 1
            self.log.warning("%s: lease lapsed (no majority of promises), unplumbing", key)
            self._lapse(key)

    def _lapse(self, key: str) -> None:
        """Our count ran out: unplumb, fence, release everywhere."""
        self._drive(key, Event.LEASE_EXPIRED)
        self._fence(key)
        self.loop.create_task(self._release_everywhere([key]))

    def _refresh_lifetime(self, key: str, now: float) -> None:
        """Push the kernel's own expiry of the address forward (at most twice a second)."""
        if self.fsm[key].state != State.OWNED or now - self.refreshed.get(key, 0) < 0.5:
            return
        self.refreshed[key] = now
        spec = self.specs[key]
        try:
            self.plumber.add(spec.address, spec.interface, lifetime=self.kernel_lifetime)
        except Exception as e:
            self.log.error("cannot refresh %s on %s: %s", spec.address, spec.interface, e)

    # -- duplicate address detection before a takeover ---------------------------------
    def _probe_clear(self, key: str, now: float) -> bool:
        """May we plumb ``key`` now? After a confirmed handover, yes. Otherwise the previous
        holder may have died with the address still configured (every process of a node
        killed, the kernel alive): ask the wire first with an RFC 5227 ARP probe (IPv6: an
        RFC 4862 DAD Neighbour Solicitation), and plumb only when nobody answers. Starts the
        probe and returns False when none is fresh."""
        if getattr(self.plumber, "dry_run", False) or self.books[key].confirmed_successor(now):
            return True
        if now - self.probed_clear.get(key, -1.0) < 0.1:
            return True
        if key not in self.probing:
            self.probing.add(key)
            self.loop.create_task(self._probe(key))
        return False

    async def _probe(self, key: str) -> None:
        """An ARP probe (IPv4) or a DAD Neighbour Solicitation (IPv6), then ``probe_wait``
        for an answer from another MAC: the same decision for both families."""
        from node.netlink import build_probe, probe_answer
        spec = self.specs[key]
        answered = None
        try:
            self._garp_frames(spec)                    # fills the interface's cache entry
            mac = self._garp_cache[spec.interface][1]
            ethertype, question = build_probe(mac, spec.ip)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
            try:
                sock.bind((spec.interface, ethertype))
                sock.setblocking(False)
                sock.send(question)
                deadline = time.monotonic() + self.probe_wait
                while answered is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        frame = await asyncio.wait_for(self.loop.sock_recv(sock, 2048), left)
                    except asyncio.TimeoutError:
                        break
                    answered = probe_answer(frame, spec.ip, mac)
                while answered is None:      # whatever arrived while we were not scheduled
                    try:
                        answered = probe_answer(sock.recv(2048), spec.ip, mac)
                    except BlockingIOError:
                        break
            finally:
                sock.close()
        except OSError as e:
            self.log.error("probe for %s failed: %s", key, e)
            answered = None
        finally:
            self.probing.discard(key)
        if answered is None:
            self.probed_clear[key] = time.monotonic()
            self._evaluate(key)
            return
        self.counters["probe_answered"] += 1
        now = time.monotonic()
        if now - self.last_probe_alarm.get(key, 0) > 5:
            self.last_probe_alarm[key] = now
            await self.alarm("address_in_use", f"VIP {key} is still answered by {answered}: not taking it over yet",
                             vip=key, mac=answered)
        self.loop.call_later(0.05, self._evaluate, key)

    def _arm_expiry(self, key: str, until: float) -> None:
        old = self.timers.pop(key, None)
        if old:
            old.cancel()
        delay = until - time.monotonic()
        self.timers[key] = self.loop.call_later(max(0.0, delay), self._evaluate, key)

    # -- the state machine's actions ----------------------------------------------------
    def _drive(self, key: str, event: Event) -> None:
        actions = self.fsm[key].handle(event)
        for action in actions:
            self._act(key, action)

    def _act(self, key: str, action: Action) -> None:
        spec = self.specs[key]
        if action is Action.PLUMB:
            try:
                self.plumber.add(spec.address, spec.interface, lifetime=self.kernel_lifetime)
            except Exception as e:
                self.counters["plumb_errors"] += 1
                self.log.error("cannot plumb %s on %s: %s", spec.address, spec.interface, e)
                self._drive(key, Event.PLUMB_FAILED)
                return
            self.acquired_at[key] = time.time()
            self.counters["acquired"] += 1
            self.log.info("%s: plumbed on %s", spec.address, spec.interface)
            self._drive(key, Event.PLUMB_DONE)
        elif action is Action.UNPLUMB:
            try:
                self.plumber.remove(spec.address, spec.interface)
            except Exception as e:
                self.counters["plumb_errors"] += 1
                self.log.error("cannot unplumb %s on %s: %s", spec.address, spec.interface, e)
                self._drive(key, Event.UNPLUMB_FAILED)
                return
            self.counters["released"] += 1
            self.released_at[key] = time.time()
            self._drive(key, Event.UNPLUMB_DONE)
            ev = self.unplumbed.pop(key, None)
            if ev is not None:
                ev.set()          # wake handover answers at once
            self.log.info("%s: unplumbed", spec.address)
        elif action is Action.GARP_BURST:
            self._garp(key)
        elif action is Action.SCHEDULE_GARP_REPEAT:
            self._cancel_garp(key)
            self.garp_timers[key] = self.loop.call_later(self.timing.garp_repeat_after, self._garp_repeat, key)
        elif action is Action.CANCEL_GARP_REPEAT:
            self._cancel_garp(key)
        elif action is Action.REPORT_OWNED:
            self.loop.create_task(self._publish_status())
        elif action is Action.REPORT_RELEASED:
            self.loop.create_task(self._publish_status())
        elif action in (Action.ALARM_PLUMB_FAILED, Action.ALARM_UNPLUMB_FAILED):
            self.counters["alarms"] += 1
            self.loop.create_task(self.alarm(action.value.replace("alarm_", ""),
                                             f"VIP {key}: {action.value.replace('alarm_', '').replace('_', ' ')}", vip=key))
        elif action is Action.ALARM_TWO_OWNERS:
            self.counters["alarms"] += 1
            self.loop.create_task(self.alarm("two_owners", f"VIP {key} is held by this node and another",
                                             vip=key))

    def _garp(self, key: str) -> None:
        """Announce ``key`` now: three (request, reply) pairs for IPv4, three unsolicited
        Neighbour Advertisements for IPv6; frames built once per VIP.

        The packet socket and the interface MAC are kept, so an announcement costs a few
        microseconds: during a move every millisecond before the client's ARP entry points
        here is a millisecond of lost connection attempts. One packet socket per interface
        serves both families (protocol 0: it only sends).
        """
        if getattr(self.plumber, "dry_run", False):
            return
        spec = self.specs[key]
        try:
            sock, frames = self._garp_frames(spec)
            for _ in range(3):
                for frame in frames:
                    sock.send(frame)
            self.counters["garp"] += 1
        except Exception as e:
            self._garp_cache.pop(spec.interface, None)
            self.log.error("announcing %s (%s) failed: %s", key,
                           "unsolicited NA" if ":" in key else "gratuitous ARP", e)

    def _garp_frames(self, spec) -> tuple:
        from node.netlink import build_announcement_frames
        cached = self._garp_cache.get(spec.interface)
        if cached is None:
            mac = self.plumber.link_mac(spec.interface)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            sock.bind((spec.interface, 0))
            cached = self._garp_cache[spec.interface] = (sock, mac, {})
        sock, mac, frames = cached
        if spec.ip not in frames:
            frames[spec.ip] = build_announcement_frames(mac, spec.ip)
        return sock, frames[spec.ip]

    def _garp_repeat(self, key: str) -> None:
        self.garp_timers.pop(key, None)
        if self.fsm[key].state == State.OWNED:
            self._garp(key)

    def _cancel_garp(self, key: str) -> None:
        t = self.garp_timers.pop(key, None)
        if t:
            t.cancel()

    async def _release_everywhere(self, keys: list[str]) -> None:
        if not keys:
            return
        # ``before``: our fence per VIP; a voter drops only promises asked for before it, so a
        # release that arrives after a later request of ours cannot void a promise we count.
        before = {k: self.books[k].fenced_at for k in keys}
        for voter in self.cluster.voters:
            try:
                await self.cast(voter, "election", "release", holder=self.member.name, vips=keys,
                                before=before)
            except BusError:
                pass
        for key in keys:
            await self.publish("vip.released", {"vip": key, "node": self.member.name})

    # -- status, reconciliation, alarms ---------------------------------------------
    def held(self) -> list[str]:
        return [k for k in self.specs if self.fsm[k].holds]

    async def handle_tick(self) -> None:
        # a changed status goes now; an unchanged one every report_refresh (ecluster.timing):
        # the election counts it fresh for report_fresh, and every member's election, hooks and
        # VIP-watching plug-ins wake up for each copy
        if (self._status_body() != self._status_sent
                or time.monotonic() - self._status_sent_at >= self.status_refresh):
            await self._publish_status()

    def _status_body(self) -> dict:
        held = self.held()
        return {"node": self.member.name, "held": held,
                "states": {k: f.state.value for k, f in self.fsm.items()},
                "load": len(held), "ready": self.ready,
                "dry_run": bool(getattr(self.plumber, "dry_run", False))}

    async def _publish_status(self) -> None:
        body = self._status_body()
        self._status_sent, self._status_sent_at = body, time.monotonic()
        await self.publish("vip.status", {**body, "time": time.time()})

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.reconcile_every)
            for key, spec in self.specs.items():
                try:
                    present = self.plumber.holds(spec.address, spec.interface)
                except Exception:
                    continue
                fsm = self.fsm[key]
                if present and not fsm.holds and fsm.state != State.RELEASING:
                    self.log.warning("%s found plumbed without a lease: removing", key)
                    self._drive(key, Event.FOUND_PLUMBED_UNEXPECTEDLY)
                elif not present and fsm.state in (State.OWNED, State.HANDING_OVER):
                    self.log.warning("%s missing from %s although held: %s", key, spec.interface,
                                     "plumbing again" if fsm.state == State.OWNED else "handed over already")
                    self._drive(key, Event.FOUND_MISSING)

    async def _check_other(self, node: str, body: dict) -> None:
        held = body.get("held")
        sent = body.get("time")
        if not isinstance(held, list) or not isinstance(sent, (int, float)):
            return
        for key in held:
            # a status sent before we acquired may still be in flight during a graceful move
            if (key in self.fsm and self.fsm[key].state in (State.OWNED, State.HANDING_OVER)
                    and sent > self.acquired_at.get(key, 0) + 0.05):
                self._drive(key, Event.OTHER_OWNER_SEEN)

    @rpc(access.ANYONE)
    def rpc_status(self) -> dict:
        now = time.monotonic()
        return {"node": self.member.name, "held": self.held(),
                "states": {k: f.state.value for k, f in self.fsm.items()},
                "assignment": {"term": self.assignment.get("term"), "owners": self.assignment.get("owners")},
                "lease_left": {k: round(max(0.0, self._quorum_until(k) - now), 3) for k in self.specs},
                # which voters' promises we count (seconds left) and which wait for a handover
                "promises": {k: {"counted": {v: round(e - now, 3) for v, (e, _) in b.counted.items() if e > now},
                                 "pending": sorted(b.pending)} for k, b in self.books.items()},
                "counters": self.counters, "dry_run": bool(getattr(self.plumber, "dry_run", False)),
                "acquired_at": self.acquired_at, "released_at": self.released_at}
