"""Network-namespace test lab, built with pyroute2.

Topology (one lab)::

    <prefix>hub : bridge br0, one veth port per endpoint (vm1, vm2, ..., vc)
    <prefix>m1  : eth0 = <subnet>.11/24      (member 1)
    <prefix>m2  : eth0 = <subnet>.12/24      (member 2) ...
    <prefix>c   : eth0 = <subnet>.2/24       (client)

The prefix is ``ecl<pid % 10000><3 random chars>-`` so that two labs never collide with each
other nor with keepalived's ``lab-*`` namespaces. A marker file ``/run/ecluster-lab/<prefix>.pid``
records the creating process (pid and start time) so that :func:`cleanup_stale` can remove the
leftovers of a crashed run without touching anything that is still owned by a live process.

Setup and inspection go through pyroute2 only; ``ip netns exec`` is used solely to start
processes inside a namespace (:meth:`Lab.popen`).
"""

from __future__ import annotations

import atexit
import bisect
import errno
import ipaddress
import os
import re
import secrets
import signal
import socket
import string
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from pyroute2 import IPRoute, netns

__all__ = [
    "LabError",
    "Lab",
    "AddressSampler",
    "FlapHandle",
    "cleanup_stale",
    "partition_blackholes",
    "WHOAMI_SCRIPT",
    "PROBE_SCRIPT",
    "MARKER_DIR",
]

MARKER_DIR = Path("/run/ecluster-lab")
NETNS_DIR = Path("/run/netns")
WHOAMI_SCRIPT = Path(__file__).with_name("whoami.py")
PROBE_SCRIPT = Path(__file__).with_name("probe.py")

# Only names of exactly this shape are ever considered ours by cleanup_stale().
_PREFIX_RE = re.compile(r"^ecl\d{1,4}[a-z0-9]{3}-$")
_RANDOM_ALPHABET = string.ascii_lowercase + string.digits
_FIRST_MEMBER_HOST = 11
_CLIENT_HOST = 2
_BRIDGE = "br0"
_IFACE = "eth0"
_KILL_WAIT_S = 5.0


class LabError(Exception):
    """Bad use of the lab (bad argument, unknown namespace, lab not up) or a failed setup."""


# ---------------------------------------------------------------------------------------------
# Pure helpers (no I/O)
# ---------------------------------------------------------------------------------------------

def make_prefix(pid: int, suffix: str) -> str:
    """Namespace-name prefix for a lab created by `pid` with a 3-char random `suffix`."""
    prefix = f"ecl{pid % 10000}{suffix}-"
    if not _PREFIX_RE.match(prefix):
        raise LabError(f"invalid lab prefix {prefix!r}")
    return prefix


def validate_subnet(subnet: str) -> str:
    """Return `subnet` ("a.b.c", the first three octets of a /24) or raise LabError."""
    parts = subnet.split(".")
    if len(parts) != 3 or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise LabError(f"subnet must be three octets like '10.99.0', got {subnet!r}")
    return ".".join(str(int(p)) for p in parts)


def validate_groups(groups: Sequence[Sequence[int]], n_members: int) -> list[list[int]]:
    """Check a partition spec: 1-based member indices, each at most once.

    Members not named in any group each form a group of their own (they are cut off from
    everyone else). Returns the complete list of groups.
    """
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise LabError(f"groups must be a list of lists of member indices, got {groups!r}")
    seen: set[int] = set()
    out: list[list[int]] = []
    for group in groups:
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
            raise LabError(f"each group must be a list of member indices, got {group!r}")
        clean = []
        for i in group:
            if not isinstance(i, int) or isinstance(i, bool) or not 1 <= i <= n_members:
                raise LabError(f"member index {i!r} out of range 1..{n_members}")
            if i in seen:
                raise LabError(f"member {i} appears in more than one group")
            seen.add(i)
            clean.append(i)
        if clean:
            out.append(clean)
    out.extend([i] for i in range(1, n_members + 1) if i not in seen)
    return out


