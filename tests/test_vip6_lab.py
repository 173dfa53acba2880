"""IPv6 VIPs in the namespace lab: three nodes and a manager whose bus runs over IPv6
(member addresses fd00:99::11..14), one IPv6 VIP and one IPv4 VIP in the same cluster, a
client namespace with both families.

What is checked, over the real parts (pyroute2 plumbing without DAD, unsolicited Neighbour
Advertisements, DAD probes, the zmq bus over IPv6):

* the mixed cluster settles, each VIP on its preferred node, both reachable from the client;
* kill -9 + link down of the IPv6 VIP's owner: with no client traffic at all (so no
  neighbour discovery of the client's own) its neighbour entry for the VIP moves to the new
  owner's MAC, which only the new owner's unsolicited NA can do, and the client then
  connects to the new owner;
* a graceful move with ``ecluster vip move`` (the CLI in the client namespace, over IPv6);
* link down/up of a member: afterwards one holder, and the holder announced the VIP again
  (the client's entry, pointed at a wrong MAC meanwhile, points at the holder);
* all along (module-wide sampler, 10 ms): at no instant do two members hold a VIP.

One cluster serves every scenario (module-scoped fixture); timing figures are printed
(run with -s), assertions on them carry margins for a noisy 2-core machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vip_cluster import LabCluster, WHOAMI_PORT, wait_for  # noqa: E402

PREFIX6 = "fd00:99::"
VIP6 = "fd00:99::100"
VIP4 = "10.99.0.100"
HOME = {VIP6: "n1", VIP4: "n2"}
BOGUS_MAC = "02:00:00:00:be:ef"


@pytest.fixture(scope="module")
def lc():
    cluster = LabCluster(3, 1, preset="lan", ipv6=PREFIX6, members_over="ipv6", vips=[
        {"address": f"{VIP6}/64", "preference": "n1"},
        {"address": f"{VIP4}/24", "preference": "n2"},
    ])
    t0 = time.monotonic()
    cluster.start()
    print(f"\ncluster up and settled in {time.monotonic() - t0:.1f} s")
    cluster.sampler = cluster.lab.start_sampler([VIP6, VIP4])
    try:
        yield cluster
        cluster.sampler.stop()
        doubles = cluster.sampler.double_holder_instants()
        assert not doubles, f"two holders at some instant: {doubles[:5]}"
        assert cluster.sampler.max_holders(VIP6) == 1
    finally:
        cluster.close()


@pytest.fixture
def window(lc):
    """Back to the normal state (every member up, VIPs at home), then check the
    no-two-holders invariant over the test."""
    for name in lc.names:
        if name not in lc.member_procs:
            lc.revive_member(name)
    for i in lc.lab.members:
        lc.lab.link_up(i)
    lc.wait_settled(timeout=60, expect=HOME)
    start = time.time()
    yield start
    end = time.time()
    doubles = [d for d in lc.sampler.double_holder_instants() if start <= d[0] <= end]
    assert not doubles, f"two holders at some instant: {doubles[:5]}"


def owner_of(lc, vip: str) -> str:
    rows = {r["address"].split("/")[0]: r for r in lc.vip_rows()}
    return rows[vip]["owner"]


def client_mac_for(lc, vip: str) -> str | None:
    entry = lc.lab.neighbour(lc.lab.client_ns, vip)
    return entry[0] if entry else None


def mac_of(lc, name: str) -> str:
    return lc.lab.member_mac(lc.index(name))


def cli(lc, *args, timeout=20) -> subprocess.CompletedProcess:
    """Run the admin CLI from the client namespace (over tcp to an IPv6 member address)."""
    argv = [sys.executable, "-m", "ecluster.cli", *args, "--config", str(lc.path)]
    p = lc.lab.popen(lc.lab.client_ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, p.returncode, out.decode(), err.decode())


class Asker:
    """Connects from the client to [VIP]:port every ``interval`` in a thread; ``answers``
    holds (time, node name or None). A SYN that reached the old holder after it unplumbed is
    dropped, so each connect gives up after ``timeout`` (a lab connect takes about 1 ms): the
    measured gap is the real one plus at most that."""

    def __init__(self, lc, vip: str, interval: float = 0.01, timeout: float = 0.03):
        self.lc, self.vip, self.interval, self.timeout = lc, vip, interval, timeout
        self.answers: list[tuple[float, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            self.answers.append((t, self.lc.lab.ask(self.lc.lab.client_ns, self.vip, WHOAMI_PORT,
                                                    timeout=self.timeout)))
            self._stop.wait(max(0.0, self.interval - (time.time() - t)))

    def stop(self) -> "Asker":
        self._stop.set()
        self._thread.join()
        return self

    def longest_gap(self, start: float, end: float) -> float:
        """Longest span within [start, end] between two answered connects."""
        answered = [start] + [t for t, a in self.answers if a and start <= t <= end] + [end]
        return max(b - a for a, b in zip(answered, answered[1:]))


def test_mixed_families_settle_over_an_ipv6_bus(lc, window):
    assert lc.cluster.member("n1").bus_endpoint == "tcp://[fd00:99::11]:7400"
    rows = {r["address"].split("/")[0]: r for r in lc.vip_rows()}
    assert rows[VIP6]["owner"] == "n1" and rows[VIP4]["owner"] == "n2"
    assert wait_for(lambda: lc.ask_vip(VIP6) == "n1", 5, what="client reaches the IPv6 VIP on n1")
    assert wait_for(lambda: lc.ask_vip(VIP4) == "n2", 5, what="client reaches the IPv4 VIP on n2")
    assert client_mac_for(lc, VIP6) == mac_of(lc, "n1")
    status = lc.call("n1", "vip", "status")
    assert status["dry_run"] is False and VIP6 in status["held"]
    assert status["counters"]["garp"] >= 1                 # the NA burst went out


def test_doctor_passes_inside_each_running_member(lc, window):
    """``ecluster doctor`` in a member's own namespace while it runs: its ports are its own,
    its clock is compared with every peer over the IPv6 bus, the IPv6 VIP's interface has IPv6."""
    for name in ("n1", "m1"):
        argv = [sys.executable, "-m", "ecluster.cli", "doctor", "-c", str(lc.path), "--member", name]
        p = lc.lab.popen(lc.ns(name), argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
        out, err = p.communicate(timeout=60)
        print(out)
        assert p.returncode == 0, out + err
        by = {}
        for line in out.splitlines():
            status, check, detail = line.split(None, 2)
            by.setdefault(check, []).append((status, detail))
        assert all(s != "FAIL" for rows in by.values() for s, _ in rows)
        assert by["ports"][0][0] == "ok" and f"{'node' if name == 'n1' else 'manager'} {name} runs here" in by["ports"][0][1]
        assert by["clock"][0][0] == "ok" and "3 answered" in by["clock"][0][1]
        assert by["layout"] == [("ok", "4 votes on 4 hosts, quorum 3: any one host may fail")]
        if name == "n1":
            assert by["privileges"][0][0] == "ok"
            assert [s for s, _ in by["interface"]] == ["ok"] and "eth0 is up" in by["interface"][0][1]
            assert by["ipv6"][0][0] == "ok" and by["ipv6"][0][1].startswith("eth0: IPv6 on")
        else:
            assert by["privileges"][0][0] == "skip" and "interface" not in by


def test_owner_killed_the_client_follows_the_unsolicited_na(lc, window):
    assert wait_for(lambda: lc.ask_vip(VIP6) == "n1", 5, what="client reaches n1")
    assert client_mac_for(lc, VIP6) == mac_of(lc, "n1")
    t_kill = lc.kill_member("n1", link_down=True)
    # No traffic from the client from here on: only an unsolicited NA can re-point its entry.
    macs = {mac_of(lc, n): n for n in ("n2", "n3")}
    new_owner = wait_for(lambda: macs.get(client_mac_for(lc, VIP6)), 10, interval=0.005,
                         what="the client's neighbour entry moves to a surviving node")
    t_na = time.time()
    answer = wait_for(lambda: lc.ask_vip(VIP6), 5, interval=0.01, what="client reaches the VIP again")
    t_reached = time.time()
    print(f"\nIPv6 failover after kill -9 + link down (lan): client entry re-pointed by NA after "
          f"{t_na - t_kill:.3f} s, first connect answered after {t_reached - t_kill:.3f} s ({answer})")
    assert answer == new_owner
    assert t_na - t_kill < 2.5               # about dead_after + probe; margin for a loaded box
    lc.wait_settled(10)
    assert lc.holders()[VIP6] == [new_owner]
    assert owner_of(lc, VIP4) == "n2", "the IPv4 VIP stays where it was"

    t_back = lc.revive_member("n1")
    lc.wait_settled(30, expect=HOME)          # failback once n1 is ready (plus the anti-flap time)
    assert wait_for(lambda: client_mac_for(lc, VIP6) == mac_of(lc, "n1"), 5,
                    what="the client's entry back at n1")
    print(f"failback to n1 settled {time.time() - t_back:.2f} s after the restart")
    assert lc.ask_vip(VIP6) == "n1"


def test_graceful_move_with_the_cli(lc, window):
    asker = Asker(lc, VIP6)
    try:
        wait_for(lambda: any(a == "n1" for _, a in asker.answers), 5, what="client reaches n1")
        t_move = time.time()
        r = cli(lc, "vip", "move", VIP6, "n3")
        assert r.returncode == 0, r.stderr
        lc.wait_settled(10, expect={VIP6: "n3", VIP4: "n2"})
        wait_for(lambda: any(a == "n3" and t > t_move for t, a in asker.answers), 5, what="client reaches n3")
        t_moved = time.time()
    finally:
        asker.stop()
    gap = asker.longest_gap(t_move, t_moved)
    unplumbed = lc.call("n1", "vip", "status")["released_at"][VIP6]
    plumbed = lc.call("n3", "vip", "status")["acquired_at"][VIP6]
    print(f"\nIPv6 vip move: longest client gap {gap * 1000:.0f} ms "
          f"(n1 unplumbed -> n3 plumbed {(plumbed - unplumbed) * 1000:.1f} ms, node clocks)")
    assert gap < 1.0             # one handover + the NA; connects every 10 ms, margin for a loaded box
    assert client_mac_for(lc, VIP6) == mac_of(lc, "n3")
    assert cli(lc, "vip", "unpin", VIP6).returncode == 0
    lc.wait_settled(15, expect=HOME)


def _candidates(lc) -> list[str]:
    return lc.leader_status()["assignment"]["candidates"]


def test_heal_after_link_down_reannounces_and_keeps_one_holder(lc, window):
    # (1) a member that does not hold the VIP drops off the link and comes back: the holder
    # announces again once it sees the member alive. The client's entry is pointed at a wrong
    # MAC meanwhile (with no traffic to the VIP), so only that announcement can correct it.
    lc.lab.link_down(lc.index("n3"))
    wait_for(lambda: "n3" not in _candidates(lc), 10, what="n3 seen down")
    def bogus_entry_sticks() -> bool:
        # an announcement already in flight (a view change re-announces) may overwrite it
        lc.lab.set_neighbour(lc.lab.client_ns, VIP6, BOGUS_MAC)
        t = time.monotonic()
        while time.monotonic() - t < 0.3:
            if client_mac_for(lc, VIP6) != BOGUS_MAC:
                return False
            time.sleep(0.02)
        return True
    wait_for(bogus_entry_sticks, 10, what="the client's entry stays on the wrong MAC for 0.3 s")
    announced = lc.call("n1", "vip", "status")["counters"]["garp"]
    t_up = time.time()
    lc.lab.link_up(lc.index("n3"))
    wait_for(lambda: client_mac_for(lc, VIP6) == mac_of(lc, "n1"), 10, interval=0.005,
             what="the holder re-announces the VIP after the heal")
    print(f"\nre-announced {time.time() - t_up:.2f} s after n3's link came back")
    assert lc.call("n1", "vip", "status")["counters"]["garp"] > announced
    assert lc.holders()[VIP6] == ["n1"]

    # (2) the holder itself is cut off (link down, processes alive): it fences itself on its
    # own clock, another node takes over; after the heal one holder, the client's entry on it.
    t_cut = time.time()
    lc.lab.link_down(lc.index("n1"))
    wait_for(lambda: owner_of(lc, VIP6) in ("n2", "n3") and lc.holders()[VIP6] in (["n2"], ["n3"]),
             15, what="another node takes the VIP over")
    print(f"taken over {time.time() - t_cut:.2f} s after n1's link went down")
    wait_for(lambda: not lc.lab.holds(1, VIP6), 10, what="n1 unplumbs on its own clock")
    lc.lab.link_up(lc.index("n1"))
    lc.wait_settled(30, expect=HOME)
    assert lc.holders()[VIP6] == ["n1"]
    wait_for(lambda: client_mac_for(lc, VIP6) == mac_of(lc, "n1"), 5, what="the client's entry on n1")
    assert wait_for(lambda: lc.ask_vip(VIP6) == "n1", 5, what="client reaches n1 again")
