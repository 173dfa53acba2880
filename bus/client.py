"""Bus clients: asyncio for services, blocking for the CLI and tests.

A client is a DEALER on its member's broker (ipc) plus, for services, a SUB on the
broker's local PUB. An admin client outside the cluster uses :class:`SyncClient` with
``remote=`` a member: it connects straight to that member's tcp ROUTER with the admin
CURVE key, and that broker routes its calls like a local client's.

API::

    await bus.call(member, service, method, timeout=2.0, **args) -> result
    await bus.cast(member, service, method, **args)
    await bus.publish(topic, body); await bus.publish_many(topic, [bodies])
    bus.subscribe(prefix)

``call`` raises :class:`CallTimeout` when no reply arrives in time and
:class:`RemoteError` (``.code``, ``.message``) when the far side answered with an error.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Awaitable, Callable

import zmq

from bus import envelope as ch
from bus import keys as keymod
from bus import transport
from bus.broker import recv_frames, send_frames
from ecluster.clusterfile import Cluster

log = logging.getLogger("ecluster.bus")

RequestHandler = Callable[[ch.Envelope], Awaitable[Any]]
EventHandler = Callable[[str, Any, ch.Envelope], Awaitable[None]]


class BusError(RuntimeError):
    """Base of the errors a call can raise."""


class CallTimeout(BusError):
    def __init__(self, member: str, service: str, method: str, timeout: float):
        super().__init__(f"no reply from {service}.{method} on {member} within {timeout:g}s")
        self.member = member


class RemoteError(BusError):
    def __init__(self, code: str, message: str):
        super().__init__(message or code)
        self.code = code
        self.message = message


class _PlainSockets:
    """Makes plain (blocking-API) sockets from any context, asyncio ones included, so the
    context still tracks them (``ctx.destroy()`` closes them)."""

    def __init__(self, ctx: zmq.Context):
        self.ctx = ctx

    def socket(self, kind: int) -> zmq.Socket:
        return self.ctx.socket(kind, socket_class=zmq.Socket)


class _Readable:
    """Await "this socket has a message" on the asyncio loop, without per-message futures.

    zmq.asyncio makes a future and several callbacks per received message, which costs
    more than the message itself on a small call; here a reader task receives without
    blocking until nothing is left and only then waits on the socket's FD. The FD is an
    edge signal that any operation on the socket may consume, so: read EVENTS in the FD
    callback (that re-arms it) and before waiting.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket):
        self.loop = loop
        self.sock = sock
        self.waiter: asyncio.Future | None = None
        self.fd = sock.getsockopt(zmq.FD)
        loop.add_reader(self.fd, self.kick)

    def kick(self) -> None:
        w = self.waiter
        if self.sock.closed:
            return
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN and w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.fd)
        except Exception:  # the loop may be closed already
            pass


# a reader yields to other tasks after this many messages in a row
_FAIR_BATCH = 64


