"""A network-namespace lab for ``ecluster demo`` (root only), built with pyroute2.

The same topology as the test lab (tests/lab.py), kept here so the installed package
does not depend on the test tree::

    <prefix>hub : bridge br0, one veth port per endpoint (vm1, vm2, ..., vc)
    <prefix>m1  : eth0 = <subnet>.11/24      (member 1) ...
    <prefix>c   : eth0 = <subnet>.2/24       (client)

Names use the test lab's scheme (``ecl<pid % 10000><3 random chars>-``) and its marker
files (``/run/ecluster-lab/<prefix>.pid``: pid and start time of the creator), so either
lab's clean-up removes the other's leftovers once their creator is dead, and nothing
that a live process still owns. No interface is ever created in the root namespace:
the host reaches the lab only through sockets made inside a namespace
(:class:`NsSockets`).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import os
import re
import secrets
import signal
import socket
import string
import subprocess
import time
from pathlib import Path
from typing import Sequence

MARKER_DIR = Path("/run/ecluster-lab")
NETNS_DIR = Path("/run/netns")
PREFIX_RE = re.compile(r"^ecl\d{1,4}[a-z0-9]{3}-$")
FIRST_MEMBER_HOST = 11
CLIENT_HOST = 2
BRIDGE = "br0"
IFACE = "eth0"
CLONE_NEWNET = 0x40000000


class LabNetError(RuntimeError):
    """The lab cannot be built or used; one-line message."""


def make_prefix(pid: int, suffix: str) -> str:
    """The namespace-name prefix for a lab made by ``pid``. Pure."""
    prefix = f"ecl{pid % 10000}{suffix}-"
    if not PREFIX_RE.match(prefix):
        raise LabNetError(f"invalid lab prefix {prefix!r}")
    return prefix


def process_start_time(pid: int) -> str | None:
    """Start time of ``pid`` (clock ticks since boot), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _ns_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in_namespaces(names: Sequence[str]) -> list[int]:
    """PIDs of the processes living in the namespaces ``names`` (never our own)."""
    wanted = {ino for ino in map(_ns_inode, names) if ino is not None}
    if not wanted:
        return []
    out = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in wanted:
            out.append(int(entry))
    return out


def kill_everything_in(names: Sequence[str], wait: float = 5.0) -> None:
    """SIGKILL (by PID) every process in the namespaces ``names`` until none is left."""
    deadline = time.monotonic() + wait
    while True:
        pids = pids_in_namespaces(names)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _remove_ns(name: str) -> None:
    from pyroute2 import netns
    try:
        netns.remove(name)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def cleanup_stale() -> list[str]:
    """Remove the namespaces of labs whose creator is dead; return their names."""
    removed: list[str] = []
    try:
        markers = sorted(MARKER_DIR.iterdir())
    except FileNotFoundError:
        return removed
    existing = sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else []
    for marker in markers:
        prefix = marker.stem + "-"
        if marker.suffix != ".pid" or not PREFIX_RE.match(prefix):
            continue
        try:
            pid_text, started = marker.read_text().split()[:2]
            pid = int(pid_text)
        except (OSError, ValueError):
            continue              # being written right now
        if process_start_time(pid) == started:
            continue              # its creator is alive: not ours to touch
        names = [n for n in existing if n.startswith(prefix)]
        kill_everything_in(names)
        for n in names:
            _remove_ns(n)
            removed.append(n)
        marker.unlink(missing_ok=True)
    return removed


