"""Transport: ZeroMQ sockets with explicit settings, CURVE, and the ZAP gate.

Every socket the bus makes comes from here, so LINGER, HWM, heartbeats, reconnect
intervals and size limits are set in one place (the channel in :mod:`bus.envelope`
never sees a socket), and so do the frame helpers :func:`send_frames` and
:func:`recv_frames` that brokers and clients move messages with.

Settings and why:
  LINGER          brokers 200 ms (flush replies on shutdown), clients 0 (never hang on exit)
  SNDHWM/RCVHWM   50 000 messages: absorbs bursts of journal batches; beyond that a
                  DEALER send fails fast (NOBLOCK) and the caller sees "unreachable"
  HEARTBEAT_*     ZMTP pings on every TCP link: a dead peer's connection is torn down
                  after the timeout, so IMMEDIATE sends fail instead of queueing forever
  RECONNECT_IVL   the preset's base; libzmq adds a random [0, base) to every wait, so
                  members restarting together do not reconnect in lock-step
  CONNECT_TIMEOUT a connect still unanswered after this is abandoned and retried: a SYN
                  lost while a partition heals would otherwise wait for the kernel's 1 s
                  retransmission (timing.connect_timeout_ms)
  MAXMSGSIZE      frames above envelope.MAX_FRAME are refused by libzmq before Python sees them
  IMMEDIATE       broker-to-broker DEALERs queue only on live connections
  IPV6            on every socket: a member address may be IPv6 (tcp://[fd00::11]:7400);
                  libzmq refuses those otherwise, and IPv4 endpoints work as before
"""
from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from bus import keys as keymod
from bus.envelope import MAX_FRAME
from ecluster.timing import Timing

HWM = 50_000
ZAP_DOMAIN = "ecluster"


def _common(sock: zmq.Socket, linger_ms: int) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
    sock.setsockopt(zmq.IPV6, 1)
    return sock


def tcp_options(sock: zmq.Socket, timing: Timing) -> None:
    """Heartbeats, keepalive and jittered reconnect for a TCP socket."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, timing.zmq_heartbeat_ivl_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timing.zmq_heartbeat_timeout_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, timing.zmq_heartbeat_timeout_ms)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    # (no jitter of our own: a base above RECONNECT_IVL_MAX would switch the back-off off)
    sock.setsockopt(zmq.RECONNECT_IVL, timing.reconnect_ivl_ms)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, timing.reconnect_ivl_max_ms)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, timing.connect_timeout_ms)


def link_options(sock: zmq.Socket, timing: Timing) -> None:
    """:func:`tcp_options` for a peer SUB link, which is also the failure detector: pinged
    every probe interval, dropped after ``link_timeout`` of silence, retried after
    ``link_reconnect_ms`` (see :mod:`ecluster.timing`)."""
    tcp_options(sock, timing)
    timeout_ms = max(1, round(timing.link_timeout * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, timing.link_ping_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
    # the peer's side drops us after this much silence from us (libzmq: 100 ms units)
    sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, -(-timeout_ms // 100) * 100))
    sock.setsockopt(zmq.RECONNECT_IVL, timing.link_reconnect_ms)


def make_socket(ctx: zmq.Context, kind: int, linger_ms: int = 0) -> zmq.Socket:
    return _common(ctx.socket(kind), linger_ms)


# -- frames without pyzmq's sugar ------------------------------------------------------
# pyzmq's send_multipart/recv_multipart combine enum flags on every frame and ask the
# socket for RCVMORE after each one (a getsockopt through the wrapper, dearer than the
# recv itself on small messages); these call the backend with plain ints and read "more"
# from the received frame. Same semantics: a multipart message is accepted whole or
# refused at its first frame (zmq.Again past the HWM, EHOSTUNREACH for an unknown ROUTER peer).
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get


def send_frames(sock: zmq.Socket, frames: list) -> None:
    """Send ``frames`` (bytes or received :class:`zmq.Frame`s, forwarded without a copy)
    as one message without blocking (raises zmq.Again past the HWM)."""
    last = len(frames) - 1
    for i in range(last):
        _send(sock, frames[i], _MORE_NOBLOCK)
    _send(sock, frames[last], _NOBLOCK)


def recv_frames(sock: zmq.Socket, copy: bool = True, ready: bool = False) -> list | None:
    """The next whole message on ``sock`` (bytes, or :class:`zmq.Frame`s with copy=False),
    or None when there is none (never blocks). ``ready``: a poll just reported the socket
    readable, so skip asking it again (EVENTS costs about as much as the recv)."""
    if not ready and not _get(sock, _EVENTS) & _POLLIN:
        return None
    try:
        f = _recv(sock, _NOBLOCK, False)
    except zmq.Again:       # "ready" was stale after all
        return None
    parts = [f.bytes if copy else f]
    while f.more:
        f = _recv(sock, _NOBLOCK, False)
        parts.append(f.bytes if copy else f)
    return parts


def curve_server(sock: zmq.Socket, pair: keymod.KeyPair) -> None:
    """Make ``sock`` a CURVE server with ``pair``; ZAP (see :class:`Gate`) checks clients."""
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())


def curve_client(sock: zmq.Socket, pair: keymod.KeyPair, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client of the server whose public key is ``server_public``."""
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)


class Gate(ThreadAuthenticator):
    """ZAP handler: lets in exactly the public keys found in the key directory.

    The authenticated User-Id of a message is ``<name>#<key id>``: the key's name (``n1``,
    ``m1``, ``admin``; see :func:`user_name`), so a broker can check that a peer claiming
    to be ``n2`` holds ``n2``'s key, and which of the name's keys it used, so a broker
    can refuse the messages of a connection whose key was removed after it connected
    (:meth:`accepts`). ``reload()`` re-reads the directory (key rotation without restart).
    """

    def __init__(self, ctx: zmq.Context, keys_dir: Path):
        super().__init__(ctx)
        self.keys_dir = keys_dir
        self.names: dict[bytes, str] = {}
        self.key_ids: frozenset[str] = frozenset()

    def start(self) -> None:  # type: ignore[override]
        super().start()
        self.reload()

    def reload(self) -> None:
        names = keymod.public_keys(self.keys_dir)
        self.names = names
        self.key_ids = frozenset(key_id(k) for k in names)
        self.configure_curve(domain=ZAP_DOMAIN, location=str(self.keys_dir))

    def curve_user_id(self, client_public_key: bytes) -> str:
        # load_certificate gives Z85 text; ZAP hands us the raw 32 bytes
        public = z85.encode(client_public_key)
        name = self.names.get(public)
        return f"{name}#{key_id(public)}" if name else "?"

    def accepts(self, user_id: str) -> bool:
        """Is the key behind this authenticated User-Id still in the key directory?"""
        return user_key_id(user_id) in self.key_ids


def key_id(public_z85: bytes) -> str:
    """A short id of a public key (its first 10 Z85 characters). Pure."""
    return public_z85[:10].decode("ascii", "replace")


def user_name(user_id: str) -> str:
    """The key's name in a User-Id made by :class:`Gate` (``"n1#Ab3..."`` -> ``"n1"``). Pure.

    Names never hold ``#`` (cluster-file names are ``[a-z][a-z0-9_-]*``); key ids may."""
    return user_id.partition("#")[0]


def user_key_id(user_id: str) -> str:
    """The key id in a User-Id made by :class:`Gate` (all after the first ``#``). Pure."""
    return user_id.partition("#")[2]
