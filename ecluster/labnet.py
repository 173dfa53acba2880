"""The network-namespace lab (root only), built with pyroute2: one implementation.

``ecluster demo`` uses :class:`LabNet` directly; the test lab (tests/lab.py) builds its
richer ``Lab`` (partitions, flaps, samplers, tracked processes) on top of it, so the names,
the marker files, the build and the clean-up exist once, here, in the installed package::

    <prefix>hub : bridge br0, one veth port per endpoint (vm1, vm2, ..., vc)
    <prefix>m1  : eth0 = <subnet>.11/24      (member 1) ...   [+ <prefix6>11/64]
    <prefix>c   : eth0 = <subnet>.2/24       (client)         [+ <prefix6>2/64]

With ``ipv6="fd00:99::"`` (a ULA /64) every endpoint also gets ``<prefix6><host>/64`` (the
host number read as hex digits, so member 1 is ``fd00:99::11``). Those lab interfaces skip
duplicate address detection (``accept_dad = 0``, addresses added with IFA_F_NODAD) so their
addresses are usable at once, keep their IPv6 addresses over a link down/up
(``keep_addr_on_down = 1``, as IPv4 always does), and the bridge floods multicast (no MLD
snooping: the lab has no querier), so neighbour discovery reaches every port.

Names are ``ecl<pid % 10000><3 random chars>-`` so that two labs never collide with each
other nor with keepalived's ``lab-*`` namespaces. A marker file
``/run/ecluster-lab/<prefix>.pid`` records the creator (pid and start time), so that
:func:`cleanup_stale` removes the leftovers of a crashed lab, and nothing that a live
process still owns. No interface is ever created in the root namespace: the host reaches
the lab only through sockets made inside a namespace (:class:`NsSockets`).
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
from typing import Iterable, Sequence

MARKER_DIR = Path("/run/ecluster-lab")
NETNS_DIR = Path("/run/netns")
PREFIX_RE = re.compile(r"^ecl\d{1,4}[a-z0-9]{3}-$")
FIRST_MEMBER_HOST = 11
CLIENT_HOST = 2
MAX_MEMBERS = 254 - FIRST_MEMBER_HOST
BRIDGE = "br0"
IFACE = "eth0"
CLONE_NEWNET = 0x40000000
KILL_WAIT_S = 5.0
_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits


class LabNetError(RuntimeError):
    """The lab cannot be built or used (bad argument, unknown namespace, failed set-up); one line."""


# -- pure -------------------------------------------------------------------------------------

def make_prefix(pid: int, suffix: str) -> str:
    """The namespace-name prefix for a lab made by ``pid`` with a 3-char ``suffix``. Pure."""
    prefix = f"ecl{pid % 10000}{suffix}-"
    if not PREFIX_RE.match(prefix):
        raise LabNetError(f"invalid lab prefix {prefix!r}")
    return prefix


def random_prefix(pid: int) -> str:
    """A prefix for ``pid`` with a random suffix."""
    return make_prefix(pid, "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(3)))


def validate_subnet(subnet: str) -> str:
    """``subnet`` ("a.b.c", the first three octets of a /24), normalised; LabNetError if bad. Pure."""
    parts = subnet.split(".") if isinstance(subnet, str) else []
    if len(parts) != 3 or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise LabNetError(f"subnet must be three octets like '10.99.0', got {subnet!r}")
    return ".".join(str(int(p)) for p in parts)


def validate_prefix6(prefix6: str) -> str:
    """``prefix6`` ("fd00:99::" or "fd00:99::/64": a /64 inside fc00::/7, the unique local
    range, so a lab never shadows a real network), as "<network>::"-style text; LabNetError
    if bad. Pure."""
    import ipaddress
    text = prefix6.strip() if isinstance(prefix6, str) else ""
    try:
        net = ipaddress.IPv6Network(text if "/" in text else f"{text}/64")
    except ValueError:
        raise LabNetError(f"ipv6 prefix must be a /64 like 'fd00:99::', got {prefix6!r}") from None
    if net.prefixlen != 64 or not net.subnet_of(ipaddress.IPv6Network("fc00::/7")):
        raise LabNetError(f"ipv6 prefix must be a unique-local /64 (inside fc00::/7), got {prefix6!r}")
    return str(net.network_address)


def host6(prefix6: str, host: int) -> str:
    """The lab's IPv6 address of ``host`` in ``prefix6``: the host number's decimal digits
    read as hex, so .11 becomes ::11. Pure."""
    import ipaddress
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address(prefix6)) + int(str(host), 16)))


def validate_n_members(n_members) -> int:
    """``n_members`` when it is an int in 1..MAX_MEMBERS; LabNetError otherwise. Pure."""
    if not isinstance(n_members, int) or isinstance(n_members, bool) or not 1 <= n_members <= MAX_MEMBERS:
        raise LabNetError(f"n_members must be an int in 1..{MAX_MEMBERS}, got {n_members!r}")
    return n_members


# -- processes and namespaces -------------------------------------------------------------------

def process_start_time(pid: int) -> str | None:
    """Start time of ``pid`` (clock ticks since boot), or None if it is gone."""
    try:
        # The comm field may contain spaces and parentheses; the fields after the last ')' are fixed.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def ns_inode(name: str) -> tuple[int, int] | None:
    """(device, inode) of the named namespace, or None when it does not exist."""
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in_namespaces(names: Iterable[str]) -> list[int]:
    """PIDs of the processes living in the namespaces ``names`` (never our own)."""
    wanted = {ino for ino in map(ns_inode, names) if ino is not None}
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


def kill_everything_in(names: Sequence[str], wait: float = KILL_WAIT_S) -> None:
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
        time.sleep(0.01)


def remove_namespace(name: str) -> None:
    """Delete the named namespace; absent is fine."""
    from pyroute2 import netns
    try:
        netns.remove(name)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def open_ns(name: str):
    """An RTNL handle (pyroute2 IPRoute) inside namespace ``name``: never creates it, no multicast."""
    from pyroute2 import IPRoute
    if ns_inode(name) is None:
        raise LabNetError(f"network namespace {name!r} does not exist")
    return IPRoute(netns=name, flags=0, groups=0)


def link_index(ipr, ifname: str) -> int:
    """Index of ``ifname`` on the handle's namespace; LabNetError when there is none."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabNetError(f"interface {ifname!r} not found")
    return found[0]