class NsSockets:
    """Makes sockets inside a namespace: one worker thread that entered it with setns(2).

    A thread's network namespace decides where the sockets it creates live; the sockets
    are then used from any thread (e.g. the asyncio loop of a port relay).
    """

    def __init__(self, ns: str):
        self.ns = ns
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"ns-{ns}",
                                                           initializer=self._enter)

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(NETNS_DIR / self.ns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns into {self.ns}: {os.strerror(e)}")
        finally:
            os.close(fd)

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket inside the namespace (blocking until the worker made it)."""
        return self._pool.submit(socket.socket, family, kind).result(timeout=10)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class LabNet:
    """Namespaces for ``n_members`` members and a client on one bridge; :meth:`down` always."""

    def __init__(self, n_members: int, subnet: str = "10.77.0"):
        if not 1 <= n_members <= 200:
            raise LabNetError(f"n_members must be in 1..200, got {n_members}")
        parts = subnet.split(".")
        if len(parts) != 3 or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
            raise LabNetError(f"subnet must be three octets like '10.77.0', got {subnet!r}")
        self.n_members = n_members
        self.subnet = subnet
        self.prefix = ""
        self.marker: Path | None = None
        self.created: list[str] = []
        self.procs: list[subprocess.Popen] = []

    # -- names --------------------------------------------------------------------------
    @property
    def hub_ns(self) -> str:
        return f"{self.prefix}hub"

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}c"

    def member_ns(self, i: int) -> str:
        return f"{self.prefix}m{i}"

    def address(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    def member_address(self, i: int) -> str:
        return self.address(FIRST_MEMBER_HOST - 1 + i)

    @property
    def client_address(self) -> str:
        return self.address(CLIENT_HOST)

    @property
    def namespaces(self) -> list[str]:
        return [self.hub_ns, *(self.member_ns(i) for i in range(1, self.n_members + 1)), self.client_ns]

    # -- lifecycle ------------------------------------------------------------------------
    def up(self) -> "LabNet":
        """Create the namespaces, bridge, veths, addresses. On failure, tear down and raise."""
        if os.geteuid() != 0:
            raise LabNetError("network namespaces need root")
        try:
            cleanup_stale()
            self._claim()
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _claim(self) -> None:
        MARKER_DIR.mkdir(parents=True, exist_ok=True)
        me, started = os.getpid(), process_start_time(os.getpid())
        alphabet = string.ascii_lowercase + string.digits
        for _ in range(50):
            prefix = make_prefix(me, "".join(secrets.choice(alphabet) for _ in range(3)))
            if NETNS_DIR.is_dir() and any(n.startswith(prefix) for n in os.listdir(NETNS_DIR)):
                continue
            try:
                fd = os.open(MARKER_DIR / f"{prefix[:-1]}.pid", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{me} {started}\n")
            self.prefix, self.marker = prefix, MARKER_DIR / f"{prefix[:-1]}.pid"
            return
        raise LabNetError("could not find a free lab prefix")

    def _build(self) -> None:
        from pyroute2 import IPRoute, netns
        for name in self.namespaces:
            netns.create(name)
            self.created.append(name)
        endpoints = [(f"vm{i}", self.member_ns(i), self.member_address(i)) for i in range(1, self.n_members + 1)]
        endpoints.append(("vc", self.client_ns, self.client_address))
        with IPRoute(netns=self.hub_ns, flags=0, groups=0) as hub:
            hub.link("add", ifname=BRIDGE, kind="bridge")
            bridge = hub.link_lookup(ifname=BRIDGE)[0]
            hub.link("set", index=bridge, state="up")
            for port, ns, _ in endpoints:
                # made inside the hub: no interface ever appears in the root namespace
                hub.link("add", ifname=port, kind="veth", peer={"ifname": IFACE, "net_ns_fd": ns})
                hub.link("set", index=hub.link_lookup(ifname=port)[0], master=bridge, state="up")
        for _, ns, addr in endpoints:
            with IPRoute(netns=ns, flags=0, groups=0) as ipr:
                eth0 = ipr.link_lookup(ifname=IFACE)[0]
                ipr.addr("add", index=eth0, address=addr, prefixlen=24)
                ipr.link("set", index=eth0, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def add_address(self, ns: str, address: str, prefixlen: int = 24) -> None:
        """Add ``address`` to eth0 in ``ns`` (e.g. more client source addresses)."""
        from pyroute2 import IPRoute
        with IPRoute(netns=ns, flags=0, groups=0) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname=IFACE)[0], address=address, prefixlen=prefixlen)

    def popen(self, ns: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside ``ns`` in a new session (killed by :meth:`down`)."""
        if ns not in self.created:
            raise LabNetError(f"{ns!r} is not a namespace of this lab")
        p = subprocess.Popen(["ip", "netns", "exec", ns, *map(str, argv)], start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def kill_ns(self, ns: str) -> None:
        """kill -9 every process in ``ns`` (a machine dying)."""
        kill_everything_in([ns])

    def down(self) -> None:
        """Kill every process in the lab (by PID), delete the namespaces and the marker. Idempotent."""
        kill_everything_in(self.created)
        for p in self.procs:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(self.created):
            _remove_ns(name)
        self.created.clear()
        if self.marker is not None:
            self.marker.unlink(missing_ok=True)
            self.marker = None
