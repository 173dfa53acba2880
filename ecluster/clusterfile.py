"""The cluster file: one TOML file that describes a whole cluster.

Shape (every key not listed here is an error naming the key and the file)::

    [cluster]
    name = "lab"
    keys = "keys"            # directory of CURVE key pairs, relative to this file
    preset = "lan"           # timing preset: "lan" (default) or "fast"
    vip_dry_run = false      # true: the vip service records but does not plumb (no root)

    [nodes.n1]
    address = "10.99.0.11"   # where this member's bus listens
    data_dir = "/var/lib/ecluster/n1"
    bus_port = 7400          # ROUTER, RPC between members      (default 7400)
    pub_port = 7401          # PUB, events to other members      (default 7401)
    metrics_port = 7402      # Prometheus text endpoint           (default 7402)

    [managers.m1]
    address = "10.99.0.21"
    data_dir = "/var/lib/ecluster/m1"       # default /var/lib/ecluster/<name>
    console_address = "127.0.0.1"           # web console bind address (default loopback)
    console_port = 7480                     # (default 7480)

    [[vip]]
    address = "10.99.0.100/24"
    interface = "eth0"
    preference = "n1"        # optional
    kind = "injection"       # or "outbound"; default injection
    follow = "10.99.0.101"   # optional: go wherever that VIP goes

    [[check]]                # health checks, run on every node by the health service
    name = "mta"
    kind = "tcp"             # "tcp": connect to address:port; "smtp": also read a 220 banner;
                             # "command": run it (no shell), exit 0 = healthy
    port = 25                # tcp / smtp
    address = "127.0.0.1"    # tcp / smtp (default loopback)
    # command = ["/usr/local/bin/check-mta", "--quick"]   # kind "command": list, or a string split like a shell
    interval = 0.5           # seconds between probes
    timeout = 1.0            # a probe that takes longer failed (a command is killed)
    fall = 3                 # failed probes in a row before unhealthy
    rise = 2                 # good probes in a row before healthy again
    vips = ["10.99.0.100"]   # optional: the VIPs it guards (default: every VIP)

    [hooks]                  # programs run after the fact (the hooks service), never waited for
    vip = "/usr/local/bin/on-vip"        # on-vip acquire|release ADDRESS/PREFIX
    config = "/usr/local/bin/on-config"  # on-config applied COMMIT
    member = "/usr/local/bin/on-member"  # on-member alive|dead MEMBER
    timeout = 10.0                       # seconds before a hook is killed (and alarmed)

Relative paths are taken relative to the directory of the cluster file. Other
sections (``[as_logger]``, ``[cidr_server]``, ``[jlog]``, ``[services.<plugin>]``)
are declared in :data:`SECTIONS` / registered by plug-ins with :func:`register_section`.
"""
from __future__ import annotations

import ipaddress
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecluster.timing import PRESETS, Timing, preset as timing_preset

DEFAULT_BUS_PORT = 7400
DEFAULT_PUB_PORT = 7401
DEFAULT_METRICS_PORT = 7402
DEFAULT_CONSOLE_PORT = 7480
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
REQUIRED = object()


class ClusterFileError(ValueError):
    """A cluster file that cannot be used; the message is one line naming file and key."""


@dataclass(frozen=True)
class Member:
    """A node or a manager: everything needed to reach it and run it."""

    name: str
    role: str                 # "node" | "manager"
    address: str
    data_dir: Path
    bus_port: int = DEFAULT_BUS_PORT
    pub_port: int = DEFAULT_PUB_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    console_address: str = "127.0.0.1"
    console_port: int = DEFAULT_CONSOLE_PORT
    logs_root: Path | None = None

    @property
    def bus_endpoint(self) -> str:
        return f"tcp://{_zmq_host(self.address)}:{self.bus_port}"

    @property
    def pub_endpoint(self) -> str:
        return f"tcp://{_zmq_host(self.address)}:{self.pub_port}"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def ipc_router(self) -> str:
        return f"ipc://{self.run_dir / 'bus.ipc'}"

    @property
    def ipc_pub(self) -> str:
        return f"ipc://{self.run_dir / 'events.ipc'}"


@dataclass(frozen=True)
class Vip:
    address: str              # with prefix, e.g. 10.99.0.100/24
    interface: str
    preference: str | None = None
    kind: str = "injection"
    follow: str | None = None

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


CHECK_KINDS = ("tcp", "smtp", "command")


