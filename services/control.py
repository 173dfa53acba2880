"""control: every member's command endpoint, and command delegation from the managers.

Commands are classes (see :class:`Command`): a name of one or more words ("status",
"vip move"), a docstring that is their help, ``validate(args) -> dict`` that turns the
words after the name into keyword arguments (or raises :class:`CommandError`), and
``async execute(service, args) -> result``. Every answer is typed::

    {"status": "ok",    "member": "n1", "command": "vip show", "result": {...}}
    {"status": "error", "member": "n1", "command": "vip move", "code": "...", "message": "..."}

and a delegated call that got no answer is ``{"status": "down", "message": "..."}``.

Built-in commands: ``status``, ``vip show``, ``vip move ADDRESS NODE``, ``config status``,
``config reload``, ``logs status``, ``membership``, ``version``, ``help [CMD]``. Plug-ins
add theirs through the entry-point group ``ecluster.commands`` (the entry-point name is only
a label; the class's ``name`` is the command)::

    [project.entry-points."ecluster.commands"]
    queue-flush = "my_plugin.commands:QueueFlush"

RPC (service ``control``, every member):
    run(command, args=[], budget=2.0)              run one command here; a typed reply
    status() · version()                           kept for ``ecluster status``
RPC (managers only):
    broadcast(command, args=[], timeout_s=3.0, members=None, include_managers=False)
    unicast(node, command, args=[], timeout_s=3.0)
        -> {"command", "args", "timeout", "manager", "elapsed", "replies": {member: typed reply}}
(``timeout_s`` and ``budget``, not ``timeout``: that name is the bus call's own deadline.)

Who may issue commands: only a holder of a cluster key. The bus lets nobody else in (ZAP
accepts exactly the public keys in the cluster's key directory, see :mod:`bus.transport`),
so the control service itself does not check again.
"""
from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import os
import platform
import time
from importlib.metadata import entry_points
from typing import Any, ClassVar

from bus.client import BusError, CallTimeout, RemoteError
from services.base import Service, ServiceError, rpc
from bus import roles as access

COMMAND_GROUP = "ecluster.commands"
DEFAULT_TIMEOUT = 3.0
MAX_TIMEOUT = 60.0
# bus error codes that mean "nobody there to answer", not "the command failed"
DOWN_CODES = frozenset({"unreachable", "no_service"})
# seconds a command's own calls may take: set per request (each request is its own task)
CALL_BUDGET: contextvars.ContextVar[float] = contextvars.ContextVar("call_budget", default=1.5)

log = logging.getLogger("ecluster.control")


class CommandError(Exception):
    """A command that cannot run as given: one-line ``message``, machine ``code``."""

    def __init__(self, message: str, code: str = "bad_arguments"):
        super().__init__(message)
        self.message = message
        self.code = code


# -- the command classes ------------------------------------------------------------------

