"""The bus broker: one per member, like Momentum's msgc server per node.

Sockets::

    local  ROUTER  ipc://<run>/bus.ipc      services and local clients (DEALER)
    local  PUB     ipc://<run>/events.ipc   events to local subscribers (SUB)
    tcp    ROUTER  tcp://addr:bus_port      CURVE server: peer brokers and admin clients
    tcp    PUB     tcp://addr:pub_port      CURVE server: events to peer brokers
    per peer DEALER -> peer's tcp ROUTER    CURVE client, IMMEDIATE (a relinked one: see below)
    per peer SUB    -> peer's tcp PUB       CURVE client, subscribed to everything

Routing rules (pure: :func:`route`):
  * req/cast for this member go to the local service ``svc:<ds>``; for another member to
    that member's DEALER. Nobody there -> an error reply, at once (never a silent wait).
  * rep goes to the client ``ds`` at this member (on whichever ROUTER it came from) or on
    to member ``dm``.
  * pub from a local client goes to the local PUB and the tcp PUB; pub from a peer goes to
    the local PUB only (no re-flooding).

Trust: ipc clients are local processes behind a 0700 run directory; the broker stamps
their member name into ``src``. On the tcp ROUTER, ZAP has authenticated the key; a peer
broker's messages must carry its own name in ``src`` (else dropped as spoofed); any other
key (the admin CLI) may only send req/cast and is treated as a client of this member.
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
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from bus import envelope as ch
from bus import keys as keymod
from bus import transport
from ecluster.clusterfile import Cluster, Member

log = logging.getLogger("ecluster.broker")

BUS_SERVICE = "bus"          # the broker answers calls addressed to this service name
HB_TOPIC = b"$hb"             # broker-to-broker heartbeat, never delivered to services
EXTERNAL_PREFIX = "x:"        # client ids of admin clients on the tcp ROUTER
MAX_IPC_PATH = 100            # AF_UNIX sun_path is 108 bytes; keep a margin
RELINK_GRACE = 5.0            # s a relinked link queues calls while its peer switches keys
RELINK_RECONNECT_MS = 10      # a relinked socket retries fast: its peer is switching right now
SWITCH_AFTER = 0.1            # s between answering bus.switch_keys and rebinding (reply goes out)
REBIND_TIMEOUT = 2.0          # s to get the port back after an unbind
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

    def fails_fast(self, now: float) -> bool:
        """Should a message for this peer be refused at once (nobody connected)?"""
        return self.monitor is not None and not self.connected and now >= self.grace_until


@dataclass
class Route:
    """Where one message goes: a socket family and an address within it."""

    to: str                 # "local" | "external" | "peer" | "self" | "error"
    target: str = ""        # routing id, or peer name
    error: dict = field(default_factory=dict)


def route(env: ch.Envelope, me: str, peers: set[str]) -> Route:
    """Decide where a req/cast/rep goes. Pure: no sockets."""
    if env.kind in ("req", "cast"):
        if env.dm == me:
            if env.ds == BUS_SERVICE:
                return Route("self")
            return Route("local", f"svc:{env.ds}")
        if env.dm in peers:
            return Route("peer", env.dm)
        return Route("error", error={"code": "unknown_member", "message": f"no member named {env.dm!r}"})
    if env.kind == "rep":
        if env.dm == me:
            if env.ds.startswith(EXTERNAL_PREFIX):
                return Route("external", env.ds[len(EXTERNAL_PREFIX):])
            return Route("local", env.ds)
        if env.dm in peers:
            return Route("peer", env.dm)
        return Route("error")
    return Route("error")


# -- frames without pyzmq's sugar ------------------------------------------------------
# pyzmq's send_multipart/recv_multipart combine enum flags on every frame, which costs
# several times the send itself on small messages; these call the backend with plain ints.
# Semantics are the same: a multipart message is accepted whole or refused at its first
# frame (zmq.Again past the HWM, EHOSTUNREACH for an unknown ROUTER peer).
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get


def send_frames(sock: zmq.Socket, frames: list) -> None:
    """Send ``frames`` as one message without blocking (raises zmq.Again past the HWM)."""
    last = len(frames) - 1
    for i, f in enumerate(frames):
        _send(sock, f, _MORE_NOBLOCK if i < last else _NOBLOCK)


def recv_frames(sock: zmq.Socket, copy: bool = True) -> list | None:
    """The next whole message on ``sock``, or None when there is none (never blocks)."""
    if not _get(sock, _EVENTS) & _POLLIN:
        return None
    parts = [_recv(sock, _NOBLOCK, copy)]
    while _get(sock, _RCVMORE):
        parts.append(_recv(sock, _NOBLOCK, copy))
    return parts


# Above this size a peer's event is checked by its header only (see event_header).
HEADER_ONLY_ABOVE = 512


def event_header(data: bytes) -> dict:
    """The header fields of an envelope (everything but the body), without decoding the body.

    A peer's event only needs its sender and topic checked here; every subscriber decodes
    and checks the whole envelope anyway (the channel), so decoding a batch's bodies in
    the broker too would double the cost of every batch. Same size limits as
    :func:`bus.envelope.unpack_raw`; raises :class:`~bus.envelope.BadMessage`. Pure.
    """
    if len(data) > ch.MAX_FRAME:
        raise ch.BadMessage(f"frame of {len(data)} bytes exceeds {ch.MAX_FRAME}")
    u = msgpack.Unpacker(raw=False, strict_map_key=True, max_str_len=ch.MAX_STR, max_bin_len=ch.MAX_BIN,
                         max_array_len=ch.MAX_ARRAY, max_map_len=ch.MAX_MAP, max_ext_len=0)
    u.feed(data)
    head: dict = {}
    try:
        for _ in range(u.read_map_header()):
            key = u.unpack()
            if key == "b":
                u.skip()
            else:
                head[key] = u.unpack()
    except Exception as e:  # msgpack raises many types on garbage: all mean "not ours"
        raise ch.BadMessage(f"undecodable frame: {type(e).__name__}") from None
    try:
        u.skip()
    except msgpack.OutOfData:
        return head
    except Exception:
        pass
    raise ch.BadMessage("undecodable frame: ExtraData")


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
        self._stop = False
        self.started = time.time()
        self.pair = keymod.load(cluster.keys_dir, member)
        self.gate: transport.Gate | None = None
        self.poller = zmq.Poller()
        self._socks: dict[zmq.Socket, tuple[str, PeerLink]] = {}   # peer socket -> (role, link)
        self._endpoints: dict[str, str] = {}                        # tcp socket attr -> bound endpoint
        self._switch_at: float | None = None
        self._switch_to: keymod.KeyPair | None = None

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
        transport.tcp_options(sub, self.timing)
        if relink:
            sub.setsockopt(zmq.RECONNECT_IVL, RELINK_RECONNECT_MS)
        transport.curve_client(sub, self.pair, server)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(m.pub_endpoint)
        link = PeerLink(name, dealer, sub, monitor=monitor,
                        grace_until=time.monotonic() + RELINK_GRACE if relink else 0.0)
        self.peers[name] = link
        return link

    def _watch(self, link: PeerLink) -> None:
        for role, sock in (("sub", link.sub), ("dealer", link.dealer), ("monitor", link.monitor)):
            if sock is not None:
                self.poller.register(sock, zmq.POLLIN)
                self._socks[sock] = (role, link)

    def _unwatch_and_close(self, link: PeerLink) -> None:
        for sock, linger in ((link.sub, 0), (link.dealer, 200), (link.monitor, 0)):
            if sock is None:
                continue
            if sock in self._socks:
                self.poller.unregister(sock)
                del self._socks[sock]
            if sock is link.dealer and link.monitor is not None:
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
            p.dealer.close(linger=0)
            p.sub.close(linger=0)
        self.peers.clear()
        self._socks.clear()
        if self.gate is not None:
            self.gate.stop()
            self.gate = None
        if self._own_ctx:
            self.ctx.term()
        for ep in (self.me.ipc_router, self.me.ipc_pub):
            try:
                os.unlink(ep[len("ipc://"):])
            except OSError:
                pass

    def stop(self) -> None:
        self._stop = True

    # -- main loop ----------------------------------------------------------------
    def run(self) -> None:
        self._bind()
        poller = self.poller
        poller.register(self.ipc_router, zmq.POLLIN)
        poller.register(self.tcp_router, zmq.POLLIN)
        for p in self.peers.values():
            self._watch(p)      # its dealer too: peers never reply on it, but drain anyway
        hb_every = self.timing.zmq_heartbeat_ivl_ms / 1000 / 2
        next_hb = 0.0
        log.info("broker %s up: %s %s", self.me.name, self.me.bus_endpoint, self.me.pub_endpoint)
        try:
            while not self._stop:
                now = time.monotonic()
                if now >= next_hb:
                    self._heartbeat()
                    next_hb = now + hb_every
                if self._switch_at is not None and now >= self._switch_at:
                    self._switch_at = None
                    self._rebind(self._switch_to or self.pair)
                wake = next_hb if self._switch_at is None else min(next_hb, self._switch_at)
                try:
                    ready = dict(poller.poll(max(0, int((wake - now) * 1000))))
                except zmq.ZMQError as e:
                    if e.errno == zmq.EINTR:
                        continue
                    raise
                if self.ipc_router in ready:
                    self._drain(self.ipc_router, self._from_local)
                if self.tcp_router in ready:
                    self._drain(self.tcp_router, self._from_tcp, copy=False)
                for sock in ready:
                    role, p = self._socks.get(sock, (None, None))
                    if p is None or sock.closed:     # replaced by a relink in this round
                        continue
                    if role == "sub":
                        self._drain(sock, lambda frames, p=p: self._from_peer_pub(p, frames))
                    elif role == "monitor":
                        self._on_monitor(p)
                    else:
                        self._drain(sock, lambda frames: None)
        finally:
            self.close()

    def _drain(self, sock: zmq.Socket, handler, copy: bool = True, limit: int = 2000) -> None:
        for _ in range(limit):
            if sock.closed:            # a handler relinked (bus.relink) the socket away
                return
            frames = recv_frames(sock, copy)
            if frames is None:
                return
            try:
                handler(frames)
            except ch.BadMessage:
                self.counters.malformed += 1
            except Exception:  # never let one message kill the broker
                self.counters.malformed += 1
                log.exception("dropping a message that broke the handler")

    def _heartbeat(self) -> None:
        try:
            send_frames(self.cluster_pub, [HB_TOPIC, self.me.name.encode()])
        except zmq.Again:
            pass

    # -- inbound ------------------------------------------------------------------
    def _from_local(self, frames: list[bytes]) -> None:
        # [routing_id, envelope] or, fast path for events, [routing_id, b"P", topic, envelope]
        if len(frames) == 4 and frames[1] == b"P":
            # Events from local clients are forwarded without decoding: subscribers check the
            # shape (channel) and the src was stamped by the client library of a local process.
            out = frames[2:]
            send_frames(self.local_pub, out)
            send_frames(self.cluster_pub, out)
            self.counters.events_local += 1
            return
        if len(frames) != 2:
            raise ch.BadMessage("local message with wrong frame count")
        env = ch.unpack(frames[1])
        env.src = self.me.name
        env.sc = frames[0].decode("utf-8", "replace")
        if env.kind == "pub":
            data = ch.pack(env)
            topic = env.topic.encode()
            send_frames(self.local_pub, [topic, data])
            send_frames(self.cluster_pub, [topic, data])
            self.counters.events_local += 1
            return
        self._dispatch(env)

    def _from_tcp(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:
            raise ch.BadMessage("tcp message with wrong frame count")
        user_id = frames[1].get("User-Id") or "?"
        if user_id != "?" and self.gate is not None and not self.gate.accepts(user_id):
            self.counters.refused += 1           # its key was removed since it connected
            return
        user = transport.user_name(user_id)
        env = ch.unpack(frames[1].bytes)
        if user in self.peers:
            if env.src != user:
                self.counters.spoofed += 1
                return
        elif user in self.cluster.members or user == "?":
            self.counters.refused += 1       # a member we have no link to, or no key name
            return
        else:
            # An admin client: may call, may not publish or reply; it is our client now.
            if env.kind not in ("req", "cast"):
                self.counters.refused += 1
                return
            env.src = self.me.name
            env.sc = EXTERNAL_PREFIX + frames[0].bytes.hex()
        self._dispatch(env)

    def _from_peer_pub(self, peer: PeerLink, frames: list[bytes]) -> None:
        peer.last_heard = time.monotonic()
        if frames[0] == HB_TOPIC:
            return
        if len(frames) != 2:
            raise ch.BadMessage("event with wrong frame count")
        if len(frames[1]) > HEADER_ONLY_ABOVE:
            head = event_header(frames[1])
            if head.get("v") != ch.VERSION:
                raise ch.BadMessage(f"unsupported envelope version {head.get('v')!r}")
            kind, src, topic = head.get("k"), head.get("src"), head.get("t")
            if not isinstance(topic, str):
                raise ch.BadMessage("event without a topic")
        else:
            env = ch.unpack(frames[1])
            kind, src, topic = env.kind, env.src, env.topic
        if kind != "pub" or src != peer.name or topic.encode() != frames[0]:
            self.counters.spoofed += 1
            return
        peer.events += 1
        self.counters.events_remote += 1
        send_frames(self.local_pub, frames)

    # -- routing ------------------------------------------------------------------
    def _dispatch(self, env: ch.Envelope) -> None:
        r = route(env, self.me.name, set(self.peers))
        self.counters.routed += 1
        if r.to == "self":
            self._answer_self(env)
        elif r.to == "local":
            self._send_or_fail(self.ipc_router, [r.target.encode(), ch.pack(env)], env, "no_service",
                               f"no service {env.ds!r} on member {self.me.name!r}")
        elif r.to == "external":
            self._send_or_fail(self.tcp_router, [bytes.fromhex(r.target), ch.pack(env)], env, "unreachable", "")
        elif r.to == "peer":
            link = self.peers[r.target]
            if link.fails_fast(time.monotonic()):
                self.counters.unreachable += 1
                if env.kind == "req":
                    self._reply(ch.reply_to(env, error={"code": "unreachable",
                                                        "message": f"member {r.target!r} is unreachable"}))
                return
            self._send_or_fail(link.dealer, [ch.pack(env)], env, "unreachable",
                               f"member {r.target!r} is unreachable")
        elif env.kind == "req":
            self._reply(ch.reply_to(env, error=r.error))

    def _send_or_fail(self, sock: zmq.Socket, frames: list[bytes], env: ch.Envelope, code: str, message: str) -> None:
        try:
            send_frames(sock, frames)
        except (zmq.Again, zmq.ZMQError) as e:
            if isinstance(e, zmq.ZMQError) and not isinstance(e, zmq.Again) and e.errno != zmq.EHOSTUNREACH:
                raise
            setattr(self.counters, code, getattr(self.counters, code) + 1)
            if env.kind == "req":
                self._reply(ch.reply_to(env, error={"code": code, "message": message}))

    def _reply(self, rep: ch.Envelope) -> None:
        rep.src = self.me.name
        r = route(rep, self.me.name, set(self.peers))
        if r.to in ("local", "external", "peer"):
            self._dispatch(rep)

    def _answer_self(self, env: ch.Envelope) -> None:
        if env.method == "ping":
            result = {"member": self.me.name, "time": time.time()}
        elif env.method == "status":
            now = time.monotonic()
            result = {
                "member": self.me.name, "role": self.me.role, "cluster": self.cluster.name,
                "uptime": round(time.time() - self.started, 3), "pid": os.getpid(),
                "counters": self.counters.as_dict(),
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
    broker = Broker(cluster, member)
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    broker.run()