@dataclass(frozen=True)
class Check:
    """One ``[[check]]``: a probe of a local service that guards some VIPs."""

    name: str
    kind: str                    # "tcp" | "smtp" | "command"
    port: int | None = None      # tcp / smtp
    address: str = "127.0.0.1"   # tcp / smtp
    command: tuple[str, ...] = ()  # command kind: argv, run without a shell
    interval: float = 0.5
    timeout: float = 1.0
    fall: int = 3
    rise: int = 2
    vips: tuple[str, ...] = ()   # bare addresses guarded; empty: every VIP

    def guards(self, vip_ip: str) -> bool:
        return not self.vips or vip_ip.split("/")[0] in self.vips


@dataclass(frozen=True)
class Hooks:
    """``[hooks]``: argv prefixes (empty: no hook) and the timeout before a hook is killed."""

    vip: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    member: tuple[str, ...] = ()
    timeout: float = 10.0


@dataclass(frozen=True)
class Cluster:
    """A parsed, checked cluster file."""

    path: Path
    name: str
    keys_dir: Path
    timing: Timing
    nodes: dict[str, Member]
    managers: dict[str, Member]
    vips: list[Vip]
    vip_dry_run: bool = False
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: tuple[Check, ...] = ()
    hooks: Hooks = field(default_factory=Hooks)

    @property
    def members(self) -> dict[str, Member]:
        return {**self.nodes, **self.managers}

    def member(self, name: str) -> Member:
        try:
            return self.members[name]
        except KeyError:
            raise ClusterFileError(
                f"{self.path}: no member named {name!r} (members: {', '.join(self.members) or 'none'})"
            ) from None

    def section(self, name: str) -> dict[str, Any]:
        """A declared optional section with its defaults filled in."""
        return self.sections[name]

    @property
    def voters(self) -> list[str]:
        """Every configured member votes: managers too, so 2 nodes + 1 manager has a majority."""
        return sorted(self.members)

    @property
    def quorum(self) -> int:
        return len(self.voters) // 2 + 1


# Optional sections: key -> (type, default). Later issues add theirs here.
SECTIONS: dict[str, dict[str, tuple[type | tuple, Any]]] = {
    "as_logger": {
        "log_interval": ((int, float), 60),
        "series_include": (str, ""),
        "series_exclude": (str, ""),
    },
    "cidr_server": {
        "retention_days": (int, 30),
    },
    # who may do what beyond the fixed roles (docs/SECURITY.md)
    "security": {
        "nodes_may_commit": (bool, False),   # a node's key may propose configuration commits
    },
    "jlog": {
        "fsync": (str, "batch"),
        "budget_mb": ((int, float), 1024),
        "policy": (str, "block"),
        "logs": (list, []),
        "segment_mb": ((int, float), 16),
    },
}
# Plug-in service sections ([services.<name>]): name -> schema, registered by plug-ins.
SERVICE_SECTIONS: dict[str, dict[str, tuple[type | tuple, Any]]] = {}
# Plug-in value checks: name -> check(cluster), raising ClusterFileError (a plug-in class's
# ``check_config`` classmethod): a wrong value is refused where the file is read, naming the key.
SERVICE_CHECKS: dict[str, Any] = {}


def register_section(service: str, schema: dict[str, tuple[type | tuple, Any]]) -> None:
    """Let a plug-in service declare its ``[services.<name>]`` table and defaults."""
    SERVICE_SECTIONS[service] = schema


_CLUSTER_KEYS = {"name": (str, REQUIRED), "keys": (str, "keys"), "preset": (str, "lan"),
                 "vip_dry_run": (bool, False)}
_NODE_KEYS = {"address": (str, REQUIRED), "data_dir": (str, REQUIRED),
              "bus_port": (int, DEFAULT_BUS_PORT), "pub_port": (int, DEFAULT_PUB_PORT),
              "metrics_port": (int, DEFAULT_METRICS_PORT)}
_MANAGER_KEYS = {"address": (str, REQUIRED), "data_dir": (str, None),
                 "bus_port": (int, DEFAULT_BUS_PORT), "pub_port": (int, DEFAULT_PUB_PORT),
                 "metrics_port": (int, DEFAULT_METRICS_PORT),
                 "console_address": (str, "127.0.0.1"), "console_port": (int, DEFAULT_CONSOLE_PORT),
                 "logs_root": (str, None)}
_VIP_KEYS = {"address": (str, REQUIRED), "interface": (str, REQUIRED), "preference": (str, None),
             "kind": (str, "injection"), "follow": (str, None)}
