"""Network-namespace test lab, built with pyroute2 on top of :mod:`ecluster.labnet`.

Topology (one lab)::

    <prefix>hub : bridge br0, one veth port per endpoint (vm1, vm2, ..., vc)
    <prefix>m1  : eth0 = <subnet>.11/24      (member 1)
    <prefix>m2  : eth0 = <subnet>.12/24      (member 2) ...
    <prefix>c   : eth0 = <subnet>.2/24       (client)

``Lab(n, ipv6="fd00:99::")`` also gives every endpoint ``fd00:99::<host>/64`` (member 1:
``fd00:99::11``, client ``fd00:99::2``), usable at once (:mod:`ecluster.labnet`); samplers,
partitions, ``addresses`` (``family=AF_INET6``) and ``ask`` then work for IPv6 too.

Names, marker files (``/run/ecluster-lab/<prefix>.pid``), the build and the clean-up of
crashed labs are :mod:`ecluster.labnet`'s (the same code ``ecluster demo`` uses); this module
adds what tests need: tracked processes, link flaps, partitions, address and ARP samplers.

Setup and inspection go through pyroute2 only; ``ip netns exec`` is used solely to start
processes inside a namespace (:meth:`Lab.popen`).
"""

from __future__ import annotations

import atexit
import bisect
import errno
import ipaddress
import os
import select
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pyroute2 import IPRoute, netns

from ecluster import labnet
from ecluster.labnet import (MARKER_DIR, NETNS_DIR, LabNetError, cleanup_stale,  # noqa: F401 - re-exported
                             make_prefix, validate_subnet)
from probe_analysis import bracketed_holders  # noqa: E402 - tests/ is on sys.path wherever lab is

class _SamplerThread:
    """What both samplers share: checked VIPs and interval, and a background thread that is
    started (waiting until it reads) and halted the same way. Subclasses define ``_run``."""

    what = "sampler"
    error: BaseException | None = None

    def _setup_thread(self, vips, interval: float, name: str) -> list[str]:
        """Check ``vips`` and ``interval``, make the thread; returns the VIPs normalised."""
        if isinstance(vips, str):
            raise LabError("vips must be a list of addresses")
        try:
            checked = [str(ipaddress.ip_address(v)) for v in vips]     # IPv4 or IPv6, canonical
        except ValueError as e:
            raise LabError(f"bad VIP: {e}") from None
        if not interval > 0:
            raise LabError(f"interval must be > 0, got {interval!r}")
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        return checked

    def _start(self) -> None:
        """Start the thread and wait until it reads (or failed to open its sockets)."""
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            raise LabError(f"{self.what} could not start: {self.error}")

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()


__all__ = [
    "LabError",
    "Lab",
    "AddressSampler",
    "ArpSampler",
    "FlapHandle",
    "cleanup_stale",
    "partition_blackholes",
    "WHOAMI_SCRIPT",
    "PROBE_SCRIPT",
    "MARKER_DIR",
]

WHOAMI_SCRIPT = Path(__file__).with_name("whoami.py")
PROBE_SCRIPT = Path(__file__).with_name("probe.py")

_IFACE = labnet.IFACE
_KILL_WAIT_S = labnet.KILL_WAIT_S

# The lab's error is labnet's: one class whichever layer found the problem.
LabError = LabNetError

# Shared helpers under the names this module (and tests/vip_cluster.py) always used.
_process_start_time = labnet.process_start_time
_kill_everything_in = labnet.kill_everything_in
_open_ns = labnet.open_ns
_link_index = labnet.link_index


# ---------------------------------------------------------------------------------------------
# Pure helpers (no I/O)
# ---------------------------------------------------------------------------------------------

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


def arp_round_holders(replies: Sequence[tuple[str, str]], vips: Sequence[str],
                      member_of_mac: dict[str, int]) -> dict[str, list[int]]:
    """Who answered one ARP round: {vip: sorted member indices}. Pure.

    `replies` are (sender IP, sender MAC) of the ARP replies received in the round; a MAC
    that is no member's counts as member 0 (still a holder, never merged with another).
    """
    seen: dict[str, set[int]] = {v: set() for v in vips}
    for ip, mac in replies:
        if ip in seen:
            seen[ip].add(member_of_mac.get(mac, 0))
    return {v: sorted(m) for v, m in seen.items()}


