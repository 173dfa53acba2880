"""Tests of node/netlink.py against real network namespaces (root only), and of its pure
packet builders and parsers (any user).

Topology, made fresh for each test and always deleted::

    eclnl<pid>-a : vip0 (veth, up)  <--->  eclnl<pid>-b : peer0 (veth, up; captures ARP / ND)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import threading
import time

import pytest
from pyroute2 import IPRoute, netns

from hypothesis import given, settings
from hypothesis import strategies as st

from node.netlink import (ETH_P_ARP, ETH_P_IPV6, ND_NEIGHBOR_ADVERT, ND_NEIGHBOR_SOLICIT, NetlinkError, Plumber,
                          build_announcement_frames, build_arp_probe, build_garp_frames, build_ns_probe, build_probe,
                          build_unsolicited_na, icmpv6_checksum, parse_arp_frame, parse_nd_frame, probe_answer,
                          run_in_netns, send_garp)

pytestmark = pytest.mark.timeout(60)

VIP = "10.99.0.100/24"
OTHER = "10.99.0.5/24"
IFACE = "vip0"
PEER = "peer0"
_counter = itertools.count()
SO_TIMESTAMPNS = 35  # Linux; not exported by the socket module


def wait_for(predicate, timeout=5.0, interval=0.01):
    """Poll ``predicate`` until truthy or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def sysctl(ns: str, path: str, value: str | None = None) -> str:
    def access():
        full = f"/proc/sys/net/ipv4/conf/{path}"
        if value is not None:
            with open(full, "w") as handle:
                handle.write(value)
        with open(full) as handle:
            return handle.read().strip()

    return run_in_netns(ns, access)


def raw_addrs(ns: str, ifname: str = IFACE) -> list[tuple[str, int, bool]]:
    """(ip, prefix, secondary) on the interface, read with pyroute2 directly (not via Plumber)."""
    with IPRoute(netns=ns, flags=0) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        return [(m.get_attr("IFA_LOCAL"), m["prefixlen"], bool(m["flags"] & 1))
                for m in ipr.get_addr(index=index, family=socket.AF_INET)]


def add_unmanaged(ns: str, address: str, ifname: str = IFACE) -> None:
    """Plumb an address the way an administrator would, outside the Plumber."""
    ip, prefix = address.split("/")
    with IPRoute(netns=ns, flags=0) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=ip, prefixlen=int(prefix))