_CHECK_KEYS = {"name": (str, REQUIRED), "kind": (str, REQUIRED), "port": (int, None),
               "address": (str, "127.0.0.1"), "command": ((str, list), None),
               "interval": ((int, float), 0.5), "timeout": ((int, float), 1.0),
               "fall": (int, 3), "rise": (int, 2), "vips": (list, None)}
_HOOK_KEYS = {"vip": ((str, list), None), "config": ((str, list), None), "member": ((str, list), None),
              "timeout": ((int, float), 10.0)}


def _zmq_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _check_table(where: str, path: Path, table: Any, schema: dict) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ClusterFileError(f"{path}: '{where}' must be a table")
    for key in table:
        if key not in schema:
            raise ClusterFileError(f"{path}: unknown key '{where}.{key}'")
    out: dict[str, Any] = {}
    for key, (typ, default) in schema.items():
        if key not in table:
            if default is REQUIRED:
                raise ClusterFileError(f"{path}: missing key '{where}.{key}'")
            out[key] = default
            continue
        value = table[key]
        # bool is an int in Python: do not let `port = true` pass as a number
        if isinstance(value, bool) and typ is not bool and bool not in (typ if isinstance(typ, tuple) else (typ,)):
            raise ClusterFileError(f"{path}: '{where}.{key}' has the wrong type (got a boolean)")
        if not isinstance(value, typ):
            names = "/".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
            raise ClusterFileError(f"{path}: '{where}.{key}' must be {names}, got {type(value).__name__}")
        out[key] = value
    return out


def _check_port(path: Path, where: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ClusterFileError(f"{path}: '{where}' port {port} out of range 1-65535")


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q).resolve()


