"""The only place that touches network interfaces: VIP plumbing (pyroute2) and gratuitous ARP.

Plumbing (:class:`Plumber`)
---------------------------
* ``add`` uses netlink ``replace`` (RTM_NEWADDR with NLM_F_REPLACE), so adding twice is a no-op.
* ``remove`` deletes exactly the given address with exactly the given prefix; the kernel matches
  both, so a VIP never takes out an address that merely shares its IP with another prefix.
  An absent address (or interface) is not an error: ``remove`` returns False.
* Only addresses named by the caller are ever changed; reads (``holds``, ``managed_present``,
  ``addresses``) change nothing.

Primary and secondary addresses. Linux makes the first IPv4 address of a subnet on an
interface its *primary*; later ones in the same subnet (same prefix) are *secondaries*, and
deleting a primary deletes all its secondaries as well -- unless the interface's
``promote_secondaries`` sysctl is on (``net.ipv4.conf.<if>.promote_secondaries``, or ``all``),
in which case a secondary is promoted instead. A VIP is primary whenever it was plumbed before
any other address of its subnet, so ``add`` switches the sysctl on for the interface (harmless
for everything else: it only changes what happens on deletion of a primary, in everyone's
favour), and ``remove`` checks it again just before deleting a primary that has secondaries,
and refuses (NetlinkError) rather than take them with it when it cannot be switched on. After
every removal it also checks that every other address is still there.

Labels (``eth0:ecl``) are not used: the caller's list of managed addresses is authoritative,
and a label would not fit long interface names (15 bytes for name plus label).

IPv6 addresses are plumbed the same way (``replace``, the same valid lifetime, exactly the
given prefix removed), with IFA_F_NODAD: no duplicate address detection, so the address is
usable at once instead of tentative for a second or more; and deprecated (preferred_lft 0),
so that it serves clients and can be bound (an outbound VIP), but the kernel never chooses it
as the source of the node's own connections: within one /64 Linux may prefer the newest
address, and a bus connection sourced from a VIP breaks as soon as the VIP moves. The quorum lease is what keeps a VIP
unique, and the vip service probes the wire itself before a takeover (below). IPv6 has no
secondaries, so the promote_secondaries dance is IPv4's only.

Gratuitous ARP and unsolicited NA (:func:`send_garp`)
-----------------------------------------------------
Frames are built here (:func:`build_announcement_frames`) with the interface's MAC read over
netlink and sent through an AF_PACKET socket. IPv4: per round one ARP request and one ARP
reply, both with sender and target protocol address = the VIP (RFC 5944 section 4.6), to the
broadcast MAC. IPv6: per round one unsolicited Neighbour Advertisement (RFC 4861 section 7.2.6):
ICMPv6 type 136 from the VIP to ff02::1, hop limit 255, override flag set, target = the VIP,
target link-layer address option = our MAC; a neighbour that has an entry for the VIP points
it at us.

Probes before a takeover (:func:`build_probe`, :func:`probe_answer`). IPv4: an RFC 5227 ARP
probe (sender IP 0.0.0.0). IPv6: a duplicate-address-detection Neighbour Solicitation (RFC 4862
section 5.4.2: from ::, to the VIP's solicited-node multicast address, no source link-layer
option); a host that has the address configured answers with an NA to ff02::1. Neither
changes any neighbour cache. Packets are built and parsed by pure functions; the parsers
return None for anything malformed (what arrives from the wire must never raise), and the
ICMPv6 checksum is computed here, since an AF_PACKET socket sends the bytes as they are.

Threads and namespaces. pyroute2's synchronous API runs its own asyncio loop, so it cannot be
used from a thread whose asyncio loop is running; a Plumber therefore does all netlink work on
one private worker thread, and ``send_garp`` on a short-lived thread of its own. A Plumber given
``netns`` talks to that namespace through pyroute2. Work that needs a plain socket or
``/proc/sys`` inside a namespace runs in a short-lived thread that joins the namespace with
setns(2) first (:func:`run_in_netns`): on Linux, setns changes only the calling thread, and the
thread ends right after, so nothing else in the process is moved.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import ipaddress
import math
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as _PyrouteNetlinkError

from node.vipcore import VipError, parse_vip_address

__all__ = [
    "NetlinkError",
    "Plumber",
    "ArpFrame",
    "NdFrame",
    "build_garp_frames",
    "build_arp_probe",
    "build_unsolicited_na",
    "build_ns_probe",
    "build_announcement_frames",
    "build_probe",
    "parse_arp_frame",
    "parse_nd_frame",
    "probe_answer",
    "icmpv6_checksum",
    "solicited_node",
    "send_garp",
    "run_in_netns",
    "NETNS_RUN_DIR",
]

NETNS_RUN_DIR = "/var/run/netns"

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_ICMPV6 = 58
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
ND_OPT_SOURCE_LINKADDR = 1
ND_OPT_TARGET_LINKADDR = 2
ND_HOP_LIMIT = 255              # RFC 4861: anything else was forwarded, and is dropped
NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000
IFA_F_NODAD = 0x02
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
IFF_UP = 0x1
IFA_F_SECONDARY = 0x01
_CLONE_NEWNET = 0x40000000
_BROADCAST_MAC = b"\xff" * 6
_ALL_NODES = ipaddress.IPv6Address("ff02::1").packed
_ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"    # RFC 2464: 33:33 + the group's last 32 bits
_ETH_HLEN = 14
_IPV6_HLEN = 40
_ETH_MIN_FRAME = 60  # without FCS; short frames are padded with zeros
_INFINITY_LIFE = 0xFFFFFFFF  # netlink's "forever"
_ABSENT_ERRNOS = (errno.ENOENT, errno.EADDRNOTAVAIL, errno.ENODEV, errno.ESRCH)

T = TypeVar("T")


class NetlinkError(Exception):
    """An interface operation failed or got bad input; the message names address and interface."""


# --------------------------------------------------------------------------- namespaces


def _netns_path(netns: str) -> str:
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


_libc = ctypes.CDLL(None, use_errno=True)


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn()`` inside network namespace ``netns`` and return its result (or raise its error).

    ``netns`` is a name under /var/run/netns or a path; None runs ``fn`` here, in this thread.
    Otherwise ``fn`` runs in a new thread that joins the namespace with setns(2) (which moves only
    that thread) and ends when ``fn`` returns. Sockets created by ``fn`` stay in that namespace.
    """
    if netns is None:
        return fn()
    return _run_in_thread(netns, fn)


