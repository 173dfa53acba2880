"""The bus broker: one per member, like Momentum's msgc server per node.

Sockets::

    local  ROUTER  ipc://<run>/bus.ipc      services and local clients (DEALER)
    local  PUB     ipc://<run>/events.ipc   events to local subscribers (SUB)
    tcp    ROUTER  tcp://addr:bus_port      CURVE server: peer brokers and admin clients
    tcp    PUB     tcp://addr:pub_port      CURVE server: events to peer brokers
    per peer DEALER -> peer's tcp ROUTER    CURVE client, IMMEDIATE (a relinked one: see below)
    per peer SUB    -> peer's tcp PUB       CURVE client, subscribed to everything; its link is
                                            the failure detector (below)

Frames: a local client sends ``[envelope]`` (a call, cast or reply) or ``[topic,
envelope]`` (an event, published as it is); the ROUTER puts the routing id in front.

Routing rules (pure: :func:`route_fields`):
  * req/cast for this member go to the local service ``svc:<ds>``; for another member to
    that member's DEALER. Nobody there -> an error reply, at once (never a silent wait).
  * rep goes to the client ``ds`` at this member (on whichever ROUTER it came from) or on
    to member ``dm``.
  * pub from a local client goes to the local PUB and the tcp PUB; pub from a peer goes to
    the local PUB only (no re-flooding).
  * A broker reads only what it routes on: a small message is decoded and checked whole, a
    large one by its header (:func:`bus.envelope.checked_header`), and the bytes it received
    go on untouched (re-encoded only to stamp ``src``/``sc`` of a client that did not set
    them right). Whoever finally receives a message decodes and checks all of it.
  * A reply that cannot go out at once (the link back is not connected yet, e.g. just after
    this broker or its peer started; a client between reconnects) waits in a bounded retry
    queue for up to ``REPLY_RETRY`` seconds, then is dropped and counted
    (``replies_dropped``). A request that cannot go out is answered with an error at once.

Failure detection (formulas in :mod:`ecluster.timing`): libzmq pings every SUB link every
probe interval P and drops it when nothing came back for ``link_timeout`` (ZMTP PING/PONG in
libzmq's I/O threads: an idle cluster runs no Python for it), and retries a dropped link after
``link_reconnect_ms``. A socket monitor on each SUB tells the broker when the link is up
(handshake succeeded) or down (disconnected, handshake failed); every change goes at once to
this member's services as the local event ``bus.link`` {peer, up, changes, boot, for}
(``changes`` counts the link's changes since ``boot``, this broker's start), and ``bus.status``
answers every link's state (membership takes it there when it starts). A relinked SUB (key
rotation) keeps its link's state until its first handshake, or until RELINK_GRACE is over.

Local-only events: ``membership.view`` (each member's services read their own member's view
only) and ``bus.link`` go to the local PUB, never to peers.

Trust: ipc clients are local processes behind a 0700 run directory; the broker stamps
their member name into ``src`` and their routing id into ``sc`` (our client library sets
both itself, so the broker only compares them; a local routing id may not look like a tcp
client's, ``x:...``). On the tcp ROUTER, ZAP has authenticated the key; a peer broker's
messages carry its own name in ``src`` (any other ``src`` from a member's key is dropped as
spoofed); a message with an empty ``src`` is a client's (the CLI with an admin identity,
or with a member's key): it may only send req/cast, becomes a client of this member, and
its client id names its key, ``x:<routing id>.<key name>``, so the callee knows who calls
(:func:`bus.roles.principal_of`).
Messages of a connection whose key has left the key directory since it connected are
refused. Malformed frames are counted and dropped; nothing a peer sends can stop the loop.

Key rotation without downtime (``ecluster keys rotate``; the bus methods below):
  * ``bus.reload_keys``  ZAP re-reads the key directory (old, current and staged keys of
    a name are all that name's keys).
  * ``bus.relink(peer, public=None)``  re-create the link to ``peer`` with one of its
    public keys (default: the one in ``<peer>.key``): the old DEALER is closed with a
    linger (what it holds still goes out), the new one queues (no IMMEDIATE) until its
    handshake succeeds, so calls made while ``peer`` switches wait instead of failing.
    Such a link reports its state through a socket monitor; once connected, or after a
    grace period, it fails fast again like an IMMEDIATE one when the peer is gone. Its
    SUB is replaced at once (a few milliseconds of that peer's events may be lost:
    PUB/SUB never promised them).
  * ``bus.switch_keys(staged=False)``  answers, then takes this member's pair anew from
    ``<me>.key_secret`` (or the staged ``<me>.next.key_secret``): rebinds both tcp
    sockets with it (this drops their inbound connections; peers relinked beforehand
    reconnect within milliseconds) and relinks every outgoing link with it.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from bus import envelope as ch
from bus import keys as keymod
from bus import roles
from bus import transport
from ecluster.clusterfile import Cluster, Member
from ecluster.timing import raise_priority

log = logging.getLogger("ecluster.broker")

BUS_SERVICE = "bus"          # the broker answers calls addressed to this service name
HB_TOPIC = b"$hb"             # an older broker's heartbeat: ignored (libzmq pings the links now)
LINK_TOPIC = "bus.link"       # local event: a peer link went up or down
#: events of local clients that stay on this member (their subscribers are its own services)
LOCAL_TOPICS = frozenset({b"membership.view", LINK_TOPIC.encode()})
EXTERNAL_PREFIX = roles.EXTERNAL_PREFIX   # client ids of tcp clients (see bus.roles)
MAX_IPC_PATH = 100            # AF_UNIX sun_path is 108 bytes; keep a margin
RELINK_GRACE = 5.0            # s a relinked link queues calls while its peer switches keys
RELINK_RECONNECT_MS = 10      # a relinked socket retries fast: its peer is switching right now
SWITCH_AFTER = 0.1            # s between answering bus.switch_keys and rebinding (reply goes out)
REBIND_TIMEOUT = 2.0          # s to get the port back after an unbind
REPLY_RETRY = 1.0             # s a reply waits for its way back (link or client not connected yet)
RETRY_EVERY = 0.005           # s between attempts while replies wait
MAX_WAITING_REPLIES = 10_000  # bound of the retry queue; beyond it a failed reply is dropped at once
BURST = 8                     # messages in a row after which a drain stops asking EVENTS first
LINK_DOWN_EVENTS = frozenset({zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                              zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH})
MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class BrokerError(RuntimeError):
    """The broker cannot start; one-line message."""


@dataclass
class Counters:
    routed: int = 0
    events_local: int = 0
    events_remote: int = 0
    malformed: int = 0
    spoofed: int = 0
    refused: int = 0
    unreachable: int = 0
    no_service: int = 0
    forbidden: int = 0            # calls of the broker's own methods refused by role
    replies_queued: int = 0       # replies that had to wait for their way back
    replies_dropped: int = 0      # ... and were still undeliverable after REPLY_RETRY

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PeerLink:
    """The sockets to one peer. A relinked link (key rotation) has a ``monitor`` and queues
    until ``connected`` (or ``grace_until``); a first link relies on IMMEDIATE instead."""

    name: str
    dealer: zmq.Socket
    sub: zmq.Socket
    last_heard: float = 0.0
    events: int = 0
    monitor: zmq.Socket | None = None
    connected: bool = False
    grace_until: float = 0.0
    # the SUB link, watched by ``sub_monitor``: the failure detector's input
    sub_monitor: zmq.Socket | None = None
    up: bool = False
    changed_at: float = 0.0              # monotonic time of the last change of ``up``
    changes: int = 0
    quiet_until: float = 0.0             # a relinked SUB: downs ignored until then or its handshake

    def fails_fast(self, now: float) -> bool:
        """Should a message for this peer be refused at once (nobody connected)?"""
        return self.monitor is not None and not self.connected and now >= self.grace_until


class Route(NamedTuple):
    """Where one message goes: a socket family and an address within it."""

    to: str                 # "local" | "external" | "peer" | "self" | "error"
    target: str = ""        # routing id, or peer name
    error: dict | None = None


_SELF = Route("self")
_NOWHERE = Route("error")


def route_fields(kind: str, dm: str, ds: str, me: str, peers) -> Route:
    """Decide where a req/cast/rep with these fields goes. Pure: no sockets."""
    if kind == "rep":
        if dm == me:
            if ds.startswith(EXTERNAL_PREFIX):
                return Route("external", roles.external_routing_hex(ds))
            return Route("local", ds)
        if dm in peers:
            return Route("peer", dm)
        return _NOWHERE
    if kind in ("req", "cast"):
        if dm == me:
            if ds == BUS_SERVICE:
                return _SELF
            return Route("local", f"svc:{ds}")
        if dm in peers:
            return Route("peer", dm)
        return Route("error", error={"code": "unknown_member", "message": f"no member named {dm!r}"})
    return _NOWHERE


def route(env: ch.Envelope, me: str, peers) -> Route:
    """Decide where a req/cast/rep goes (see :func:`route_fields`). Pure: no sockets."""
    return route_fields(env.kind, env.dm, env.ds, me, peers)


# Above this size a message is checked by its header only (see bus.envelope.checked_header).
HEADER_ONLY_ABOVE = 512

# the frame helpers live in the transport; importable from here as before
send_frames = transport.send_frames
recv_frames = transport.recv_frames
#: the header fields of an envelope without decoding its body (see :func:`bus.envelope.header`)
event_header = ch.header


def peek(data) -> dict:
    """The checked fields of an envelope a broker routes on: all of a small one (decoded
    whole), the header of a large one (its body left as bytes). Raises BadMessage. Pure."""
    if len(data) > HEADER_ONLY_ABOVE:
        return ch.checked_header(data)
    return ch.check_wire(ch.unpack_raw(data))


def restamp(data, src: str, sc: str) -> bytes:
    """``data`` re-encoded with ``src`` and ``sc`` set (a client that did not set them). Pure."""
    d = ch.unpack_raw(data)
    d["src"], d["sc"] = src, sc
    try:
        return msgpack.packb(d, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ch.BadMessage(f"cannot encode message: {e}") from None


def _bytes(data) -> bytes:
    return data if isinstance(data, bytes) else data.bytes


class Broker:
    """Run with :meth:`run` (blocks until :meth:`stop` or SIGTERM)."""

    def __init__(self, cluster: Cluster, member: str, ctx: zmq.Context | None = None):
        self.cluster = cluster
        self.me: Member = cluster.member(member)
        self.timing = cluster.timing
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()   # own context: ZAP is one handler per context
        self.counters = Counters()
        self.peers: dict[str, PeerLink] = {}
        self.member_roles = {n: m.role for n, m in cluster.members.items()}
        self._stop = False
        self.started = time.time()
        self.pair = keymod.load(cluster.keys_dir, member)
        self.gate: transport.Gate | None = None
        # one epoll over the sockets' ZMQ_FDs, not zmq_poll: zmq_poll asks every socket for its
        # EVENTS on every wake-up (a syscall each), this asks only the ones that were signalled
        self._epoll = select.epoll()
        self._fds: dict[int, tuple[str, zmq.Socket, PeerLink | None]] = {}   # fd -> (role, socket, link)
        self._again: dict[int, tuple] = {}  # to handle in the next round although not signalled
        self._endpoints: dict[str, str] = {}                        # tcp socket attr -> bound endpoint
        self._switch_at: float | None = None
        self._switch_to: keymod.KeyPair | None = None
        self._waiting: deque = deque()      # replies to retry: (give-up time, route, data)
        # stop() writes here: the loop sleeps in poll until a message or a deadline, and a
        # signal handler or another thread must still wake it
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- set-up -------------------------------------------------------------------
    def _bind(self) -> None:
        run = self.me.run_dir
        run.mkdir(parents=True, exist_ok=True)
        os.chmod(run, 0o700)
        for ep in (self.me.ipc_router, self.me.ipc_pub):
            if len(ep) - len("ipc://") > MAX_IPC_PATH:
                raise BrokerError(f"socket path {ep[6:]} is too long for a unix socket; use a shorter data_dir")
        self.gate = transport.Gate(self.ctx, self.cluster.keys_dir)
        self.gate.start()
        ctx = self.ctx
        self.ipc_router = transport.make_socket(ctx, zmq.ROUTER, 200)
        self.ipc_router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.ipc_router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.local_pub = transport.make_socket(ctx, zmq.PUB, 200)
        self.tcp_router = transport.make_socket(ctx, zmq.ROUTER, 200)
        self.tcp_router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.tcp_router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        transport.tcp_options(self.tcp_router, self.timing)
        transport.curve_server(self.tcp_router, self.pair)
        self.cluster_pub = transport.make_socket(ctx, zmq.PUB, 200)
        transport.tcp_options(self.cluster_pub, self.timing)
        transport.curve_server(self.cluster_pub, self.pair)
        try:
            self.ipc_router.bind(self.me.ipc_router)
            self.local_pub.bind(self.me.ipc_pub)
            self.tcp_router.bind(self.me.bus_endpoint)
            self.cluster_pub.bind(self.me.pub_endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise BrokerError(f"member {self.me.name}: cannot bind its bus sockets ({e.strerror})") from None
        self._endpoints = {"tcp_router": self.me.bus_endpoint, "cluster_pub": self.me.pub_endpoint}
        for name, m in self.cluster.members.items():
            if name == self.me.name:
                continue
            self._link(name, m)

    def _link(self, name: str, m: Member, relink: bool = False, server: bytes | None = None) -> PeerLink | None:
        """Connect a DEALER and a SUB to peer ``name`` with its public key ``server`` (by
        default the one in ``<name>.key``).

        A first link is IMMEDIATE (sends fail while nobody is connected); a relink queues
        and is watched by a socket monitor instead (see the module docstring).
        """
        if server is None:
            try:
                server = keymod.load(self.cluster.keys_dir, name, secret=False).public
            except keymod.KeyError_ as e:
                log.warning("no link to %s: %s", name, e)
                return None
        dealer = transport.make_socket(self.ctx, zmq.DEALER, 200)
        if not relink:
            dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt_string(zmq.ROUTING_ID, f"b:{self.me.name}")
        transport.tcp_options(dealer, self.timing)
        transport.curve_client(dealer, self.pair, server)
        monitor = None
        if relink:
            dealer.setsockopt(zmq.RECONNECT_IVL, RELINK_RECONNECT_MS)
            monitor = dealer.get_monitor_socket(MONITOR_EVENTS)
        dealer.connect(m.bus_endpoint)
        sub = transport.make_socket(self.ctx, zmq.SUB, 0)
        transport.link_options(sub, self.timing)
        if relink:
            sub.setsockopt(zmq.RECONNECT_IVL, RELINK_RECONNECT_MS)
        transport.curve_client(sub, self.pair, server)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub_monitor = sub.get_monitor_socket(MONITOR_EVENTS)
        sub.connect(m.pub_endpoint)
        now = time.monotonic()
        link = PeerLink(name, dealer, sub, monitor=monitor,
                        grace_until=now + RELINK_GRACE if relink else 0.0,
                        sub_monitor=sub_monitor, changed_at=now,
                        quiet_until=now + RELINK_GRACE if relink else 0.0)
        self.peers[name] = link
        return link

    def _register(self, role: str, sock, link: PeerLink | None = None) -> None:
        fd = sock.getsockopt(zmq.FD) if isinstance(sock, zmq.Socket) else sock.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._fds[fd] = (role, sock, link)
        # what arrived before now has not signalled the fd (libzmq signals a reader that
        # found its pipe empty): look at it in the next round whether or not it fires
        self._again[fd] = (role, sock, link)

    def _unregister(self, sock: zmq.Socket) -> None:
        for fd, (_, s, _) in list(self._fds.items()):
            if s is sock:
                self._epoll.unregister(fd)
                del self._fds[fd]

    def _watch(self, link: PeerLink) -> None:
        # not its DEALER: peers never send on it (replies come on our ROUTER)
        for role, sock in (("sub", link.sub), ("monitor", link.monitor), ("sub_monitor", link.sub_monitor)):
            if sock is not None:
                self._register(role, sock, link)

    def _unwatch_and_close(self, link: PeerLink) -> None:
        for sock, linger in ((link.sub, 0), (link.dealer, 200), (link.monitor, 0), (link.sub_monitor, 0)):
            if sock is None:
                continue
            self._unregister(sock)
            if (sock is link.sub and link.sub_monitor is not None) or (
                    sock is link.dealer and link.monitor is not None):
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
            sock.close(linger=linger)

    def relink(self, name: str, server: bytes | None = None) -> None:
        """Replace the link to ``name`` (its key, or ours, changed), using its public key
        ``server`` (default: ``<name>.key``). The old DEALER is closed with a linger after
        the new one exists."""
        old = self.peers.get(name)
        link = self._link(name, self.cluster.members[name], relink=True, server=server)
        if link is None:
            if old is not None:
                self.peers[name] = old
            return
        if old is not None:
            link.last_heard, link.events = old.last_heard, old.events
            # the peer is as up as it was: the new SUB's handshake (or its grace) decides next
            link.up, link.changed_at, link.changes = old.up, old.changed_at, old.changes
            self._unwatch_and_close(old)
        self._watch(link)
        log.info("relinked to %s", name)

    def _on_monitor(self, link: PeerLink) -> None:
        while link.monitor is not None and not link.monitor.closed:
            try:
                event = recv_monitor_message(link.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.connected = True
            elif event != zmq.EVENT_MONITOR_STOPPED:
                link.connected = False

    def _on_sub_monitor(self, link: PeerLink) -> None:
        while link.sub_monitor is not None and not link.sub_monitor.closed:
            try:
                event = recv_monitor_message(link.sub_monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.quiet_until = 0.0
                self._set_link(link, True)
            elif event in LINK_DOWN_EVENTS and time.monotonic() >= link.quiet_until:
                self._set_link(link, False)

    def _end_quiet(self, now: float) -> None:
        """A relinked SUB whose grace ended without a handshake: its peer is down now."""
        for link in self.peers.values():
            if link.quiet_until and now >= link.quiet_until:
                link.quiet_until = 0.0
                self._set_link(link, False)

    def _set_link(self, link: PeerLink, up: bool) -> None:
        """Record a link state; tell this member's services when it changed."""
        if link.up == up:
            return
        link.up, link.changed_at = up, time.monotonic()
        link.changes += 1
        log.info("link to %s %s", link.name, "up" if up else "down")
        body = {"peer": link.name, "up": up, "changes": link.changes, "boot": self.started, "for": 0.0}
        try:
            send_frames(self.local_pub, [LINK_TOPIC.encode(), ch.pack_event(LINK_TOPIC, body, self.me.name)])
        except zmq.Again:
            pass

    def links(self) -> dict:
        """Every peer link: up, how many changes, seconds since the last one."""
        now = time.monotonic()
        return {p.name: {"up": p.up, "changes": p.changes, "for": round(now - p.changed_at, 3)}
                for p in self.peers.values()}

    def _rebind(self, pair: keymod.KeyPair) -> None:
        """Serve the tcp sockets with ``pair`` from now on, and link out with it."""
        self.pair = pair
        for attr, endpoint in self._endpoints.items():
            sock: zmq.Socket = getattr(self, attr)
            sock.unbind(endpoint)
            transport.curve_server(sock, self.pair)
            deadline = time.monotonic() + REBIND_TIMEOUT
            while True:
                try:
                    sock.bind(endpoint)
                    break
                except zmq.ZMQError as e:   # the old listener closes asynchronously
                    if e.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.005)
        for name in list(self.peers):
            self.relink(name)
        log.info("broker %s now uses its new key", self.me.name)

    def close(self) -> None:
        for s in ("ipc_router", "local_pub", "tcp_router", "cluster_pub"):
            sock = getattr(self, s, None)
            if sock is not None:
                sock.close(linger=100)
        for p in self.peers.values():
            if p.monitor is not None:
                p.monitor.close(linger=0)
            if p.sub_monitor is not None:
                p.sub_monitor.close(linger=0)
            p.dealer.close(linger=0)
            p.sub.close(linger=0)
        self.peers.clear()
        self._fds.clear()
        self._epoll.close()
        if self.gate is not None:
            self.gate.stop()
            self.gate = None
        if self._own_ctx:
            self.ctx.term()
        self._wake_r.close()
        self._wake_w.close()
        for ep in (self.me.ipc_router, self.me.ipc_pub):
            try:
                os.unlink(ep[len("ipc://"):])
            except OSError:
                pass

    def stop(self) -> None:
        """End :meth:`run` soon; safe from a signal handler or another thread."""
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- main loop ----------------------------------------------------------------
    def run(self) -> None:
        self._bind()
        self._register("ipc", self.ipc_router)
        self._register("tcp", self.tcp_router)
        self._register("wake", self._wake_r)
        for p in self.peers.values():
            self._watch(p)
        ipc_router, tcp_router, wake_r = self.ipc_router, self.tcp_router, self._wake_r
        log.info("broker %s up: %s %s", self.me.name, self.me.bus_endpoint, self.me.pub_endpoint)
        try:
            while not self._stop:
                now = time.monotonic()
                if self._switch_at is not None and now >= self._switch_at:
                    self._switch_at = None
                    self._rebind(self._switch_to or self.pair)
                if self._waiting:
                    self._retry_replies(now)
                wake = self._switch_at
                if any(p.quiet_until for p in self.peers.values()):
                    self._end_quiet(now)
                    quiet = [p.quiet_until for p in self.peers.values() if p.quiet_until]
                    if quiet:
                        wake = min(quiet) if wake is None else min(wake, *quiet)
                if self._waiting:
                    wake = now + RETRY_EVERY if wake is None else min(wake, now + RETRY_EVERY)
                # nothing to do until a message or the next deadline: no idle wake-ups
                timeout = 0 if self._again else (-1 if wake is None else max(0.0, wake - now) + 0.001)
                fired = {fd: self._fds[fd] for fd, _ in self._epoll.poll(timeout) if fd in self._fds}
                fired.update(self._again)
                self._again = again = {}
                for role, sock, p in fired.values():
                    if role == "wake":
                        try:
                            wake_r.recv(64)
                        except OSError:
                            pass
                    elif sock.closed:                      # replaced by a relink in this round
                        continue
                    elif sock is ipc_router:
                        if self._drain(sock, self._from_local):
                            again[-1] = (role, sock, p)
                    elif sock is tcp_router:
                        if self._drain(sock, self._from_tcp, copy=False):     # zmq.Frames: User-Id
                            again[-2] = (role, sock, p)
                    elif role == "sub":
                        if self._drain(sock, lambda frames, p=p: self._from_peer_pub(p, frames)):
                            again[id(sock)] = (role, sock, p)
                    elif role == "sub_monitor":
                        self._on_sub_monitor(p)
                    elif role == "monitor":
                        self._on_monitor(p)
                # a send on a ROUTER may have taken the signal of a message that arrived on it
                # meanwhile (libzmq handles the socket's commands on send too): look once more
                for key, role, sock, handler, copy in ((-1, "ipc", ipc_router, self._from_local, True),
                                                       (-2, "tcp", tcp_router, self._from_tcp, False)):
                    if key not in again and self._drain(sock, handler, copy=copy):
                        again[key] = (role, sock, None)
        finally:
            self.close()

    def _drain(self, sock: zmq.Socket, handler, copy: bool = True, limit: int = 2000) -> bool:
        """Handle up to ``limit`` waiting messages of ``sock`` (its fd was signalled); True
        when it stopped at the limit (more may wait: the caller comes back at once, since
        the fd will not be signalled again for them)."""
        for i in range(limit):
            if sock.closed:            # a handler relinked (bus.relink) the socket away
                return False
            # within a burst just try (the one zmq.Again at its end costs less than asking
            # EVENTS before every message); the first one asks: a signal is not a message
            frames = recv_frames(sock, copy, i >= BURST)
            if frames is None:
                return False
            try:
                handler(frames)
            except ch.BadMessage:
                self.counters.malformed += 1
            except Exception:  # never let one message kill the broker
                self.counters.malformed += 1
                log.exception("dropping a message that broke the handler")
        return True

    # -- inbound ------------------------------------------------------------------
    def _from_local(self, frames: list[bytes]) -> None:
        # [routing_id, envelope] or, fast path for events, [routing_id, topic, envelope]
        n = len(frames)
        if n == 3:
            # Events from local clients are forwarded without decoding: subscribers check the
            # shape (channel) and the src was stamped by the client library of a local process.
            out = frames[1:]
            send_frames(self.local_pub, out)
            if out[0] not in LOCAL_TOPICS:
                send_frames(self.cluster_pub, out)
            self.counters.events_local += 1
            return
        if n != 2:
            raise ch.BadMessage("local message with wrong frame count")
        data = frames[1]
        d = peek(data)
        me = self.me.name
        sc = frames[0].decode("utf-8", "replace")
        if sc.startswith(EXTERNAL_PREFIX):
            self.counters.refused += 1          # only this broker names tcp clients (roles)
            return
        if d.get("src") != me or d.get("sc") != sc:
            data = restamp(data, me, sc)       # our client library sets both: rare
            d["src"], d["sc"] = me, sc
        if d["k"] == "pub":
            topic = d["t"].encode()
            send_frames(self.local_pub, [topic, data])
            if topic not in LOCAL_TOPICS:
                send_frames(self.cluster_pub, [topic, data])
            self.counters.events_local += 1
            return
        self._dispatch(d, data)

    def _from_tcp(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:
            raise ch.BadMessage("tcp message with wrong frame count")
        frame = frames[1]
        user_id = frame.get("User-Id") or "?"
        if user_id != "?" and self.gate is not None and not self.gate.accepts(user_id):
            self.counters.refused += 1           # its key was removed since it connected
            return
        user = transport.user_name(user_id)
        data = frame.bytes if len(frame) <= HEADER_ONLY_ABOVE else frame.buffer
        d = peek(data)
        if user in self.peers and d.get("src") == user:
            pass                             # a peer broker, speaking for itself
        elif user == "?" or (user in self.cluster.members and d.get("src")):
            self.counters.spoofed += 1       # no key name, or a member's key claiming a src
            return
        else:
            # A client (the CLI: an admin identity, or a member's key used by a client):
            # may call, may not publish or reply; it is our client now, named by its key.
            if d["k"] not in ("req", "cast"):
                self.counters.refused += 1
                return
            sc = roles.external_client_id(frames[0].bytes.hex(), user)
            frame = restamp(data, self.me.name, sc)
            d["src"], d["sc"] = self.me.name, sc
        if d["k"] == "pub":
            self.counters.refused += 1       # a peer's events come on its PUB, never here
            return
        self._dispatch(d, frame)

    def _from_peer_pub(self, peer: PeerLink, frames: list[bytes]) -> None:
        peer.last_heard = time.monotonic()
        if len(frames) != 2:
            raise ch.BadMessage("event with wrong frame count")
        topic, data = frames
        if topic == HB_TOPIC or topic in LOCAL_TOPICS:
            return                       # an older broker's heartbeat; nobody else's local news
        # Only what says who sent it is checked here (kind, src, topic); every subscriber
        # decodes and checks the whole envelope anyway (the channel).
        d = ch.header(data) if len(data) > HEADER_ONLY_ABOVE else ch.unpack_raw(data)
        if not isinstance(d, dict) or d.get("v") != ch.VERSION:
            raise ch.BadMessage("not an envelope of this version")
        t = d.get("t")
        if d.get("k") != "pub" or d.get("src") != peer.name or not isinstance(t, str) or t.encode() != topic:
            self.counters.spoofed += 1
            return
        peer.events += 1
        self.counters.events_remote += 1
        send_frames(self.local_pub, frames)

    # -- routing ------------------------------------------------------------------
    def _dispatch(self, d: dict, data) -> None:
        """Route the checked message ``d`` whose encoded form is ``data`` (bytes or a zmq.Frame,
        sent on as it is)."""
        kind = d["k"]
        r = route_fields(kind, d["dm"], d["ds"], self.me.name, self.peers)
        self.counters.routed += 1
        to = r.to
        if kind == "rep":
            if to != "error" and not self._send_reply(r, data):
                self._wait_reply(r, data)
            return
        if to == "peer":
            link = self.peers[r.target]
            if link.fails_fast(time.monotonic()):
                self.counters.unreachable += 1
                if kind == "req":
                    self._error_reply(d, "unreachable", f"member {r.target!r} is unreachable")
                return
            self._send_or_fail(link.dealer, [data], d, "unreachable", f"member {r.target!r} is unreachable")
        elif to == "local":
            self._send_or_fail(self.ipc_router, [r.target.encode(), data], d, "no_service",
                               f"no service {d['ds']!r} on member {self.me.name!r}")
        elif to == "self":
            self._answer_self(ch.unpack(_bytes(data)))
        elif kind == "req":
            self._error_reply(d, r.error["code"], r.error["message"])

    def _send_or_fail(self, sock: zmq.Socket, frames: list, d: dict, code: str, message: str) -> None:
        """Send a request on; when it cannot go out, count it and answer the caller with an error."""
        try:
            send_frames(sock, frames)
        except zmq.Again:
            pass
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
        else:
            return
        setattr(self.counters, code, getattr(self.counters, code) + 1)
        if d["k"] == "req":
            self._error_reply(d, code, message)

    def _send_reply(self, r: Route, data) -> bool:
        """Try once to send a reply along ``r``; False when its way is not open (yet)."""
        if r.to == "peer":
            link = self.peers.get(r.target)
            if link is None or link.fails_fast(time.monotonic()):
                return False
            sock, frames = link.dealer, [data]
        elif r.to == "local":
            sock, frames = self.ipc_router, [r.target.encode(), data]
        else:
            sock, frames = self.tcp_router, [bytes.fromhex(r.target), data]
        try:
            send_frames(sock, frames)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return False

    def _wait_reply(self, r: Route, data) -> None:
        """Queue a reply that could not go out, for REPLY_RETRY seconds at most."""
        if len(self._waiting) >= MAX_WAITING_REPLIES:
            self.counters.replies_dropped += 1
            return
        self.counters.replies_queued += 1
        self._waiting.append((time.monotonic() + REPLY_RETRY, r, data))

    def _retry_replies(self, now: float) -> None:
        """One attempt for every waiting reply, oldest first; the expired ones are dropped."""
        for _ in range(len(self._waiting)):
            give_up, r, data = self._waiting.popleft()
            try:
                sent = self._send_reply(r, data)
            except zmq.ZMQError:
                sent = False
            if sent:
                continue
            if now >= give_up:
                self.counters.replies_dropped += 1
                log.warning("dropped a reply to %s %s: no way back within %.1f s", r.to, r.target, REPLY_RETRY)
            else:
                self._waiting.append((give_up, r, data))

    def _error_reply(self, d: dict, code: str, message: str) -> None:
        """Answer the request ``d`` with the error ``{code, message}``."""
        self._reply(ch.Envelope(kind="rep", id=d["id"], dm=d.get("src") or "", ds=d.get("sc") or "",
                                error={"code": code, "message": message}))

    def _reply(self, rep: ch.Envelope) -> None:
        """Send a reply made by this broker on its way."""
        rep.src, rep.sc = self.me.name, BUS_SERVICE
        self._dispatch({"k": "rep", "dm": rep.dm, "ds": rep.ds}, ch.pack(rep))

    #: who may call the broker's own methods (bus.roles); the key methods are the admin's
    RULES = {"ping": roles.ANYONE, "status": roles.ANYONE,
             "reload_keys": roles.ADMIN_ONLY, "relink": roles.ADMIN_ONLY, "switch_keys": roles.ADMIN_ONLY,
             "stage_key": roles.ADMIN_ONLY, "put_public": roles.ADMIN_ONLY, "promote_key": roles.ADMIN_ONLY,
             "retire_key": roles.ADMIN_ONLY}

    def _answer_self(self, env: ch.Envelope) -> None:
        rule = self.RULES.get(env.method or "")
        if rule is not None:
            who = roles.principal_of(env.src, env.sc, self.me.name, self.member_roles)
            if not roles.permits(rule, who, env.body):
                self.counters.forbidden += 1
                log.warning("forbidden: %s", roles.refusal(BUS_SERVICE, env.method, rule, who))
                if env.kind == "req":
                    self._reply(ch.reply_to(env, error={"code": roles.FORBIDDEN,
                                                        "message": roles.refusal(BUS_SERVICE, env.method, rule, who)}))
                return
        if env.method in ("stage_key", "put_public", "promote_key", "retire_key"):
            try:
                result = self._key_method(env.method, env.body if isinstance(env.body, dict) else {})
            except keymod.KeyError_ as e:
                if env.kind == "req":
                    self._reply(ch.reply_to(env, error={"code": "no_key", "message": str(e)}))
                return
            if env.kind == "req":
                self._reply(ch.reply_to(env, result=result))
            return
        if env.method == "ping":
            result = {"member": self.me.name, "time": time.time()}
        elif env.method == "status":
            now = time.monotonic()
            result = {
                "member": self.me.name, "role": self.me.role, "cluster": self.cluster.name,
                "uptime": round(time.time() - self.started, 3), "pid": os.getpid(),
                "counters": self.counters.as_dict(),
                "replies_waiting": len(self._waiting),
                "boot": self.started,
                "links": self.links(),
                "peers": {p.name: {"heard_ago": None if not p.last_heard else round(now - p.last_heard, 3),
                                   "events": p.events,
                                   "relinked": p.monitor is not None,
                                   "connected": p.connected if p.monitor is not None else None}
                          for p in self.peers.values()},
            }
        elif env.method == "reload_keys":
            if self.gate:
                self.gate.reload()
            result = {"keys": len(self.gate.names) if self.gate else 0}
        elif env.method == "relink":
            try:
                member, server = self._relink_args(env.body)
            except ValueError as e:
                if env.kind == "req":
                    self._reply(ch.reply_to(env, error={"code": "bad_arguments", "message": str(e)}))
                return
            self.relink(member, server)
            result = {"relinked": member}
        elif env.method == "switch_keys":
            staged = bool(env.body.get("staged")) if isinstance(env.body, dict) else False
            try:
                self._switch_to = keymod.load(self.cluster.keys_dir,
                                              f"{self.me.name}.{keymod.NEXT}" if staged else self.me.name)
            except keymod.KeyError_ as e:
                if env.kind == "req":
                    self._reply(ch.reply_to(env, error={"code": "no_key", "message": str(e)}))
                return
            self._switch_at = time.monotonic() + SWITCH_AFTER
            result = {"switching": self.me.name, "after": SWITCH_AFTER,
                      "public": self._switch_to.public.decode()}
        else:
            if env.kind == "req":
                self._reply(ch.reply_to(env, error={"code": "unknown_method", "message": f"bus has no method {env.method!r}"}))
            return
        if env.kind == "req":
            self._reply(ch.reply_to(env, result=result))


    def _key_method(self, method: str, body: dict) -> dict:
        """The key-rotation steps done on this host's own key directory (``ecluster keys
        rotate`` with a bundle per host: a secret never leaves the host that made it).

        ``stage_key``: make this member's next pair here, answer its public key.
        ``put_public(name, public)``: accept ``public`` as ``name``'s staged key.
        ``promote_key(name, public)``: make it ``name``'s current key (this member's own:
        its staged pair; another's: the public key only). ``retire_key(name)``: forget
        ``name``'s previous key. The caller reloads the keys (``reload_keys``) after."""
        d = self.cluster.keys_dir
        me = self.me.name
        if method == "stage_key":
            return {"name": me, "public": keymod.stage(d, me).public.decode()}
        name = body.get("name")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise keymod.KeyError_(f"{method} needs a key name, not {name!r}")
        if method == "retire_key":
            return {"name": name, "retired": keymod.retire(d, name)}
        public = keymod.check_public(body.get("public"))
        if method == "put_public":
            if name == me:
                raise keymod.KeyError_(f"{me}'s own staged key is made here (stage_key), not sent")
            return {"name": name, "changed": keymod.put_public(d, name, public)}
        if name == me:
            return {"name": name, "changed": keymod.promote_own(d, me, public)}
        return {"name": name, "changed": keymod.promote_public(d, name, public)}

    def _relink_args(self, body) -> tuple[str, bytes | None]:
        """``{peer, public?}`` of bus.relink, checked: a peer, and one of its own keys."""
        member = body.get("peer") if isinstance(body, dict) else None
        if member not in self.peers:
            raise ValueError(f"relink needs a peer member, not {member!r}")
        public = body.get("public")
        if public is None:
            return member, None
        names = self.gate.names if self.gate is not None else {}
        if not isinstance(public, str) or names.get(public.encode()) != member:
            raise ValueError(f"{public!r} is not one of {member}'s keys in the key directory (reload_keys first?)")
        return member, public.encode()


def serve(cluster: Cluster, member: str) -> None:
    """Run a broker in the foreground until SIGTERM/SIGINT."""
    raise_priority()     # every lease promise and renewal passes through it
    broker = Broker(cluster, member)
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    broker.run()
