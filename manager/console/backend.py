"""What the console shows, asked over the bus from the manager that serves it.

:class:`BusBackend` answers every JSON endpoint with a plain dict. A service that is not
running (or does not answer in time) gives ``{"available": false, "error": "..."}`` for
its part of the page, never a failed page. An action the cluster refuses (moving a VIP to
a drained node, a malformed CIDR query) raises :class:`ActionError` with the cluster's
code and one-line message.

``call`` is any ``async (member, service, method, timeout=..., **args)`` (a service's
``call``), so tests may back the console with a fake.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from bus.client import BusError, CallTimeout, RemoteError
from node.health import check_summary

DOWN_CODES = frozenset({"unreachable", "no_service"})
ASK_TIMEOUT = 1.5
MAX_QUERY = 1000
MAX_TAIL_LINES = 500
TAIL_BYTES = 256 * 1024

Call = Callable[..., Awaitable[Any]]


class ActionError(Exception):
    """The cluster refused an action or a query: ``code``, one-line ``message``, HTTP ``status``."""

    def __init__(self, message: str, code: str = "error", status: int = 409):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


def not_available(service: str, why: str) -> dict:
    return {"available": False, "error": f"{service} not available ({why})"}


def tail_lines(path: Path, n: int, max_bytes: int = TAIL_BYTES) -> list[str]:
    """The last ``n`` lines of a file (at most ``max_bytes`` read), decoded leniently."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        start = max(0, size - max_bytes)
        f.seek(max(0, start - 1))
        data = f.read(size - max(0, start - 1))
    cut = False
    if start > 0:
        # one byte more than the window: a newline there means the window starts a line
        cut, data = data[:1] != b"\n", data[1:]
    lines = data.split(b"\n")
    if cut:
        lines = lines[1:]          # the first line was cut by the read window
    if lines and lines[-1] == b"":
        lines = lines[:-1]
    return [ln.decode("utf-8", "replace") for ln in lines[-n:]] if n > 0 else []


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` is under ``root`` once both are resolved. Pure apart from resolve()."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def member_rows(cluster, view: dict | None, leader: str | None, health: dict | None = None) -> list[dict]:
    """Rows of the cluster page from the membership view (None: unknown) and the
    coordinator's health table (election.status "health"). Pure."""
    members = (view or {}).get("members", {}) if isinstance(view, dict) else {}
    health = health if isinstance(health, dict) else {}
    rows = []
    for name, m in cluster.members.items():
        seen = members.get(name) or {}
        rows.append({"name": name, "role": m.role, "address": m.address,
                     "state": seen.get("state", "unknown"), "incarnation": seen.get("inc"),
                     "since": seen.get("since"), "coordinator": name == leader,
                     "checks": check_summary(health.get(name)) if m.role == "node" else None})
    return rows


class BusBackend:
    """The console's data source: the manager's own services and the members, over the bus."""

    def __init__(self, cluster, member: str, call: Call):
        self.cluster = cluster
        self.member = member
        self._call = call

    async def ask(self, service: str, method: str, member: str | None = None, timeout: float = ASK_TIMEOUT,
                  **args) -> Any:
        """Call or return ``{"available": False, ...}`` when the service is not there;
        a refusal by the service raises :class:`ActionError`."""
        try:
            return await self._call(member or self.member, service, method, timeout=timeout, **args)
        except CallTimeout:
            return not_available(service, f"no reply within {timeout:g}s")
        except RemoteError as e:
            if e.code in DOWN_CODES:
                return not_available(service, e.message)
            raise ActionError(e.message, e.code) from None
        except BusError as e:
            return not_available(service, str(e))

    @staticmethod
    def available(value: Any) -> bool:
        return not (isinstance(value, dict) and value.get("available") is False)

    async def act(self, service: str, method: str, timeout: float = 3.0, **args) -> Any:
        """An action: not available is an error too (503)."""
        out = await self.ask(service, method, timeout=timeout, **args)
        if not self.available(out):
            raise ActionError(out["error"], "not_available", 503)
        return out

    # -- pages ------------------------------------------------------------------------
    async def cluster_page(self) -> dict:
        election, view = await asyncio.gather(self.ask("election", "status"), self.ask("membership", "view"))
        e_ok, v_ok = self.available(election), self.available(view)
        leader = election.get("leader") if e_ok else None
        return {"cluster": self.cluster.name, "manager": self.member, "time": time.time(),
                "coordinator": leader, "term": election.get("term") if e_ok else None,
                "quorum": self.cluster.quorum, "voters": len(self.cluster.voters),
                "view_number": view.get("number") if v_ok else None,
                "members": member_rows(self.cluster, view if v_ok else None, leader,
                                       election.get("health") if e_ok else None),
                "election": None if e_ok else election, "membership": None if v_ok else view}

    async def vips_page(self) -> dict:
        election, view = await asyncio.gather(self.ask("election", "status"), self.ask("membership", "view"))
        out: dict[str, Any] = {"manager": self.member, "time": time.time()}
        states = {}
        if self.available(view):
            states = {n: m.get("state") for n, m in view.get("members", {}).items()}
        health = {}
        if not self.available(election):
            out.update(election=election, vips=[], coordinator=None, term=None, drained=[])
        else:
            a = election.get("assignment") or {}
            health = election.get("health") if isinstance(election.get("health"), dict) else {}
            out.update(election=None, vips=election.get("vips", []), coordinator=election.get("leader"),
                       term=election.get("term"), drained=sorted(a.get("drained", []) or []))
        out["nodes"] = [{"name": n, "state": states.get(n, "unknown"), "drained": n in out["drained"],
                         "checks": check_summary(health.get(n))}
                        for n in self.cluster.nodes]
        return out

    async def move_vip(self, vip: str, node: str) -> dict:
        check_vip(vip)
        self.check_node(node)
        return await self.act("election", "move", vip=vip, node=node)

    async def unpin_vip(self, vip: str) -> dict:
        check_vip(vip)
        return await self.act("election", "unpin", vip=vip)

    async def drain_node(self, node: str, drain: bool = True) -> dict:
        self.check_node(node)
        return await self.act("election", "drain" if drain else "undrain", node=node)

    def check_node(self, node: Any) -> None:
        if not isinstance(node, str) or node not in self.cluster.nodes:
            raise ActionError(f"unknown node {node!r} (nodes: {', '.join(self.cluster.nodes)})",
                              "unknown_node", 400)

    async def config_page(self, diff_rev: str | None = None) -> dict:
        status, commits = await asyncio.gather(self.ask("configsync", "cluster_status", timeout=2.5),
                                               self.ask("configsync", "log", n=20))
        out: dict[str, Any] = {"manager": self.member, "time": time.time()}
        if not self.available(status):
            out.update(status=status, members=[], committed=None, coordinator=None)
        else:
            out.update(status=None, members=status.get("members", []), committed=status.get("committed"),
                       coordinator=status.get("coordinator"), term=status.get("term"))
        out["log"] = commits if isinstance(commits, list) else []
        out["log_error"] = None if isinstance(commits, list) else commits.get("error")
        if diff_rev:
            if not (4 <= len(diff_rev) <= 64 and all(c in "0123456789abcdefABCDEF" for c in diff_rev)):
                raise ActionError(f"bad revision {diff_rev!r}: give a commit id (hex)", "bad_revision", 400)
            try:
                diff = await self.ask("configsync", "diff", rev=diff_rev)
            except ActionError as e:
                diff = {"available": False, "error": e.message}
            out["diff"] = {"rev": diff_rev, "text": diff if isinstance(diff, str) else None,
                           "error": None if isinstance(diff, str) else diff.get("error")}
        return out

    async def logs_page(self, node: str | None = None, log: str | None = None, lines: int = 50) -> dict:
        nodes = list(self.cluster.nodes)
        agg, *journals = await asyncio.gather(self.ask("logagg", "status"),
                                              *(self.ask("jlog", "status", member=n, timeout=1.0) for n in nodes))
        out: dict[str, Any] = {"manager": self.member, "time": time.time()}
        lanes = []
        if self.available(agg):
            for n, logs in sorted((agg.get("logs") or {}).items()):
                for lg, st in sorted(logs.items()):
                    lanes.append({"node": n, "log": lg, **{k: st.get(k) for k in (
                        "written_seq", "node_last_seq", "lag_records", "lag_bytes", "records_written",
                        "duplicates_skipped", "error")}})
        out["aggregation"] = None if self.available(agg) else agg
        out["subscriber"] = agg.get("subscriber") if self.available(agg) else None
        out["lanes"] = lanes
        subs = []
        for n, st in zip(nodes, journals):
            if not self.available(st):
                subs.append({"node": n, "log": None, "subscriber": None, "error": st.get("error")})
                continue
            for lg, info in sorted((st.get("logs") or {}).items()):
                for sub, s in sorted((info.get("subscribers") or {}).items()):
                    subs.append({"node": n, "log": lg, "subscriber": sub, "checkpoint": s.get("checkpoint"),
                                 "lag_records": s.get("lag_records"), "lag_bytes": s.get("lag_bytes"),
                                 "stalled": s.get("stalled"), "last_seq": info.get("last_seq")})
        out["subscribers"] = subs
        out["tail"] = None
        if node and log and self.available(agg):
            lines = max(1, min(int(lines), MAX_TAIL_LINES))
            st = ((agg.get("logs") or {}).get(node) or {}).get(log)
            if st is None:
                out["tail"] = {"node": node, "log": log, "lines": [], "error": "no such aggregated log"}
            else:
                out["tail"] = await self._tail(agg, node, log, st.get("file"), lines)
        return out

    async def _tail(self, agg: dict, node: str, log: str, file: str | None, n: int) -> dict:
        out = {"node": node, "log": log, "file": file, "lines": [], "error": None}
        root = Path(agg.get("root") or "/nonexistent")
        path = root / file if file else None          # the sink names its file relative to the root
        if path is None:
            out["error"] = "nothing written yet"
        elif not inside(root, path):
            out["error"] = "file outside the aggregation root"
        else:
            try:
                out["lines"] = await asyncio.get_running_loop().run_in_executor(None, tail_lines, path, n)
            except OSError as e:
                out["error"] = f"cannot read {file}: {e.strerror or e}"
        return out

    async def cidr_page(self, query: str | None) -> dict:
        if not query:
            status = await self.ask("cidr_server", "status")
            if not self.available(status):
                return {"available": False, "error": status["error"], "series": []}
            return {"available": True, "series": status.get("series", []), "nodes": status.get("nodes", {})}
        if len(query) > MAX_QUERY:
            raise ActionError(f"query too long ({len(query)} characters, at most {MAX_QUERY})", "bad_query", 400)
        try:
            out = await self.ask("cidr_server", "query", timeout=5.0, text=query)
        except ActionError as e:
            raise ActionError(e.message, e.code, 400) from None
        if not self.available(out):
            return {**out, "query": query}
        return {"available": True, "query": query, "rows": out.get("rows", []), "result": out.get("result")}

    async def commands(self) -> dict:
        out = await self.ask("control", "commands")
        return {"commands": out} if isinstance(out, list) else {"commands": [], **out}

    async def run_command(self, mode: str, command: str, node: str | None = None, timeout: float = 3.0,
                          include_managers: bool = False) -> dict:
        if not isinstance(command, str) or not command.strip():
            raise ActionError("give a command (try: help)", "bad_arguments", 400)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 30:
            raise ActionError("timeout must be a number of seconds in (0, 30]", "bad_arguments", 400)
        words = command.split()
        try:
            if mode == "broadcast":
                return await self.act("control", "broadcast", timeout=timeout + 2.0, command=words, args=[],
                                      timeout_s=timeout, include_managers=bool(include_managers))
            if mode == "unicast":
                if not isinstance(node, str) or node not in self.cluster.members:
                    raise ActionError(f"unknown member {node!r} (members: {', '.join(self.cluster.members)})",
                                      "unknown_member", 400)
                return await self.act("control", "unicast", timeout=timeout + 2.0, node=node, command=words,
                                      args=[], timeout_s=timeout)
        except ActionError as e:
            if e.status == 409:
                e.status = 400     # a refused command is a bad request from the form
            raise
        raise ActionError(f"mode must be broadcast or unicast, got {mode!r}", "bad_arguments", 400)


def check_vip(vip: Any) -> None:
    if not isinstance(vip, str):
        raise ActionError("vip must be an address", "bad_arguments", 400)
    try:
        ipaddress.ip_interface(vip)
    except ValueError:
        raise ActionError(f"{vip!r} is not an IP address", "bad_arguments", 400) from None