def _run_in_thread(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a new short-lived thread, inside ``netns`` when given; wait for it."""
    box: dict[str, object] = {}

    def enter_and_run() -> None:
        if netns is not None:
            path = _netns_path(netns)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                box["error"] = NetlinkError(f"network namespace {netns!r} not found ({path})")
                return
            except OSError as exc:
                box["error"] = NetlinkError(
                    f"cannot open network namespace {netns!r}: {exc.strerror}")
                return
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    box["error"] = NetlinkError(
                        f"cannot enter network namespace {netns!r}: {os.strerror(code)}")
                    return
            finally:
                os.close(fd)
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    worker = threading.Thread(target=enter_and_run, name=f"netns-{netns}", daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def _open_iproute(netns: str | None) -> IPRoute:
    """An RTNL socket without multicast subscriptions, in ``netns`` when given (never created)."""
    if netns is None:
        try:
            return IPRoute(groups=0)
        except TypeError:  # pyroute2 < 0.9
            return IPRoute()
    try:
        return IPRoute(netns=netns, flags=0, groups=0)
    except TypeError:  # pyroute2 < 0.9 runs namespaced RTNL through NetNS
        from pyroute2 import NetNS

        return NetNS(netns, flags=0)


def _sysctl_path(ifname: str, name: str) -> str:
    return f"/proc/sys/net/ipv4/conf/{ifname}/{name}"


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


# --------------------------------------------------------------------------- plumbing


@dataclass(frozen=True)
class _Addr:
    ip: str
    prefixlen: int
    secondary: bool

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(f"{self.ip}/{self.prefixlen}", strict=False)


def _parse(address: str, ifname: str | None, *, require_prefix: bool = True) -> tuple[str, int]:
    try:
        return parse_vip_address(address, require_prefix=require_prefix)
    except VipError as exc:
        where = f" on {ifname}" if ifname else ""
        raise NetlinkError(f"{exc}{where}") from None


class Plumber:
    """Adds, removes and inspects VIP addresses on interfaces, over netlink (pyroute2).

    ``ifname_default`` is used when a method is called without ``ifname``. With ``netns`` (a name
    under /var/run/netns) every operation acts inside that namespace, which must exist.

    All netlink work runs on one private worker thread, so methods may be called from any thread,
    one at a time or concurrently (they queue), and also from inside a running asyncio loop
    (pyroute2's synchronous API cannot run there itself); each call blocks for a few ms. Use as a
    context manager or call :meth:`close`.
    """

    def __init__(self, ifname_default: str | None = None, netns: str | None = None) -> None:
        self.ifname_default = ifname_default
        self.netns = netns
        self._ipr: IPRoute | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="plumber")
        try:
            self._ipr = self._worker.submit(_open_iproute, netns).result()
        except FileNotFoundError:
            self._worker.shutdown()
            raise NetlinkError(f"network namespace {netns!r} not found") from None
        except (OSError, _PyrouteNetlinkError) as exc:
            self._worker.shutdown()
            where = f" in namespace {netns!r}" if netns else ""
            raise NetlinkError(f"cannot open netlink{where}: {exc}") from None

    # -- lifecycle

    def close(self) -> None:
        """Close the netlink socket and stop the worker thread; further calls raise NetlinkError."""
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            try:
                self._worker.submit(ipr.close).result()
            except RuntimeError:  # worker already shut down
                pass
        self._worker.shutdown(wait=True)

    def __enter__(self) -> "Plumber":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers (run on the worker thread)

    def _run(self, fn: Callable[[], T]) -> T:
        if self._ipr is None:
            raise NetlinkError("Plumber is closed")
        try:
            future = self._worker.submit(fn)
        except RuntimeError:
            raise NetlinkError("Plumber is closed") from None
        return future.result()

    def _ifname(self, ifname: str | None, address: str) -> str:
        name = ifname or self.ifname_default
        if not name:
            raise NetlinkError(f"no interface given for {address} and no default interface")
        return name

    def _rtnl(self) -> IPRoute:
        if self._ipr is None:
            raise NetlinkError("Plumber is closed")
        return self._ipr

    def _index(self, ifname: str) -> int | None:
        found = self._rtnl().link_lookup(ifname=ifname)
        return found[0] if found else None

    def _dump(self, index: int, family: int = socket.AF_INET) -> list[_Addr]:
        """The interface's addresses of one family (IPv6 text canonical, as vip_key gives it)."""
        result = []
        for msg in self._rtnl().get_addr(index=index, family=family):
            if msg.get("index") != index or msg.get("family") != family:  # old pyroute2 filters loosely
                continue
            ip = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if family == socket.AF_INET6:
                ip = str(ipaddress.IPv6Address(ip))
            flags = msg.get_attr("IFA_FLAGS")
            flags = msg["flags"] if flags is None else flags
            # IFA_F_SECONDARY shares its bit with IFA_F_TEMPORARY: it means "secondary" for IPv4 only
            result.append(_Addr(ip, msg["prefixlen"], family == socket.AF_INET and bool(flags & IFA_F_SECONDARY)))
        return result

    def _promote_enabled(self, ifname: str) -> bool:
        def read() -> bool:
            for scope in (ifname, "all"):
                with open(_sysctl_path(scope, "promote_secondaries")) as handle:
                    if handle.read().strip() not in ("", "0"):
                        return True
            return False

        return run_in_netns(self.netns, read)

    def _enable_promote(self, ifname: str) -> None:
        def write() -> None:
            with open(_sysctl_path(ifname, "promote_secondaries"), "w") as handle:
                handle.write("1")

        run_in_netns(self.netns, write)

    def _ensure_promote(self, ifname: str) -> bool:
        """Switch promote_secondaries on for ``ifname``; True when it is on afterwards."""
        try:
            if not self._promote_enabled(ifname):
                self._enable_promote(ifname)
            return self._promote_enabled(ifname)
        except OSError:
            return False

    def _fail(self, verb: str, address: str, ifname: str, exc: BaseException) -> NetlinkError:
        args = getattr(exc, "args", ())
        reason = getattr(exc, "strerror", None) or (args[1] if len(args) > 1 else str(exc))
        where = f" (namespace {self.netns})" if self.netns else ""
        target = f"{address} on {ifname}" if address else ifname
        return NetlinkError(f"cannot {verb} {target}{where}: {reason}")

    # -- public API

    def add(self, address_with_prefix: str, ifname: str | None = None, lifetime: int | None = None) -> bool:
        """Plumb ``a.b.c.d/p`` (or IPv6 ``addr/p``, without DAD) on the interface; idempotent.
        True when it was not there before.

        ``lifetime`` (whole seconds) makes the kernel itself delete the address that long after
        the last ``add`` unless it is added again: a last line of fencing for when every
        process of ours is dead and nobody is left to unplumb. None: forever.

        IPv4 only: also switches ``promote_secondaries`` on for the interface (module docstring);
        when that is impossible the address is still added and a later :meth:`remove` refuses
        to delete it while it is the primary of other addresses.
        """
        name = self._ifname(ifname, address_with_prefix)
        ip, prefixlen = _parse(address_with_prefix, name)

        family = _family(ip)

        def work() -> bool:
            index = self._index(name)
            if index is None:
                raise NetlinkError(f"cannot add {address_with_prefix} on {name}: no such interface")
            before = any(a.ip == ip and a.prefixlen == prefixlen for a in self._dump(index, family))
            extra: dict = {}
            if family == socket.AF_INET6:
                # usable at once: DAD would leave it tentative (unusable) for a second or more,
                # and on a clash the kernel would disable it silently; we probe ourselves first
                extra["flags"] = IFA_F_NODAD
            else:
                self._ensure_promote(name)
            if family == socket.AF_INET and prefixlen <= 30:  # like `ip addr add ... brd +`
                net = ipaddress.IPv4Network(f"{ip}/{prefixlen}", strict=False)
                extra["broadcast"] = str(net.broadcast_address)
            valid = _INFINITY_LIFE if lifetime is None else int(lifetime)
            if family == socket.AF_INET6:
                # preferred_lft 0 (deprecated): still answered and bindable, but never picked by
                # source address selection for this node's own connections (which would break
                # when the VIP moves on; in the node's own /64 the kernel may pick it otherwise)
                extra["IFA_CACHEINFO"] = {"ifa_preferred": 0, "ifa_valid": valid, "cstamp": 0, "tstamp": 0}
            elif lifetime is not None:
                extra["IFA_CACHEINFO"] = {"ifa_preferred": valid, "ifa_valid": valid,
                                          "cstamp": 0, "tstamp": 0}
            self._rtnl().addr("replace", index=index, address=ip, prefixlen=prefixlen, **extra)
            return not before

        try:
            return self._run(work)
        except (OSError, _PyrouteNetlinkError) as exc:
            raise self._fail("add", address_with_prefix, name, exc) from None

    def remove(self, address_with_prefix: str, ifname: str | None = None) -> bool:
        """Unplumb exactly ``a.b.c.d/p``; True when it was removed, False when it was absent.

        Never removes anything else: a primary address with secondaries is deleted only with
        ``promote_secondaries`` on, and afterwards every other address is checked to be there.
        """
        name = self._ifname(ifname, address_with_prefix)
        ip, prefixlen = _parse(address_with_prefix, name)

        family = _family(ip)

        def work() -> bool:
            index = self._index(name)
            if index is None:
                return False
            before = self._dump(index, family)
            target = next((a for a in before if a.ip == ip and a.prefixlen == prefixlen), None)
            if target is None:
                return False
            others = [a for a in before if a is not target]
            dependants = [a for a in others if a.secondary and a.prefixlen == prefixlen
                          and a.network == target.network]
            if not target.secondary and dependants and not self._ensure_promote(name):
                kept = ", ".join(f"{a.ip}/{a.prefixlen}" for a in dependants)
                raise NetlinkError(
                    f"refusing to remove {address_with_prefix} from {name}: it is the primary "
                    f"address of {kept}, and promote_secondaries cannot be switched on")
            try:
                self._rtnl().addr("del", index=index, address=ip, prefixlen=prefixlen)
            except _PyrouteNetlinkError as exc:
                if exc.code in _ABSENT_ERRNOS:
                    return False  # went away between the dump and the delete
                raise
            after = {(a.ip, a.prefixlen) for a in self._dump(index, family)}
            lost = [f"{a.ip}/{a.prefixlen}" for a in others if (a.ip, a.prefixlen) not in after]
            if lost:
                raise NetlinkError(f"removing {address_with_prefix} from {name} also removed "
                                   f"{', '.join(lost)}")
            return True

        try:
            return self._run(work)
        except (OSError, _PyrouteNetlinkError) as exc:
            raise self._fail("remove", address_with_prefix, name, exc) from None

    def holds(self, address: str, ifname: str | None = None) -> bool:
        """True when the interface has the address; with a prefix, only that exact prefix counts."""
        name = self._ifname(ifname, address)
        exact = "/" in address
        ip, prefixlen = _parse(address, name, require_prefix=False)

        def work() -> bool:
            index = self._index(name)
            if index is None:
                return False
            return any(a.ip == ip and (not exact or a.prefixlen == prefixlen)
                       for a in self._dump(index, _family(ip)))

        try:
            return self._run(work)
        except (OSError, _PyrouteNetlinkError) as exc:
            raise self._fail("inspect", address, name, exc) from None

    def managed_present(self, managed: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Which ``(address_with_prefix, ifname)`` pairs are plumbed now (exact prefix), in order.

        One dump per interface and address family; a missing interface holds nothing.
        """
        wanted = [(address, ifname, self._ifname(ifname, address)) for address, ifname in managed]
        keys = [_parse(address, name) for address, _, name in wanted]

        def work() -> list[tuple[str, str]]:
            seen: dict[tuple[str, int], set[tuple[str, int]]] = {}
            present = []
            for (address, ifname, name), key in zip(wanted, keys):
                where = (name, _family(key[0]))
                if where not in seen:
                    index = self._index(name)
                    seen[where] = set() if index is None else {
                        (a.ip, a.prefixlen) for a in self._dump(index, where[1])}
                if key in seen[where]:
                    present.append((address, ifname))
            return present

        try:
            return self._run(work)
        except (OSError, _PyrouteNetlinkError) as exc:
            raise self._fail("inspect", "managed addresses", "their interfaces", exc) from None

    def addresses(self, ifname: str | None = None, family: int = socket.AF_INET) -> list[str]:
        """Every address of ``family`` (IPv4 by default; AF_INET6 includes the kernel's own
        link-local) on the interface as ``address/p``, in kernel order; [] when absent."""
        name = self._ifname(ifname, "addresses")

        def work() -> list[str]:
            index = self._index(name)
            return [] if index is None else [f"{a.ip}/{a.prefixlen}" for a in self._dump(index, family)]

        try:
            return self._run(work)
        except (OSError, _PyrouteNetlinkError) as exc:
            raise self._fail("list addresses of", "", name, exc) from None

    def link_mac(self, ifname: str | None = None) -> str:
        """The interface's hardware address, ``aa:bb:cc:dd:ee:ff``, read over netlink."""
        name = self._ifname(ifname, "link")
        try:
            return self._run(lambda: _link_info(self._rtnl(), name)[0])
        except (OSError, _PyrouteNetlinkError) as exc:
            raise self._fail("read the MAC of", "", name, exc) from None

    def promote_secondaries(self, ifname: str | None = None) -> bool:
        """True when deleting a primary on the interface promotes its secondaries."""
        name = self._ifname(ifname, "promote_secondaries")
        try:
            return self._run(lambda: self._promote_enabled(name))
        except OSError as exc:
            raise self._fail("read promote_secondaries of", "", name, exc) from None


def _link_info(ipr: IPRoute, ifname: str) -> tuple[str, int, int]:
    """(MAC, ARPHRD type, flags) of ``ifname``; NetlinkError when it does not exist."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetlinkError(f"interface {ifname} not found")
    link = ipr.get_links(found[0])[0]
    return link.get_attr("IFLA_ADDRESS") or "", link["ifi_type"], link["flags"]


# --------------------------------------------------------------------------- gratuitous ARP


@dataclass(frozen=True)
class ArpFrame:
    """A decoded Ethernet ARP frame (IPv4 over Ethernet); MACs as ``aa:bb:..`` strings."""

    dst_mac: str
    src_mac: str
    op: int
    sender_mac: str
    sender_ip: str
    target_mac: str
    target_ip: str

    @property
    def gratuitous(self) -> bool:
        """Sender and target protocol address are the same (an announcement, not a question)."""
        return self.sender_ip == self.target_ip


def _mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise NetlinkError(f"bad MAC address {mac!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise NetlinkError(f"bad MAC address {mac!r}") from None


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def build_garp_frames(mac: str, ip: str) -> list[bytes]:
    """The two gratuitous ARP frames announcing ``ip`` at ``mac``: [request, reply].

    Both are broadcast, with sender IP = target IP = ``ip``; the reply also carries ``mac`` as
    target hardware address (RFC 5944 section 4.6). Padded to the 60-byte Ethernet minimum.
    """
    sha = _mac_bytes(mac)
    spa = _ipv4_bytes(ip)
    frames = []
    for op, tha in ((ARPOP_REQUEST, b"\x00" * 6), (ARPOP_REPLY, sha)):
        frame = (_BROADCAST_MAC + sha + struct.pack("!H", ETH_P_ARP)
                 + struct.pack("!HHBBH", ARPHRD_ETHER, ETH_P_IP, 6, 4, op)
                 + sha + spa + tha + spa)
        frames.append(frame.ljust(_ETH_MIN_FRAME, b"\x00"))
    return frames


def build_arp_probe(mac: str, ip: str) -> bytes:
    """An RFC 5227 ARP probe for ``ip`` from ``mac``: a broadcast request with sender IP 0.0.0.0.

    A host that has ``ip`` configured answers it (Linux does, for duplicate address
    detection), and the probe itself changes no ARP cache anywhere.
    """
    sha = _mac_bytes(mac)
    tpa = _ipv4_bytes(ip)
    frame = (_BROADCAST_MAC + sha + struct.pack("!H", ETH_P_ARP)
             + struct.pack("!HHBBH", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST)
             + sha + b"\x00" * 4 + b"\x00" * 6 + tpa)
    return frame.ljust(_ETH_MIN_FRAME, b"\x00")


def probe_answer(frame: bytes, ip: str, own_mac: str) -> str | None:
    """The MAC of another host claiming ``ip`` in ``frame``, else None. Pure; never raises.

    IPv4: an ARP reply or announcement with sender IP ``ip``. IPv6: a Neighbour Advertisement
    for target ``ip`` (hop limit 255), its MAC from the target link-layer option, else the
    Ethernet source. Our own frames (``own_mac``) and questions (probes) never count.
    """
    try:
        key, _ = _parse(ip, None, require_prefix=False)
    except NetlinkError:
        return None
    if _family(key) == socket.AF_INET6:
        nd = parse_nd_frame(frame)
        if nd is None or nd.type != ND_NEIGHBOR_ADVERT or nd.hop_limit != ND_HOP_LIMIT or nd.target != key:
            return None
        mac = nd.lladdr or nd.src_mac
        return None if mac == own_mac else mac
    arp = parse_arp_frame(frame)
    if arp is None or arp.sender_ip != key or arp.sender_mac == own_mac:
        return None
    return arp.sender_mac


def parse_arp_frame(frame: bytes) -> ArpFrame | None:
    """Decode an Ethernet frame as IPv4 ARP; None when it is anything else or too short."""
    if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    if htype != ARPHRD_ETHER or ptype != ETH_P_IP or hlen != 6 or plen != 4:
        return None
    body = frame[22:42]
    return ArpFrame(
        dst_mac=_mac_text(frame[0:6]), src_mac=_mac_text(frame[6:12]), op=op,
        sender_mac=_mac_text(body[0:6]), sender_ip=socket.inet_ntoa(body[6:10]),
        target_mac=_mac_text(body[10:16]), target_ip=socket.inet_ntoa(body[16:20]))


# --------------------------------------------------------------------------- IPv6 neighbour discovery


@dataclass(frozen=True)
class NdFrame:
    """A decoded Ethernet frame carrying an ICMPv6 Neighbour Solicitation or Advertisement.

    Addresses as canonical text; ``lladdr`` is the source (NS) or target (NA) link-layer
    address option, None when absent; ``flags`` the NA's R/S/O bits (0 for an NS).
    """

    dst_mac: str
    src_mac: str
    src_ip: str
    dst_ip: str
    hop_limit: int
    type: int
    flags: int
    target: str
    lladdr: str | None

    @property
    def override(self) -> bool:
        return bool(self.flags & NA_FLAG_OVERRIDE)

    @property
    def solicited(self) -> bool:
        return bool(self.flags & NA_FLAG_SOLICITED)


def _ipv6_bytes(ip: str) -> bytes:
    try:
        return ipaddress.IPv6Address(_parse(ip, None, require_prefix=False)[0]).packed
    except ValueError:
        raise NetlinkError(f"not an IPv6 address: {ip!r}") from None


def _ipv4_bytes(ip: str) -> bytes:
    try:
        return ipaddress.IPv4Address(_parse(ip, None, require_prefix=False)[0]).packed
    except ValueError:
        raise NetlinkError(f"not an IPv4 address: {ip!r}") from None


def icmpv6_checksum(src: bytes, dst: bytes, message: bytes) -> int:
    """The ICMPv6 checksum of ``message`` (its checksum field zero) between ``src`` and ``dst``
    (16 bytes each): RFC 4443 section 2.3, over the RFC 8200 pseudo-header. Pure."""
    data = src + dst + struct.pack("!I3xB", len(message), IPPROTO_ICMPV6) + message
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def solicited_node(ip: bytes) -> bytes:
    """The solicited-node multicast group of an IPv6 address (ff02::1:ffXX:XXXX). Pure."""
    return bytes.fromhex("ff0200000000000000000001ff") + ip[13:]


def _icmpv6_frame(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, body_without_sum: bytes) -> bytes:
    """Ethernet + IPv6 (hop limit 255) + ICMPv6 ``body`` (type, code, 2 zero bytes, rest)."""
    checksum = icmpv6_checksum(src, dst, body_without_sum)
    body = body_without_sum[:2] + struct.pack("!H", checksum) + body_without_sum[4:]
    ipv6 = struct.pack("!IHBB", 6 << 28, len(body), IPPROTO_ICMPV6, ND_HOP_LIMIT) + src + dst
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IPV6) + ipv6 + body


def build_unsolicited_na(mac: str, ip: str) -> bytes:
    """An unsolicited Neighbour Advertisement of ``ip`` at ``mac`` (RFC 4861 section 7.2.6).

    From ``ip`` to ff02::1 (all nodes), hop limit 255; flags: override set, solicited and
    router clear; target = ``ip``; one target link-layer address option = ``mac``.
    """
    own = _mac_bytes(mac)
    target = _ipv6_bytes(ip)
    body = (struct.pack("!BBHI", ND_NEIGHBOR_ADVERT, 0, 0, NA_FLAG_OVERRIDE) + target
            + struct.pack("!BB", ND_OPT_TARGET_LINKADDR, 1) + own)
    return _icmpv6_frame(_ALL_NODES_MAC, own, target, _ALL_NODES, body)


def build_ns_probe(mac: str, ip: str) -> bytes:
    """A duplicate-address-detection Neighbour Solicitation for ``ip`` (RFC 4862 section 5.4.2).

    From :: (so no neighbour cache anywhere learns anything from it, and no source
    link-layer option, which RFC 4861 forbids with ::) to ``ip``'s solicited-node group; a
    host that has ``ip`` configured answers with an NA to ff02::1.
    """
    own = _mac_bytes(mac)
    target = _ipv6_bytes(ip)
    group = solicited_node(target)
    body = struct.pack("!BBHI", ND_NEIGHBOR_SOLICIT, 0, 0, 0) + target
    return _icmpv6_frame(b"\x33\x33" + group[12:], own, b"\x00" * 16, group, body)


def parse_nd_frame(frame: bytes) -> NdFrame | None:
    """Decode an Ethernet frame as an ICMPv6 NS or NA; None for anything else or anything
    malformed (truncated, bad lengths or options, wrong checksum). Pure; never raises on bytes."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        return None
    frame = bytes(frame)
    start = _ETH_HLEN + _IPV6_HLEN
    if len(frame) < start + 24 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IPV6:
        return None
    version_etc, payload_len, next_header, hop_limit = struct.unpack("!IHBB", frame[14:22])
    if version_etc >> 28 != 6 or next_header != IPPROTO_ICMPV6:
        return None                                   # ND never carries extension headers
    if payload_len < 24 or len(frame) < start + payload_len:
        return None
    src, dst = frame[22:38], frame[38:54]
    body = frame[start:start + payload_len]
    kind, code, checksum, word = struct.unpack("!BBHI", body[:8])
    if kind not in (ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT) or code != 0:
        return None
    if icmpv6_checksum(src, dst, body[:2] + b"\x00\x00" + body[4:]) != checksum:
        return None
    target = ipaddress.IPv6Address(body[8:24])
    wanted_option = ND_OPT_SOURCE_LINKADDR if kind == ND_NEIGHBOR_SOLICIT else ND_OPT_TARGET_LINKADDR
    lladdr = None
    options = body[24:]
    while options:
        if len(options) < 2 or options[1] == 0 or len(options) < options[1] * 8:
            return None                               # RFC 4861 section 7.1.1: drop it whole
        if options[0] == wanted_option and options[1] == 1 and lladdr is None:
            lladdr = _mac_text(options[2:8])
        options = options[options[1] * 8:]
    return NdFrame(dst_mac=_mac_text(frame[0:6]), src_mac=_mac_text(frame[6:12]),
                   src_ip=str(ipaddress.IPv6Address(src)), dst_ip=str(ipaddress.IPv6Address(dst)),
                   hop_limit=hop_limit, type=kind, flags=word if kind == ND_NEIGHBOR_ADVERT else 0,
                   target=str(target), lladdr=lladdr)


# --------------------------------------------------------------------------- either family


def build_announcement_frames(mac: str, ip: str) -> list[bytes]:
    """What announces ``ip`` at ``mac`` once: the gratuitous ARP pair (IPv4) or one
    unsolicited NA (IPv6). Pure."""
    bare = _parse(ip, None, require_prefix=False)[0]
    if _family(bare) == socket.AF_INET6:
        return [build_unsolicited_na(mac, bare)]
    return build_garp_frames(mac, bare)


def build_probe(mac: str, ip: str) -> tuple[int, bytes]:
    """(ethertype to listen on, frame) asking the wire whether anyone holds ``ip``: an ARP
    probe (IPv4) or a DAD Neighbour Solicitation (IPv6). Pure."""
    bare = _parse(ip, None, require_prefix=False)[0]
    if _family(bare) == socket.AF_INET6:
        return ETH_P_IPV6, build_ns_probe(mac, bare)
    return ETH_P_ARP, build_arp_probe(mac, bare)


def send_garp(ifname: str, ip: str, count: int = 3, interval: float = 0.0,
              netns: str | None = None) -> int:
    """Announce ``ip`` on ``ifname``: ``count`` rounds, ``interval`` s apart, of (ARP request,
    ARP reply) for IPv4 or one unsolicited Neighbour Advertisement for IPv6.

    ``ip`` may carry a prefix. The MAC, link type and up-state are read over netlink; the frames go
    out through an AF_PACKET socket, created inside ``netns`` when given. Blocks for about
    ``(count - 1) * interval`` seconds. Returns the number of frames sent (``2 * count`` for
    IPv4, ``count`` for IPv6).
    """
    bare = _parse(ip, ifname, require_prefix=False)[0]
    what = "an unsolicited NA" if _family(bare) == socket.AF_INET6 else "gratuitous ARP"
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise NetlinkError(f"cannot send {what} for {bare} on {ifname}: count must be >= 1")
    if (isinstance(interval, bool) or not isinstance(interval, (int, float))
            or not math.isfinite(interval) or interval < 0):
        raise NetlinkError(f"cannot send {what} for {bare} on {ifname}: "
                           "interval must be a non-negative number")

    def announce() -> int:
        ipr = _open_iproute(None)  # opened in this thread, hence in its namespace
        try:
            mac, link_type, flags = _link_info(ipr, ifname)
        except NetlinkError as exc:
            raise NetlinkError(f"cannot send {what} for {bare} on {ifname}: {exc}") from None
        finally:
            ipr.close()
        if link_type != ARPHRD_ETHER:
            raise NetlinkError(f"cannot send {what} for {bare} on {ifname}: "
                               f"not an Ethernet interface (link type {link_type})")
        if not flags & IFF_UP:
            raise NetlinkError(f"cannot send {what} for {bare} on {ifname}: interface is down")
        frames = build_announcement_frames(mac, bare)
        sent = 0
        # protocol 0: this socket only sends, so the kernel queues nothing to it
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
            sock.bind((ifname, 0))
            for round_no in range(count):
                if round_no and interval:
                    time.sleep(interval)
                for frame in frames:
                    sock.send(frame)
                    sent += 1
        return sent

    try:
        return _run_in_thread(netns, announce)  # a fresh thread: safe inside an asyncio loop
    except NetlinkError:
        raise
    except (OSError, _PyrouteNetlinkError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        where = f" (namespace {netns})" if netns else ""
        raise NetlinkError(f"cannot send {what} for {bare} on {ifname}{where}: {reason}") from None
