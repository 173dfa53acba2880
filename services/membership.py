"""membership: who is alive, as a numbered view every service can subscribe to.

Every member (node or manager) runs it. Each one publishes a heartbeat event every
``probe_interval`` P; receivers keep, per member, when they last heard it and its
*incarnation* (a counter the member bumps on every start and whenever it refutes a
suspicion, stored in ``<data_dir>/membership.json``).

States, decided locally from silence (formulas in :mod:`ecluster.timing`)::

    alive   --silence >= suspect_after-->  suspect  --silence >= dead_after-->  dead
      ^                                       |                                   |
      +------- heartbeat (any incarnation) ---+---- heartbeat -------------------+

Suspicion is announced: a heartbeat carries the suspects of its sender as
``[name, incarnation]`` pairs. A member that finds itself suspected at its current
incarnation *refutes*: it bumps its incarnation and heartbeats at once, so a slow but
live member clears the suspicion before anyone declares it dead (memberlist/Lifeguard).
A heartbeat at a lower incarnation than known is stale and ignored.

Events:  ``membership.hb``    {m, inc, seq, role, suspects}           (cluster-wide)
         ``membership.view``  {number, member, members: {name: {state, inc, role, since}}}
                              published on every change (number+1) and refreshed every second
RPC:     ``membership.view()``
"""
from __future__ import annotations

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
    last_heard: float | None = None      # local monotonic time
    state: str = DEAD
    since: float = 0.0                   # wall clock of the last state change


def classify(silence: float | None, suspect_after: float, dead_after: float) -> str:
    """State for a silence (seconds since last heartbeat; None: never heard). Pure."""
    if silence is None or silence >= dead_after:
        return DEAD
    if silence >= suspect_after:
        return SUSPECT
    return ALIVE


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
    subscriptions = ("membership.hb",)

    async def handle_init(self) -> None:
        self.state_file = self.data_dir / "membership.json"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.inc = load_incarnation(self.state_file)
        store_incarnation(self.state_file, self.inc)
        self.seq = 0
        self.number = 0
        self.peers: dict[str, Peer] = {
            name: Peer(name, m.role) for name, m in self.cluster.members.items() if name != self.member.name
        }
        self.last_view_pub = 0.0
        await self._heartbeat()
        self.log.info("membership up, incarnation %d", self.inc)

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        type(self).tick_interval = cluster.timing.probe_interval

    async def _heartbeat(self) -> None:
        self.seq += 1
        suspects = [[p.name, p.inc] for p in self.peers.values() if p.state == SUSPECT]
        await self.publish("membership.hb", {"m": self.member.name, "inc": self.inc, "seq": self.seq,
                                             "role": self.member.role, "suspects": suspects})

    async def handle_tick(self) -> None:
        await self._heartbeat()
        now = time.monotonic()
        changed = False
        for p in self.peers.values():
            silence = None if p.last_heard is None else now - p.last_heard
            state = classify(silence, self.timing.suspect_after, self.timing.dead_after)
            if state != p.state:
                self.log.info("%s: %s -> %s", p.name, p.state, state)
                p.state, p.since = state, time.time()
                changed = True
        if changed:
            self.number += 1
        if changed or time.time() - self.last_view_pub >= 1.0:
            await self._publish_view()

    async def handle_event(self, topic: str, body: Any, env) -> None:
        if not isinstance(body, dict):
            return
        name = env.src
        if name == self.member.name:
            return
        p = self.peers.get(name)
        if p is None or body.get("m") != name or not isinstance(body.get("inc"), int):
            return
        inc = body["inc"]
        if inc < p.inc:
            return                      # stale: from before the member restarted or refuted
        p.inc = inc
        p.last_heard = time.monotonic()
        if p.state != ALIVE:
            self.log.info("%s: %s -> alive (inc %d)", name, p.state, inc)
            p.state, p.since = ALIVE, time.time()
            self.number += 1
            await self._publish_view()
        for entry in body.get("suspects") or ():
            if (isinstance(entry, list) and len(entry) == 2 and entry[0] == self.member.name
                    and entry[1] == self.inc):
                self.inc += 1            # refute: a newer incarnation outranks the suspicion
                store_incarnation(self.state_file, self.inc)
                self.log.info("refuting suspicion by %s with incarnation %d", name, self.inc)
                await self._heartbeat()
                break

    def view(self) -> dict:
        members = {name: {"state": p.state, "inc": p.inc, "role": p.role, "since": p.since}
                   for name, p in self.peers.items()}
        members[self.member.name] = {"state": ALIVE, "inc": self.inc, "role": self.member.role,
                                     "since": self.started}
        return {"number": self.number, "member": self.member.name, "members": members, "time": time.time()}

    async def _publish_view(self) -> None:
        self.last_view_pub = time.time()
        await self.publish("membership.view", self.view())

    @rpc(access.ANYONE)
    def rpc_view(self) -> dict:
        return self.view()