def _member_address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why peers could not reach a bus listening on ``ip`` (None when they can). Pure."""
    if ip.is_multicast or ip.is_unspecified:
        return "a member needs a unicast address its peers can connect to"
    if ip.version == 6 and (ip.is_link_local or ip.scope_id):
        return "an IPv6 link-local address needs a zone on every peer: use a global or ULA address"
    return None


def _member(path: Path, base: Path, role: str, name: str, table: Any) -> Member:
    where = f"{'nodes' if role == 'node' else 'managers'}.{name}"
    if not NAME_RE.match(name):
        raise ClusterFileError(f"{path}: member name '{name}' must match {NAME_RE.pattern}")
    t = _check_table(where, path, table, _NODE_KEYS if role == "node" else _MANAGER_KEYS)
    try:
        bus_ip = ipaddress.ip_address(t["address"])
    except ValueError:
        raise ClusterFileError(f"{path}: '{where}.address' is not an IP address: {t['address']!r}") from None
    problem = _member_address_problem(bus_ip)
    if problem:
        raise ClusterFileError(f"{path}: '{where}.address' {t['address']!r}: {problem}")
    t["address"] = str(bus_ip)     # canonical (IPv6 compressed), so a duplicate endpoint is seen
    for k in ("bus_port", "pub_port", "metrics_port") + (("console_port",) if role == "manager" else ()):
        _check_port(path, f"{where}.{k}", t[k])
    data_dir = t["data_dir"] or f"/var/lib/ecluster/{name}"
    extra: dict[str, Any] = {}
    if role == "manager":
        try:
            ipaddress.ip_address(t["console_address"])
        except ValueError:
            raise ClusterFileError(f"{path}: '{where}.console_address' is not an IP address") from None
        extra = {"console_address": t["console_address"], "console_port": t["console_port"],
                 "logs_root": _resolve(base, t["logs_root"]) if t["logs_root"] else None}
    return Member(name=name, role=role, address=t["address"], data_dir=_resolve(base, data_dir),
                  bus_port=t["bus_port"], pub_port=t["pub_port"], metrics_port=t["metrics_port"], **extra)


def parse_cluster(text: str, path: Path) -> Cluster:
    """Parse and check cluster-file text; ``path`` is used for messages and relative paths."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ClusterFileError(f"{path}: invalid TOML: {e}") from None
    base = path.parent
    allowed = {"cluster", "nodes", "managers", "vip", "check", "hooks", "services", *SECTIONS}
    for key in raw:
        if key not in allowed:
            raise ClusterFileError(f"{path}: unknown key '{key}'")
    if "cluster" not in raw:
        raise ClusterFileError(f"{path}: missing table '[cluster]'")
    c = _check_table("cluster", path, raw["cluster"], _CLUSTER_KEYS)
    if c["preset"] not in PRESETS:
        raise ClusterFileError(f"{path}: 'cluster.preset' must be one of {', '.join(sorted(PRESETS))}, got {c['preset']!r}")
    if not NAME_RE.match(c["name"]):
        raise ClusterFileError(f"{path}: 'cluster.name' must match {NAME_RE.pattern}")

    members: dict[str, dict[str, Member]] = {"node": {}, "manager": {}}
    for role, key in (("node", "nodes"), ("manager", "managers")):
        tables = raw.get(key, {})
        if not isinstance(tables, dict):
            raise ClusterFileError(f"{path}: '{key}' must be a table of tables")
        for name, table in tables.items():
            if name in members["node"] or name in members["manager"]:
                raise ClusterFileError(f"{path}: member name '{name}' is used twice")
            members[role][name] = _member(path, base, role, name, table)
    if not members["node"]:
        raise ClusterFileError(f"{path}: no [nodes.<name>] table: a cluster needs at least one node")

    seen_ep: dict[tuple[str, int], str] = {}
    seen_dirs: dict[Path, str] = {}
    for m in [*members["node"].values(), *members["manager"].values()]:
        ports = [m.bus_port, m.pub_port, m.metrics_port] + ([m.console_port] if m.role == "manager" else [])
        if len(set(ports)) != len(ports):
            raise ClusterFileError(f"{path}: member '{m.name}' uses one port twice")
        for port in ports:
            other = seen_ep.get((m.address, port))
            if other:
                raise ClusterFileError(f"{path}: members '{other}' and '{m.name}' both use {m.address}:{port}")
            seen_ep[(m.address, port)] = m.name
        if m.data_dir in seen_dirs:
            raise ClusterFileError(f"{path}: members '{seen_dirs[m.data_dir]}' and '{m.name}' share data_dir {m.data_dir}")
        seen_dirs[m.data_dir] = m.name

    vips_raw = raw.get("vip", [])
    if not isinstance(vips_raw, list):
        raise ClusterFileError(f"{path}: 'vip' must be an array of tables ([[vip]])")
    vips = [_vip(path, i, t, members["node"]) for i, t in enumerate(vips_raw)]
    _check_vip_graph(path, vips)
    checks = _checks(path, raw.get("check", []), vips)
    hooks = _hooks(path, raw.get("hooks", {}))

    sections = {}
    for name, schema in SECTIONS.items():
        sections[name] = _check_table(name, path, raw.get(name, {}), schema)
    _check_sections(path, sections)

    services: dict[str, dict[str, Any]] = {}
    svc_raw = raw.get("services", {})
    if not isinstance(svc_raw, dict):
        raise ClusterFileError(f"{path}: 'services' must be a table of tables")
    for name, table in svc_raw.items():
        schema = SERVICE_SECTIONS.get(name)
        if schema is None:
            _load_plugin_sections()
            schema = SERVICE_SECTIONS.get(name)
        if schema is None:
            raise ClusterFileError(f"{path}: unknown key 'services.{name}' (no such plug-in service)")
        services[name] = _check_table(f"services.{name}", path, table, schema)

    keys_dir = _resolve(base, c["keys"])
    cluster = Cluster(path=path, name=c["name"], keys_dir=keys_dir, timing=timing_preset(c["preset"]),
                      nodes=members["node"], managers=members["manager"], vips=vips,
                      vip_dry_run=c["vip_dry_run"], sections=sections, services=services,
                      checks=checks, hooks=hooks)
    for name in services:
        check = SERVICE_CHECKS.get(name)
        if check is not None:
            try:
                check(cluster)
            except ClusterFileError as e:
                msg = str(e)
                raise ClusterFileError(msg if msg.startswith(f"{path}:") else f"{path}: {msg}") from None
    return cluster


