"""Tests of the network-namespace lab (tests/lab.py), the whoami server, probe and analysis."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from pyroute2 import IPRoute, netns

from lab import (MARKER_DIR, NETNS_DIR, PROBE_SCRIPT, WHOAMI_SCRIPT, Lab, LabError,
                 arp_round_holders, cleanup_stale, partition_blackholes, validate_groups)
from probe import Prober
from probe_analysis import ProbeAnalysisError, analyze, parse_lines

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
pytestmark = pytest.mark.timeout(60)

PORT = 7000
VIP = "10.99.0.100"


def wait_for(predicate, timeout=5.0, interval=0.01):
    """Poll `predicate` until it returns a truthy value or `timeout` passes; return the value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def span_rounds(arp):
    """How many 10 ms rounds fit between an ArpSampler's first and last change point."""
    snap = arp.snapshot()
    return (snap[-1][0] - snap[0][0]) / arp.interval


def lab_namespaces(prefix):
    return [n for n in os.listdir(NETNS_DIR) if n.startswith(prefix)] if NETNS_DIR.is_dir() else []


def start_whoami(lab, ns, name, bind=None):
    argv = [sys.executable, str(WHOAMI_SCRIPT), name, str(PORT)] + ([bind] if bind else [])
    return lab.popen(ns, argv, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def lab3():
    """Example fixture: a 3-member lab with a whoami server (named m1, m2, m3) on every member."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with Lab(3) as lab:
        for i in lab.members:
            start_whoami(lab, lab.member_ns(i), f"m{i}")
        for i in lab.members:
            assert wait_for(lambda: lab.ask(lab.client_ns, lab.member_address(i), PORT)), \
                f"whoami on member {i} never answered"
        yield lab


# -- pure parts (no root) ------------------------------------------------------------------

def test_validate_groups_completes_and_rejects():
    assert validate_groups([[1], [2, 3]], 4) == [[1], [2, 3], [4]]
    with pytest.raises(LabError, match="out of range"):
        validate_groups([[0]], 3)
    with pytest.raises(LabError, match="more than one group"):
        validate_groups([[1, 2], [2]], 3)
    with pytest.raises(LabError):
        validate_groups("12", 3)


def test_partition_blackholes_is_symmetric():
    addrs = {1: "a1", 2: "a2", 3: "a3"}
    bh = partition_blackholes([[1], [2, 3]], addrs)
    assert bh == {1: {"a2", "a3"}, 2: {"a1"}, 3: {"a1"}}
    assert partition_blackholes([[1, 2, 3]], addrs) == {1: set(), 2: set(), 3: set()}


def test_bad_lab_arguments():
    with pytest.raises(LabError):
        Lab(0)
    with pytest.raises(LabError):
        Lab(2, subnet="10.99")
    lab = Lab(2)
    assert lab.member_ns(2).startswith(lab.prefix) and lab.prefix.startswith("ecl")
    assert lab.member_address(2) == "10.99.0.12" and lab.client_address == "10.99.0.2"
    with pytest.raises(LabError):
        lab.member_ns(3)
    with pytest.raises(LabError, match="not up"):
        lab.link_down(1)


def test_arp_round_holders_counts_members_and_strangers():
    macs = {"aa:00:00:00:00:01": 1, "aa:00:00:00:00:02": 2}
    replies = [("10.0.0.100", "aa:00:00:00:00:01"), ("10.0.0.100", "aa:00:00:00:00:01"),
               ("10.0.0.101", "aa:00:00:00:00:02"), ("10.0.0.101", "ee:ee:ee:ee:ee:ee"),
               ("10.0.0.9", "aa:00:00:00:00:02")]
    assert arp_round_holders(replies, ["10.0.0.100", "10.0.0.101", "10.0.0.102"], macs) == {
        "10.0.0.100": [1], "10.0.0.101": [0, 2], "10.0.0.102": []}


def test_overlapping_attempts_first_answer_is_by_answer_time():
    # attempt 2 started first but its SYN was lost: the first answer after 0.0 is attempt 3's
    recs = [(-0.01, -0.009, "m1"), (0.000, 0.250, None), (0.002, 1.003, "m2"), (0.007, 0.008, "m2"),
            (0.012, 0.013, "m2")]
    an = analyze(recs)
    assert an.first_answer_by_other(0.0, "m1").t1 == pytest.approx(0.008)
    assert an.first_answer(0.0).t1 == pytest.approx(0.008)
    assert an.first_answer(0.0, "m1") is None
    assert an.longest_gap(-0.02, 0.02).length == pytest.approx(0.017)


def test_probe_keeps_its_cadence_while_syns_are_dropped():
    """A listener whose accept queue is full drops SYNs: those attempts time out, yet new ones
    keep starting every interval; once it accepts, the first answer comes within ~1 interval."""
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    prober = Prober("127.0.0.1", port, interval=0.005, timeout=0.1)
    served = {}

    def serve_later():
        time.sleep(0.4)              # the outage being measured, not synchronisation
        served["t"] = time.time()
        srv.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conn.sendall(b"late\n")
            conn.close()

    stop = threading.Event()
    worker = threading.Thread(target=serve_later, daemon=True)
    worker.start()
    try:
        records = prober.run(0.8)
    finally:
        stop.set()
        worker.join()
        srv.close()
    starts = [r.t0 for r in records]
    spacing = sorted(b - a for a, b in zip(starts, starts[1:]))
    assert spacing[len(spacing) // 2] < 0.012, "attempts must not wait for each other"
    assert any(r.err == "timeout" for r in records), "the full queue should have dropped SYNs"
    an = analyze(records)
    first = an.first_answer(served["t"])
    assert first is not None and first.who == "late"
    assert first.t1 - served["t"] < 0.1


def test_probe_cpu_is_small():
    """probe.py at a 5 ms cadence against a local whoami: its own CPU use (printed on stderr)."""
    import re
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(WHOAMI_SCRIPT), "w", str(port), "127.0.0.1"])
    def listening():
        with socket.socket() as c:
            return c.connect_ex(("127.0.0.1", port)) == 0
    try:
        assert wait_for(listening)
        res = subprocess.run([sys.executable, str(PROBE_SCRIPT), "127.0.0.1", str(port), "2", "0.005"],
                             capture_output=True, text=True, timeout=20)
    finally:
        server.kill()
        server.wait()
    an = analyze(parse_lines(res.stdout))
    assert len(an.answered) > 200
    m = re.search(r"\(([\d.]+)% of one core\)", res.stderr)
    assert m, res.stderr
    print(f"\nprobe.py, 5 ms cadence: {res.stderr.strip()}")
    assert float(m.group(1)) < 30


def test_probe_analysis_figures():
    recs = [(0.00, 0.001, "m1"), (0.01, 0.011, "m1"), (0.02, 0.07, None), (0.08, 0.13, None),
            (0.14, 0.141, "m2"), (0.15, 0.151, "m2")]
    an = analyze(recs)
    first = an.first_answer_by_other(0.015)
    assert first.who == "m2" and first.t1 == pytest.approx(0.141)
    assert an.failover_s(0.015) == pytest.approx(0.126)
    gap = an.longest_gap(0.0, 1.0)
    assert (gap.start, gap.end) == (pytest.approx(0.011), pytest.approx(0.141))
    assert an.longest_gap(0.05, 0.1).length == pytest.approx(0.05)  # clipped to the window
    assert an.who_sequence() == ["m1", None, "m2"]
    assert [r.attempts for r in an.runs()] == [2, 2, 2]
    assert an.first_answer_by_other(0.015, owner="m2") is None
    assert parse_lines('{"t0": 1, "t1": 2, "who": null}\n')[0].who is None
    with pytest.raises(ProbeAnalysisError):
        analyze([(2, 1, "x")])
    with pytest.raises(ProbeAnalysisError):
        parse_lines("not json")


# -- the lab -----------------------------------------------------------------------------

@needs_root
def test_layout_and_connectivity(lab3):
    assert lab_namespaces(lab3.prefix) and set(lab_namespaces(lab3.prefix)) == set(lab3.namespaces)
    assert (MARKER_DIR / f"{lab3.prefix[:-1]}.pid").exists()
    for i in lab3.members:
        assert lab3.addresses(i) == {lab3.member_address(i)}
        assert lab3.ask(lab3.client_ns, lab3.member_address(i), PORT) == f"m{i}"
    for i, j in [(1, 2), (2, 3), (3, 1), (2, 1)]:
        assert lab3.ask(lab3.member_ns(i), lab3.member_address(j), PORT) == f"m{j}"


@needs_root
def test_partition_and_heal(lab3):
    ask = lab3.ask
    try:
        lab3.partition([[1], [2, 3]])
        assert ask(lab3.member_ns(1), lab3.member_address(2), PORT, 0.2) is None
        assert ask(lab3.member_ns(2), lab3.member_address(1), PORT, 0.2) is None
        assert ask(lab3.member_ns(2), lab3.member_address(3), PORT) == "m3"
        assert ask(lab3.member_ns(3), lab3.member_address(2), PORT) == "m2"
        for i in lab3.members:
            assert ask(lab3.client_ns, lab3.member_address(i), PORT) == f"m{i}"
    finally:
        lab3.heal()
    assert lab3.blackholes() == {}
    for i in lab3.members:
        with IPRoute(netns=lab3.member_ns(i), flags=0, groups=0) as ipr:
            assert not [r for r in ipr.route("dump") if r["type"] == 6]  # RTN_BLACKHOLE
    assert ask(lab3.member_ns(1), lab3.member_address(2), PORT) == "m2"
    assert ask(lab3.member_ns(2), lab3.member_address(1), PORT) == "m1"


@needs_root
def test_isolate_all(lab3):
    try:
        lab3.isolate_all()
        for i in lab3.members:
            for j in lab3.members:
                if i != j:
                    assert lab3.ask(lab3.member_ns(i), lab3.member_address(j), PORT, 0.2) is None
            assert lab3.ask(lab3.client_ns, lab3.member_address(i), PORT) == f"m{i}"
    finally:
        lab3.heal()
    assert lab3.ask(lab3.member_ns(3), lab3.member_address(1), PORT) == "m1"


@needs_root
def test_link_down_and_up(lab3):
    try:
        lab3.link_down(2)
        assert lab3.ask(lab3.client_ns, lab3.member_address(2), PORT, 0.2) is None
        assert lab3.ask(lab3.client_ns, lab3.member_address(1), PORT) == "m1"
    finally:
        lab3.link_up(2)
    assert wait_for(lambda: lab3.ask(lab3.client_ns, lab3.member_address(2), PORT, 0.2)) == "m2"


@needs_root
def test_flap_leaves_link_up(lab3):
    handle = lab3.flap(3, period_s=0.1, duration_s=0.25)
    handle.join(timeout=5)
    states = [s for _, s in handle.transitions]
    assert states[:2] == ["down", "up"] and states[-1] == "up" and "down" in states[2:]
    assert wait_for(lambda: lab3.ask(lab3.client_ns, lab3.member_address(3), PORT, 0.2)) == "m3"


@needs_root
def test_sampler_sees_added_addresses():
    """Also measures one sampling pass over 4 member namespaces (printed with -s)."""
    with Lab(4) as lab:
        sampler = lab.start_sampler([VIP], interval=0.01)
        assert sampler.max_holders(VIP) == 0
        with IPRoute(netns=lab.member_ns(2), flags=0, groups=0) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=VIP, prefixlen=32)
        t_one = time.time()
        assert wait_for(lambda: sampler.max_holders(VIP) == 1)
        assert VIP in lab.addresses(2)
        lab.add_address(4, VIP)
        assert wait_for(lambda: sampler.max_holders(VIP) == 2)
        lab.del_address(2, VIP)
        lab.del_address(4, VIP)
        t_none = time.time()
        wait_for(lambda: sampler.holders_at(time.time())[VIP] == [], timeout=2)
        n_before = len(sampler.samples)
        wait_for(lambda: len(sampler.samples) >= n_before + 20, timeout=5)
        sampler.stop()
        doubles = sampler.address_double_holder_instants()
        assert doubles and all(v == VIP and h == [2, 4] for _, v, h in doubles)
        assert sampler.holders_at(doubles[0][0]) == {VIP: [2, 4]}
        # the client's ARP view saw the same two holders, and nothing else
        arp = sampler.arp
        arp_doubles = arp.double_holder_rounds()
        assert arp_doubles and all(v == VIP and h == [2, 4] for _, v, h in arp_doubles)
        assert sampler.double_holder_instants() == sorted(doubles + arp_doubles)
        assert lab.arp_double_holders() == arp_doubles
        assert arp.max_holders(VIP) == 2 and sampler.max_holders(VIP) == 2
        assert arp.holders_at(time.time())[VIP] == []
        seen = [h[VIP] for _, h in arp.snapshot()]
        assert seen[0] == [] and [2] in seen and [2, 4] in seen and seen[-1] == []
        assert all(set(h) <= {2, 4} for h in seen)
        print(f"ARP from the client: {arp.stats()}")
        assert arp.stats()["rounds"] >= span_rounds(arp) * 0.5
        assert sampler.holders_at(t_one - 10) is None
        assert sampler.holders_at(time.time())[VIP] == []
        assert max(len(d[VIP]) for t, d in sampler.samples if t > t_none) == 0
        stats = sampler.pass_stats()
        print(f"\nsampling pass over 4 namespaces: {stats}")
        # a pass usually fits the 10 ms interval (median ~5 ms idle); a loaded 2-core box has
        # been seen at 13 ms: the cadence check below is what the double-holder checks rely on
        assert stats["median"] < 0.02, "a sampling pass must stay near the 10 ms interval"
        # At a 10 ms cadence: far more samples than a slow sampler would produce.
        span = sampler.samples[-1][0] - sampler.samples[0][0]
        assert len(sampler.samples) >= span / 0.01 * 0.5


@needs_root
def test_probe_sees_vip_move():
    with Lab(2) as lab:
        for i in lab.members:
            start_whoami(lab, lab.member_ns(i), f"m{i}")
        lab.add_address(1, VIP)
        assert wait_for(lambda: lab.ask(lab.client_ns, VIP, PORT)) == "m1"
        assert wait_for(lambda: lab.ask(lab.client_ns, lab.member_address(2), PORT)) == "m2"
        probe = lab.popen(lab.client_ns, [sys.executable, str(PROBE_SCRIPT), VIP, str(PORT),
                                          "1.2", "0.01"], stdout=subprocess.PIPE, text=True)
        # Move once the probe has demonstrably been answered by m1 for a while.
        time.sleep(0.5)  # not synchronisation: gives the probe a stretch of m1 answers
        t_move = time.time()
        lab.del_address(1, VIP)
        lab.add_address(2, VIP)
        lab.flush_neighbours(lab.client_ns)  # what a gratuitous ARP would do
        out, _ = probe.communicate(timeout=10)
        an = analyze(parse_lines(out))
        assert an.attempts and an.answered, "the probe got no answer at all"
        first = an.first_answer_by_other(t_move)
        assert first is not None and first.who == "m2"
        assert all(a.who in ("m1", None) for a in an.attempts if a.t1 < t_move)
        assert an.who_sequence()[0] == "m1" and an.who_sequence()[-1] == "m2"
        assert 0 < an.failover_s(t_move) < 0.5
        assert an.longest_gap(t_move - 0.1, t_move + 0.5).length < 0.5


@needs_root
def test_down_removes_everything_and_is_idempotent():
    lab = Lab(2).up()
    procs = [start_whoami(lab, lab.member_ns(1), "m1"),
             lab.popen(lab.client_ns, ["sleep", "60"])]
    marker = MARKER_DIR / f"{lab.prefix[:-1]}.pid"
    assert marker.exists() and len(lab_namespaces(lab.prefix)) == 4
    killed = lab.kill_member(1)
    assert killed == [procs[0]] and procs[0].returncode is not None
    assert procs[1].poll() is None
    lab.down()
    lab.down()
    assert lab_namespaces(lab.prefix) == []
    assert not marker.exists()
    assert all(p.returncode is not None and not os.path.exists(f"/proc/{p.pid}") for p in procs)


@needs_root
def test_exception_inside_with_still_cleans_up():
    procs = []
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(1) as lab:
            prefix = lab.prefix
            procs.append(lab.popen(lab.member_ns(1), ["sleep", "60"]))
            # A grandchild in the same process group dies with the group.
            procs.append(lab.popen(lab.client_ns, ["sh", "-c", "sleep 60 & wait"]))
            raise RuntimeError("boom")
    assert lab_namespaces(prefix) == []
    assert all(p.returncode is not None for p in procs)
    with pytest.raises(LabError):
        lab.popen(lab.client_ns, ["true"])


@needs_root
def test_cleanup_stale_removes_only_dead_labs():
    # A lab whose creator dies by SIGKILL (no atexit) leaves namespaces and a process behind.
    child = textwrap.dedent(f"""
        import json, os, signal, subprocess, sys
        sys.path.insert(0, {str(WHOAMI_SCRIPT.parent)!r})
        from lab import Lab
        lab = Lab(2).up()
        p = lab.popen(lab.client_ns, ["sleep", "60"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
        print(json.dumps({{"prefix": lab.prefix, "pid": p.pid}}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    keep = f"ecl{os.getpid() % 10000}qqq-keep"  # ecl-shaped but without a marker
    assert keep not in lab_namespaces("ecl")
    netns.create(keep)
    try:
        # The live lab exists first: the dying child's own up() must leave it alone too.
        with Lab(1) as live:
            res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                                 timeout=20)
            info = json.loads(res.stdout)
            stale_prefix, orphan = info["prefix"], info["pid"]
            assert len(lab_namespaces(stale_prefix)) == 4 and os.path.exists(f"/proc/{orphan}")
            removed = cleanup_stale()
            assert set(removed) == {f"{stale_prefix}{s}" for s in ("hub", "m1", "m2", "c")}
            assert lab_namespaces(stale_prefix) == []
            assert wait_for(lambda: not os.path.exists(f"/proc/{orphan}"), timeout=5)
            assert not (MARKER_DIR / f"{stale_prefix[:-1]}.pid").exists()
            assert set(lab_namespaces(live.prefix)) == set(live.namespaces)
            assert keep in lab_namespaces("ecl")
            assert cleanup_stale() == []
    finally:
        netns.remove(keep)