@pytest.fixture
def lab():
    """Two namespaces joined by a veth pair; yields (ns_a, ns_b); deletes both afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    base = f"eclnl{os.getpid()}-{next(_counter)}"
    ns_a, ns_b = f"{base}a", f"{base}b"
    created = []
    try:
        for name in (ns_a, ns_b):
            netns.create(name)
            created.append(name)
        with IPRoute(netns=ns_a, flags=0) as ipr:
            ipr.link("add", ifname=IFACE, kind="veth", peer=PEER)
            peer_index = ipr.link_lookup(ifname=PEER)[0]
            fd = os.open(f"/var/run/netns/{ns_b}", os.O_RDONLY)
            try:
                ipr.link("set", index=peer_index, net_ns_fd=fd)
            finally:
                os.close(fd)
            for name in (IFACE, "lo"):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        with IPRoute(netns=ns_b, flags=0) as ipr:
            for name in (PEER, "lo"):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        yield ns_a, ns_b
    finally:
        for name in created:
            try:
                netns.remove(name)
            except OSError:
                pass
        leftovers = [n for n in netns.listnetns() if n.startswith(base)]
        assert not leftovers, leftovers


@pytest.fixture
def plumber(lab):
    with Plumber(IFACE, netns=lab[0]) as p:
        yield p


# --------------------------------------------------------------------------- plumbing

def test_add_is_idempotent_and_remove_leaves_other_address(lab, plumber):
    ns_a, _ = lab
    add_unmanaged(ns_a, OTHER)  # the other address is primary, the VIP will be secondary
    assert plumber.add(VIP) is True
    assert plumber.add(VIP) is False
    assert raw_addrs(ns_a) == [("10.99.0.5", 24, False), ("10.99.0.100", 24, True)]
    assert plumber.holds("10.99.0.100") and plumber.holds(VIP)
    assert not plumber.holds("10.99.0.100/25")
    assert plumber.remove(VIP) is True
    assert raw_addrs(ns_a) == [("10.99.0.5", 24, False)]
    assert not plumber.holds(VIP)


def test_removing_a_primary_vip_keeps_its_secondaries(lab, plumber):
    ns_a, _ = lab
    assert sysctl(ns_a, f"{IFACE}/promote_secondaries") == "0"
    assert plumber.add(VIP) is True  # first in its subnet: primary
    assert sysctl(ns_a, f"{IFACE}/promote_secondaries") == "1"
    add_unmanaged(ns_a, OTHER)
    add_unmanaged(ns_a, "10.99.0.6/24")
    assert raw_addrs(ns_a)[0] == ("10.99.0.100", 24, False)
    assert plumber.remove(VIP) is True
    assert sorted(a[:2] for a in raw_addrs(ns_a)) == [("10.99.0.5", 24), ("10.99.0.6", 24)]


def test_remove_switches_promotion_back_on_when_someone_turned_it_off(lab, plumber):
    ns_a, _ = lab
    plumber.add(VIP)
    add_unmanaged(ns_a, OTHER)
    assert sysctl(ns_a, f"{IFACE}/promote_secondaries", "0") == "0"
    assert not plumber.promote_secondaries()
    assert plumber.remove(VIP) is True
    assert [a[:2] for a in raw_addrs(ns_a)] == [("10.99.0.5", 24)]


def test_remove_refuses_rather_than_take_secondaries_along(lab, plumber, monkeypatch):
    ns_a, _ = lab
    plumber.add(VIP)
    add_unmanaged(ns_a, OTHER)
    sysctl(ns_a, f"{IFACE}/promote_secondaries", "0")
    monkeypatch.setattr(Plumber, "_ensure_promote", lambda self, ifname: False)
    with pytest.raises(NetlinkError) as info:
        plumber.remove(VIP)
    message = str(info.value)
    assert "10.99.0.100/24" in message and IFACE in message and "10.99.0.5/24" in message
    assert "\n" not in message
    assert len(raw_addrs(ns_a)) == 2  # nothing removed


def test_remove_absent_or_wrong_prefix_is_not_an_error(lab, plumber):
    ns_a, _ = lab
    assert plumber.remove(VIP) is False
    assert plumber.remove(VIP, "nosuchif") is False
    plumber.add(VIP)
    assert plumber.remove("10.99.0.100/25") is False  # exact prefix only
    assert plumber.remove("10.99.0.100/32") is False
    assert raw_addrs(ns_a) == [("10.99.0.100", 24, False)]
    assert plumber.remove(VIP) is True
    assert plumber.remove(VIP) is False


def test_other_interfaces_and_other_namespaces_untouched(lab, plumber):
    ns_a, _ = lab
    loopback_before = raw_addrs(ns_a, "lo")
    plumber.add(VIP)
    plumber.remove(VIP)
    assert raw_addrs(ns_a, "lo") == loopback_before
    with IPRoute() as host:
        assert not [m for m in host.get_addr(family=socket.AF_INET)
                    if m.get_attr("IFA_LOCAL") == "10.99.0.100"]


def test_managed_present_and_addresses(lab, plumber):
    ns_a, _ = lab
    add_unmanaged(ns_a, OTHER)
    plumber.add(VIP)
    managed = [(VIP, IFACE), ("10.99.0.101/24", IFACE), ("10.99.0.5/16", IFACE),
               (VIP, "nosuchif")]
    assert plumber.managed_present(managed) == [(VIP, IFACE)]
    assert plumber.addresses() == ["10.99.0.5/24", VIP]
    assert plumber.addresses("nosuchif") == []


def test_plumber_works_from_another_thread_in_its_namespace(lab, plumber):
    results = []
    worker = threading.Thread(target=lambda: results.append(plumber.add(VIP)))
    worker.start()
    worker.join(10)
    assert results == [True]
    assert plumber.holds(VIP)
    # run_in_netns moved only its own thread: the namespace sees vip0, this thread does not
    assert run_in_netns(lab[0], lambda: os.path.exists(f"/proc/sys/net/ipv4/conf/{IFACE}"))
    assert IFACE not in [name for _, name in socket.if_nameindex()]


def test_plumber_and_garp_work_inside_a_running_asyncio_loop(lab):
    ns_a, _ = lab

    async def main():
        with Plumber(IFACE, netns=ns_a) as p:  # pyroute2's sync API alone would fail here
            assert p.add(VIP) is True
            assert send_garp(IFACE, VIP, count=1, netns=ns_a) == 2
            assert p.remove(VIP) is True
            return p.addresses()

    assert asyncio.run(main()) == []


def test_closed_plumber_refuses_work(lab):
    p = Plumber(IFACE, netns=lab[0])
    p.close()
    p.close()  # idempotent
    with pytest.raises(NetlinkError, match="closed"):
        p.add(VIP)


def test_errors_are_one_line_and_name_address_and_interface(lab, plumber):
    with pytest.raises(NetlinkError, match=r"10\.99\.0\.7/24 on nosuchif"):
        plumber.add("10.99.0.7/24", "nosuchif")
    with pytest.raises(NetlinkError, match="not an IPv4 or IPv6 address"):
        plumber.add("10.99.0.999/24")
    with pytest.raises(NetlinkError, match="prefix is required"):
        plumber.add("10.99.0.7")
    with Plumber(netns=lab[0]) as no_default, pytest.raises(NetlinkError, match="no interface"):
        no_default.add(VIP)
    with pytest.raises(NetlinkError, match="not found"):
        Plumber(IFACE, netns=f"eclnl{os.getpid()}-missing")
    assert not os.path.exists(f"/var/run/netns/eclnl{os.getpid()}-missing")  # never created


# --------------------------------------------------------------------------- gratuitous ARP

def open_capture(ns: str, ifname: str) -> socket.socket:
    def make():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        sock.bind((ifname, ETH_P_ARP))
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # kernel receive time per frame
        sock.settimeout(0.05)
        return sock

    return run_in_netns(ns, make)


def capture_garps(sock: socket.socket, ip: str, want: int, timeout: float = 5.0):
    frames, stamps = [], []
    deadline = time.monotonic() + timeout
    while len(frames) < want and time.monotonic() < deadline:
        try:
            data, ancillary, _, _ = sock.recvmsg(2048, socket.CMSG_SPACE(16))
        except socket.timeout:
            continue
        arp = parse_arp_frame(data)
        if arp is not None and arp.sender_ip == ip and arp.gratuitous:
            frames.append(arp)
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanos = struct.unpack("qq", payload[:16])
                    stamps.append(seconds + nanos / 1e9)
    return frames, stamps


def test_garp_frames_reach_the_peer_with_our_mac(lab, plumber):
    ns_a, ns_b = lab
    plumber.add(VIP)
    mac = plumber.link_mac()
    capture = open_capture(ns_b, PEER)
    try:
        assert send_garp(IFACE, VIP, count=3, netns=ns_a) == 6
        frames, _ = capture_garps(capture, "10.99.0.100", want=6)
    finally:
        capture.close()
    assert len(frames) == 6
    assert [f.op for f in frames] == [1, 2] * 3
    for frame in frames:
        assert frame.sender_mac == mac and frame.src_mac == mac
        assert frame.dst_mac == "ff:ff:ff:ff:ff:ff"
        assert frame.target_ip == "10.99.0.100"
    assert frames[0].target_mac == "00:00:00:00:00:00" and frames[1].target_mac == mac


def test_garp_rounds_are_spaced_by_interval(lab, plumber):
    ns_a, ns_b = lab
    capture = open_capture(ns_b, PEER)
    try:
        started = time.monotonic()
        send_garp(IFACE, "10.99.0.100", count=3, interval=0.1, netns=ns_a)
        elapsed = time.monotonic() - started
        frames, stamps = capture_garps(capture, "10.99.0.100", want=6)
    finally:
        capture.close()
    assert len(frames) == 6 and len(stamps) == 6
    assert elapsed >= 0.2
    # kernel receive stamps, so receiver scheduling cannot blur them: rounds >= interval apart
    assert stamps[2] - stamps[0] >= 0.099 and stamps[4] - stamps[2] >= 0.099


def test_garp_errors(lab, plumber):
    ns_a, _ = lab
    with pytest.raises(NetlinkError, match="not found"):
        send_garp("nosuchif", "10.99.0.100", netns=ns_a)
    with pytest.raises(NetlinkError, match="not an Ethernet interface"):
        send_garp("lo", "10.99.0.100", netns=ns_a)
    with IPRoute(netns=ns_a, flags=0) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=IFACE)[0], state="down")
    with pytest.raises(NetlinkError, match="interface is down"):
        send_garp(IFACE, "10.99.0.100", netns=ns_a)
    with pytest.raises(NetlinkError, match="count"):
        send_garp(IFACE, "10.99.0.100", count=0, netns=ns_a)
    with pytest.raises(NetlinkError, match="namespace"):
        send_garp(IFACE, "10.99.0.100", netns=f"eclnl{os.getpid()}-missing")


def test_build_and_parse_garp_frames_round_trip():
    request, reply = build_garp_frames("02:00:00:00:00:01", "10.99.0.100/24")
    assert len(request) == len(reply) == 60
    for frame, op in ((request, 1), (reply, 2)):
        arp = parse_arp_frame(frame)
        assert arp.op == op and arp.gratuitous
        assert arp.sender_mac == "02:00:00:00:00:01" and arp.sender_ip == "10.99.0.100"
    assert parse_arp_frame(b"\x00" * 60) is None
    assert parse_arp_frame(request[:30]) is None
    with pytest.raises(NetlinkError):
        build_garp_frames("02:00:00:00:00", "10.99.0.100")


# --------------------------------------------------------------------------- IPv6: plumbing

VIP6 = "fd00::100/64"
OTHER6 = "fd00::5/64"
MAC = "02:00:00:00:00:01"


def raw_addrs6(ns: str, ifname: str = IFACE) -> dict[str, tuple[int, int, int, int]]:
    """{ip: (prefix, IFA_FLAGS, valid lifetime, preferred lifetime)} of the interface's IPv6
    addresses, via pyroute2."""
    with IPRoute(netns=ns, flags=0) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        out = {}
        for m in ipr.get_addr(index=index, family=socket.AF_INET6):
            flags = m.get_attr("IFA_FLAGS")
            cache = m.get_attr("IFA_CACHEINFO")
            out[m.get_attr("IFA_ADDRESS")] = (m["prefixlen"], m["flags"] if flags is None else flags,
                                              cache["ifa_valid"] if cache else -1,
                                              cache["ifa_preferred"] if cache else -1)
        return out


def test_ipv6_add_is_usable_at_once_limited_and_removed_exactly(lab, plumber):
    ns_a, _ = lab
    with IPRoute(netns=ns_a, flags=0) as ipr:      # an administrator's address in the same /64
        ipr.addr("add", index=ipr.link_lookup(ifname=IFACE)[0], address="fd00::5", prefixlen=64)
    assert plumber.add(VIP6, lifetime=4) is True
    assert plumber.add(VIP6, lifetime=4) is False
    prefix, flags, valid, preferred = raw_addrs6(ns_a)["fd00::100"]
    assert prefix == 64 and flags & 0x02 and not flags & 0x40       # IFA_F_NODAD, not IFA_F_TENTATIVE
    assert 0 < valid <= 4
    assert preferred == 0 and flags & 0x20                          # IFA_F_DEPRECATED: never a source
    assert plumber.holds("fd00::100") and plumber.holds("FD00:0::100/64") and not plumber.holds("fd00::100/80")
    assert plumber.managed_present([(VIP6, IFACE), (VIP, IFACE), ("fd00::9/64", IFACE)]) == [(VIP6, IFACE)]
    assert VIP6 in plumber.addresses(family=socket.AF_INET6) and plumber.addresses() == []
    plumber.add(VIP6)                                               # no lifetime: valid forever
    assert raw_addrs6(ns_a)["fd00::100"][2:] == (0xFFFFFFFF, 0)
    assert plumber.remove("fd00::100/80") is False                  # exactly the configured prefix
    assert plumber.remove(VIP6) is True and plumber.remove(VIP6) is False
    left = raw_addrs6(ns_a)
    assert "fd00::100" not in left and left["fd00::5"][0] == 64     # the other address is untouched


def test_a_deprecated_ipv6_vip_is_not_the_source_of_our_own_connections(lab, plumber):
    """In the node's own /64 the newest address could win source selection; a deprecated
    VIP never does, yet it still accepts connections."""
    ns_a, ns_b = lab
    for ns, ifname, ip in ((ns_a, IFACE, "fd00::5"), (ns_b, PEER, "fd00::6")):
        with IPRoute(netns=ns, flags=0) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=ip, prefixlen=64, flags=0x02)
    plumber.add(VIP6, lifetime=10)

    def source_towards_peer() -> str:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.connect(("fd00::6", 9))        # UDP connect: the kernel picks the source, sends nothing
            return s.getsockname()[0]

    assert run_in_netns(ns_a, source_towards_peer) == "fd00::5"


def test_mixed_families_on_one_interface(lab, plumber):
    plumber.add(VIP)
    plumber.add(VIP6)
    assert plumber.managed_present([(VIP, IFACE), (VIP6, IFACE)]) == [(VIP, IFACE), (VIP6, IFACE)]
    assert plumber.remove(VIP) is True
    assert plumber.holds(VIP6) and not plumber.holds(VIP)


# --------------------------------------------------------------------------- IPv6: packets (pure)

def test_unsolicited_na_is_what_rfc_4861_asks_for():
    frame = build_unsolicited_na(MAC, "fd00::100/64")
    nd = parse_nd_frame(frame)
    assert nd is not None and nd.type == ND_NEIGHBOR_ADVERT
    assert nd.dst_mac == "33:33:00:00:00:01" and nd.src_mac == MAC
    assert nd.src_ip == "fd00::100" and nd.dst_ip == "ff02::1" and nd.hop_limit == 255
    assert nd.override and not nd.solicited and not nd.flags & 0x80000000
    assert nd.target == "fd00::100" and nd.lladdr == MAC
    # the checksum verifies: summing the message with its checksum in place gives zero
    assert icmpv6_checksum(frame[22:38], frame[38:54], frame[54:]) == 0
    assert build_announcement_frames(MAC, "fd00::100") == [frame]
    assert len(build_announcement_frames(MAC, "10.99.0.100")) == 2      # IPv4: the GARP pair


def test_ns_probe_is_a_dad_solicitation():
    frame = build_ns_probe(MAC, "fd00::12:3456")
    nd = parse_nd_frame(frame)
    assert nd.type == ND_NEIGHBOR_SOLICIT and nd.src_ip == "::" and nd.lladdr is None
    assert nd.dst_ip == "ff02::1:ff12:3456" and nd.dst_mac == "33:33:ff:12:34:56"
    assert nd.target == "fd00::12:3456" and nd.hop_limit == 255
    assert icmpv6_checksum(frame[22:38], frame[38:54], frame[54:]) == 0
    assert build_probe(MAC, "fd00::12:3456/64") == (ETH_P_IPV6, frame)
    assert build_probe(MAC, "10.99.0.100") == (ETH_P_ARP, build_arp_probe(MAC, "10.99.0.100"))


def test_probe_answer_counts_only_another_hosts_advertisement():
    theirs = "02:00:00:00:00:02"
    assert probe_answer(build_unsolicited_na(theirs, "fd00::100"), "fd00::100", MAC) == theirs
    assert probe_answer(build_unsolicited_na(theirs, "fd00::100"), "FD00::100/64", MAC) == theirs
    assert probe_answer(build_unsolicited_na(MAC, "fd00::100"), "fd00::100", MAC) is None      # our own
    assert probe_answer(build_unsolicited_na(theirs, "fd00::101"), "fd00::100", MAC) is None   # other target
    assert probe_answer(build_ns_probe(theirs, "fd00::100"), "fd00::100", MAC) is None         # a question
    forwarded = bytearray(build_unsolicited_na(theirs, "fd00::100"))
    forwarded[21] = 64                                    # hop limit != 255: not from this link
    assert probe_answer(bytes(forwarded), "fd00::100", MAC) is None
    assert probe_answer(build_garp_frames(theirs, "10.99.0.100")[1], "fd00::100", MAC) is None
    assert probe_answer(build_unsolicited_na(theirs, "fd00::100"), "10.99.0.100", MAC) is None
    assert probe_answer(b"", "not an address", MAC) is None


def test_nd_parser_refuses_damaged_frames():
    frame = build_unsolicited_na(MAC, "fd00::100")
    assert parse_nd_frame(frame[:-1]) is None                          # truncated
    flipped = bytearray(frame)
    flipped[60] ^= 0x01                                                # a bit of the target: bad checksum
    assert parse_nd_frame(bytes(flipped)) is None
    zero_len_option = bytearray(frame)
    zero_len_option[79] = 0
    assert parse_nd_frame(bytes(zero_len_option)) is None             # option length 0: RFC 4861 drop
    assert parse_nd_frame(frame + b"\x00" * 10) is not None           # Ethernet padding is fine
    with pytest.raises(NetlinkError):
        build_unsolicited_na(MAC, "10.99.0.100")
    with pytest.raises(NetlinkError):
        build_ns_probe("02:00", "fd00::1")


def _nd_like(draw_bytes: bytes, base: bytes) -> bytes:
    """A real ND frame with some bytes overwritten: reaches deep into the parser."""
    out = bytearray(base)
    for i in range(0, len(draw_bytes) - 1, 2):
        out[draw_bytes[i] % len(out)] = draw_bytes[i + 1]
    return bytes(out)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.binary(max_size=40).map(lambda b: _nd_like(b, build_unsolicited_na(MAC, "fd00::100"))),
                 st.binary(max_size=40).map(lambda b: _nd_like(b, build_ns_probe(MAC, "fd00::100"))),
                 st.binary(max_size=40).map(lambda b: _nd_like(b, build_garp_frames(MAC, "10.0.0.1")[0]))))
def test_fuzz_parsers_never_raise(frame):
    """Whatever arrives from the wire: None or a decoded frame, never an exception."""
    nd = parse_nd_frame(frame)
    assert nd is None or nd.type in (ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT)
    parse_arp_frame(frame)
    for ip in ("fd00::100", "10.0.0.1"):
        answer = probe_answer(frame, ip, MAC)
        assert answer is None or (isinstance(answer, str) and answer != MAC)


# --------------------------------------------------------------------------- IPv6: on the wire

def open_nd_capture(ns: str, ifname: str) -> socket.socket:
    def make():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IPV6))
        sock.bind((ifname, ETH_P_IPV6))
        sock.settimeout(0.05)
        return sock

    return run_in_netns(ns, make)


def neighbour_mac(ns: str, ifname: str, ip: str) -> str | None:
    with IPRoute(netns=ns, flags=0) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        for m in ipr.get_neighbours(ifindex=index, family=socket.AF_INET6):
            if m.get_attr("NDA_DST") == ip:
                return (m.get_attr("NDA_LLADDR") or "").lower() or None
    return None


def test_unsolicited_na_repoints_the_peers_neighbour_entry(lab, plumber):
    """The peer's kernel takes our NA (so the checksum, hop limit and options are right) and
    points its existing entry for the VIP at our MAC, as a client's would after a failover."""
    ns_a, ns_b = lab
    plumber.add(VIP6)
    with IPRoute(netns=ns_b, flags=0) as ipr:
        ipr.neigh("add", ifindex=ipr.link_lookup(ifname=PEER)[0], dst="fd00::100",
                  lladdr="02:00:00:00:00:99", state=0x04)            # NUD_STALE: the old holder
    assert neighbour_mac(ns_b, PEER, "fd00::100") == "02:00:00:00:00:99"
    capture = open_nd_capture(ns_b, PEER)
    try:
        assert send_garp(IFACE, VIP6, count=3, netns=ns_a) == 3
        seen = []
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            try:
                nd = parse_nd_frame(capture.recv(2048))
            except socket.timeout:
                continue
            if nd is not None and nd.type == ND_NEIGHBOR_ADVERT and nd.target == "fd00::100":
                seen.append(nd)
    finally:
        capture.close()
    assert len(seen) == 3 and all(nd.lladdr == plumber.link_mac() for nd in seen)
    assert wait_for(lambda: neighbour_mac(ns_b, PEER, "fd00::100") == plumber.link_mac())