def _vip(path: Path, i: int, table: Any, nodes: dict[str, Member]) -> Vip:
    # the vip service's own parser (IPv4 or IPv6): whatever passes here it can plumb, so a
    # VIP it cannot handle fails the load, naming the key, instead of crash-looping a service
    from node.vipcore import VipError, interface_problem, parse_vip_address, subnet_address_problem, vip_key
    where = f"vip[{i}]"
    t = _check_table(where, path, table, _VIP_KEYS)
    if "/" not in t["address"]:
        example = "64" if ":" in t["address"] else "24"
        raise ClusterFileError(f"{path}: '{where}.address' needs a prefix length, e.g. {t['address']}/{example}")
    try:
        ip, prefixlen = parse_vip_address(t["address"])
    except VipError as e:
        raise ClusterFileError(f"{path}: '{where}.address': {_vip_reason(e)}") from None
    problem = subnet_address_problem(ip, prefixlen)
    if problem:
        raise ClusterFileError(f"{path}: '{where}.address': {t['address']!r} {problem}")
    problem = interface_problem(t["interface"])
    if problem:
        raise ClusterFileError(f"{path}: '{where}.interface': {problem}")
    if t["kind"] not in ("injection", "outbound"):
        raise ClusterFileError(f"{path}: '{where}.kind' must be 'injection' or 'outbound', got {t['kind']!r}")
    if t["preference"] is not None and t["preference"] not in nodes:
        raise ClusterFileError(f"{path}: '{where}.preference' names unknown node {t['preference']!r}")
    follow = None
    if t["follow"]:
        try:
            follow = vip_key(t["follow"])       # canonical, so "fd00:0::100" finds "fd00::100"
        except VipError as e:
            raise ClusterFileError(f"{path}: '{where}.follow': {_vip_reason(e)}") from None
    return Vip(address=f"{ip}/{prefixlen}", interface=t["interface"],
               preference=t["preference"], kind=t["kind"], follow=follow)


def _vip_reason(e: Exception) -> str:
    """A VipError's message without its "bad VIP address" lead (the key is named instead)."""
    return str(e).removeprefix("bad VIP address ")


def _check_vip_graph(path: Path, vips: list[Vip]) -> None:
    by_ip: dict[str, Vip] = {}
    for v in vips:
        if v.ip in by_ip:
            raise ClusterFileError(f"{path}: VIP {v.ip} is listed twice")
        by_ip[v.ip] = v
    for v in vips:
        seen = {v.ip}
        cur = v
        while cur.follow:
            if cur.follow not in by_ip:
                raise ClusterFileError(f"{path}: VIP {cur.ip} follows {cur.follow}, which is not a VIP")
            if cur.follow in seen:
                raise ClusterFileError(f"{path}: VIP {v.ip}: 'follow' forms a cycle")
            seen.add(cur.follow)
            cur = by_ip[cur.follow]


def _argv(path: Path, where: str, value: Any) -> tuple[str, ...]:
    """A program and its arguments: a list of strings, or one string split as a shell would
    (no shell runs it). Pure."""
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as e:
            raise ClusterFileError(f"{path}: '{where}' cannot be split into arguments: {e}") from None
    else:
        if not all(isinstance(a, str) for a in value):
            raise ClusterFileError(f"{path}: '{where}' must be a list of strings")
        argv = list(value)
    if not argv or not argv[0]:
        raise ClusterFileError(f"{path}: '{where}' is empty: name a program")
    if any("\0" in a for a in argv):
        raise ClusterFileError(f"{path}: '{where}' contains a NUL character")
    return tuple(argv)


def _positive(path: Path, where: str, value: float, at_most: float | None = None) -> float:
    if not value > 0 or value != value:
        raise ClusterFileError(f"{path}: '{where}' must be more than 0, got {value!r}")
    if at_most is not None and value > at_most:
        raise ClusterFileError(f"{path}: '{where}' must be at most {at_most:g}, got {value!r}")
    return float(value)


