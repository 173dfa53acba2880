"""Shared test helpers: cluster files with free ports and keys, member processes, polling.

* :func:`make_cluster_file` / the ``make_cluster`` fixture: a cluster file on loopback
  (distinct free ports) or on given addresses, with a key pair per member and ``admin``.
  Data directories go under a short ``/tmp/ecl*`` directory so unix socket paths stay
  well below the 108-byte limit whatever pytest's tmp_path looks like.
* :class:`Procs` / the ``procs`` fixture: ``ecluster ...`` subprocesses in their own
  session, output to files, stopped at teardown by PID (their descendants too).
* :func:`wait_until`: poll a condition with a deadline (never a bare sleep).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

PYTHON = sys.executable
CLI = [PYTHON, "-m", "ecluster.cli"]


# -- polling ------------------------------------------------------------------------------

def wait_until(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               what: str | None = None) -> Any:
    """Poll ``cond`` until it returns a truthy value (returned) or ``timeout`` passes.

    An exception from ``cond`` counts as "not yet"; the last one is named in the failure.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - "not yet", reported if it never comes true
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what or getattr(cond, '__name__', 'condition')} not true within "
                                 f"{timeout:g}s" + (f" (last error: {last!r})" if last else ""))
        time.sleep(interval)


# -- cluster files --------------------------------------------------------------------------