class AsyncClient:
    """A service's or a local tool's connection to its member's broker."""

    def __init__(self, cluster: Cluster, member: str, identity: str,
                 ctx: zmq.Context | None = None, subscribe: bool = True):
        self.cluster = cluster
        self.member = cluster.member(member)
        self.identity = identity
        self.ctx = ctx or zmq.Context.instance()
        plain = _PlainSockets(self.ctx)
        self.dealer = transport.make_socket(plain, zmq.DEALER, 0)
        self.dealer.setsockopt_string(zmq.ROUTING_ID, identity)
        self.dealer.connect(self.member.ipc_router)
        self.sub = None
        if subscribe:
            self.sub = transport.make_socket(plain, zmq.SUB, 0)
            self.sub.connect(self.member.ipc_pub)
        self.pending: dict[str, asyncio.Future] = {}
        self.on_request: RequestHandler | None = None
        self.on_event: EventHandler | None = None
        self.malformed = 0
        self.late = 0
        self._tasks: list[asyncio.Task] = []
        self._readers: list[_Readable] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dealer_fd: int | None = None
        self._serving: set[asyncio.Task] = set()     # strong refs: the loop keeps only weak ones

    # -- outbound -----------------------------------------------------------------
    async def _send(self, frames: list[bytes]) -> None:
        """Send on the DEALER; past the high-water mark, wait (back-pressure) instead of failing."""
        sock = self.dealer
        delay = 0.0005
        while True:
            try:
                send_frames(sock, frames)
                break
            except zmq.Again:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
        self._kick_dealer()

    async def call(self, member: str | None, service: str, method: str, timeout: float = 2.0, **args) -> Any:
        dm = member or self.member.name
        env = ch.request(dm, service, method, args, time.time() + timeout)
        env.src = self.member.name
        fut = asyncio.get_running_loop().create_future()
        self.pending[env.id] = fut
        try:
            await self._send([ch.pack(env)])
            rep: ch.Envelope = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise CallTimeout(dm, service, method, timeout) from None
        finally:
            self.pending.pop(env.id, None)
        if rep.error:
            raise RemoteError(rep.error["code"], rep.error["message"])
        return rep.body

    async def cast(self, member: str | None, service: str, method: str, **args) -> None:
        env = ch.request(member or self.member.name, service, method, args, None, kind="cast")
        env.src = self.member.name
        await self._send([ch.pack(env)])

    async def publish(self, topic: str, body: Any) -> None:
        env = ch.event(topic, body)
        env.src = self.member.name
        await self._send([b"P", topic.encode(), ch.pack(env)])

    async def publish_many(self, topic: str, bodies: list) -> None:
        env = ch.event(topic, bodies, batch=True)
        env.src = self.member.name
        await self._send([b"P", topic.encode(), ch.pack(env)])

    def subscribe(self, prefix: str) -> None:
        if self.sub is None:
            raise BusError("this client was made without a subscription socket")
        self.sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        for r in self._readers:
            if r.sock is self.sub:
                r.kick()           # any socket operation may eat the FD's edge

    # -- inbound ------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        # the DEALER is read straight from its FD callback: a reply resolves its call's
        # future and a request becomes a task without an extra hop through a reader task
        self._dealer_fd = self.dealer.getsockopt(zmq.FD)
        loop.add_reader(self._dealer_fd, self._on_dealer)
        loop.call_soon(self._on_dealer)      # anything that arrived before start()
        if self.sub is not None:
            ready = _Readable(loop, self.sub)
            self._readers.append(ready)
            self._tasks.append(loop.create_task(self._read_sub(ready)))

    def _kick_dealer(self) -> None:
        """After a send: zmq may have taken the FD's "readable" edge, so look ourselves."""
        if self._loop is not None and not self.dealer.closed and self.dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._loop.call_soon(self._on_dealer)

    def _on_dealer(self) -> None:
        sock = self.dealer
        if sock.closed:
            return
        for _ in range(_FAIR_BATCH):
            frames = recv_frames(sock)
            if frames is None:
                return
            try:
                if len(frames) != 1:
                    raise ch.BadMessage("reply with wrong frame count")
                env = ch.unpack(frames[0])
            except ch.BadMessage:
                self.malformed += 1
                continue
            if env.kind == "rep":
                fut = self.pending.get(env.id)
                if fut is not None and not fut.done():
                    fut.set_result(env)
                else:
                    self.late += 1
            elif self.on_request is not None:
                task = self._loop.create_task(self._serve(env))
                self._serving.add(task)
                task.add_done_callback(self._serving.discard)
        self._loop.call_soon(self._on_dealer)    # more may be queued: let other work run first

    async def _serve(self, env: ch.Envelope) -> None:
        if env.deadline is not None and time.time() > env.deadline + 0.5:
            self.late += 1       # the caller gave up already: do not act on a stale request
            return
        try:
            result = await self.on_request(env)
            rep = ch.reply_to(env, result=result)
        except RemoteError as e:
            rep = ch.reply_to(env, error={"code": e.code, "message": e.message})
        except Exception as e:  # a handler bug answers with an error, it does not kill the service
            log.exception("handler for %s.%s failed", env.ds, env.method)
            rep = ch.reply_to(env, error={"code": "internal", "message": f"{type(e).__name__}: {e}"})
        if env.kind == "req":
            rep.src = self.member.name
            try:
                data = ch.pack(rep)
            except ch.BadMessage as e:
                data = ch.pack(ch.reply_to(env, error={"code": "internal", "message": str(e)}))
            await self._send([data])

    async def _read_sub(self, ready: _Readable) -> None:
        sock = self.sub
        in_a_row = 0
        while True:
            frames = recv_frames(sock)
            if frames is None:
                in_a_row = 0
                await ready.wait()
                continue
            in_a_row += 1
            if in_a_row >= _FAIR_BATCH:
                in_a_row = 0
                await asyncio.sleep(0)
            if len(frames) != 2:
                self.malformed += 1
                continue
            try:
                env = ch.unpack(frames[1])
                if env.kind != "pub":
                    raise ch.BadMessage("not an event")
            except ch.BadMessage:
                self.malformed += 1
                continue
            if self.on_event is None:
                continue
            bodies = env.body if env.batch else [env.body]
            for body in bodies:
                try:
                    await self.on_event(env.topic, body, env)
                except Exception:
                    log.exception("event handler for %s failed", env.topic)

    def close(self) -> None:
        for t in [*self._tasks, *self._serving]:
            t.cancel()
        for r in self._readers:
            r.close()
        self._readers.clear()
        if self._loop is not None and self._dealer_fd is not None:
            try:
                self._loop.remove_reader(self._dealer_fd)
            except Exception:  # the loop may be closed already
                pass
            self._dealer_fd = None
        self.dealer.close(linger=0)
        if self.sub is not None:
            self.sub.close(linger=0)