def cleanup_stale() -> list[str]:
    """Remove the namespaces of labs whose creator is dead; return their names.

    A lab is stale when its marker file names a process that no longer exists (pid plus
    start time, so a recycled pid does not count as alive). Only namespaces whose name
    starts with such a stale ``ecl…-`` prefix are touched: their processes are killed by
    PID, then the namespaces are deleted and the marker removed.
    """
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
            continue              # half-written marker of a lab being created right now
        if process_start_time(pid) == started:
            continue              # its creator is alive: not ours to touch
        names = [n for n in existing if n.startswith(prefix)]
        kill_everything_in(names)
        for n in names:
            remove_namespace(n)
            removed.append(n)
        marker.unlink(missing_ok=True)
    return removed


def claim_prefix(prefix: str) -> tuple[str, Path]:
    """Write the marker of a lab prefix (trying ``prefix`` first, then random ones).

    The marker is written before any namespace exists, so even a half-built lab is found by
    :func:`cleanup_stale`. Returns (prefix, marker path).
    """
    MARKER_DIR.mkdir(parents=True, exist_ok=True)
    me = os.getpid()
    started = process_start_time(me)
    for _ in range(50):
        marker = MARKER_DIR / f"{prefix[:-1]}.pid"
        clash = NETNS_DIR.is_dir() and any(n.startswith(prefix) for n in os.listdir(NETNS_DIR))
        if not clash:
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{me} {started}\n")
                return prefix, marker
        prefix = random_prefix(me)
    raise LabNetError("could not find a free lab prefix")


IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
DAD_WAIT_S = 10.0


def write_sysctl(ns: str, path: str, value: str) -> None:
    """Write ``/proc/sys/<path>`` as seen from namespace ``ns`` (net sysctls are per namespace:
    the file is opened by a thread that joined it)."""
    def write() -> None:
        with open(f"/proc/sys/{path}", "w") as f:
            f.write(value)
    sockets = NsSockets(ns)
    try:
        sockets.run(write)
    finally:
        sockets.close()