def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now on ``host`` (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def short_dir(prefix: str = "ecl") -> Path:
    """A fresh directory with a short path (for unix sockets); the caller removes it."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def cluster_text(name: str, nodes: Sequence[tuple[str, str, tuple[int, ...]]],
                 managers: Sequence[tuple[str, str, tuple[int, ...]]], data_root: Path,
                 preset: str = "lan", extra: str = "", nodes_may_commit: bool = True) -> str:
    """Cluster-file text for (name, address, (bus, pub, metrics, console)) members. Pure.

    Tests commit through nodes (eccfg --member n1), so the [security] switch that allows it
    is on unless asked otherwise (its default in a cluster file is off)."""
    lines = ["[cluster]", f'name = "{name}"', 'keys = "keys"', f'preset = "{preset}"', "vip_dry_run = true", ""]
    if nodes_may_commit:
        lines += ["[security]", "nodes_may_commit = true", ""]
    for table, members in (("nodes", nodes), ("managers", managers)):
        for mname, address, (bus, pub, metrics, console) in members:
            lines += [f"[{table}.{mname}]", f'address = "{address}"', f'data_dir = "{data_root / mname}"',
                      f"bus_port = {bus}", f"pub_port = {pub}", f"metrics_port = {metrics}"]
            if table == "managers":
                lines.append(f"console_port = {console}")
            lines.append("")
    return "\n".join(lines) + "\n" + extra


def make_cluster_file(base: Path, n_nodes: int = 3, n_managers: int = 0, addresses: Sequence[str] | None = None,
                      extra: str = "", data_root: Path | None = None, preset: str = "lan", name: str = "test",
                      nodes_may_commit: bool = True):
    """Write ``base/cluster.toml`` and its keys; return the loaded :class:`Cluster`.

    Members are ``n1..nN`` then ``m1..mM``. Without ``addresses`` they all listen on
    127.0.0.1 on distinct free ports; with distinct ``addresses`` (one per member, nodes
    first) they use the default ports 7400-7402.
    """
    from bus import keys as keymod
    from ecluster.clusterfile import load_cluster

    names = [f"n{i}" for i in range(1, n_nodes + 1)] + [f"m{i}" for i in range(1, n_managers + 1)]
    if addresses is None:
        ports = free_ports(4 * len(names))
        spec = [(nm, "127.0.0.1", tuple(ports[4 * i:4 * i + 4])) for i, nm in enumerate(names)]
    else:
        if len(addresses) != len(names) or len(set(addresses)) != len(addresses):
            raise ValueError("give one distinct address per member")
        spec = [(nm, addr, (7400, 7401, 7402, 7480)) for nm, addr in zip(names, addresses)]
    base.mkdir(parents=True, exist_ok=True)
    root = data_root or base / "data"
    text = cluster_text(name, spec[:n_nodes], spec[n_nodes:], root, preset=preset, extra=extra,
                        nodes_may_commit=nodes_may_commit and "[security]" not in extra)
    path = base / "cluster.toml"
    path.write_text(text)
    for nm in [*names, keymod.ADMIN]:
        keymod.create(base / "keys", nm)
    return load_cluster(path)


@pytest.fixture
def make_cluster(tmp_path):
    """Factory: ``make_cluster(n_nodes, n_managers=0, addresses=None, extra="", preset="lan")``."""
    roots: list[Path] = []

    def factory(n_nodes: int = 3, n_managers: int = 0, addresses=None, extra: str = "", preset: str = "lan",
                sub: str = "c", nodes_may_commit: bool = True):
        root = short_dir()
        roots.append(root)
        return make_cluster_file(tmp_path / sub, n_nodes, n_managers, addresses, extra, data_root=root,
                                 preset=preset, nodes_may_commit=nodes_may_commit)

    yield factory
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)


# -- processes ------------------------------------------------------------------------------

def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _ppid_map() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...)."""
    parents = _ppid_map()
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        frontier += kids
    return out


def alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Procs:
    """``ecluster`` subprocesses of one test (or module); :meth:`stop_all` at teardown."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self._logs: dict[int, Path] = {}
        self._seen: dict[int, str | None] = {}     # pid -> start time, descendants included

    def start(self, args: Sequence[str], name: str | None = None, argv: Sequence[str] | None = None,
              **kwargs) -> subprocess.Popen:
        """Start ``ecluster <args>`` (or a full ``argv``) in a new session, output to a file."""
        cmd = list(argv) if argv is not None else [*CLI, *map(str, args)]
        log = self.log_dir / f"{name or Path(cmd[-1]).name}.{len(self.procs)}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, **kwargs)
        self.procs.append(p)
        self._logs[p.pid] = log
        self._seen[p.pid] = _start_time(p.pid)
        return p

    def log(self, p: subprocess.Popen) -> str:
        return self._logs[p.pid].read_text(errors="replace")

    def remember_tree(self, p: subprocess.Popen) -> list[int]:
        """Record ``p``'s current descendants so teardown can kill them by PID too."""
        kids = descendants(p.pid)
        for k in kids:
            self._seen.setdefault(k, _start_time(k))
        return kids

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal ``p`` (by PID), wait for it; SIGKILL its group if it does not go."""
        self.remember_tree(p)
        if p.returncode is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)   # unreaped leader: the group id is still ours
            except ProcessLookupError:
                pass
            return p.wait(timeout=5)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.returncode is None:
                self.stop(p)
        # anything that escaped (e.g. a program of a killed supervisord): by PID, if still the same process
        for pid, started in self._seen.items():
            if started is not None and _start_time(pid) == started and alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path / "logs")
    yield p
    p.stop_all()


def run_cli(args: Sequence[str], timeout: float = 30.0, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``ecluster <args>`` to completion; returns the completed process (text output)."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def bus_ping(cluster, via: str, target: str | None = None, timeout: float = 0.5) -> dict:
    """``bus.ping`` of ``target`` (default ``via``) through ``via``'s broker, as a local client."""
    from bus.client import SyncClient
    with SyncClient(cluster, via=via) as c:
        return c.call(target or via, "bus", "ping", timeout=timeout)


def bus_status(cluster, member: str, timeout: float = 1.0) -> dict:
    """``bus.status`` of ``member`` asked over its ipc socket."""
    from bus.client import SyncClient
    with SyncClient(cluster, via=member) as c:
        return c.call(member, "bus", "status", timeout=timeout)
