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
import zmq.asyncio

from bus import envelope as ch
from bus import keys as keymod
from bus import transport
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


class AsyncClient:
    """A service's or a local tool's connection to its member's broker."""

    def __init__(self, cluster: Cluster, member: str, identity: str,
                 ctx: zmq.asyncio.Context | None = None, subscribe: bool = True):
        self.cluster = cluster
        self.member = cluster.member(member)
        self.identity = identity
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.dealer = transport.make_socket(self.ctx, zmq.DEALER, 0)
        self.dealer.setsockopt_string(zmq.ROUTING_ID, identity)
        self.dealer.connect(self.member.ipc_router)
        self.sub = None
        if subscribe:
            self.sub = transport.make_socket(self.ctx, zmq.SUB, 0)
            self.sub.connect(self.member.ipc_pub)
        self.pending: dict[str, asyncio.Future] = {}
        self.on_request: RequestHandler | None = None
        self.on_event: EventHandler | None = None
        self.malformed = 0
        self.late = 0
        self._tasks: list[asyncio.Task] = []

    # -- outbound -----------------------------------------------------------------
    async def call(self, member: str | None, service: str, method: str, timeout: float = 2.0, **args) -> Any:
        dm = member or self.member.name
        env = ch.request(dm, service, method, args, time.time() + timeout)
        env.src = self.member.name
        fut = asyncio.get_running_loop().create_future()
        self.pending[env.id] = fut
        try:
            await self.dealer.send(ch.pack(env))
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
        await self.dealer.send(ch.pack(env))

    async def publish(self, topic: str, body: Any) -> None:
        env = ch.event(topic, body)
        env.src = self.member.name
        await self.dealer.send_multipart([b"P", topic.encode(), ch.pack(env)])

    async def publish_many(self, topic: str, bodies: list) -> None:
        env = ch.event(topic, bodies, batch=True)
        env.src = self.member.name
        await self.dealer.send_multipart([b"P", topic.encode(), ch.pack(env)])

    def subscribe(self, prefix: str) -> None:
        if self.sub is None:
            raise BusError("this client was made without a subscription socket")
        self.sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())

    # -- inbound ------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._read_dealer()))
        if self.sub is not None:
            self._tasks.append(loop.create_task(self._read_sub()))

    async def _read_dealer(self) -> None:
        while True:
            data = await self.dealer.recv()
            try:
                env = ch.unpack(data)
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
                asyncio.get_running_loop().create_task(self._serve(env))

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
            await self.dealer.send(data)

    async def _read_sub(self) -> None:
        while True:
            frames = await self.sub.recv_multipart()
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
        for t in self._tasks:
            t.cancel()
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