def _checks(path: Path, raw: Any, vips: list[Vip]) -> tuple[Check, ...]:
    if not isinstance(raw, list):
        raise ClusterFileError(f"{path}: 'check' must be an array of tables ([[check]])")
    vip_ips = {v.ip for v in vips}
    out: list[Check] = []
    for i, table in enumerate(raw):
        where = f"check[{i}]"
        t = _check_table(where, path, table, _CHECK_KEYS)
        name = t["name"]
        if not NAME_RE.match(name):
            raise ClusterFileError(f"{path}: '{where}.name' must match {NAME_RE.pattern}, got {name!r}")
        if any(c.name == name for c in out):
            raise ClusterFileError(f"{path}: '{where}.name': check {name!r} is defined twice")
        where = f"check.{name}"
        kind = t["kind"]
        if kind not in CHECK_KINDS:
            raise ClusterFileError(f"{path}: '{where}.kind' must be one of {', '.join(CHECK_KINDS)}, got {kind!r}")
        port, command = t["port"], ()
        if kind in ("tcp", "smtp"):
            if port is None:
                raise ClusterFileError(f"{path}: missing key '{where}.port' (a {kind} check connects to a port)")
            _check_port(path, f"{where}.port", port)
            if t["command"] is not None:
                raise ClusterFileError(f"{path}: '{where}.command' is only for kind = \"command\"")
            try:
                ipaddress.ip_address(t["address"])
            except ValueError:
                raise ClusterFileError(f"{path}: '{where}.address' is not an IP address: {t['address']!r}") from None
        else:
            if t["command"] is None:
                raise ClusterFileError(f"{path}: missing key '{where}.command' (a command check runs a program)")
            if port is not None:
                raise ClusterFileError(f"{path}: '{where}.port' is only for tcp and smtp checks")
            command = _argv(path, f"{where}.command", t["command"])
        interval = _positive(path, f"{where}.interval", t["interval"], 3600)
        timeout = _positive(path, f"{where}.timeout", t["timeout"], 3600)
        for k in ("fall", "rise"):
            if not 1 <= t[k] <= 1000:
                raise ClusterFileError(f"{path}: '{where}.{k}' must be between 1 and 1000, got {t[k]}")
        guarded: list[str] = []
        for v in t["vips"] or []:
            if not isinstance(v, str):
                raise ClusterFileError(f"{path}: '{where}.vips' entries must be VIP addresses (strings)")
            ip = v.split("/")[0]
            try:
                ip = str(ipaddress.ip_address(ip))
            except ValueError:
                raise ClusterFileError(f"{path}: '{where}.vips' entry {v!r} is not an address") from None
            if ip not in vip_ips:
                raise ClusterFileError(f"{path}: '{where}.vips' names {ip}, which is not a [[vip]]")
            guarded.append(ip)
        if t["vips"] is not None and not guarded:
            raise ClusterFileError(f"{path}: '{where}.vips' is empty: leave it out to guard every VIP")
        out.append(Check(name=name, kind=kind, port=port, address=t["address"], command=command,
                         interval=interval, timeout=timeout, fall=t["fall"], rise=t["rise"],
                         vips=tuple(guarded)))
    return tuple(out)


def _hooks(path: Path, raw: Any) -> Hooks:
    t = _check_table("hooks", path, raw, _HOOK_KEYS)
    argvs = {k: _argv(path, f"hooks.{k}", t[k]) if t[k] is not None else () for k in ("vip", "config", "member")}
    return Hooks(timeout=_positive(path, "hooks.timeout", t["timeout"], 3600), **argvs)


def _check_sections(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    a = sections["as_logger"]
    if not a["log_interval"] >= 1:
        raise ClusterFileError(f"{path}: 'as_logger.log_interval' must be at least 1 second")
    for key in ("series_include", "series_exclude"):
        if a[key]:
            try:
                re.compile(a[key])
            except re.error as e:
                raise ClusterFileError(f"{path}: 'as_logger.{key}' is not a valid regex: {e}") from None
    if sections["cidr_server"]["retention_days"] < 1:
        raise ClusterFileError(f"{path}: 'cidr_server.retention_days' must be at least 1")
    j = sections["jlog"]
    if j["policy"] not in ("block", "drop_oldest"):
        raise ClusterFileError(f"{path}: 'jlog.policy' must be 'block' or 'drop_oldest'")
    if not (j["fsync"] in ("always", "batch") or re.fullmatch(r"interval:\d+", j["fsync"])):
        raise ClusterFileError(f"{path}: 'jlog.fsync' must be 'always', 'batch' or 'interval:<ms>'")
    for log in j["logs"]:
        if not isinstance(log, str) or not NAME_RE.match(log):
            raise ClusterFileError(f"{path}: 'jlog.logs' entries must be log names matching {NAME_RE.pattern}")


_plugins_loaded = False


def _load_plugin_sections() -> None:
    """Import every registered service class once so plug-ins can register their sections."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points
    for ep in entry_points(group="ecluster.services"):
        try:
            cls = ep.load()
        except Exception:  # a broken plug-in must not make the cluster file unreadable
            continue
        schema = getattr(cls, "config_schema", None)
        if schema:
            SERVICE_SECTIONS.setdefault(ep.name, schema)
        check = getattr(cls, "check_config", None)
        if callable(check):
            SERVICE_CHECKS.setdefault(ep.name, check)


def load_cluster(path: str | Path) -> Cluster:
    """Read and check a cluster file; raises :class:`ClusterFileError` with a one-line message."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ClusterFileError(f"{p}: no such cluster file") from None
    except OSError as e:
        raise ClusterFileError(f"{p}: cannot read: {e.strerror}") from None
    return parse_cluster(text, p.resolve())