# ---------------------------------------------------------------------------------------------
# Namespace inspection helpers (I/O)
# ---------------------------------------------------------------------------------------------

def _link_up(ipr: IPRoute, index: int) -> bool:
    links = ipr.get_links(index)
    return bool(links) and bool(links[0]["flags"] & 1)   # IFF_UP


def _link_mac(ipr: IPRoute, index: int) -> str:
    links = ipr.get_links(index)
    return (links[0].get_attr("IFLA_ADDRESS") or "").lower() if links else ""


def _ipv4_addresses(ipr: IPRoute, index: int) -> set[str]:
    return _ip_addresses(ipr, index, socket.AF_INET)


def _ip_addresses(ipr: IPRoute, index: int, family: int) -> set[str]:
    """The interface's addresses of ``family`` (IPv6 canonical)."""
    return {
        str(ipaddress.ip_address(msg.get("address")))
        for msg in ipr.addr("dump", family=family, index=index)
        if msg.get("index") == index and msg.get("family") == family
    }


def _family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _host_prefix(address: str) -> int:
    return 128 if ":" in address else 32


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

    def __init__(self, n_members: int, subnet: str = "10.99.0", ipv6: str | None = None):
        # namespaces, marker and build are labnet's (the same code as `ecluster demo`'s lab)
        self._net = labnet.LabNet(n_members, subnet, ipv6=ipv6)
        self.n_members = self._net.n_members
        self.subnet = self._net.subnet
        self._tracked: list[_Tracked] = []
        self._blackholes: dict[int, set[str]] = {}
        self._samplers: list[AddressSampler] = []
        self._arp_samplers: list[ArpSampler] = []
        self._flaps: list[FlapHandle] = []
        self._lock = threading.RLock()
        self._is_up = False
        self._is_down = False

    # -- names and addresses -----------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """Namespace-name prefix (``ecl<pid><3 chars>-``); final once the lab is up."""
        return self._net.prefix

    @property
    def hub_ns(self) -> str:
        """Name of the namespace holding the bridge."""
        return self._net.hub_ns

    @property
    def client_ns(self) -> str:
        """Name of the client namespace."""
        return self._net.client_ns

    @property
    def client_address(self) -> str:
        """IPv4 address of the client's eth0."""
        return self._net.client_address

    def member_ns(self, i: int) -> str:
        """Name of member `i`'s namespace (1-based)."""
        return self._net.member_ns(self._check_member(i))

    def member_address(self, i: int) -> str:
        """IPv4 address of member `i`'s eth0 (1-based): <subnet>.11, .12, ..."""
        return self._net.member_address(self._check_member(i))

    @property
    def ipv6(self) -> bool:
        """Whether the lab gave its endpoints IPv6 addresses."""
        return self._net.prefix6 is not None

    @property
    def client_address6(self) -> str:
        """IPv6 address of the client's eth0 (an IPv6 lab only)."""
        return self._net.client_address6

    def member_address6(self, i: int) -> str:
        """IPv6 address of member `i`'s eth0 (an IPv6 lab only): <prefix6>11, 12, ..."""
        return self._net.member_address6(self._check_member(i))

    def address6(self, host: int) -> str:
        """The IPv6 address <prefix6><host> (the host's digits as hex), e.g. for a VIP."""
        if not isinstance(host, int) or isinstance(host, bool) or not 1 <= host <= 254:
            raise LabError(f"host part must be in 1..254, got {host!r}")
        return self._net.address6(host)

    def address(self, host: int) -> str:
        """The address <subnet>.<host>, e.g. for a VIP (host 1..254)."""
        if not isinstance(host, int) or isinstance(host, bool) or not 1 <= host <= 254:
            raise LabError(f"host part must be in 1..254, got {host!r}")
        return self._net.address(host)

    @property
    def namespaces(self) -> list[str]:
        """Every namespace name of this lab (hub, members, client)."""
        return self._net.namespaces

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
            self._net.up()          # cleans stale labs, claims the prefix, builds; undoes itself on failure
        except BaseException:
            self.down()
            raise
        return self

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
        for arp in list(self._arp_samplers):
            arp._halt()
        for t in self._tracked:
            self._kill_tracked(t)
        # Anything still living in our namespaces (e.g. something that escaped its process
        # group with setsid) belongs to this lab: labnet kills it by PID, then deletes the
        # namespaces and the marker.
        self._net.down()

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
        blackhole /32 routes (and /128 for their IPv6 addresses in an IPv6 lab), in each member
        namespace, for the other groups' member addresses.
        """
        self._check_up()
        complete = validate_groups(groups, self.n_members)
        wanted = partition_blackholes(
            complete, {i: self.member_address(i) for i in self.members})
        if self.ipv6:
            for i, dsts in partition_blackholes(
                    complete, {i: self.member_address6(i) for i in self.members}).items():
                wanted[i] |= dsts
        with self._lock:
            self.heal()
            for i, dsts in wanted.items():
                if not dsts:
                    continue
                with _open_ns(self.member_ns(i)) as ipr:
                    for dst in sorted(dsts):
                        ipr.route("add", dst=f"{dst}/{_host_prefix(dst)}", type="blackhole")
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
                            ipr.route("del", dst=f"{dst}/{_host_prefix(dst)}", type="blackhole")
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

    def addresses(self, i: int, ifname: str = _IFACE, family: int = socket.AF_INET) -> set[str]:
        """Addresses of `family` (IPv4 by default; IPv6 canonical, link-local included) currently
        on member `i`'s eth0 (or `ifname`; none when it has no such interface)."""
        self._check_up()
        with _open_ns(self.member_ns(i)) as ipr:
            if ifname != _IFACE and not ipr.link_lookup(ifname=ifname):
                return set()
            return _ip_addresses(ipr, _link_index(ipr, ifname), family)

    def holds(self, i: int, address: str, ifname: str = _IFACE) -> bool:
        """Whether member `i` has `address` (either family) on eth0 (or `ifname`)."""
        canonical = str(ipaddress.ip_address(address))
        return canonical in self.addresses(i, ifname, _family_of(canonical))

    def add_address(self, i: int, address: str, prefixlen: int | None = None) -> None:
        """Add `address`/`prefixlen` (default: a host prefix) to member `i`'s eth0 (e.g. to
        stand in for a VIP); an IPv6 address without DAD."""
        self._check_up()
        ipaddress.ip_address(address)
        extra = {"flags": labnet.IFA_F_NODAD} if ":" in address else {}
        with _open_ns(self.member_ns(i)) as ipr:
            ipr.addr("add", index=_link_index(ipr, _IFACE), address=address,
                     prefixlen=_host_prefix(address) if prefixlen is None else prefixlen, **extra)

    def del_address(self, i: int, address: str, prefixlen: int | None = None) -> None:
        """Remove `address`/`prefixlen` (default: a host prefix) from member `i`'s eth0."""
        self._check_up()
        with _open_ns(self.member_ns(i)) as ipr:
            ipr.addr("del", index=_link_index(ipr, _IFACE), address=address,
                     prefixlen=_host_prefix(address) if prefixlen is None else prefixlen)

    def member_mac(self, i: int) -> str:
        """Member `i`'s eth0 MAC (lower case)."""
        self._check_up()
        with _open_ns(self.member_ns(i)) as ipr:
            return _link_mac(ipr, _link_index(ipr, _IFACE))

    def neighbour(self, ns: str, address: str) -> tuple[str, int] | None:
        """(MAC, NUD state) of the neighbour entry for `address` (either family) on eth0 in
        `ns`, or None when there is none (or it has no link-layer address)."""
        self._check_up()
        canonical = str(ipaddress.ip_address(address))
        with _open_ns(ns) as ipr:
            eth0 = _link_index(ipr, _IFACE)
            for msg in ipr.neigh("dump", ifindex=eth0, family=_family_of(canonical)):
                dst = msg.get("NDA_DST")
                mac = msg.get("NDA_LLADDR")
                if msg.get("ifindex") == eth0 and dst and mac and str(ipaddress.ip_address(dst)) == canonical:
                    return mac.lower(), msg["state"]
        return None

    def set_neighbour(self, ns: str, address: str, mac: str) -> None:
        """Make `ns`'s neighbour entry for `address` point at `mac`, state STALE (as a client
        that last talked to a holder now gone would have it)."""
        self._check_up()
        with _open_ns(ns) as ipr:
            ipr.neigh("replace", ifindex=_link_index(ipr, _IFACE), dst=address, lladdr=mac,
                      state=0x04)                      # NUD_STALE

    def flush_neighbours(self, ns: str, family: int = socket.AF_INET) -> None:
        """Forget every ARP (or, with AF_INET6, neighbour) entry on eth0 in `ns` (e.g. the
        client after a VIP moved by hand)."""
        self._check_up()
        if ns not in self.namespaces or ns == self.hub_ns:
            raise LabError(f"{ns!r} is not a member or client namespace of this lab")
        with _open_ns(ns) as ipr:
            eth0 = _link_index(ipr, _IFACE)
            for msg in ipr.neigh("dump", ifindex=eth0, family=family):
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
        """Connect from `ns` to address:port (either family) and return the first line
        (whoami), or None."""
        with self.ns_socket(ns, _family_of(address)) as s:
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

    def start_sampler(self, vips: list[str], interval: float = 0.01,
                      arp: bool = True) -> "AddressSampler":
        """Start an AddressSampler over every member namespace; returns once it is sampling.

        With `arp` (the default) an ArpSampler asks from the client every `interval` too, for
        the IPv4 VIPs among `vips`; it is the sampler's ``.arp``, stopped with it, and its
        two-holder rounds are part of ``double_holder_instants()``. IPv6 VIPs are sampled by
        their addresses only.
        """
        self._check_up()
        sampler = AddressSampler(self, vips, interval)
        self._samplers.append(sampler)
        sampler._start()
        arp_vips = [v for v in sampler.vips if _family_of(v) == socket.AF_INET]   # ARP is IPv4's
        if arp and arp_vips:
            try:
                sampler.arp = self.start_arp_sampler(arp_vips, interval)
            except BaseException:
                sampler._halt()
                raise
        return sampler

    def start_arp_sampler(self, vips: list[str], interval: float = 0.01) -> "ArpSampler":
        """Start an ArpSampler in the client namespace; returns once it has sent its first round."""
        self._check_up()
        sampler = ArpSampler(self, vips, interval)
        self._arp_samplers.append(sampler)
        sampler._start()
        return sampler

    def arp_double_holders(self) -> list[tuple[float, str, list[int]]]:
        """Every ARP round (of every ArpSampler of this lab) answered by two members for one VIP."""
        return sorted(d for arp in self._arp_samplers for d in arp.double_holder_rounds())


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
class AddressSampler(_SamplerThread):
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
    arp: "ArpSampler | None" = None   # the client's ARP view, when started with arp=True

    what = "address sampler"

    def __post_init__(self):
        self.vips = self._setup_thread(self.vips, self.interval, "address-sampler")
        self._families = sorted({_family_of(v) for v in self.vips})   # one dump per family in use

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
                present: set[str] = set()
                for family in self._families:
                    present |= _ip_addresses(ipr, eth0, family)
                held = frozenset(v for v in self.vips if v in present)
            reads.append((time.time(), i, held))
            for v in held:
                holders[v].append(i)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.samples.append((t, holders))
            self.reads.extend(reads)
            self.pass_durations.append(elapsed)

    def stop(self) -> None:
        """Stop sampling (and the ARP companion); raise LabError if a sampling thread failed."""
        self._halt()
        if self.arp is not None:
            self.arp.stop()
        if self.error is not None:
            raise LabError(f"address sampler failed: {self.error}")

    def snapshot(self) -> list[tuple[float, dict[str, list[int]]]]:
        """A copy of the samples so far."""
        with self._lock:
            return [(t, {v: list(h) for v, h in d.items()}) for t, d in self.samples]

    def max_holders(self, vip: str) -> int:
        """Largest number of members that held `vip` at the same instant (see
        double_holder_instants), by their addresses or, with the ARP companion, by ARP answers."""
        if vip not in self.vips:
            raise LabError(f"{vip!r} is not sampled (sampling {self.vips})")
        by_address = max((len(h) for _, v, h in self._overlaps() if v == vip), default=1 if any(
            d[vip] for _, d in self.snapshot()) else 0)
        return max(by_address, self.arp.max_holders(vip) if self.arp is not None and vip in self.arp.vips else 0)

    def double_holder_instants(self) -> list[tuple[float, str, list[int]]]:
        """Every (t, vip, holders) where more than one member held the same VIP at time t:
        seen in the members' addresses (address_double_holder_instants) or, when the ARP
        companion runs, answering one ARP round from the client (ArpSampler.double_holder_rounds).
        """
        out = self.address_double_holder_instants()
        if self.arp is not None:
            out += self.arp.double_holder_rounds()
        return sorted(out)

    def address_double_holder_instants(self) -> list[tuple[float, str, list[int]]]:
        """Every (t, vip, holders) where the members' addresses show two holders at time t.

        One pass reads the namespaces one after another, and under load a pass can take
        tens of milliseconds, so two reads of one pass are not one instant. Member j's read
        at time z showing the VIP counts as a double hold with member i only when i's reads
        just before *and* just after z both show it too (i held it across z).
        """
        return [(t, v, h) for t, v, h in self._overlaps() if len(h) > 1]

    def arp_double_holders(self) -> list[tuple[float, str, list[int]]]:
        """The ARP companion's two-holder rounds ([] without one)."""
        return self.arp.double_holder_rounds() if self.arp is not None else []

    def _overlaps(self) -> list[tuple[float, str, list[int]]]:
        with self._lock:
            reads = list(self.reads)
        return bracketed_holders(reads)

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