def _ipv6_ready_sysctls(ns: str, scope: str) -> None:
    """Usable-at-once IPv6 for interface ``scope`` (or "default": interfaces made later)."""
    for name, value in (("accept_dad", "0"), ("keep_addr_on_down", "1")):
        write_sysctl(ns, f"net/ipv6/conf/{scope}/{name}", value)


def tentative_addresses(ipr, index: int) -> list[str]:
    """IPv6 addresses of the interface still in duplicate address detection."""
    out = []
    for msg in ipr.get_addr(index=index, family=socket.AF_INET6):
        flags = msg.get_attr("IFA_FLAGS")
        flags = msg["flags"] if flags is None else flags
        if msg.get("index") == index and flags & IFA_F_TENTATIVE:
            out.append(msg.get_attr("IFA_ADDRESS"))
    return out


def wait_ipv6_usable(ns: str, timeout: float = DAD_WAIT_S) -> None:
    """Poll until no IPv6 address on eth0 in ``ns`` is tentative; LabNetError after ``timeout``."""
    deadline = time.monotonic() + timeout
    with open_ns(ns) as ipr:
        eth0 = link_index(ipr, IFACE)
        while True:
            left = tentative_addresses(ipr, eth0)
            if not left:
                return
            if time.monotonic() > deadline:
                raise LabNetError(f"{ns}: IPv6 addresses still tentative after {timeout:.0f} s: {left}")
            time.sleep(0.01)


