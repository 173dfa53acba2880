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

On the wire a local client sends an envelope as one frame with ``src`` and ``sc`` set as
its broker would stamp them (member name, routing id), so the broker routes on the header
and passes the bytes on; an event goes as two frames ``[topic, envelope]`` that the
broker publishes as they are. ``on_request`` may return the result (answered at once, no
task) or an awaitable of it (``async def`` handlers: awaited in a task).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from typing import Any, Awaitable, Callable

import zmq

from bus import envelope as ch
from bus import keys as keymod
from bus import transport
from bus.transport import recv_frames, send_frames
from ecluster.clusterfile import Cluster

log = logging.getLogger("ecluster.bus")

#: answers a request: returns the result, or an awaitable of it (an ``async def`` handler)
RequestHandler = Callable[[ch.Envelope], Any]
EventHandler = Callable[[str, Any, ch.Envelope], Awaitable[None]]
#: (topic, bodies, envelope) of one publish_many: a consumer of batches takes them whole
BatchHandler = Callable[[str, list, ch.Envelope], Awaitable[None]]


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
# ... and stops asking EVENTS before each receive after this many
_BURST = 8


#: how late past its deadline a request from this member is still served (scheduling slack)
STALE_SLACK_S = 0.5


def is_stale(env: ch.Envelope, me: str, now: float) -> bool:
    """Whether a request's caller has surely given up, so it must not be acted on. Pure.

    The deadline is wall-clock time on the *caller's* clock. Only a request from this
    member is judged by it: members' wall clocks may differ by any amount (an NTP step,
    a wrong clock), and judging a peer's deadline by ours made a member whose clock is
    a second behind unable to get its lease promises, and one ahead answer nothing. A
    peer's late request is served; its caller drops the reply by id (harmless: the
    protocols never depend on a request being dropped).
    """
    return env.deadline is not None and env.src == me and now > env.deadline + STALE_SLACK_S


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
        # when set, a publish_many batch goes here in one call; else on_event gets each body
        self.on_batch: BatchHandler | None = None
        self.malformed = 0
        self.late = 0
        self._tasks: list[asyncio.Task] = []
        self._readers: list[_Readable] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dealer_fd: int | None = None
        self._serving: set[asyncio.Task] = set()     # strong refs: the loop keeps only weak ones

    # -- outbound -----------------------------------------------------------------
    async def _send(self, frames: list) -> None:
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

    def _send_soon(self, frames: list) -> None:
        """Send now if the DEALER takes it, else in a task that waits for room (replies)."""
        try:
            send_frames(self.dealer, frames)
        except zmq.Again:
            self._spawn(self._send(frames))
            return
        self._kick_dealer()

    def _stamped(self, env: ch.Envelope) -> bytes:
        # src and sc as the broker would stamp them, so it forwards our bytes untouched
        env.src, env.sc = self.member.name, self.identity
        return ch.pack(env)

    async def call(self, member: str | None, service: str, method: str, timeout: float = 2.0, **args) -> Any:
        dm = member or self.member.name
        env = ch.request(dm, service, method, args, time.time() + timeout)
        fut = asyncio.get_running_loop().create_future()
        self.pending[env.id] = fut
        try:
            await self._send([self._stamped(env)])
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
        await self._send([self._stamped(env)])

    async def publish(self, topic: str, body: Any) -> None:
        # two frames: the broker's event fast path (it publishes them as they are)
        await self._send([topic.encode(), ch.pack_event(topic, body, self.member.name)])

    async def publish_many(self, topic: str, bodies: list) -> None:
        await self._send([topic.encode(), ch.pack_event(topic, bodies, self.member.name, batch=True)])

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
                self._serve(env)
        self._loop.call_soon(self._on_dealer)    # more may be queued: let other work run first

    def _spawn(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._serving.add(task)                  # strong ref: the loop keeps only weak ones
        task.add_done_callback(self._serving.discard)

    def _serve(self, env: ch.Envelope) -> None:
        """Answer a request: at once when the handler returns a value, from a task when it
        returns an awaitable (no task, no extra loop pass for a plain method)."""
        if is_stale(env, self.member.name, time.time()):
            self.late += 1       # the caller gave up already: do not act on a stale request
            return
        try:
            result = self.on_request(env)
        except Exception as e:
            self._answer(env, error=e)
            return
        if inspect.isawaitable(result):
            self._spawn(self._finish(env, result))
        else:
            self._answer(env, result)

    async def _finish(self, env: ch.Envelope, pending: Awaitable) -> None:
        try:
            result = await pending
        except Exception as e:
            self._answer(env, error=e)
            return
        self._answer(env, result)

    def _answer(self, env: ch.Envelope, result: Any = None, error: Exception | None = None) -> None:
        if error is None:
            rep = ch.reply_to(env, result=result)
        elif isinstance(error, RemoteError):
            rep = ch.reply_to(env, error={"code": error.code, "message": error.message})
        else:   # a handler bug answers with an error, it does not kill the service
            log.error("handler for %s.%s failed", env.ds, env.method, exc_info=error)
            rep = ch.reply_to(env, error={"code": "internal", "message": f"{type(error).__name__}: {error}"})
        if env.kind != "req":
            return
        try:
            data = self._stamped(rep)
        except ch.BadMessage as e:
            data = self._stamped(ch.reply_to(env, error={"code": "internal", "message": str(e)}))
        self._send_soon([data])

    async def _read_sub(self, ready: _Readable) -> None:
        sock = self.sub
        in_a_row = 0
        readable = False
        while True:
            # within a burst just try: one zmq.Again at its end costs less than EVENTS each time
            frames = recv_frames(sock, True, readable or in_a_row >= _BURST)
            readable = False
            if frames is None:
                in_a_row = 0
                await ready.wait()
                readable = True      # wait() returns once EVENTS said POLLIN
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
            if env.batch and self.on_batch is not None:
                try:
                    await self.on_batch(env.topic, env.body, env)
                except Exception:
                    log.exception("batch handler for %s failed", env.topic)
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
            identity = f"cli:{os.getpid()}:{os.urandom(3).hex()}"
            self.sock.setsockopt_string(zmq.ROUTING_ID, identity)
            self.sock.connect(self.member.ipc_router)
            # as the broker would stamp them, so it forwards our bytes untouched
            self.src, self.sc = self.member.name, identity
        else:
            pair = keymod.load(cluster.keys_dir, key)
            server = keymod.load(cluster.keys_dir, self.member.name, secret=False).public
            transport.tcp_options(self.sock, cluster.timing)
            transport.curve_client(self.sock, pair, server)
            self.sock.connect(self.member.bus_endpoint)
            self.src, self.sc = "", ""
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)

    def _send(self, env: ch.Envelope) -> None:
        env.src, env.sc = self.src, self.sc
        data = ch.pack(env)
        try:
            send_frames(self.sock, [data])
        except zmq.Again:          # past the HWM (or no connection yet): block as zmq would
            self.sock.send(data)

    def call(self, member: str | None, service: str, method: str, timeout: float = 2.0, **args) -> Any:
        dm = member or self.member.name
        env = ch.request(dm, service, method, args, time.time() + timeout)
        self._send(env)
        deadline = time.monotonic() + timeout
        while True:
            frames = recv_frames(self.sock)
            if frames is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._poller.poll(int(left * 1000) + 1):
                    if time.monotonic() >= deadline:
                        raise CallTimeout(dm, service, method, timeout)
                continue
            if len(frames) != 1:
                continue
            try:
                rep = ch.unpack(frames[0])
            except ch.BadMessage:
                continue
            if rep.kind != "rep" or rep.id != env.id:
                continue      # a late reply to an earlier call
            if rep.error:
                raise RemoteError(rep.error["code"], rep.error["message"])
            return rep.body

    def cast(self, member: str | None, service: str, method: str, **args) -> None:
        self._send(ch.request(member or self.member.name, service, method, args, None, kind="cast"))

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
