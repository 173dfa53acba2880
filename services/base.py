"""The service runtime: one small base class for built-ins and plug-ins alike.

A service is a class registered in the entry-point group ``ecluster.services``::

    [project.entry-points."ecluster.services"]
    smtp = "my_plugin.smtp:SmtpService"

and run (one process each, under supervisord) by ``ecluster service run NAME``.

Hooks (all ``async``; a hook must not block the event loop: do disk or CPU-heavy work
with ``await self.offload(fn, ...)``):

  handle_init()                 after the bus is connected, before any other hook
  handle_event(topic, body, env) for each event matching ``subscriptions`` (prefixes)
  handle_call(method, args, env) for each call/cast; the default dispatches to
                                 ``rpc_<method>(**args)`` and refuses unknown methods
                                 and arguments that do not fit (``bad_arguments``); a
                                 plain (not async) ``rpc_`` method is then answered
                                 straight from the bus reader, without a task
  handle_tick()                 every ``tick_interval`` seconds (None: never)
  handle_reload(rev)            when configsync applies a new configuration revision here
                                 (counted: ``ping`` answers ``reloads``, ``last_reload_rev``)
  handle_stop()                 once, on SIGTERM/SIGINT, before the bus closes
  handle_vips(held)             with ``watch_vips = True``: this node's held VIPs changed

Following the VIPs (``watch_vips = True``): the base subscribes to ``vip.status``, takes
only this member's reports (``env.src``), keeps ``held_vips`` = ``{kind: (bare addresses,
sorted)}`` for every kind (empty tuples before the first report) and calls
``handle_vips`` only when that mapping changes. A VIP counts as held once it is plumbed
(state ``owned`` or ``handing_over``), not while it is being acquired. If this node's
``vip.status`` stays silent past :func:`stale_after` (the kernel has dropped an
unrefreshed VIP by then), everything counts as released. ``ask_held_vips()`` asks the
vip service's ``status`` RPC at once (also done once after ``handle_init``).

Helpers: ``call``, ``cast``, ``publish``, ``publish_many``, ``alarm``; attributes
``cluster``, ``member`` (this member's :class:`~ecluster.clusterfile.Member`), ``timing``,
``data_dir``, ``config`` (this service's ``[services.<name>]`` table), ``log``.

Roles: every ``rpc_<method>`` declares who may call it with ``@rpc(rule)`` (rules and the
caller's identity: :mod:`bus.roles`); the check runs before the arguments are looked at,
an undeclared method is refused to everyone, and a refusal is the typed error
``forbidden``, logged with the caller's name and counted (``ping`` answers ``forbidden``).

A raised :class:`ServiceError` answers the caller with a typed error ``{code, message}``.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import os
import signal
import time
from importlib.metadata import entry_points
from typing import Any, ClassVar

from bus import envelope as ch
from bus import roles as access
from ecluster.timing import raise_priority
from bus.client import AsyncClient, CallTimeout, RemoteError
from ecluster.clusterfile import Cluster

GROUP = "ecluster.services"
RELOAD_TOPIC = "config.applied"
ALARM_TOPIC = "alarm."
VIP_STATUS_TOPIC = "vip.status"
#: states of services.vip's owner machine in which the address is on the interface
PLUMBED_STATES = frozenset({"owned", "handing_over"})


def vip_kernel_lifetime(timing) -> int:
    """Seconds the kernel keeps a VIP the vip service stopped refreshing (services.vip
    plumbs with this lifetime): whole seconds, at least 2 so one late refresh is harmless. Pure."""
    return max(2, math.ceil(2 * timing.lease))


def stale_after(timing) -> float:
    """Silence of this node's vip.status after which no VIP can still be plumbed here: the
    kernel lifetime of an unrefreshed VIP, plus a probe interval. Pure."""
    return vip_kernel_lifetime(timing) + timing.probe_interval


def vip_kinds(cluster: Cluster) -> dict[str, str]:
    """Bare VIP address -> its kind ("injection", "outbound"), from the cluster file. Pure."""
    return {v.ip: v.kind for v in cluster.vips}


def no_vips(kinds: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """The mapping with nothing held: every kind (both standard ones at least) -> (). Pure."""
    return {k: () for k in sorted({"injection", "outbound", *kinds.values()})}


def held_by_kind(held: Any, states: Any, kinds: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """This node's plumbed VIPs by kind, from a vip.status body's (or the vip status RPC's)
    ``held`` and ``states``. Pure.

    With ``states`` (a map VIP -> state) a VIP counts only in a plumbed state (owned,
    handing over): ``held`` also lists a VIP whose plumb is still in flight. Without it,
    ``held`` is taken as it is. Entries that are not VIPs of the cluster file are ignored.
    """
    out = {k: [] for k in no_vips(kinds)}
    if isinstance(states, dict):
        addresses = [a for a, st in states.items() if st in PLUMBED_STATES]
    elif isinstance(held, (list, tuple)):
        addresses = list(held)
    else:
        addresses = []
    for a in addresses:
        if not isinstance(a, str):
            continue
        kind = kinds.get(a.split("/", 1)[0])
        if kind is not None:
            out[kind].append(a.split("/", 1)[0])
    return {k: tuple(sorted(set(v))) for k, v in out.items()}


def rpc(rule: access.Rule, *, caller: bool = False):
    """Declare an ``rpc_<method>``: who may call it (a :class:`bus.access.Rule`, e.g.
    ``access.ANYONE``, ``access.OPERATOR``, ``access.rule(access.MANAGER, own="node")``, with
    ``from bus import roles as access``: inside a service class ``roles`` is where it runs).

    A method without a declaration is refused to everyone (fail closed). With
    ``caller=True`` the method also gets ``caller=<Principal>`` (never from the wire)."""
    def mark(fn):
        fn.rpc_rule = rule
        fn.rpc_caller = caller
        return fn
    return mark


def rpc_rules(cls: type) -> dict[str, access.Rule | None]:
    """Every ``rpc_`` method of a service class -> its declared rule (None: undeclared). Pure."""
    out = {}
    for attr in sorted(dir(cls)):
        if attr.startswith("rpc_") and callable(getattr(cls, attr, None)):
            out[attr[4:]] = getattr(getattr(cls, attr), "rpc_rule", None)
    return out


class ServiceError(RemoteError):
    """Raise from a handler to answer the caller with ``{code, message}``."""

    def __init__(self, message: str, code: str = "error"):
        super().__init__(code, message)


class UnknownService(LookupError):
    pass


class ParamShape:
    """Which keyword arguments a function takes, for a check cheaper than
    ``inspect.signature(fn).bind`` on every call (the signature is read once per function)."""

    __slots__ = ("signature", "names", "required", "any_keyword", "never")

    def __init__(self, signature: inspect.Signature):
        P = inspect.Parameter
        params = signature.parameters.values()
        self.signature = signature
        self.names = frozenset(p.name for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY))
        self.required = frozenset(p.name for p in params if p.default is P.empty
                                  and p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY))
        self.any_keyword = any(p.kind is P.VAR_KEYWORD for p in params)
        # a positional-only parameter without a default can never be given by keyword
        self.never = any(p.kind is P.POSITIONAL_ONLY and p.default is P.empty for p in params)

    @classmethod
    def of(cls, fn) -> "ParamShape":
        return cls(inspect.signature(fn))

    def fits(self, args: dict) -> bool:
        """Would ``fn(**args)`` bind? Pure."""
        keys = args.keys()
        if self.never or not self.required <= keys:
            return False
        return self.any_keyword or keys <= self.names


# function -> its ParamShape (functions of service classes: a few dozen per process)
_shapes: dict = {}


class Service:
    """Base class of every service (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    #: where it runs: members whose role is in this tuple ("node", "manager")
    roles: ClassVar[tuple[str, ...]] = ("node", "manager")
    #: event topic prefixes to receive
    subscriptions: ClassVar[tuple[str, ...]] = ()
    tick_interval: ClassVar[float | None] = None
    #: schema of this service's [services.<name>] table: key -> (type, default)
    config_schema: ClassVar[dict[str, tuple]] = {}
    #: built-ins always run on their roles; a plug-in runs only where its table is present
    builtin: ClassVar[bool] = False
    #: time-critical (membership, election, vip): ask the kernel for a better CPU priority
    #: so a busy machine does not starve heartbeats and lease renewals
    critical: ClassVar[bool] = False
    #: True: follow this node's vip.status; keep self.held_vips current; call handle_vips on change
    watch_vips: ClassVar[bool] = False

    def __init__(self, cluster: Cluster, member: str):
        self.cluster = cluster
        self.member = cluster.member(member)
        self.timing = cluster.timing
        self.data_dir = self.member.data_dir
        self.config: dict[str, Any] = cluster.services.get(self.name, {})
        self.log = logging.getLogger(f"ecluster.{self.name}")
        self.bus: AsyncClient | None = None
        self.started = time.time()
        self.reloads = 0                    # handle_reload calls (config.applied for this member)
        self.last_reload_rev: str | None = None
        self._vip_kinds = vip_kinds(cluster)
        #: {kind: bare addresses, sorted}, always every kind; empty before the first report
        self.held_vips: dict[str, tuple[str, ...]] = no_vips(self._vip_kinds)
        self._vip_reports = 0               # reports of this node's vip service taken
        self._vip_stale: asyncio.TimerHandle | None = None
        self._first_vips_task: asyncio.Task | None = None
        self._member_roles = {n: m.role for n, m in cluster.members.items()}
        self._switches: dict[str, Any] = dict(cluster.sections.get("security", {}))
        self.forbidden: dict[str, int] = {}  # method -> calls refused by role (bus.roles)

    # -- hooks (override) ------------------------------------------------------------
    async def handle_init(self) -> None:
        pass

    async def handle_event(self, topic: str, body: Any, env: ch.Envelope) -> None:
        pass

    async def handle_call(self, method: str, args: dict, env: ch.Envelope) -> Any:
        result = self._rpc(method, args, env)(**args)
        if inspect.isawaitable(result):
            result = await result
        return result

    def caller_of(self, env: ch.Envelope) -> access.Principal:
        """Who sent ``env`` (see :mod:`bus.roles`). Pure given the cluster file."""
        return access.principal_of(env.src, env.sc, self.member.name, self._member_roles)

    def _rpc(self, method: str, args: dict, env: ch.Envelope | None = None):
        """The bound ``rpc_<method>``, once its caller may call it (ServiceError forbidden)
        and ``args`` fit its parameters (unknown_method, bad_arguments). The role check
        comes first: a caller that may not call a method learns nothing about its arguments.
        ``env`` None: a call from this process itself, not checked."""
        fn = getattr(self, f"rpc_{method}", None)
        if fn is None or not callable(fn):
            raise ServiceError(f"service {self.name!r} has no method {method!r}", "unknown_method")
        func = getattr(fn, "__func__", fn)
        wants_caller = getattr(func, "rpc_caller", False)
        who = None
        if env is not None:
            rule = getattr(func, "rpc_rule", None)
            who = self.caller_of(env)
            if rule is None or not access.permits(rule, who, args, self._switches):
                self.forbidden[method] = self.forbidden.get(method, 0) + 1
                why = (access.refusal(self.name, method, rule, who) if rule is not None
                       else f"{self.name}.{method} declares no roles: refused to everyone")
                self.log.warning("forbidden: %s", why)
                raise ServiceError(why, access.FORBIDDEN)
        if wants_caller and "caller" in args:
            raise ServiceError(f"{self.name}.{method}: 'caller' is not an argument", "bad_arguments")
        try:
            shape = _shapes.get(func)
        except TypeError:                          # an unhashable callable object: no cache
            shape = func = None
        if shape is None:
            shape = ParamShape.of(fn)
            if func is not None:
                _shapes[func] = shape
        given = {**args, "caller": None} if wants_caller else args
        if not shape.fits(given):
            try:
                shape.signature.bind(**given)      # only to word the error as Python does
            except TypeError as e:
                raise ServiceError(f"{self.name}.{method}: {e}", "bad_arguments") from None
        if wants_caller:
            return functools.partial(fn, caller=who)
        return fn

    async def handle_tick(self) -> None:
        pass

    async def handle_reload(self, rev: str) -> None:
        pass

    async def handle_stop(self) -> None:
        pass

    async def handle_vips(self, held: dict[str, tuple[str, ...]]) -> None:
        """This node's held VIPs changed (by kind). Must not block."""

    # -- following the VIPs (watch_vips) --------------------------------------------
    async def ask_held_vips(self) -> dict[str, tuple[str, ...]]:
        """Ask the local vip service now (its status RPC); updates held_vips.

        Raises the bus error when the vip service does not answer. If a vip.status event
        was taken while the call was out, that event stands (it may be the newer news; the
        next one comes within a probe interval) and the answer is returned as it is.
        """
        before = self._vip_reports
        st = await self.call(self.member.name, "vip", "status", timeout=1.0)
        if not isinstance(st, dict):
            raise ServiceError("vip.status answered something that is not a map", "bad_reply")
        held = held_by_kind(st.get("held"), st.get("states"), self._vip_kinds)
        if self._vip_reports == before:
            await self._take_vips(held)
        return held

    async def _take_vips(self, held: dict[str, tuple[str, ...]]) -> None:
        """A fresh report of this node's VIPs: re-arm the staleness timer, tell on change."""
        self._vip_reports += 1
        if self._vip_stale is not None:
            self._vip_stale.cancel()
        loop = asyncio.get_running_loop()
        self._vip_stale = loop.call_later(stale_after(self.timing), self._vips_stale)
        await self._set_held_vips(held)

    async def _set_held_vips(self, held: dict[str, tuple[str, ...]]) -> None:
        if held == self.held_vips:
            return
        self.held_vips = held
        try:
            await self.handle_vips(held)
        except Exception:
            self.log.exception("handle_vips failed")

    def _vips_stale(self) -> None:
        self._vip_stale = None
        if any(self.held_vips.values()):
            self.log.warning("no vip.status from this node for %.1f s: every VIP counts as released",
                             stale_after(self.timing))
        asyncio.get_running_loop().create_task(self._set_held_vips(no_vips(self._vip_kinds)))

    async def _first_vips(self) -> None:
        # do not wait a probe interval for the first status
        try:
            await self.ask_held_vips()
        except (CallTimeout, RemoteError) as e:
            self.log.debug("vip status not available yet: %s", e)
        except Exception:
            self.log.exception("asking the vip service failed")

    # -- helpers ------------------------------------------------------------------
    async def call(self, member: str | None, service: str, method: str, timeout: float = 2.0, **args) -> Any:
        return await self.bus.call(member, service, method, timeout=timeout, **args)

    async def cast(self, member: str | None, service: str, method: str, **args) -> None:
        await self.bus.cast(member, service, method, **args)

    async def publish(self, topic: str, body: Any) -> None:
        await self.bus.publish(topic, body)

    async def publish_many(self, topic: str, bodies: list) -> None:
        await self.bus.publish_many(topic, bodies)

    async def alarm(self, kind: str, message: str, **details) -> None:
        """Raise a cluster alarm: an event every manager shows, not just a log line."""
        self.log.error("ALARM %s: %s", kind, message)
        await self.publish(f"{ALARM_TOPIC}{kind}", {"member": self.member.name, "service": self.name,
                                                     "message": message, "time": time.time(), **details})

    async def offload(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    @rpc(access.ANYONE)
    def rpc_ping(self) -> dict:
        return {"service": self.name, "member": self.member.name, "pid": os.getpid(),
                "uptime": round(time.time() - self.started, 3),
                "reloads": self.reloads, "last_reload_rev": self.last_reload_rev,
                "forbidden": sum(self.forbidden.values()), "forbidden_by_method": dict(self.forbidden)}

    @classmethod
    def runs_on(cls, cluster: Cluster, member: str) -> bool:
        m = cluster.member(member)
        if m.role not in cls.roles:
            return False
        return cls.builtin or cls.name in cluster.services

    # -- runtime ------------------------------------------------------------------
    async def _on_event(self, topic: str, body: Any, env: ch.Envelope) -> None:
        if topic == RELOAD_TOPIC and isinstance(body, dict) and body.get("member") == self.member.name:
            rev = str(body.get("rev", ""))
            self.reloads += 1
            self.last_reload_rev = rev
            await self.handle_reload(rev)
        if (self.watch_vips and topic == VIP_STATUS_TOPIC and env.src == self.member.name
                and isinstance(body, dict)):
            await self._take_vips(held_by_kind(body.get("held"), body.get("states"), self._vip_kinds))
        if any(topic.startswith(p) for p in self.subscriptions):
            await self.handle_event(topic, body, env)

    def _on_request(self, env: ch.Envelope) -> Any:
        # A plain rpc_ method is answered without a task (the bus client replies at once
        # when it gets a value, awaits it when it gets an awaitable); an overridden
        # handle_call keeps its own (async) path.
        if type(self).handle_call is Service.handle_call:
            return self._rpc(env.method, env.body, env)(**env.body)
        return self.handle_call(env.method, env.body, env)

    async def run(self) -> None:
        """Connect, run hooks until SIGTERM/SIGINT, stop cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if self.critical:
            raise_priority()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        self._stop_event = stop
        self.bus = AsyncClient(self.cluster, self.member.name, f"svc:{self.name}")
        prefixes = (*self.subscriptions, RELOAD_TOPIC, *((VIP_STATUS_TOPIC,) if self.watch_vips else ()))
        for prefix in dict.fromkeys(prefixes):
            self.bus.subscribe(prefix)
        self.bus.on_event = self._on_event
        self.bus.on_request = self._on_request
        self.bus.start()
        ticker = None
        try:
            await self.handle_init()
            if self.watch_vips:
                self._first_vips_task = loop.create_task(self._first_vips())
            if self.tick_interval:
                ticker = loop.create_task(self._ticker())
            await stop.wait()
        finally:
            if ticker:
                ticker.cancel()
            if self._vip_stale is not None:
                self._vip_stale.cancel()
            try:
                await self.handle_stop()
            finally:
                self.bus.close()

    def request_stop(self) -> None:
        ev = getattr(self, "_stop_event", None)
        if ev is not None:
            ev.set()

    async def _ticker(self) -> None:
        interval = self.tick_interval
        next_at = time.monotonic()
        while True:
            next_at += interval
            try:
                await self.handle_tick()
            except Exception:
                self.log.exception("tick failed")
            delay = next_at - time.monotonic()
            if delay < 0:          # fell behind (a pause): do not fire a burst of ticks
                next_at = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)


def registry() -> dict[str, type[Service]]:
    """Every service class found in the entry-point group, built-ins included."""
    out: dict[str, type[Service]] = {}
    for ep in entry_points(group=GROUP):
        out[ep.name] = ep  # loaded lazily by load_service
    return out


def load_service(name: str) -> type[Service]:
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in eps:
        raise UnknownService(f"no service named {name!r} (known: {', '.join(sorted(eps)) or 'none'})")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise UnknownService(f"entry point {name!r} is not a Service subclass")
    if cls.name != name:
        cls.name = name
    return cls


def services_for(cluster: Cluster, member: str) -> list[str]:
    """Names of the services that run on ``member``, in a stable order."""
    out = []
    for name in sorted(registry()):
        try:
            cls = load_service(name)
        except Exception:
            continue
        if cls.runs_on(cluster, member):
            out.append(name)
    return out


def run_service(cluster: Cluster, member: str, name: str) -> None:
    cls = load_service(name)
    svc = cls(cluster, member)
    asyncio.run(svc.run())


__all__ = ["Service", "ServiceError", "CallTimeout", "RemoteError", "load_service", "services_for", "run_service",
           "stale_after", "held_by_kind"]