def build_topology(hub_ns: str, endpoints: Sequence[tuple[str, str, str]], created: list[str],
                   addresses6: dict[str, str] | None = None) -> None:
    """Create ``hub_ns`` with a bridge and, for each (port, namespace, address), the namespace
    with eth0 = address/24 on a veth whose peer is a bridge port; everything up.

    ``addresses6`` ({namespace: IPv6 address}) adds those as /64 without DAD, and makes the
    lab's IPv6 usable at once (see the module docstring); None leaves IPv6 as the kernel has it.
    Each namespace name is appended to ``created`` as soon as it exists (so a failure half-way
    leaves a list of what to remove).
    """
    from pyroute2 import netns
    for name in [hub_ns, *(ns for _, ns, _ in endpoints)]:
        netns.create(name)
        created.append(name)
        if addresses6 is not None:
            _ipv6_ready_sysctls(name, "default")     # before the veths exist: they inherit it
    with open_ns(hub_ns) as hub:
        if addresses6 is not None:
            hub.link("add", ifname=BRIDGE, kind="bridge", br_mcast_snooping=0)
        else:
            hub.link("add", ifname=BRIDGE, kind="bridge")
        bridge = link_index(hub, BRIDGE)
        hub.link("set", index=bridge, state="up")
        hub.link("set", index=link_index(hub, "lo"), state="up")
        for port, ns, _ in endpoints:
            # made inside the hub: no interface ever appears in the root namespace
            hub.link("add", ifname=port, kind="veth", peer={"ifname": IFACE, "net_ns_fd": ns})
            hub.link("set", index=link_index(hub, port), master=bridge, state="up")
    for _, ns, addr in endpoints:
        if addresses6 is not None:
            _ipv6_ready_sysctls(ns, IFACE)
        with open_ns(ns) as ipr:
            eth0 = link_index(ipr, IFACE)
            ipr.addr("add", index=eth0, address=addr, prefixlen=24)
            if addresses6 is not None and ns in addresses6:
                ipr.addr("add", index=eth0, address=addresses6[ns], prefixlen=64, flags=IFA_F_NODAD)
            ipr.link("set", index=eth0, state="up")
            ipr.link("set", index=link_index(ipr, "lo"), state="up")
    if addresses6 is not None:
        for _, ns, _ in endpoints:
            wait_ipv6_usable(ns)


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

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM,
               proto: int = 0) -> socket.socket:
        """A new socket inside the namespace (blocking until the worker made it)."""
        return self._pool.submit(socket.socket, family, kind, proto).result(timeout=10)

    def run(self, fn, *args):
        """``fn(*args)`` on the worker, inside the namespace (e.g. a bind by interface name)."""
        return self._pool.submit(fn, *args).result(timeout=10)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class LabNet:
    """Namespaces for ``n_members`` members and a client on one bridge; :meth:`down` always.

    The prefix is chosen at construction (so names are known before :meth:`up`) and claimed
    (marker file) by :meth:`up`, which may pick another one if it is taken.
    """

    def __init__(self, n_members: int, subnet: str = "10.77.0", ipv6: str | None = None):
        self.n_members = validate_n_members(n_members)
        self.subnet = validate_subnet(subnet)
        self.prefix6 = None if ipv6 is None else validate_prefix6(ipv6)
        self.prefix = random_prefix(os.getpid())
        self.marker: Path | None = None
        self.created: list[str] = []
        self.procs: list[subprocess.Popen] = []

    # -- names --------------------------------------------------------------------------
    @property
    def hub_ns(self) -> str:
        """Name of the namespace holding the bridge."""
        return f"{self.prefix}hub"

    @property
    def client_ns(self) -> str:
        """Name of the client namespace."""
        return f"{self.prefix}c"

    def member_ns(self, i: int) -> str:
        """Name of member ``i``'s namespace (1-based)."""
        return f"{self.prefix}m{i}"

    def address(self, host: int) -> str:
        """The address <subnet>.<host>."""
        return f"{self.subnet}.{host}"

    def member_address(self, i: int) -> str:
        """Member ``i``'s eth0 address: <subnet>.11, .12, ..."""
        return self.address(FIRST_MEMBER_HOST - 1 + i)

    @property
    def client_address(self) -> str:
        """The client's eth0 address (<subnet>.2)."""
        return self.address(CLIENT_HOST)

    def address6(self, host: int) -> str:
        """The IPv6 address <prefix6><host> (host digits as hex); LabNetError without IPv6."""
        if self.prefix6 is None:
            raise LabNetError("this lab has no IPv6 (LabNet(..., ipv6='fd00:..::'))")
        return host6(self.prefix6, host)

    def member_address6(self, i: int) -> str:
        """Member ``i``'s eth0 IPv6 address: <prefix6>11, 12, ..."""
        return self.address6(FIRST_MEMBER_HOST - 1 + i)

    @property
    def client_address6(self) -> str:
        """The client's eth0 IPv6 address (<prefix6>2)."""
        return self.address6(CLIENT_HOST)

    @property
    def namespaces(self) -> list[str]:
        """Every namespace name of this lab (hub, members, client)."""
        return [self.hub_ns, *(self.member_ns(i) for i in range(1, self.n_members + 1)), self.client_ns]

    # -- lifecycle ------------------------------------------------------------------------
    def up(self) -> "LabNet":
        """Create the namespaces, bridge, veths, addresses. On failure, tear down and raise."""
        if os.geteuid() != 0:
            raise LabNetError("network namespaces need root")
        try:
            cleanup_stale()
            self.prefix, self.marker = claim_prefix(self.prefix)
            endpoints = [(f"vm{i}", self.member_ns(i), self.member_address(i))
                         for i in range(1, self.n_members + 1)]
            endpoints.append(("vc", self.client_ns, self.client_address))
            addresses6 = None
            if self.prefix6 is not None:
                addresses6 = {self.member_ns(i): self.member_address6(i) for i in range(1, self.n_members + 1)}
                addresses6[self.client_ns] = self.client_address6
            build_topology(self.hub_ns, endpoints, self.created, addresses6)
        except BaseException:
            self.down()
            raise
        return self

    def add_address(self, ns: str, address: str, prefixlen: int = 24) -> None:
        """Add ``address`` to eth0 in ``ns`` (e.g. more client source addresses); IPv6 without DAD."""
        extra = {"flags": IFA_F_NODAD} if ":" in address else {}
        with open_ns(ns) as ipr:
            ipr.addr("add", index=link_index(ipr, IFACE), address=address, prefixlen=prefixlen, **extra)

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
            remove_namespace(name)
        self.created.clear()
        if self.marker is not None:
            self.marker.unlink(missing_ok=True)
            self.marker = None