class SyncClient:
    """Blocking calls, for the CLI and tests.

    ``SyncClient(cluster, via=member)`` connects over ipc as a local client of ``via``
    (needs access to its run directory); ``SyncClient(cluster, remote=member)``
    connects over tcp with the admin key (or ``key=``) to that member's broker.
    """

    def __init__(self, cluster: Cluster, via: str | None = None, remote: str | None = None,
                 key: str = keymod.ADMIN, ctx: zmq.Context | None = None):
        if (via is None) == (remote is None):
            raise ValueError("give exactly one of via= or remote=")
        self.cluster = cluster
        self.ctx = ctx or zmq.Context.instance()
        self.sock = transport.make_socket(self.ctx, zmq.DEALER, 0)
        self.member = cluster.member(via or remote)
        if via is not None:
            self.sock.setsockopt_string(zmq.ROUTING_ID, f"cli:{os.getpid()}:{os.urandom(3).hex()}")
            self.sock.connect(self.member.ipc_router)
            self.src = self.member.name
        else:
            pair = keymod.load(cluster.keys_dir, key)
            server = keymod.load(cluster.keys_dir, self.member.name, secret=False).public
            transport.tcp_options(self.sock, cluster.timing)
            transport.curve_client(self.sock, pair, server)
            self.sock.connect(self.member.bus_endpoint)
            self.src = ""

    def call(self, member: str | None, service: str, method: str, timeout: float = 2.0, **args) -> Any:
        dm = member or self.member.name
        env = ch.request(dm, service, method, args, time.time() + timeout)
        env.src = self.src
        self.sock.send(ch.pack(env))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                if time.monotonic() >= deadline:
                    raise CallTimeout(dm, service, method, timeout)
                continue
            try:
                rep = ch.unpack(self.sock.recv())
            except ch.BadMessage:
                continue
            if rep.kind != "rep" or rep.id != env.id:
                continue      # a late reply to an earlier call
            if rep.error:
                raise RemoteError(rep.error["code"], rep.error["message"])
            return rep.body

    def cast(self, member: str | None, service: str, method: str, **args) -> None:
        env = ch.request(member or self.member.name, service, method, args, None, kind="cast")
        env.src = self.src
        self.sock.send(ch.pack(env))

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
