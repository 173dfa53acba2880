"""membership: who is alive, as a numbered view every service can subscribe to.

Every member (node or manager) runs it. Two inputs (formulas in :mod:`ecluster.timing`):

* **Links** (the failure detector). This member's broker keeps a SUB link to every peer,
  pinged by libzmq every probe interval and dropped after ``link_timeout`` of silence; it
  tells every change at once (``bus.link``, a local event) and answers them all in
  ``bus.status``. No Python runs per ping, on either side.
* **Heartbeats** every ``member_hb_every`` (1 s on lan): ``membership.hb`` {m, inc, seq, role}
  from each member's membership service, carrying its *incarnation* (bumped on every start,
  stored in ``<data_dir>/membership.json``) and showing that the member's Python runs.

States, decided locally (:func:`classify`, pure)::

    alive    link up (and a heartbeat within hung_after, or the link up for less than that)
    suspect  link down for at least link_suspect_after (silence about suspect_after)
    dead     link down for at least link_dead_after (silence about dead_after), never up,
             or up but without a heartbeat for hung_after (a hung member)

A link that comes back makes its member alive again at once. A heartbeat at a lower
incarnation than known is stale and ignored. Because a live peer answers pings from libzmq's
I/O thread, a paused Python (a GC pause, a starved scheduler slice) no longer looks like a
dead member; a whole-process stall or a dead host still does, after about dead_after.

Events:  ``membership.hb``    {m, inc, seq, role}                      (cluster-wide)
         ``membership.view``  {number, member, members: {name: {state, inc, role, since}}}
                              this member only (bus.broker.LOCAL_TOPICS): on every change
                              (number+1) and refreshed every member_hb_every
         (in) ``bus.link``    {peer, up, changes, boot}                 this member's broker
RPC:     ``membership.view()``

Contracts: handlers must not block (they run on the bus reader); the link snapshot is asked
of the broker at start and again with every heartbeat, so a lost ``bus.link`` costs at most
one heartbeat interval.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.fsutil import atomic_write
from services.base import Service, rpc
from bus import roles as access

ALIVE, SUSPECT, DEAD = "alive", "suspect", "dead"


@dataclass
class Peer:
    name: str
    role: str
    inc: int = -1
    last_heard: float | None = None      # local monotonic time of its last heartbeat
    link_up: bool = False
    link_at: float | None = None         # local monotonic time of the link's last change (None: never known)
    link_changes: int = -1               # the broker's change count for this link (ordering)
    state: str = DEAD
    since: float = 0.0                   # wall clock of the last state change


def classify(link_up: bool, link_for: float | None, hb_silence: float | None, timing) -> str:
    """State of a peer (see the module docstring). Pure.

    ``link_for``: seconds since the link last changed (None: never up); ``hb_silence``:
    seconds since its last heartbeat (None: none heard)."""
    if link_for is None:
        return DEAD
    if link_up:
        quiet = link_for if hb_silence is None else min(hb_silence, link_for)
        return DEAD if quiet >= timing.hung_after else ALIVE
    if link_for >= timing.link_dead_after:
        return DEAD
    if link_for >= timing.link_suspect_after:
        return SUSPECT
    return ALIVE


def next_change_in(link_up: bool, link_for: float | None, hb_silence: float | None, timing) -> float | None:
    """Seconds until :func:`classify` may answer differently with no new input (None: never). Pure."""
    if link_for is None:
        return None
    if link_up:
        quiet = link_for if hb_silence is None else min(hb_silence, link_for)
        return max(0.0, timing.hung_after - quiet) if quiet < timing.hung_after else None
    for edge in (timing.link_suspect_after, timing.link_dead_after):
        if link_for < edge:
            return edge - link_for
    return None


def load_incarnation(path: Path) -> int:
    """The next incarnation: one more than the last one stored (0 on first start)."""
    try:
        prev = int(json.loads(path.read_text())["incarnation"])
    except (OSError, ValueError, KeyError, TypeError):
        prev = -1
    return prev + 1


def store_incarnation(path: Path, inc: int) -> None:
    # durable, rename included: a restart must never reuse an incarnation
    atomic_write(path, json.dumps({"incarnation": inc}))


class MembershipService(Service):
    name = "membership"
    builtin = True
    critical = True
    subscriptions = ("membership.hb", "bus.link")

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        type(self).tick_interval = cluster.timing.member_hb_every

    async def handle_init(self) -> None:
        self.state_file = self.data_dir / "membership.json"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.inc = load_incarnation(self.state_file)
        store_incarnation(self.state_file, self.inc)
        self.seq = 0
        self.number = 0
        self.broker_boot: float | None = None
        self.peers: dict[str, Peer] = {
            name: Peer(name, m.role) for name, m in self.cluster.members.items() if name != self.member.name
        }
        self._recheck: asyncio.TimerHandle | None = None
        await self._heartbeat()
        await self._snapshot_links()
        self._reclassify()
        await self._publish_view()
        self.log.info("membership up, incarnation %d", self.inc)

    async def _heartbeat(self) -> None:
        self.seq += 1
        await self.publish("membership.hb", {"m": self.member.name, "inc": self.inc, "seq": self.seq,
                                             "role": self.member.role})

    async def _snapshot_links(self) -> None:
        """Take every link's state from the broker (bus.status): at start and once per
        heartbeat interval, so a lost bus.link event is mended within one interval."""
        try:
            st = await self.call(self.member.name, "bus", "status", timeout=1.0)
        except Exception as e:       # the broker restarting: the next tick asks again
            self.log.debug("bus.status: %s", e)
            return
        links = st.get("links") if isinstance(st, dict) else None
        if not isinstance(links, dict):
            return
        now = time.monotonic()
        for name, info in links.items():
            if isinstance(info, dict) and isinstance(info.get("for"), (int, float)):
                self._take_link(name, bool(info.get("up")), info.get("changes"), st.get("boot"),
                                now - float(info["for"]))

    def _take_link(self, name: str, up: bool, changes: Any, boot: Any, at: float) -> bool:
        """One link report (an event or a snapshot row); True when it was news."""
        p = self.peers.get(name)
        if p is None or not isinstance(changes, int) or not isinstance(boot, (int, float)):
            return False
        if boot != self.broker_boot:             # a new broker: its counts start again
            self.broker_boot = boot
            for q in self.peers.values():
                q.link_changes = -1
        if changes < p.link_changes or (changes == p.link_changes and p.link_at is not None):
            return False                          # older than what we know
        p.link_changes = changes
        # never up since this broker started: down, and since when does not matter (dead)
        p.link_up, p.link_at = up, (None if changes == 0 and not up else at)
        return True

    async def handle_tick(self) -> None:
        await self._heartbeat()
        await self._snapshot_links()
        if not self._reclassify():
            await self._publish_view()            # the refresh (a change published already)

    async def handle_event(self, topic: str, body: Any, env) -> None:
        if not isinstance(body, dict):
            return
        if topic == "bus.link":
            if env.src == self.member.name and self._take_link(
                    body.get("peer"), bool(body.get("up")), body.get("changes"), body.get("boot"),
                    time.monotonic()):
                self._reclassify()
            return
        name = env.src
        if name == self.member.name:
            return
        p = self.peers.get(name)
        if p is None or body.get("m") != name or not isinstance(body.get("inc"), int):
            return
        inc = body["inc"]
        if inc < p.inc:
            return                      # stale: from before the member restarted
        p.inc = inc
        p.last_heard = time.monotonic()
        if p.state != ALIVE:
            self._reclassify()

    def _reclassify(self) -> bool:
        """Classify every peer now; publish the view when a state changed (as a task: the
        caller may be the bus reader). Arms one timer for the next instant a state may
        change without news. True when something changed."""
        now = time.monotonic()
        changed = False
        soonest = None
        for p in self.peers.values():
            link_for = None if p.link_at is None else now - p.link_at
            hb_silence = None if p.last_heard is None else now - p.last_heard
            state = classify(p.link_up, link_for, hb_silence, self.timing)
            if state != p.state:
                self.log.info("%s: %s -> %s", p.name, p.state, state)
                p.state, p.since = state, time.time()
                changed = True
            nxt = next_change_in(p.link_up, link_for, hb_silence, self.timing)
            if nxt is not None:
                soonest = nxt if soonest is None else min(soonest, nxt)
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        loop = asyncio.get_running_loop()
        if soonest is not None:
            # a little after the edge, so the state is past it when we look
            self._recheck = loop.call_later(soonest + 0.002, self._reclassify)
        if changed:
            self.number += 1
            loop.create_task(self._publish_view())
        return changed

    def view(self) -> dict:
        members = {name: {"state": p.state, "inc": p.inc, "role": p.role, "since": p.since}
                   for name, p in self.peers.items()}
        members[self.member.name] = {"state": ALIVE, "inc": self.inc, "role": self.member.role,
                                     "since": self.started}
        return {"number": self.number, "member": self.member.name, "members": members, "time": time.time()}

    async def _publish_view(self) -> None:
        await self.publish("membership.view", self.view())

    @rpc(access.ANYONE)
    def rpc_view(self) -> dict:
        return self.view()