class ArpSampler(_SamplerThread):
    """Asks the wire from the client namespace who answers ARP for each VIP, every `interval` s.

    A round broadcasts one ARP probe per VIP on the client's eth0 (RFC 5227: sender IP
    0.0.0.0, built by node.netlink.build_arp_probe, so no ARP cache anywhere changes and the
    nodes' own probe listeners ignore it) through an AF_PACKET socket, and collects the ARP
    replies to it (op reply, target IP 0.0.0.0, target MAC the client's) until the next round
    is sent. Sender MACs map to members by their eth0 MAC (0: no member's). Two members
    answering one round for one VIP = two holders.

    Why this is one instant: the bridge floods a probe to every member within microseconds
    and each kernel answers it in its receive path, so a handover (release, bus message,
    acquire) cannot fit between two members' answers to one probe. Limit: a reply delayed
    past the next round's send (10 ms) is counted in that round; that errs towards reporting
    two holders, never towards missing them.

    ``rounds`` counts rounds; ``history`` keeps (t, {vip: members}) only when the answer
    changes (memory stays small over long runs); ``doubles`` every two-holder round.
    """

    what = "ARP sampler"

    def __init__(self, lab: Lab, vips: list[str], interval: float = 0.01):
        self.vips = self._setup_thread(vips, interval, "arp-sampler")
        self.lab, self.interval = lab, interval
        self.rounds = 0
        self.replies = 0
        self.late_rounds = 0          # rounds sent more than one interval late (sampler starved)
        self.history: list[tuple[float, dict[str, list[int]]]] = []
        self.doubles: list[tuple[float, str, list[int]]] = []
        self.member_of_mac: dict[str, int] = {}
        self.client_mac = ""
        self.error: BaseException | None = None
        self._max: dict[str, int] = {v: 0 for v in self.vips}

    def _open(self) -> socket.socket:
        from node.netlink import ETH_P_ARP, run_in_netns

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
            try:
                sock.bind((_IFACE, ETH_P_ARP))
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return sock
        return run_in_netns(self.lab.client_ns, make)

    def _run(self) -> None:
        from node.netlink import ARPOP_REPLY, build_arp_probe, parse_arp_frame
        sock = None
        try:
            for i in self.lab.members:
                with _open_ns(self.lab.member_ns(i)) as ipr:
                    self.member_of_mac[_link_mac(ipr, _link_index(ipr, _IFACE))] = i
            with _open_ns(self.lab.client_ns) as ipr:
                self.client_mac = _link_mac(ipr, _link_index(ipr, _IFACE))
            frames = [build_arp_probe(self.client_mac, v) for v in self.vips]
            sock = self._open()
            wanted = set(self.vips)

            def drain(into: list) -> None:
                while True:
                    try:
                        frame = sock.recv(128)
                    except (BlockingIOError, InterruptedError):
                        return
                    arp = parse_arp_frame(frame)
                    if (arp is not None and arp.op == ARPOP_REPLY and arp.sender_ip in wanted
                            and arp.target_ip == "0.0.0.0" and arp.target_mac == self.client_mac):
                        into.append((arp.sender_ip, arp.sender_mac))

            drain([])                                   # nothing before our first round counts
            next_tick = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                if now - next_tick > self.interval:
                    self.late_rounds += 1
                t_sent = time.time()
                for frame in frames:
                    sock.send(frame)
                self._ready.set()
                next_tick = max(next_tick + self.interval, now)
                replies: list[tuple[str, str]] = []
                while True:
                    wait = next_tick - time.monotonic()
                    if wait <= 0 or self._stop.is_set():
                        break
                    if select.select([sock], [], [], wait)[0]:
                        drain(replies)
                drain(replies)                          # whatever came in just before the next send
                self._record(t_sent, arp_round_holders(replies, self.vips, self.member_of_mac),
                             len(replies))
        except BaseException as e:
            if not self._stop.is_set():
                self.error = e
        finally:
            self._ready.set()
            if sock is not None:
                sock.close()

    def _record(self, t: float, holders: dict[str, list[int]], n_replies: int) -> None:
        with self._lock:
            self.rounds += 1
            self.replies += n_replies
            if not self.history or self.history[-1][1] != holders:
                self.history.append((t, holders))
            for v, h in holders.items():
                self._max[v] = max(self._max[v], len(h))
                if len(h) > 1:
                    self.doubles.append((t, v, list(h)))

    def stop(self) -> None:
        """Stop sampling; raise LabError if the sampling thread failed."""
        self._halt()
        if self.error is not None:
            raise LabError(f"ARP sampler failed: {self.error}")

    def double_holder_rounds(self) -> list[tuple[float, str, list[int]]]:
        """Every (t sent, vip, members) where two or more members answered one round."""
        with self._lock:
            return [(t, v, list(h)) for t, v, h in self.doubles]

    def max_holders(self, vip: str) -> int:
        """Most members that answered one round for `vip`."""
        if vip not in self._max:
            raise LabError(f"{vip!r} is not sampled (sampling {self.vips})")
        with self._lock:
            return self._max[vip]

    def holders_at(self, t: float) -> dict[str, list[int]] | None:
        """Who answered the latest round sent at or before `t` (time.time() scale), or None."""
        with self._lock:
            k = bisect.bisect_right([x for x, _ in self.history], t)
            return None if k == 0 else {v: list(h) for v, h in self.history[k - 1][1].items()}

    def snapshot(self) -> list[tuple[float, dict[str, list[int]]]]:
        """The change points so far: (t, {vip: members}) whenever the answer changed."""
        with self._lock:
            return [(t, {v: list(h) for v, h in d.items()}) for t, d in self.history]

    def stats(self) -> dict[str, int]:
        """rounds, replies, late rounds, two-holder rounds."""
        with self._lock:
            return {"rounds": self.rounds, "replies": self.replies, "late_rounds": self.late_rounds,
                    "double_rounds": len(self.doubles)}