def partition_blackholes(groups: Sequence[Sequence[int]], addresses: dict[int, str]
                         ) -> dict[int, set[str]]:
    """For each member, the addresses of members outside its group (to be blackholed).

    `groups` must be complete (see validate_groups); `addresses` maps member index -> address.
    """
    group_of = {i: gi for gi, group in enumerate(groups) for i in group}
    return {
        i: {addresses[j] for j in addresses if group_of[j] != group_of[i]}
        for i in addresses
    }


# ---------------------------------------------------------------------------------------------
# Process / namespace helpers (I/O)
# ---------------------------------------------------------------------------------------------

def _process_start_time(pid: int) -> str | None:
    """Start time (clock ticks since boot) of `pid`, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The comm field may contain spaces and parentheses; fields after the last ')' are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19]  # field 22 overall: starttime


def _owner_alive(pid: int, start_time: str) -> bool:
    return _process_start_time(pid) == start_time


def _ns_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _pids_in_namespaces(names: Iterable[str]) -> list[int]:
    """PIDs of processes whose network namespace is one of `names` (never our own pid)."""
    wanted = {ino for ino in (_ns_inode(n) for n in names) if ino is not None}
    if not wanted:
        return []
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in wanted:
            pids.append(int(entry))
    return pids


def _kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_everything_in(names: Sequence[str], deadline_s: float = _KILL_WAIT_S) -> None:
    """SIGKILL (by PID) every process living in the namespaces `names`, until none is left."""
    deadline = time.monotonic() + deadline_s
    while True:
        pids = _pids_in_namespaces(names)
        if not pids or time.monotonic() > deadline:
            return
        _kill_pids(pids)
        time.sleep(0.01)


def _remove_namespace(name: str) -> None:
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def _open_ns(name: str) -> IPRoute:
    """An RTNL handle inside namespace `name`: never creates the namespace, no multicast."""
    if _ns_inode(name) is None:
        raise LabError(f"network namespace {name!r} does not exist")
    return IPRoute(netns=name, flags=0, groups=0)


def _link_index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname!r} not found")
    return found[0]


def _link_up(ipr: IPRoute, index: int) -> bool:
    links = ipr.get_links(index)
    return bool(links) and bool(links[0]["flags"] & 1)   # IFF_UP


def _ipv4_addresses(ipr: IPRoute, index: int) -> set[str]:
    return {
        msg.get("address")
        for msg in ipr.addr("dump", family=socket.AF_INET, index=index)
        if msg.get("index") == index
    }


def cleanup_stale() -> list[str]:
    """Remove namespaces left by crashed labs; return the names removed.

    A lab is stale when its marker file ``/run/ecluster-lab/<prefix>.pid`` names a process
    that no longer exists (pid plus start time, so a recycled pid does not count as alive).
    Only namespaces whose name starts with such a stale ``ecl…-`` prefix are touched: their
    processes are killed by PID, then the namespaces are deleted and the marker removed.
    """
    removed: list[str] = []
    try:
        markers = sorted(MARKER_DIR.iterdir())
    except FileNotFoundError:
        return removed
    existing = sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else []
    for marker in markers:
        if marker.suffix != ".pid":
            continue
        prefix = marker.stem + "-"
        if not _PREFIX_RE.match(prefix):
            continue
        try:
            pid_text, start_time = marker.read_text().split()[:2]
            owner_pid = int(pid_text)
        except (OSError, ValueError):
            continue  # half-written marker of a lab being created right now: leave it
        if _owner_alive(owner_pid, start_time):
            continue
        names = [n for n in existing if n.startswith(prefix)]
        _kill_everything_in(names)
        for name in names:
            _remove_namespace(name)
            removed.append(name)
        marker.unlink(missing_ok=True)
    return removed


# ---------------------------------------------------------------------------------------------
# Lab
# ---------------------------------------------------------------------------------------------

@dataclass
class _Tracked:
    ns: str
    proc: subprocess.Popen


class Lab:
    """A bridge namespace, `n_members` member namespaces and one client namespace.

    Use as a context manager (``with Lab(3) as lab: ...``) or call :meth:`up` / :meth:`down`.
    :meth:`down` is idempotent and also registered with :mod:`atexit`.
    """

    def __init__(self, n_members: int, subnet: str = "10.99.0"):
        if not isinstance(n_members, int) or isinstance(n_members, bool) or not (
                1 <= n_members <= 254 - _FIRST_MEMBER_HOST):
            raise LabError(f"n_members must be an int in 1..{254 - _FIRST_MEMBER_HOST}, "
                           f"got {n_members!r}")
        self.n_members = n_members
        self.subnet = validate_subnet(subnet)
        self.prefix = make_prefix(os.getpid(), "".join(
            secrets.choice(_RANDOM_ALPHABET) for _ in range(3)))
        self._marker: Path | None = None
        self._created: list[str] = []
        self._tracked: list[_Tracked] = []
        self._blackholes: dict[int, set[str]] = {}
        self._samplers: list[AddressSampler] = []
        self._flaps: list[FlapHandle] = []
        self._lock = threading.RLock()
        self._is_up = False
        self._is_down = False

    # -- names and addresses -----------------------------------------------------------------

    @property
    def hub_ns(self) -> str:
        """Name of the namespace holding the bridge."""
        return f"{self.prefix}hub"

    @property
    def client_ns(self) -> str:
        """Name of the client namespace."""
        return f"{self.prefix}c"

    @property
    def client_address(self) -> str:
        """IPv4 address of the client's eth0."""
        return self.address(_CLIENT_HOST)

    def member_ns(self, i: int) -> str:
        """Name of member `i`'s namespace (1-based)."""
        return f"{self.prefix}m{self._check_member(i)}"

    def member_address(self, i: int) -> str:
        """IPv4 address of member `i`'s eth0 (1-based): <subnet>.11, .12, ..."""
        return self.address(_FIRST_MEMBER_HOST - 1 + self._check_member(i))

    def address(self, host: int) -> str:
        """The address <subnet>.<host>, e.g. for a VIP (host 1..254)."""
        if not isinstance(host, int) or not 1 <= host <= 254:
            raise LabError(f"host part must be in 1..254, got {host!r}")
        return f"{self.subnet}.{host}"

    @property
    def namespaces(self) -> list[str]:
        """Every namespace name of this lab (hub, members, client)."""
        return [self.hub_ns] + [self.member_ns(i) for i in self.members] + [self.client_ns]

    @property
    def members(self) -> range:
        """Member indices, 1..n_members."""
        return range(1, self.n_members + 1)

    def _check_member(self, i: int) -> int:
        if not isinstance(i, int) or isinstance(i, bool) or not 1 <= i <= self.n_members:
            raise LabError(f"member index {i!r} out of range 1..{self.n_members}")
        return i

    def _check_up(self) -> None:
        if not self._is_up or self._is_down:
            raise LabError("lab is not up")

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "Lab":
        self.up()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.down()

    def up(self) -> "Lab":
        """Create the namespaces, bridge and veths; addresses; links up. Returns self."""
        if self._is_up or self._is_down:
            raise LabError("a Lab can be brought up only once")
        self._is_up = True
        atexit.register(self.down)
        try:
            cleanup_stale()
            self._claim_prefix()
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _claim_prefix(self) -> None:
        """Write the marker file first, so even a half-built lab is found by cleanup_stale()."""
        MARKER_DIR.mkdir(parents=True, exist_ok=True)
        me = os.getpid()
        start_time = _process_start_time(me)
        for _ in range(50):
            marker = MARKER_DIR / f"{self.prefix[:-1]}.pid"
            clash = NETNS_DIR.is_dir() and any(
                n.startswith(self.prefix) for n in os.listdir(NETNS_DIR))
            if not clash:
                try:
                    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "w") as f:
                        f.write(f"{me} {start_time}\n")
                    self._marker = marker
                    return
            self.prefix = make_prefix(me, "".join(
                secrets.choice(_RANDOM_ALPHABET) for _ in range(3)))
        raise LabError("could not find a free lab prefix")

    def _build(self) -> None:
        for name in self.namespaces:
            netns.create(name)
            self._created.append(name)
        endpoints = [(f"vm{i}", self.member_ns(i), self.member_address(i)) for i in self.members]
        endpoints.append(("vc", self.client_ns, self.client_address))
        with _open_ns(self.hub_ns) as hub:
            hub.link("add", ifname=_BRIDGE, kind="bridge")
            bridge = _link_index(hub, _BRIDGE)
            hub.link("set", index=bridge, state="up")
            hub.link("set", index=_link_index(hub, "lo"), state="up")
            for port, ns, _ in endpoints:
                # Created inside the hub, so no interface ever appears in the root namespace.
                hub.link("add", ifname=port, kind="veth", peer={"ifname": _IFACE, "net_ns_fd": ns})
                hub.link("set", index=_link_index(hub, port), master=bridge, state="up")
        for _, ns, addr in endpoints:
            with _open_ns(ns) as ipr:
                eth0 = _link_index(ipr, _IFACE)
                ipr.addr("add", index=eth0, address=addr, prefixlen=24)
                ipr.link("set", index=eth0, state="up")
                ipr.link("set", index=_link_index(ipr, "lo"), state="up")

    def down(self) -> None:
        """Tear everything down: flaps, samplers, processes (by PID), namespaces, marker.

        Idempotent; safe to call from atexit and after a failed up().
        """
        with self._lock:
            if self._is_down:
                return
            self._is_down = True
        atexit.unregister(self.down)
        for flap in list(self._flaps):
            flap.stop()
        for sampler in list(self._samplers):
            sampler._halt()
        for t in self._tracked:
            self._kill_tracked(t)
        # Anything still living in our namespaces (e.g. something that escaped its process
        # group with setsid) belongs to this lab: kill it by PID before deleting the namespaces.
        _kill_everything_in(self._created)
        for name in self._created:
            _remove_namespace(name)
        if self._marker is not None:
            self._marker.unlink(missing_ok=True)

    # -- processes ---------------------------------------------------------------------------

    def popen(self, ns: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start `argv` inside namespace `ns` (``ip netns exec``) in a new session; tracked."""
        self._check_up()
        if ns not in self.namespaces:
            raise LabError(f"{ns!r} is not a namespace of this lab")
        if isinstance(argv, (str, bytes)) or not argv:
            raise LabError("argv must be a non-empty list of strings")
        if kwargs.pop("start_new_session", True) is not True:
            raise LabError("lab processes always run in a new session")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *map(str, argv)],
                                start_new_session=True, **kwargs)
        with self._lock:
            self._tracked.append(_Tracked(ns, proc))
        return proc

    def processes(self, ns: str | None = None) -> list[subprocess.Popen]:
        """Tracked processes (optionally only those started in `ns`)."""
        return [t.proc for t in self._tracked if ns is None or t.ns == ns]

    def kill(self, proc_or_i: subprocess.Popen | int) -> list[subprocess.Popen]:
        """SIGKILL a tracked process's group (or, given an int, every process of that member)."""
        if isinstance(proc_or_i, int) and not isinstance(proc_or_i, bool):
            return self.kill_member(proc_or_i)
        for t in self._tracked:
            if t.proc is proc_or_i:
                self._kill_tracked(t)
                return [t.proc]
        raise LabError(f"{proc_or_i!r} is not a process started by this lab")

    def kill_member(self, i: int) -> list[subprocess.Popen]:
        """SIGKILL every tracked process started in member `i`'s namespace; return them."""
        ns = self.member_ns(i)
        victims = [t for t in self._tracked if t.ns == ns]
        for t in victims:
            self._kill_tracked(t)
        return [t.proc for t in victims]

    @staticmethod
    def _kill_tracked(t: _Tracked) -> None:
        proc = t.proc
        # While the leader is unreaped its pid cannot be reused, so killpg hits only its group.
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=_KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            pass

    # -- links, partitions --------------------------------------------------------------------

    def _set_link(self, i: int, state: str) -> None:
        self._check_up()
        with _open_ns(self.member_ns(i)) as ipr:
            ipr.link("set", index=_link_index(ipr, _IFACE), state=state)

    def link_down(self, i: int) -> None:
        """Set member `i`'s eth0 down (inside its namespace)."""
        self._set_link(i, "down")

    def link_up(self, i: int) -> None:
        """Set member `i`'s eth0 up again."""
        self._set_link(i, "up")

    def partition(self, groups: list[list[int]]) -> None:
        """Cut members in different groups off from each other; the client still reaches all.

        Replaces any earlier partition. Members not named form groups of their own. Done with
        blackhole /32 routes, in each member namespace, for the other groups' member addresses.
        """
        self._check_up()
        complete = validate_groups(groups, self.n_members)
        wanted = partition_blackholes(
            complete, {i: self.member_address(i) for i in self.members})
        with self._lock:
            self.heal()
            for i, dsts in wanted.items():
                if not dsts:
                    continue
                with _open_ns(self.member_ns(i)) as ipr:
                    for dst in sorted(dsts):
                        ipr.route("add", dst=f"{dst}/32", type="blackhole")
                        self._blackholes.setdefault(i, set()).add(dst)

    def isolate_all(self) -> None:
        """Every member cut off from every other member (the client still reaches all)."""
        self.partition([[i] for i in self.members])

    def heal(self) -> None:
        """Remove exactly the blackhole routes installed by partition()."""
        self._check_up()
        with self._lock:
            for i, dsts in list(self._blackholes.items()):
                with _open_ns(self.member_ns(i)) as ipr:
                    for dst in sorted(dsts):
                        try:
                            ipr.route("del", dst=f"{dst}/32", type="blackhole")
                        except Exception as e:  # already gone: nothing left to heal
                            if getattr(e, "code", None) not in (errno.ESRCH, errno.ENOENT):
                                raise
                        dsts.discard(dst)
                del self._blackholes[i]

    def blackholes(self) -> dict[int, set[str]]:
        """Blackholed destination addresses per member, as installed by partition()."""
        with self._lock:
            return {i: set(d) for i, d in self._blackholes.items()}

    # -- addresses -----------------------------------------------------------------------------

    def addresses(self, i: int) -> set[str]:
        """IPv4 addresses currently on member `i`'s eth0."""
        self._check_up()
        with _open_ns(self.member_ns(i)) as ipr:
            return _ipv4_addresses(ipr, _link_index(ipr, _IFACE))

    def add_address(self, i: int, address: str, prefixlen: int = 32) -> None:
        """Add `address`/`prefixlen` to member `i`'s eth0 (e.g. to stand in for a VIP)."""
        self._check_up()
        ipaddress.IPv4Address(address)
        with _open_ns(self.member_ns(i)) as ipr:
            ipr.addr("add", index=_link_index(ipr, _IFACE), address=address,
                     prefixlen=prefixlen)

    def del_address(self, i: int, address: str, prefixlen: int = 32) -> None:
        """Remove `address`/`prefixlen` from member `i`'s eth0."""
        self._check_up()
        with _open_ns(self.member_ns(i)) as ipr:
            ipr.addr("del", index=_link_index(ipr, _IFACE), address=address,
                     prefixlen=prefixlen)

    def flush_neighbours(self, ns: str) -> None:
        """Forget every ARP entry on eth0 in `ns` (e.g. the client after a VIP moved by hand)."""
        self._check_up()
        if ns not in self.namespaces or ns == self.hub_ns:
            raise LabError(f"{ns!r} is not a member or client namespace of this lab")
        with _open_ns(ns) as ipr:
            eth0 = _link_index(ipr, _IFACE)
            for msg in ipr.neigh("dump", ifindex=eth0, family=socket.AF_INET):
                dst = msg.get("NDA_DST")
                if msg.get("ifindex") == eth0 and dst:
                    try:
                        ipr.neigh("del", ifindex=eth0, dst=dst)
                    except Exception:
                        pass  # entry vanished meanwhile

    # -- sockets from inside a namespace -----------------------------------------------------

    def ns_socket(self, ns: str, family: int = socket.AF_INET,
                  type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket created inside namespace `ns`, usable from this process."""
        self._check_up()
        if ns not in self.namespaces:
            raise LabError(f"{ns!r} is not a namespace of this lab")
        return netns.create_socket(ns, family, type, flags=0)

    def ask(self, ns: str, address: str, port: int, timeout: float = 0.5) -> str | None:
        """Connect from `ns` to address:port and return the first line (whoami), or None."""
        with self.ns_socket(ns) as s:
            s.settimeout(timeout)
            try:
                s.connect((address, port))
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                return None
        return data.decode(errors="replace").strip() or None

    # -- background helpers ------------------------------------------------------------------

    def flap(self, i: int, period_s: float, duration_s: float) -> "FlapHandle":
        """Toggle member `i`'s eth0 down/up (half a period each) for `duration_s`, in a thread.

        The link is left up at the end. Returns a handle with .join() and .stop().
        """
        self._check_up()
        self._check_member(i)
        if not period_s > 0 or not duration_s >= 0:
            raise LabError("flap needs period_s > 0 and duration_s >= 0")
        handle = FlapHandle(self.member_ns(i), period_s, duration_s)
        self._flaps.append(handle)
        handle._start()
        return handle

    def start_sampler(self, vips: list[str], interval: float = 0.01) -> "AddressSampler":
        """Start an AddressSampler over every member namespace; returns once it is sampling."""
        self._check_up()
        sampler = AddressSampler(self, vips, interval)
        self._samplers.append(sampler)
        sampler._start()
        return sampler


# ---------------------------------------------------------------------------------------------
# Background threads
# ---------------------------------------------------------------------------------------------

class FlapHandle:
    """A running link flap (see Lab.flap). `transitions` lists (time.time(), 'down'|'up')."""

    def __init__(self, ns: str, period_s: float, duration_s: float):
        self.ns = ns
        self.period_s = period_s
        self.duration_s = duration_s
        self.transitions: list[tuple[float, str]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"flap-{ns}", daemon=True)

    def _start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            with _open_ns(self.ns) as ipr:  # own handle: pyroute2 handles are per thread
                eth0 = _link_index(ipr, _IFACE)
                end = time.monotonic() + self.duration_s
                try:
                    while time.monotonic() < end and not self._stop.is_set():
                        for state in ("down", "up"):
                            ipr.link("set", index=eth0, state=state)
                            self.transitions.append((time.time(), state))
                            self._stop.wait(self.period_s / 2)
                finally:
                    if not self.transitions or self.transitions[-1][1] != "up":
                        ipr.link("set", index=eth0, state="up")
                        self.transitions.append((time.time(), "up"))
        except BaseException as e:  # reported through .error / join()
            self.error = e

    def join(self, timeout: float | None = None) -> None:
        """Wait for the flap to finish; raise LabError if the flapping thread failed."""
        self._thread.join(timeout)
        if self.error is not None:
            raise LabError(f"flap of {self.ns} failed: {self.error}")

    def stop(self) -> None:
        """End the flap early (link left up)."""
        self._stop.set()
        self._thread.join()


@dataclass
class AddressSampler:
    """Samples which member holds which VIP, every `interval` seconds, in a background thread.

    Each sample is ``(time.time(), {vip: [member indices holding it]})``; a member holds a
    VIP when the address is on its eth0 *and* eth0 is up. One pyroute2 handle per member
    namespace stays open for the sampler's life (opened inside its thread).
    """

    lab: Lab
    vips: list[str]
    interval: float = 0.01
    samples: list[tuple[float, dict[str, list[int]]]] = field(default_factory=list)
    pass_durations: list[float] = field(default_factory=list)
    reads: list[tuple[float, int, frozenset]] = field(default_factory=list)   # (t, member, VIPs held)
    error: BaseException | None = None

    def __post_init__(self):
        if isinstance(self.vips, str):
            raise LabError("vips must be a list of addresses")
        try:
            self.vips = [str(ipaddress.IPv4Address(v)) for v in self.vips]
        except ValueError as e:
            raise LabError(f"bad VIP: {e}") from None
        if not self.interval > 0:
            raise LabError(f"interval must be > 0, got {self.interval!r}")
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="address-sampler", daemon=True)

    def _start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            raise LabError(f"address sampler could not start: {self.error}")

    def _run(self) -> None:
        handles: list[tuple[int, IPRoute, int]] = []
        try:
            for i in self.lab.members:
                ipr = _open_ns(self.lab.member_ns(i))
                handles.append((i, ipr, _link_index(ipr, _IFACE)))
            self._sample(handles)
            self._ready.set()
            next_tick = time.monotonic() + self.interval
            while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
                self._sample(handles)
                # Fixed cadence; after a stall, resume from now rather than bursting.
                next_tick = max(next_tick + self.interval, time.monotonic())
        except BaseException as e:
            if not self._stop.is_set():
                self.error = e
        finally:
            self._ready.set()
            for _, ipr, _ in handles:
                try:
                    ipr.close()
                except Exception:
                    pass

    def _sample(self, handles) -> None:
        start = time.perf_counter()
        t = time.time()
        holders: dict[str, list[int]] = {v: [] for v in self.vips}
        reads = []
        for i, ipr, eth0 in handles:
            # An address on a link that is down answers no ARP and takes no traffic: it is
            # not held (a killed node whose link was downed keeps its addresses configured).
            held: frozenset[str] = frozenset()
            if _link_up(ipr, eth0):
                present = _ipv4_addresses(ipr, eth0)
                held = frozenset(v for v in self.vips if v in present)
            reads.append((time.time(), i, held))
            for v in held:
                holders[v].append(i)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.samples.append((t, holders))
            self.reads.extend(reads)
            self.pass_durations.append(elapsed)

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def stop(self) -> None:
        """Stop sampling; raise LabError if the sampling thread failed."""
        self._halt()
        if self.error is not None:
            raise LabError(f"address sampler failed: {self.error}")

    def snapshot(self) -> list[tuple[float, dict[str, list[int]]]]:
        """A copy of the samples so far."""
        with self._lock:
            return [(t, {v: list(h) for v, h in d.items()}) for t, d in self.samples]

    def max_holders(self, vip: str) -> int:
        """Largest number of members that held `vip` at the same instant (see double_holder_instants)."""
        if vip not in self.vips:
            raise LabError(f"{vip!r} is not sampled (sampling {self.vips})")
        return max((len(h) for _, v, h in self._overlaps() if v == vip), default=1 if any(
            d[vip] for _, d in self.snapshot()) else 0)

    def double_holder_instants(self) -> list[tuple[float, str, list[int]]]:
        """Every (t, vip, holders) where more than one member held the same VIP at time t.

        One pass reads the namespaces one after another, and under load a pass can take
        tens of milliseconds, so two reads of one pass are not one instant. Member j's read
        at time z showing the VIP counts as a double hold with member i only when i's reads
        just before *and* just after z both show it too (i held it across z).
        """
        return [(t, v, h) for t, v, h in self._overlaps() if len(h) > 1]

    def _overlaps(self) -> list[tuple[float, str, list[int]]]:
        with self._lock:
            reads = list(self.reads)
        by_member: dict[int, list[tuple[float, frozenset]]] = {}
        for t, i, held in reads:
            by_member.setdefault(i, []).append((t, held))
        times = {i: [t for t, _ in seq] for i, seq in by_member.items()}
        out = []
        for z, j, held in reads:
            for v in held:
                holders = [j]
                for i, seq in by_member.items():
                    if i == j:
                        continue
                    k = bisect.bisect_right(times[i], z)
                    before = seq[k - 1] if k else None
                    after = seq[k] if k < len(seq) else None
                    if before and after and v in before[1] and v in after[1]:
                        holders.append(i)
                out.append((z, v, sorted(holders)))
        return out

    def holders_at(self, t: float) -> dict[str, list[int]] | None:
        """The latest sample taken at or before `t` (time.time() scale), or None."""
        best = None
        for st, d in self.snapshot():
            if st > t:
                break
            best = d
        return best

    def pass_stats(self) -> dict[str, float]:
        """Duration of one sampling pass over all member namespaces: n, median, p99, max (s)."""
        with self._lock:
            d = sorted(self.pass_durations)
        if not d:
            return {"n": 0}
        return {"n": len(d), "median": d[len(d) // 2],
                "p99": d[min(len(d) - 1, int(len(d) * 0.99))], "max": d[-1]}