class Command:
    """Base of every command. Subclass, set ``name`` (and ``params``), write the docstring.

    ``params`` names the positional words the command takes, in order; a name ending in
    ``?`` is optional. The default :meth:`validate` checks their number and returns them
    by name; override it to check their form too (call ``super().validate(args)`` first).
    ``roles`` limits where the command makes sense ("node", "manager").
    """

    name: ClassVar[str] = ""
    params: ClassVar[tuple[str, ...]] = ()
    roles: ClassVar[tuple[str, ...]] = ("node", "manager")

    def __init__(self, cluster=None):
        self.cluster = cluster

    @classmethod
    def usage(cls) -> str:
        words = [cls.name]
        for p in cls.params:
            words.append(f"[{p[:-1].upper()}]" if p.endswith("?") else p.upper())
        return " ".join(words)

    @classmethod
    def help_text(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc or "(no help)"

    @classmethod
    def summary(cls) -> str:
        return cls.help_text().splitlines()[0]

    def validate(self, args: list[str]) -> dict:
        """The positional words -> keyword arguments; :class:`CommandError` when they do not fit."""
        if not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
            raise CommandError(f"{self.name}: arguments must be a list of words")
        required = [p for p in self.params if not p.endswith("?")]
        if len(args) < len(required):
            missing = " ".join(p.upper() for p in required[len(args):])
            raise CommandError(f"{self.name}: missing {missing} (usage: {self.usage()})")
        if len(args) > len(self.params):
            raise CommandError(f"{self.name}: too many arguments: {' '.join(args[len(self.params):])!r} "
                               f"(usage: {self.usage()})")
        return {p.rstrip("?"): (args[i] if i < len(args) else None) for i, p in enumerate(self.params)}

    async def execute(self, service: "ControlService", args: dict) -> Any:
        raise NotImplementedError


class StatusCommand(Command):
    """This member: role, uptime, its services (up or not available), the coordinator.

    Example: ecluster broadcast status
    """

    name = "status"

    async def execute(self, service, args):
        names = await service.local_services()
        pings = await asyncio.gather(*(service.ask_local(n, "ping") for n in names))
        services = {n: ("up" if isinstance(p, dict) and p.get("available", True) else "not available")
                    for n, p in zip(names, pings)}
        election = await service.ask_local("election", "status")
        coord = ({"role": election.get("role"), "term": election.get("term"), "coordinator": election.get("leader")}
                 if election.get("available", True) else election)
        return {**service.rpc_status(), "services": services, "election": coord}


class VipShowCommand(Command):
    """The VIP table as this member sees it (owner, state, candidates) and what it holds itself.

    Example: ecluster unicast n1 vip show
    """

    name = "vip show"

    async def execute(self, service, args):
        election = await service.ask_local("election", "status")
        out: dict[str, Any] = {}
        if election.get("available", True):
            out.update(coordinator=election.get("leader"), term=election.get("term"), vips=election.get("vips", []))
        else:
            out["election"] = election
        if service.member.role == "node":
            vip = await service.ask_local("vip", "status")
            out["held"] = vip.get("held", []) if vip.get("available", True) else vip
        return out


class VipMoveCommand(Command):
    """Move a VIP to a node (release, then acquire) and pin it there; asks the coordinator.

    Refused when the VIP or node is unknown, the node is down or drained.
    Example: ecluster unicast m1 vip move 10.0.0.100 n2
    """

    name = "vip move"
    params = ("address", "node")

    def validate(self, args):
        out = super().validate(args)
        try:
            ipaddress.ip_interface(out["address"])
        except ValueError:
            raise CommandError(f"vip move: {out['address']!r} is not an IP address") from None
        if self.cluster is not None and out["node"] not in self.cluster.nodes:
            raise CommandError(f"vip move: unknown node {out['node']!r} "
                               f"(nodes: {', '.join(self.cluster.nodes)})", "unknown_node")
        return out

    async def execute(self, service, args):
        return await service.ask_local("election", "move", required=True, vip=args["address"], node=args["node"])


class ConfigStatusCommand(Command):
    """This member's configuration: revision applied, committed head, state.

    Example: ecluster broadcast config status
    """

    name = "config status"

    async def execute(self, service, args):
        return await service.ask_local("configsync", "status")


class ConfigReloadCommand(Command):
    """Catch up with the committed configuration now and apply it (services reload on change).

    Example: ecluster broadcast config reload
    """

    name = "config reload"

    async def execute(self, service, args):
        return await service.ask_local("configsync", "pull", required=True)


class LogsStatusCommand(Command):
    """Journals on a node (seqs, subscribers, lag); aggregation on a manager (written, lag).

    Example: ecluster broadcast logs status
    """

    name = "logs status"

    async def execute(self, service, args):
        if service.member.role == "node":
            return await service.ask_local("jlog", "status")
        return await service.ask_local("logagg", "status")


class MembershipCommand(Command):
    """This member's membership view: every member's state (alive/suspect/dead) and incarnation.

    Example: ecluster broadcast membership
    """

    name = "membership"

    async def execute(self, service, args):
        return await service.ask_local("membership", "view")


class VersionCommand(Command):
    """Software versions on this member (ecluster, Python, ZeroMQ).

    Example: ecluster broadcast version
    """

    name = "version"

    async def execute(self, service, args):
        return service.rpc_version()


class HelpCommand(Command):
    """List the commands, or show one command's help: help [CMD...].

    Example: ecluster unicast n1 help vip move
    """

    name = "help"
    params = ("command?",)

    def validate(self, args):
        if not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
            raise CommandError("help: arguments must be a list of words")
        if not args:
            return {"command": None}
        cls, rest = resolve(list(args), command_classes())
        if rest:
            raise CommandError(f"help: {' '.join(args)!r}: {cls.name} takes no sub-command {rest[0]!r}")
        return {"command": cls.name}

    async def execute(self, service, args):
        table = command_classes()
        if args.get("command"):
            cls = table[args["command"]]
            return {"name": cls.name, "usage": cls.usage(), "help": cls.help_text(), "roles": list(cls.roles)}
        return {"commands": [{"name": c.name, "usage": c.usage(), "summary": c.summary()}
                             for c in sorted(table.values(), key=lambda c: c.name)]}


BUILTIN_COMMANDS: tuple[type[Command], ...] = (
    StatusCommand, VipShowCommand, VipMoveCommand, ConfigStatusCommand, ConfigReloadCommand,
    LogsStatusCommand, MembershipCommand, VersionCommand, HelpCommand)

_plugins: dict[str, type[Command]] | None = None


def plugin_commands() -> dict[str, type[Command]]:
    """Commands of the entry-point group ``ecluster.commands`` (loaded once; a broken one is skipped)."""
    global _plugins
    if _plugins is None:
        found: dict[str, type[Command]] = {}
        for ep in entry_points(group=COMMAND_GROUP):
            try:
                cls = ep.load()
            except Exception as e:  # noqa: BLE001 - one bad plug-in must not hide the others
                log.error("command plug-in %s (%s) does not load: %s", ep.name, ep.value, e)
                continue
            if not (isinstance(cls, type) and issubclass(cls, Command) and cls.name):
                log.error("command plug-in %s (%s) is not a named Command subclass", ep.name, ep.value)
                continue
            found[" ".join(cls.name.split())] = cls
        _plugins = found
    return _plugins


def command_classes() -> dict[str, type[Command]]:
    """Every command by name: built-ins, then plug-ins (a plug-in cannot replace a built-in)."""
    table = {c.name: c for c in BUILTIN_COMMANDS}
    for name, cls in plugin_commands().items():
        table.setdefault(name, cls)
    return table


def resolve(words: list[str], table: dict[str, type[Command]]) -> tuple[type[Command], list[str]]:
    """The command named by the longest leading run of ``words``, and the words left. Pure.

    Raises :class:`CommandError` (code ``unknown_command``) naming the nearest commands.
    """
    if not words:
        raise CommandError("no command given (try: help)", "unknown_command")
    for n in range(len(words), 0, -1):
        name = " ".join(words[:n])
        if name in table:
            return table[name], list(words[n:])
    first = words[0]
    near = sorted(n for n in table if n.split()[0] == first)
    hint = f"did you mean: {', '.join(near)}" if near else f"commands: {', '.join(sorted(table))}"
    raise CommandError(f"unknown command {' '.join(words)!r} ({hint})", "unknown_command")


def split_command(command: Any, args: Any) -> list[str]:
    """``command`` ("vip move" or ["vip", "move"]) and ``args`` as one list of words. Pure."""
    if isinstance(command, str):
        words = command.split()
    elif isinstance(command, (list, tuple)) and all(isinstance(w, str) for w in command):
        words = [w for part in command for w in part.split()]
    else:
        raise CommandError("the command must be text or a list of words", "bad_arguments")
    if args is None:
        args = []
    if isinstance(args, str):
        args = args.split()
    if not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
        raise CommandError("the arguments must be a list of words", "bad_arguments")
    return words + list(args)


def prepare(command: Any, args: Any, cluster=None) -> tuple[Command, dict]:
    """Resolve and validate: the command object and its keyword arguments (or CommandError)."""
    cls, rest = resolve(split_command(command, args), command_classes())
    cmd = cls(cluster)
    return cmd, cmd.validate(rest)


def ok_reply(member: str, command: str, result: Any) -> dict:
    return {"status": "ok", "member": member, "command": command, "result": result}


def error_reply(member: str, command: str, code: str, message: str) -> dict:
    return {"status": "error", "member": member, "command": command, "code": code, "message": message}


def down_reply(member: str, command: str, message: str) -> dict:
    return {"status": "down", "member": member, "command": command, "message": message}


def check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise ServiceError(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {timeout!r}",
                           "bad_arguments")
    return float(timeout)


# -- the service -------------------------------------------------------------------------------

class ControlService(Service):
    name = "control"
    builtin = True

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        self._local: list[str] | None = None

    async def handle_init(self) -> None:
        # finding the services of this member loads every service class (slow imports):
        # do it once, in a thread, from the start
        self._local_task = asyncio.get_running_loop().create_task(self.offload(self._find_local))

    def _find_local(self) -> list[str]:
        from node.child import in_a_child
        from services.base import services_for
        try:
            # in a child: the classes loaded to ask where each runs stay out of this process
            return in_a_child("services.base:services_for", self.cluster, self.member.name)
        except Exception:  # noqa: BLE001 - a broken plug-in must not break status
            self.log.warning("finding this member's services in a child failed: finding them here")
            try:
                return services_for(self.cluster, self.member.name)
            except Exception:  # noqa: BLE001
                return []

    # -- helpers for commands ----------------------------------------------------------
    async def local_services(self) -> list[str]:
        """The services configured to run on this member ([] while still being found)."""
        if self._local is None:
            task = getattr(self, "_local_task", None)
            if task is None:
                self._local = await self.offload(self._find_local)
            else:
                try:
                    self._local = await asyncio.wait_for(asyncio.shield(task), CALL_BUDGET.get())
                except asyncio.TimeoutError:
                    return []
        return self._local

    async def ask_local(self, service: str, method: str, required: bool = False, **args) -> Any:
        """Call a service of this member. A service that is not running gives
        ``{"available": False, "error": ...}`` (or a CommandError when ``required``)."""
        budget = CALL_BUDGET.get()
        try:
            return await self.call(self.member.name, service, method, timeout=budget, **args)
        except CallTimeout:
            msg = f"{service} did not answer within {budget:g}s"
        except RemoteError as e:
            if e.code not in DOWN_CODES:
                raise
            msg = f"{service} is not available here ({e.message})"
        if required:
            raise CommandError(msg, "not_available")
        return {"available": False, "error": msg}

    # -- RPC --------------------------------------------------------------------------
    @rpc(access.ANYONE)
    def rpc_status(self) -> dict:
        return {"member": self.member.name, "role": self.member.role, "cluster": self.cluster.name,
                "pid": os.getpid(), "host": platform.node(), "time": time.time(),
                "uptime": round(time.time() - self.started, 3)}

    @rpc(access.ANYONE)
    def rpc_version(self) -> dict:
        from importlib.metadata import version

        import zmq
        return {"member": self.member.name, "ecluster": version("ecluster"), "python": platform.python_version(),
                "zmq": zmq.zmq_version(), "pyzmq": zmq.__version__}

    @rpc(access.OPERATOR)
    async def rpc_run(self, command: Any, args: Any = None, budget: float = 2.0) -> dict:
        """Run one command on this member; always a typed reply (ok or error).

        ``budget``: seconds the caller will wait; the command's own calls are kept within it.
        """
        name = " ".join(command) if isinstance(command, (list, tuple)) else str(command)
        try:
            budget = check_timeout(budget)
            cmd, kwargs = prepare(command, args, self.cluster)
            name = cmd.name
            if self.member.role not in cmd.roles:
                raise CommandError(f"{cmd.name}: runs on {'/'.join(cmd.roles)}, not on a {self.member.role}",
                                   "wrong_role")
            CALL_BUDGET.set(max(0.1, min(1.5, budget * 0.7)))   # this request's task only
            result = await cmd.execute(self, kwargs)
            return ok_reply(self.member.name, name, result)
        except CommandError as e:
            return error_reply(self.member.name, name, e.code, e.message)
        except ServiceError as e:
            return error_reply(self.member.name, name, e.code, e.message)
        except CallTimeout as e:
            return error_reply(self.member.name, name, "timeout", str(e))
        except RemoteError as e:
            return error_reply(self.member.name, name, e.code, e.message)
        except Exception as e:  # noqa: BLE001 - a command bug is an error reply, not a dead service
            self.log.exception("command %s failed", name)
            return error_reply(self.member.name, name, "internal", f"{type(e).__name__}: {e}")

    def _manager_only(self, what: str) -> None:
        if self.member.role != "manager":
            raise ServiceError(f"{what} is served by managers, not by node {self.member.name}", "wrong_role")

    def _prepare_here(self, command: Any, args: Any) -> tuple[str, list[str]]:
        """Check the command on the manager first: one clear error instead of one per node."""
        try:
            cmd, _ = prepare(command, args, self.cluster)
        except CommandError as e:
            raise ServiceError(e.message, e.code) from None
        words = split_command(command, args)
        return cmd.name, words[len(cmd.name.split()):]

    async def _delegate(self, targets: list[str], name: str, rest: list[str], timeout: float) -> dict:
        started = time.monotonic()

        async def one(member: str) -> tuple[str, dict]:
            # the far side gets a little less than our timeout so its answer can still arrive
            budget = round(timeout * 0.9, 3)
            if member == self.member.name:
                run = self.rpc_run(name, rest, budget=budget)
            else:
                run = self.call(member, "control", "run", timeout=timeout, command=name, args=rest, budget=budget)
            try:
                # the call has its own deadline; this one also bounds a send that would block
                return member, await asyncio.wait_for(run, timeout)
            except (asyncio.TimeoutError, CallTimeout):
                return member, down_reply(member, name, f"no reply within {timeout:g}s")
            except RemoteError as e:
                if e.code in DOWN_CODES:
                    return member, down_reply(member, name, e.message)
                return member, error_reply(member, name, e.code, e.message)
            except BusError as e:
                return member, down_reply(member, name, str(e))

        pairs = await asyncio.gather(*(one(m) for m in targets))
        return {"command": name, "args": rest, "timeout": timeout, "manager": self.member.name,
                "elapsed": round(time.monotonic() - started, 3), "replies": dict(pairs)}

    @rpc(access.OPERATOR)
    async def rpc_broadcast(self, command: Any, args: Any = None, timeout_s: float = DEFAULT_TIMEOUT,
                            members: list | None = None, include_managers: bool = False) -> dict:
        """Run a command on every node (``include_managers``: every member; or ``members``),
        concurrently; a member without an answer within ``timeout_s`` is reported down."""
        self._manager_only("broadcast")
        timeout = check_timeout(timeout_s)
        name, rest = self._prepare_here(command, args)
        if members:
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise ServiceError("members must be a list of member names", "bad_arguments")
            for m in members:
                if m not in self.cluster.members:
                    raise ServiceError(f"unknown member {m!r} (members: {', '.join(self.cluster.members)})",
                                       "unknown_member")
            targets = list(dict.fromkeys(members))
        else:
            targets = list(self.cluster.nodes) + (list(self.cluster.managers) if include_managers else [])
        return await self._delegate(targets, name, rest, timeout)

    @rpc(access.OPERATOR)
    async def rpc_unicast(self, node: str, command: Any, args: Any = None,
                          timeout_s: float = DEFAULT_TIMEOUT) -> dict:
        """Run a command on one member; down when it does not answer within ``timeout_s``."""
        self._manager_only("unicast")
        timeout = check_timeout(timeout_s)
        if not isinstance(node, str) or node not in self.cluster.members:
            raise ServiceError(f"unknown member {node!r} (members: {', '.join(self.cluster.members)})",
                               "unknown_member")
        name, rest = self._prepare_here(command, args)
        return await self._delegate([node], name, rest, timeout)

    @rpc(access.ANYONE)
    def rpc_commands(self) -> list[dict]:
        """Every command known here: name, usage, one-line summary (for the console's form)."""
        return [{"name": c.name, "usage": c.usage(), "summary": c.summary()}
                for c in sorted(command_classes().values(), key=lambda c: c.name)]


__all__ = ["Command", "CommandError", "ControlService", "BUILTIN_COMMANDS", "COMMAND_GROUP", "command_classes",
           "plugin_commands", "prepare", "resolve", "split_command"]
