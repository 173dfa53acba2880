"""Hooks in the namespace lab: three nodes and a manager under supervisord, the real vip
service plumbing real addresses, every node's addresses sampled every 10 ms.

One hook script serves the three kinds ([hooks] vip, member and config). It appends
``$1 $2 KIND PRESENT TIME`` to ``<root>/<member>-<kind>.log``, where PRESENT is whether the
VIP is on the interface when the hook runs (``ip addr`` inside the member's namespace) and
TIME is ``date +%s.%N``. While ``<root>/hang-<member>`` exists, a vip hook of that member then
sleeps forever (``sleep 1000``): it must be killed at the hook timeout, alarmed, and delay
neither a failover nor any lease renewal.

Figures are printed (run with -s); timing assertions carry wide margins for this 2-core box.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
              pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vip_cluster import LabCluster, wait_for  # noqa: E402

VIP = "10.99.0.100"
OUT = "10.99.0.102"
HOOK_TIMEOUT = 8.0
# a failover with hung hooks may take this much longer than one without (it should take no
# longer at all: the hooks run in another process; the margin is for the noisy machine)
FAILOVER_MARGIN = 1.0

HOOK = """#!/bin/sh
# the lab's hook for every kind: vip acquire|release ADDRESS, member alive|dead NAME, config applied REV
kind=${{ECLUSTER_EVENT%%.*}}
present=-
if [ -n "$ECLUSTER_VIP" ]; then
    ip=${{ECLUSTER_VIP%/*}}
    if ip -o -4 addr show dev "$ECLUSTER_VIP_INTERFACE" | grep -q " $ip/"; then present=yes; else present=no; fi
fi
echo "$1 $2 ${{ECLUSTER_VIP_KIND:--}} $present $(date +%s.%N)" >> {root}/$ECLUSTER_MEMBER-$kind.log
if [ "$kind" = vip ] && [ -e {root}/hang-$ECLUSTER_MEMBER ]; then
    echo $$ >> {root}/hung-$ECLUSTER_MEMBER
    exec sleep 1000
fi
"""


class AlarmWatch:
    """Every alarm.hook_failed event seen on one member's ipc PUB, collected by a thread."""

    def __init__(self, cluster, member: str):
        import zmq

        from bus import envelope as ch
        self.alarms: list[dict] = []
        self._stop = threading.Event()
        self._sock = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"alarm.hook_failed")
        self._sock.connect(cluster.member(member).ipc_pub)
        self._unpack = ch.unpack
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            if self._sock.poll(100):
                _, data = self._sock.recv_multipart()
                body = self._unpack(data).body
                body["seen"] = time.time()
                self.alarms.append(body)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)


@pytest.fixture(scope="module")
def lc():
    cluster = LabCluster(3, 1, preset="lan", vips=[
        {"address": f"{VIP}/24", "preference": "n1"},
        {"address": f"{OUT}/24", "preference": "n2", "kind": "outbound"},
    ])
    hook = cluster.root / "hook"
    hook.write_text(HOOK.format(root=cluster.root))
    hook.chmod(0o755)
    cluster.extra = f'[hooks]\nvip = "{hook}"\nmember = "{hook}"\nconfig = "{hook}"\ntimeout = {HOOK_TIMEOUT}\n'
    cluster.figures = {}
    alarms = None
    try:
        cluster.start()
        cluster.sampler = cluster.lab.start_sampler([VIP, OUT])
        alarms = cluster.alarms = AlarmWatch(cluster.cluster, "m1")
        yield cluster
        cluster.sampler.stop()
        doubles = cluster.sampler.double_holder_instants()
        assert not doubles, f"two holders at some instant: {doubles[:5]}"
    finally:
        if alarms is not None:
            alarms.close()
        for name in cluster.names:                 # no hook left hanging in a namespace we tear down
            (cluster.root / f"hang-{name}").unlink(missing_ok=True)
        cluster.close()


def lines(lc, member: str, kind: str) -> list[list[str]]:
    f = lc.root / f"{member}-{kind}.log"
    return [ln.split() for ln in f.read_text().splitlines()] if f.exists() else []


def calls(lc, member: str, kind: str) -> list[tuple[str, str]]:
    return [(ln[0], ln[1]) for ln in lines(lc, member, kind)]


def last_for(lc, member: str, vip: str) -> list[str] | None:
    """The last vip hook line of ``member`` about ``vip``, or None."""
    mine = [ln for ln in lines(lc, member, "vip") if ln[1].split("/")[0] == vip]
    return mine[-1] if mine else None


def owner_of(lc, vip: str) -> str:
    return {r["address"].split("/")[0]: r for r in lc.vip_rows()}[vip]["owner"]


def vip_status(lc, node: str) -> dict:
    return lc.call(node, "vip", "status", timeout=1.0)


def hooks_status(lc, node: str) -> dict:
    return lc.call(node, "hooks", "status", timeout=1.0)


def vip_hooks_idle(lc, node: str) -> bool:
    vip = hooks_status(lc, node)["kinds"]["vip"]
    return not vip["queued"] and not vip["running"]


def reads_of(lc, node: str, since: float) -> list[tuple[float, frozenset]]:
    i = lc.index(node)
    with lc.sampler._lock:
        return [(t, held) for t, m, held in lc.sampler.reads if m == i and t >= since]


def first_present(lc, node: str, vip: str, since: float) -> tuple[float, float]:
    """(last read without ``vip``, first read with it) on ``node`` after ``since``."""
    prev = since
    for t, held in reads_of(lc, node, since):
        if vip in held:
            return prev, t
        prev = t
    raise AssertionError(f"{vip} never seen on {node} since {since}")


def unheld_reads(lc, node: str, vip: str, start: float, end: float) -> list[float]:
    return [t for t, held in reads_of(lc, node, start) if t <= end and vip not in held]


def failover(lc, when_taken_over=None) -> tuple[float, str, float]:
    """kill -9 n1 (link down) under the client probe: (failover s, new owner, kill time);
    ``when_taken_over()`` is called as soon as another node holds the VIP."""
    probe = lc.start_probe(5)
    wait_for(lambda: lc.ask_vip() == "n1", 5, what="client reaches n1")
    t_kill = lc.kill_member("n1", link_down=True)
    def new_holder():
        h = lc.holders()[VIP]
        return h[0] if len(h) == 1 and h[0] != "n1" else None
    new = wait_for(new_holder, 10, what="a new holder")
    if when_taken_over is not None:
        when_taken_over()
    res = lc.probe_result(probe)
    return res.failover_s(t_kill, "n1"), new, t_kill


def unhang(lc) -> None:
    for m in ("n2", "n3"):
        (lc.root / f"hang-{m}").unlink(missing_ok=True)


def restore(lc) -> None:
    for name in lc.names:
        if name not in lc.member_procs:
            lc.revive_member(name)
    lc.lab.heal()
    lc.wait_settled(timeout=60, expect={VIP: "n1", OUT: "n2"})


def test_settled_owners_were_told_after_plumbing(lc):
    lc.wait_settled(timeout=30, expect={VIP: "n1", OUT: "n2"})
    # the last word on each address (a start-up reshuffle may have told more before it)
    for node, vip, kind in (("n1", VIP, "injection"), ("n2", OUT, "outbound")):
        last = wait_for(lambda: (lambda ln: ln if ln and ln[0] == "acquire" else None)(last_for(lc, node, vip)), 20,
                        what=f"{node} told of {vip}")
        assert last[2:4] == [kind, "yes"], last
    for node, vip in (("n1", OUT), ("n2", VIP), ("n3", VIP), ("n3", OUT)):
        assert (last_for(lc, node, vip) or ["release"])[0] == "release", (node, vip)
    assert calls(lc, "m1", "vip") == []          # a manager holds no VIP


def test_a_config_commit_runs_the_config_hook_and_reloads_every_service(lc):
    from services.base import services_for

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ecluster.cli", "config", *args, "-c", str(lc.path)],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    def applied(m):
        f = lc.cluster.member(m).data_dir / "conf.applied"
        return f.read_text().strip() if f.exists() else None

    r = cli("bootstrap", "--member", "n1")
    assert r.returncode == 0, r.stderr
    head = lc.call("n1", "configsync", "head", timeout=3.0)["head"]
    wait_for(lambda: all(applied(m) == head for m in lc.names), 30, what="bootstrap applied everywhere")
    conf = lc.cluster.member("n1").data_dir / "conf" / "global"
    (conf / "relay.toml").write_text('domains = ["example.org"]\n')
    r = cli("commit", "--member", "n1", "-m", "relay domains", "--add-all")
    assert r.returncode == 0, r.stderr
    rev = lc.call("n1", "configsync", "head", timeout=3.0)["head"]
    assert rev != head
    wait_for(lambda: all(applied(m) == rev for m in lc.names), 30, what="the commit applied everywhere")
    for m in lc.names:
        wait_for(lambda: ("applied", rev) in calls(lc, m, "config"), 10, what=f"{m}'s config hook told of {rev[:12]}")
    # every service process of every member had its handle_reload called with the revision
    for m in lc.names:
        for svc in services_for(lc.cluster, m):
            ping = wait_for(lambda: (lambda p: p if p["last_reload_rev"] == rev else None)(
                lc.call(m, svc, "ping", timeout=2.0)), 10, what=f"{svc} on {m} reloaded {rev[:12]}")
            assert ping["reloads"] >= 1, (m, svc, ping)


def test_failover_new_owner_told_after_plumb_members_told_dead_then_alive(lc):
    restore(lc)
    before = {m: len(lines(lc, m, "member")) for m in lc.names}
    seconds, new, t_kill = failover(lc)
    print(f"\nfailover after kill -9 + link down, hooks configured: {seconds:.3f} s (new owner {new})")
    lc.figures["failover"] = seconds
    assert seconds is not None and seconds < 2.5
    told = wait_for(lambda: [ln for ln in lines(lc, new, "vip") if ln[:2] == ["acquire", f"{VIP}/24"]
                             and float(ln[4]) > t_kill], 10, what=f"{new}'s acquire hook")
    hook_t = float(told[0][4])
    plumbed = vip_status(lc, new)["acquired_at"][VIP]
    last_absent, first_seen = first_present(lc, new, VIP, t_kill)
    print(f"acquire hook on {new}: {1000 * (hook_t - plumbed):.0f} ms after the plumb "
          f"(sampler: absent at {last_absent - t_kill:.3f} s, seen at {first_seen - t_kill:.3f} s after the kill)")
    assert told[0][3] == "yes", "the address was on the interface when the hook ran"
    assert hook_t >= plumbed and hook_t >= last_absent
    for m in ("n2", "n3", "m1"):
        wait_for(lambda: ("dead", "n1") in calls(lc, m, "member")[before[m]:], 10, what=f"{m} told n1 is dead")
    t_back = lc.revive_member("n1")
    lc.wait_settled(60, expect={VIP: "n1"})
    for m in ("n2", "n3", "m1"):
        wait_for(lambda: calls(lc, m, "member")[before[m]:][-1:] == [("alive", "n1")], 20,
                 what=f"{m} told n1 is alive again")
    # the failback: release on the interim owner after its unplumb, acquire on n1 after its plumb
    rel = wait_for(lambda: [ln for ln in lines(lc, new, "vip") if ln[:2] == ["release", f"{VIP}/24"]
                            and float(ln[4]) > t_back], 20, what=f"{new}'s release hook")
    assert rel[0][3] == "no" and float(rel[0][4]) >= vip_status(lc, new)["released_at"][VIP]
    acq = wait_for(lambda: [ln for ln in lines(lc, "n1", "vip") if ln[:2] == ["acquire", f"{VIP}/24"]
                            and float(ln[4]) > t_back], 20, what="n1's acquire hook after the failback")
    assert acq[0][3] == "yes" and float(acq[0][4]) >= vip_status(lc, "n1")["acquired_at"][VIP]


def test_hung_hooks_delay_no_failover_and_no_renewal_and_are_killed_at_their_timeout(lc):
    restore(lc)
    assert "failover" in lc.figures, "needs the failover figure of the test before"
    n_alarms = len(lc.alarms.alarms)
    for m in ("n2", "n3"):          # nothing of the tests before still queued: only the hooks below hang
        wait_for(lambda: vip_hooks_idle(lc, m), 20, what=f"{m}'s vip hooks idle")
    for m in ("n2", "n3"):
        (lc.root / f"hang-{m}").touch()
    try:
        # OUT moves n2 -> n3: n2's release hook and n3's acquire hook hang (their vip queues are stuck)
        # a node's own key may not move VIPs (bus.roles): the coordinator's own call may
        leader = lc.call("n1", "election", "status")["leader"]
        lc.call(leader, "election", "move", vip=OUT, node="n3", timeout=3.0)
        t_hang = time.time()
        for m in ("n2", "n3"):
            wait_for(lambda: hooks_status(lc, m)["kinds"]["vip"]["running"], 10, what=f"{m}'s vip hook hanging")
        # the flags go as soon as the VIP is taken over (well before the hooks' timeout), so
        # the acquire queued behind a hung hook runs normally once that hook is killed
        seconds, new, t_kill = failover(lc, when_taken_over=lambda: unhang(lc))
        t_plumbed = first_present(lc, new, VIP, t_kill)[1]
    finally:
        unhang(lc)
    print(f"\nfailover with every successor's vip hook hanging: {seconds:.3f} s "
          f"(without: {lc.figures['failover']:.3f} s)")
    assert seconds is not None and seconds < max(2.5, lc.figures["failover"] + FAILOVER_MARGIN)
    # killed at the timeout, alarmed, reaped
    hung = {m: [int(p) for p in (lc.root / f"hung-{m}").read_text().split()] for m in ("n2", "n3")}
    got = wait_for(lambda: (lambda a: a if {x["member"] for x in a} >= {"n2", "n3"} else None)(
        [a for a in lc.alarms.alarms[n_alarms:] if a.get("hook") == "vip"]), HOOK_TIMEOUT + 15,
        what="alarm.hook_failed from n2 and n3")
    for a in got:
        assert "timed out" in a["reason"], a
        assert HOOK_TIMEOUT - 0.5 <= a["time"] - t_hang <= HOOK_TIMEOUT + 5, (a, t_hang)
    for m, pids in hung.items():
        for pid in pids:
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, what=f"{m}'s hung hook {pid} gone")
    # the acquire queued behind the hung hook ran once the hook was killed (the flag is gone)
    told = wait_for(lambda: [ln for ln in lines(lc, new, "vip") if ln[:2] == ["acquire", f"{VIP}/24"]
                             and float(ln[4]) > t_kill], 15, what=f"{new}'s queued acquire hook")
    assert told[0][3] == "yes"
    st = hooks_status(lc, new)["kinds"]["vip"]
    # the hung run is gone; a later event's hook may be running now, but none past its timeout
    hung_pids = {pid for pids in hung.values() for pid in pids}
    assert st["counters"]["timeouts"] >= 1
    assert st["running"] is None or (st["running"]["pid"] not in hung_pids
                                     and st["running"]["for"] < HOOK_TIMEOUT), st["running"]
    # no lapse while the hooks hung: the new owner held VIP at every read since it plumbed it,
    # and n3 held OUT at every read since it took it over (renewals went on)
    t_end = time.time()
    assert unheld_reads(lc, new, VIP, t_plumbed, t_end) == []
    t_out = first_present(lc, "n3", OUT, t_hang)[1]
    assert unheld_reads(lc, "n3", OUT, t_out, t_end) == []
    print(f"{new} held {VIP} for {t_end - t_plumbed:.1f} s and n3 held {OUT} for {t_end - t_out:.1f} s "
          f"without a gap, hooks hung for {HOOK_TIMEOUT:g} s")
    lc.call(lc.call("n2", "election", "status")["leader"], "election", "unpin", vip=OUT, timeout=3.0)
    restore(lc)