def test_dad_probe_is_answered_by_the_kernel_that_holds_the_address(lab, plumber):
    ns_a, ns_b = lab
    plumber.add(VIP6)
    holder_mac = plumber.link_mac()
    with IPRoute(netns=ns_b, flags=0) as ipr:
        prober_mac = ipr.get_links(ipr.link_lookup(ifname=PEER)[0])[0].get_attr("IFLA_ADDRESS")

    def ask(ip: str, wait: float) -> str | None:
        capture = open_nd_capture(ns_b, PEER)
        try:
            ethertype, question = build_probe(prober_mac, ip)
            assert ethertype == ETH_P_IPV6
            capture.send(question)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    answer = probe_answer(capture.recv(2048), ip, prober_mac)
                except socket.timeout:
                    continue
                if answer:
                    return answer
            return None
        finally:
            capture.close()

    assert ask("fd00::100", 2.0) == holder_mac
    assert ask("fd00::101", 0.2) is None                  # nobody has it: no answer
    # the probe taught the holder nothing (sent from ::, no link-layer option)
    assert neighbour_mac(ns_a, IFACE, "::") is None


def test_ipv6_garp_errors_name_the_announcement(lab):
    ns_a, _ = lab
    with pytest.raises(NetlinkError, match="unsolicited NA for fd00::100 on nosuchif"):
        send_garp("nosuchif", VIP6, netns=ns_a)
