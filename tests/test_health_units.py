"""Health checks without a cluster: the rise/fall machine, which VIPs fail, the coordinator's
book, assign_vips's ``ineligible``, each probe kind against real loopback sockets and
programs, and the health service's loops (publish recorded instead of sent)."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecluster.clusterfile import Check
from bus.roles import Principal
from node.health import HEALTHY, UNHEALTHY, UNKNOWN, CheckState, HealthBook, guarded_vips
from node.vipcore import VipSpec, assign_vips
from services.health import HealthService, probe_command, run_probe

pytestmark = pytest.mark.timeout(60)

A, B, C = "10.99.0.100", "10.99.0.101", "10.99.0.102"


# --------------------------------------------------------------------------- state machine

def feed(cs: CheckState, results: str) -> list[str]:
    """Feed 'o'/'x' results; the state after each."""
    out = []
    for i, r in enumerate(results):
        cs.record(r == "o", float(i), None if r == "o" else "down", 0.001)
        out.append(cs.state)
    return out


def test_first_result_decides_then_fall_and_rise_count_in_a_row():
    assert CheckState(3, 2).state == UNKNOWN
    assert feed(CheckState(3, 2), "o")[-1] == HEALTHY
    assert feed(CheckState(3, 2), "x")[-1] == UNHEALTHY
    s = feed(CheckState(3, 2), "oxxoxxxoox")
    assert s == [HEALTHY, HEALTHY, HEALTHY, HEALTHY, HEALTHY, HEALTHY, UNHEALTHY, UNHEALTHY, HEALTHY, HEALTHY]


def test_record_reports_only_changes_and_keeps_the_reason():
    cs = CheckState(fall=2, rise=1)
    assert cs.record(True, 1.0) == HEALTHY
    assert cs.record(False, 2.0, "refused") is None
    assert cs.record(False, 3.0, "refused again") == UNHEALTHY
    assert (cs.since, cs.last_error, cs.fails, cs.probes, cs.failures) == (3.0, "refused again", 2, 3, 2)
    assert cs.record(True, 4.0) == HEALTHY
    assert set(cs.report()) == {"state", "fails", "rises", "since", "last_error", "took"}


@given(st.integers(1, 5), st.integers(1, 5), st.lists(st.booleans(), max_size=40))
def test_state_flips_only_after_fall_or_rise_in_a_row(fall, rise, results):
    cs = CheckState(fall, rise)
    prev, run_ok, run_bad = UNKNOWN, 0, 0
    for i, ok in enumerate(results):
        run_ok, run_bad = (run_ok + 1, 0) if ok else (0, run_bad + 1)
        cs.record(ok, float(i))
        if prev == HEALTHY and cs.state == UNHEALTHY:
            assert run_bad >= fall
        if prev == UNHEALTHY and cs.state == HEALTHY:
            assert run_ok >= rise
        assert cs.state != UNKNOWN
        prev = cs.state


def test_guarded_vips_failing_and_unknown():
    checks = [Check("mta", "tcp", port=25), Check("web", "tcp", port=80, vips=(B,)),
              Check("slow", "command", command=("true",), vips=(C,))]
    keys = [A, B, C]
    assert guarded_vips(checks, {"mta": HEALTHY, "web": HEALTHY, "slow": HEALTHY}, keys) == ([], [])
    assert guarded_vips(checks, {"mta": HEALTHY, "web": UNHEALTHY, "slow": UNKNOWN}, keys) == ([B], [C])
    assert guarded_vips(checks, {"mta": UNHEALTHY}, keys) == ([A, B, C], [B, C])
    assert guarded_vips([], {}, keys) == ([], [])


# --------------------------------------------------------------------------- coordinator's book

def report(failing=(), unknown=(), seq=1):
    return {"node": "x", "seq": seq, "failing": list(failing), "unknown": list(unknown),
            "checks": {"mta": {"state": UNHEALTHY if failing else HEALTHY}}}


def test_book_fresh_failing_is_ineligible_stale_is_not():
    book = HealthBook(fresh_for=2.0, anti_flap=5.0)
    assert book.take("n1", report([A]), 10.0) is True
    assert book.take("n1", report([A], seq=2), 10.5) is False       # nothing new
    assert book.ineligible(11.0) == {A: {"n1"}}
    assert book.ineligible(13.0) == {}                              # stale: membership alone decides
    assert book.recovering(13.0) == {A: {"n1"}}                     # ...but its preference waits
    assert book.take("n1", report([A]), 13.0) is True                # fresh again: a change
    assert book.take("n1", "garbage", 13.1) is False
    assert book.table(13.2)["n1"]["failing_checks"] == ["mta"]


def test_book_recovery_starts_anti_flap():
    book = HealthBook(fresh_for=2.0, anti_flap=5.0)
    book.take("n1", report([A, B]), 0.0)
    assert book.take("n1", report([B]), 1.0) is True
    assert book.ineligible(1.5) == {B: {"n1"}}
    assert book.recovering(1.5) == {A: {"n1"}}
    book.take("n1", report([]), 2.0)
    assert book.recovering(5.9) == {A: {"n1"}, B: {"n1"}}
    assert book.recovering(6.5) == {B: {"n1"}}
    assert book.recovering(7.0) == {}
    book.forget_old(7.0)
    assert book.recovered == {}


def test_book_unknown_spares_the_current_owner():
    book = HealthBook(fresh_for=2.0, anti_flap=5.0)
    book.take("n1", report(unknown=[A, B]), 0.0)
    book.take("n2", report(unknown=[A]), 0.0)
    assert book.unknown(1.0, {A: "n1"}) == {A: {"n2"}, B: {"n1"}}


# --------------------------------------------------------------------------- assign_vips

def vip(n: int, **kw) -> VipSpec:
    return VipSpec(address=f"10.99.0.{n}/24", interface="eth0", **kw)


def test_ineligible_beats_preference_stability_and_pin():
    vips = [vip(100, preference="a")]
    run = lambda **kw: assign_vips(vips, ["a", "b", "c"], {}, set(), kw.get("pinned", {}),  # noqa: E731
                                   kw.get("current", {}), ineligible=kw.get("ineligible"))
    assert run() == {A: "a"}
    assert run(ineligible={A: {"a"}}) == {A: "b"}
    assert run(ineligible={A: {"a"}}, current={A: "c"}) == {A: "c"}
    assert run(ineligible={A: {"b"}}, pinned={A: "b"}) == {A: "a"}
    assert run(ineligible={A + "/24": {"a", "b", "c"}}) == {A: None}


def test_ineligible_applies_to_the_whole_follow_group():
    vips = [vip(100, preference="a"), vip(101, follow=A), vip(102, follow="10.99.0.101")]
    base = dict(candidates=["a", "b"], loads={}, drained=set(), pinned={}, current={})
    assert assign_vips(vips, **base) == {A: "a", B: "a", C: "a"}
    # the check fails for a follower of a follower: the whole group leaves a
    assert assign_vips(vips, **base, ineligible={C: {"a"}}) == {A: "b", B: "b", C: "b"}
    assert assign_vips(vips, **base, ineligible={C: {"a"}, A: {"b"}}) == {A: None, B: None, C: None}
    # soft avoid of a follower moves the group while another node is eligible
    assert assign_vips(vips, **base, avoid={B: {"a"}}) == {A: "b", B: "b", C: "b"}


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_an_ineligible_node_never_gets_a_vip_it_is_ineligible_for(data):
    nodes = ["a", "b", "c", "d"]
    n = data.draw(st.integers(1, 6))
    specs = []
    for i in range(n):
        follow = data.draw(st.one_of(st.none(), st.integers(0, i - 1))) if i else None
        pref = None if follow is not None else data.draw(st.one_of(st.none(), st.sampled_from(nodes)))
        specs.append(vip(10 + i, preference=pref, follow=None if follow is None else f"10.99.0.{10 + follow}"))
    keys = [s.key for s in specs]
    subsets = st.sets(st.sampled_from(nodes))
    cands = sorted(data.draw(subsets))
    ineligible = data.draw(st.dictionaries(st.sampled_from(keys), subsets))
    avoid = data.draw(st.dictionaries(st.sampled_from(keys), subsets))
    pinned = data.draw(st.dictionaries(st.sampled_from(keys), st.sampled_from(nodes)))
    current = data.draw(st.dictionaries(st.sampled_from(keys), st.sampled_from(nodes)))
    drained = data.draw(subsets)
    owners = assign_vips(specs, cands, {}, drained, pinned, current, avoid, ineligible=ineligible)
    leader = {}
    for s in specs:
        k = s.key
        while next(x for x in specs if x.key == k).follow:
            k = next(x for x in specs if x.key == k).follow
        leader[s.key] = k
    for key, owner in owners.items():
        group = [k for k in keys if leader[k] == leader[key]]
        if owner is not None:
            assert owner in cands and owner not in drained
            assert all(owner not in ineligible.get(k, ()) for k in group), (key, owner, ineligible)
        else:
            # unowned only when no node is eligible for the whole group
            assert not [x for x in cands if x not in drained
                        and all(x not in ineligible.get(k, ()) for k in group)]
    # without any health input the answer is what it always was
    assert assign_vips(specs, cands, {}, drained, pinned, current, avoid) == \
        assign_vips(specs, cands, {}, drained, pinned, current, avoid, ineligible={})


# --------------------------------------------------------------------------- the coordinator

def test_coordinator_moves_a_failing_vip_and_brings_it_back_after_anti_flap(make_cluster):
    from services.election import ElectionService
    cluster = make_cluster(3, 0, extra=f'[[vip]]\naddress = "{A}/24"\ninterface = "eth0"\npreference = "n1"\n'
                                         '[[check]]\nname = "mta"\nkind = "tcp"\nport = 2525\n')
    es = ElectionService(cluster, "n1")
    now = time.monotonic()
    es.view = {"members": {n: {"state": "alive"} for n in cluster.nodes}}
    for n in cluster.nodes:
        es.vip_status[n] = {"held": [], "_at": now}
    es.assignment["owners"] = {A: "n1"}
    assert es.compute_owners(now) == {A: "n1"}
    es.health.take("n1", report([A]), now)
    assert es.compute_owners(now) == {A: "n2"}
    es.assignment["owners"] = {A: "n2"}
    assert es.vip_table(now)[0]["unhealthy"] == ["n1"]
    es.health.take("n1", report([]), now + 1)
    assert es.compute_owners(now + 1) == {A: "n2"}                   # recovered, but anti-flap
    assert es.compute_owners(now + 1 + cluster.timing.anti_flap) == {A: "n1"}


# --------------------------------------------------------------------------- probes, for real

class Listener:
    """A loopback TCP server in a thread: ``banner`` is sent on accept (None: say nothing)."""

    def __init__(self, banner: bytes | None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.banner = banner
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            if self.banner is not None:
                try:
                    c.sendall(self.banner)
                except OSError:
                    pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def probe(check) -> tuple[bool, str | None, float]:
    return asyncio.run(run_probe(check))


def test_tcp_probe_against_a_listener_and_a_closed_port():
    srv = Listener(None)
    try:
        ok, err, took = probe(Check("t", "tcp", port=srv.port, timeout=1.0))
        assert ok and err is None and took < 1.0
    finally:
        srv.close()
    ok, err, _ = probe(Check("t", "tcp", port=closed_port(), timeout=1.0))
    assert not ok and "refused" in err.lower()


def test_smtp_probe_needs_a_220_greeting_within_the_timeout():
    good, bad, mute = Listener(b"220 mx.example ESMTP\r\n"), Listener(b"554 go away\r\n"), Listener(None)
    try:
        assert probe(Check("s", "smtp", port=good.port, timeout=1.0))[0]
        ok, err, _ = probe(Check("s", "smtp", port=bad.port, timeout=1.0))
        assert not ok and "554" in err
        t0 = time.monotonic()
        ok, err, took = probe(Check("s", "smtp", port=mute.port, timeout=0.4))
        assert not ok and "within 0.4" in err
        assert 0.35 < took < 1.5 and time.monotonic() - t0 < 2.0
        # the good server got our QUIT
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            good.conns[0].settimeout(0.5)
            try:
                if good.conns[0].recv(100).startswith(b"QUIT"):
                    break
            except OSError:
                pass
        else:
            pytest.fail("no QUIT")
    finally:
        for s in (good, bad, mute):
            s.close()


def test_command_probe_exit_status_output_and_missing_program():
    assert probe(Check("c", "command", command=("true",), timeout=2.0))[0]
    ok, err, _ = probe(Check("c", "command", command=("sh", "-c", "echo broken; exit 3"), timeout=2.0))
    assert not ok and err == "exit 3: broken"
    ok, err, _ = probe(Check("c", "command", command=("/nonexistent/check",), timeout=2.0))
    assert not ok and "cannot run" in err
    big = asyncio.run(probe_command(("sh", "-c", "head -c 100000 /dev/zero | tr '\\0' a"), 5.0))
    assert len(big) == 4096


def _pids_in_session(sid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(d))
    return out


def test_a_hanging_command_fails_at_its_timeout_and_its_whole_group_is_killed(tmp_path):
    pidfile = tmp_path / "pids"
    # a child that would outlive the shell: killpg must take it too
    argv = ("sh", "-c", f"sleep 1000 & echo $$ $! > {pidfile}; sleep 1000")
    t0 = time.monotonic()
    ok, err, took = probe(Check("c", "command", command=argv, timeout=0.5))
    assert not ok and "within 0.5" in err and took < 2.0, (err, took)
    shell, child = map(int, pidfile.read_text().split())
    deadline = time.monotonic() + 5
    while _pids_in_session(shell) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pids_in_session(shell) == [], "the command's group was not killed"
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- the service's loops

def health_service(make_cluster, checks: str) -> tuple[HealthService, list]:
    cluster = make_cluster(2, 0, extra=f'[[vip]]\naddress = "{A}/24"\ninterface = "eth0"\n'
                                        f'[[vip]]\naddress = "{B}/24"\ninterface = "eth0"\n' + checks)
    svc = HealthService(cluster, "n1")
    sent: list = []

    async def publish(topic, body):
        sent.append((time.monotonic(), topic, body))
    svc.publish = publish
    return svc, sent


def test_service_hang_is_a_failed_probe_and_status_answers_meanwhile(make_cluster):
    srv = Listener(None)
    svc, sent = health_service(make_cluster, f'''
[[check]]
name = "hang"
kind = "command"
command = ["sleep", "1000"]
interval = 0.2
timeout = 0.5
fall = 1
rise = 1
vips = ["{B}"]
[[check]]
name = "port"
kind = "tcp"
port = {srv.port}
interval = 0.1
timeout = 0.5
''')

    async def scenario():
        await svc.handle_init()
        t0 = time.monotonic()
        # status answers at once while the command hangs
        st = svc.rpc_status()
        assert st["checks"]["hang"]["state"] == UNKNOWN and st["unknown"] == [A, B]
        while not any(t == "health.status" for _, t, _ in sent):
            await asyncio.sleep(0.02)
            assert time.monotonic() - t0 < 3
        assert svc.rpc_status()["checks"]["port"]["state"] == HEALTHY
        first = next(b for _, t, b in sent if t == "health.status")
        assert first["failing"] == [B] and first["unknown"] == []
        assert first["checks"]["hang"]["state"] == UNHEALTHY
        assert any(t == "alarm.check_failed" for _, t, _ in sent)
        # the port goes away: after fall (3) failures the report says both VIPs fail
        srv.close()
        while svc.rpc_status()["failing"] != [A, B]:
            await asyncio.sleep(0.02)
            assert time.monotonic() - t0 < 5
        n = len(sent)
        await asyncio.sleep(0.05)
        assert sent[-1][2]["failing"] == [A, B] or len(sent) > n
        await svc.handle_stop()

    try:
        asyncio.run(scenario())
    finally:
        srv.close()
    m = {f["name"]: f for f in svc.rpc_metrics()}
    assert {s[0]["check"]: s[1] for s in m["ecluster_check_healthy"]["samples"]} == {"hang": 0, "port": 0}


def test_service_heartbeats_every_report_refresh(make_cluster):
    srv = Listener(None)
    svc, sent = health_service(make_cluster, f'[[check]]\nname = "p"\nkind = "tcp"\nport = {srv.port}\n'
                                             'interval = 0.1\n')

    async def scenario():
        await svc.handle_init()
        await asyncio.sleep(svc.heartbeat * 4.5)
        await svc.handle_stop()

    try:
        asyncio.run(scenario())
    finally:
        srv.close()
    times = [t for t, topic, _ in sent if topic == "health.status"]
    assert 3 <= len(times) <= 7, times
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g > svc.heartbeat * 0.8 for g in gaps), gaps
    assert [b["seq"] for _, t, b in sent if t == "health.status"] == list(range(1, len(times) + 1))


def test_no_checks_means_nothing_runs(make_cluster):
    svc, sent = health_service(make_cluster, "")

    async def scenario():
        await svc.handle_init()
        await asyncio.sleep(0.3)
        await svc.handle_stop()
    asyncio.run(scenario())
    assert sent == [] and svc.tasks == []
    assert svc.rpc_status()["checks"] == {} and svc.rpc_status()["failing"] == []


# --------------------------------------------------------------------------- shown to operators

def test_check_summary_status_vip_list_console_and_metrics(make_cluster):
    from ecluster.commands.status import add_election
    from ecluster.commands.vip import vip_rows
    from manager.console.backend import member_rows
    from node.health import check_summary
    from services.metrics import family_from_dict, render

    book = HealthBook(fresh_for=2.0, anti_flap=5.0)
    book.take("n1", report([A]), 0.0)
    book.take("n2", {"failing": [], "unknown": [A], "checks": {"mta": {"state": UNKNOWN}}}, 0.0)
    book.take("n3", report([]), -10.0)
    table = book.table(1.0)
    assert [check_summary(table.get(n)) for n in ("n1", "n2", "n3", "n4")] == \
        ["failing: mta", "starting: mta", "-", "-"]

    cluster = make_cluster(3, 1)
    rep = {"members": [{"name": n, "role": cluster.member(n).role} for n in cluster.members]}
    rep = add_election(rep, {"leader": "n2", "term": 3, "view": {"members": {}}, "health": table})
    assert {m["name"]: m.get("checks") for m in rep["members"]} == \
        {"n1": "failing: mta", "n2": "starting: mta", "n3": "-", "m1": None}
    assert rep["members"][0]["failing_vips"] == [A]

    base = {"address": f"{A}/24", "kind": "injection", "holders": [], "candidates": [], "follow": None,
            "pinned": None, "settled_for": 1.0, "state": "owned"}
    rows = vip_rows({"vips": [{**base, "owner": "n2", "preference": "n1", "unhealthy": ["n1"]},
                              {**base, "owner": "n2", "preference": None, "unhealthy": ["n3"]},
                              {**base, "owner": "n2", "preference": None}]})
    assert [(r["health"], r["unhealthy"]) for r in rows] == [("unhealthy", ["n1"]), ("ok", ["n3"]), ("ok", [])]

    assert [r["checks"] for r in member_rows(cluster, None, None, table)] == ["failing: mta", "starting: mta", "-", None]

    svc = HealthService(make_cluster(2, 0, extra='[[check]]\nname = "mta"\nkind = "smtp"\nport = 25\n', sub="h"), "n1")
    svc.states["mta"].record(False, 1.0, "refused", 0.01)
    text = render(family_from_dict(f) for f in svc.rpc_metrics())
    assert 'ecluster_check_healthy{check="mta",kind="smtp"} 0' in text
    assert 'ecluster_check_failures_total{check="mta",kind="smtp"} 1' in text
    assert "# TYPE ecluster_check_probes_total counter" in text


def test_first_report_waits_for_every_first_result_without_spinning(make_cluster):
    srv = Listener(None)
    svc, sent = health_service(make_cluster, f'''
[[check]]
name = "fast"
kind = "tcp"
port = {srv.port}
interval = 0.1
[[check]]
name = "slow"
kind = "command"
command = ["sleep", "0.6"]
timeout = 2.0
interval = 5
''')

    async def scenario():
        await svc.handle_init()
        t0 = time.process_time()
        while not sent:
            await asyncio.sleep(0.02)
        spent = time.process_time() - t0
        await svc.handle_stop()
        return spent

    try:
        cpu = asyncio.run(scenario())
    finally:
        srv.close()
    first = sent[0][2]
    assert first["checks"]["fast"]["state"] == first["checks"]["slow"]["state"] == HEALTHY
    assert first["unknown"] == [] and cpu < 0.3, cpu


def test_move_to_a_node_failing_a_check_is_refused(make_cluster):
    from services.base import ServiceError
    from services.election import LEADER, ElectionService
    cluster = make_cluster(3, 0, extra=f'[[vip]]\naddress = "{A}/24"\ninterface = "eth0"\n'
                                         f'[[vip]]\naddress = "{B}/24"\ninterface = "eth0"\nfollow = "{A}"\n'
                                         f'[[check]]\nname = "mta"\nkind = "tcp"\nport = 2525\nvips = ["{B}"]\n')
    es = ElectionService(cluster, "n1")
    now = time.monotonic()
    es.role = LEADER
    es.view = {"members": {n: {"state": "alive"} for n in cluster.nodes}}
    for n in cluster.nodes:
        es.vip_status[n] = {"held": [], "_at": now}
    es.health.take("n3", report([B]), now)          # the follower's check fails on n3
    with pytest.raises(ServiceError) as e:
        asyncio.run(es.rpc_move(A, "n3", caller=Principal("n1", "node", local=True)))
    assert e.value.code == "node_unhealthy" and "\n" not in e.value.message and B in e.value.message


def test_metrics_asks_builtins_with_a_metrics_rpc_and_leaves_out_those_not_running(make_cluster):
    from bus.client import RemoteError
    from services.metrics import MetricsService

    cluster = make_cluster(2, 0, extra='[[check]]\nname = "mta"\nkind = "tcp"\nport = 25\n')
    health = HealthService(cluster, "n1")
    health.states["mta"].record(True, 1.0, None, 0.002)
    ms = MetricsService(cluster, "n1")
    asked = []

    async def call(member, service, method, timeout=2.0, **args):
        asked.append((service, method))
        if service == "health" and method == "metrics":
            return health.rpc_metrics()
        if service == "hooks":
            raise RemoteError("no_service", "no service hooks on n1")
        raise RemoteError("no_service", f"no service {service}")
    ms.call = call

    async def scenario():
        # what handle_init does, without binding the HTTP port
        from services.base import load_service, services_for
        from services.metrics import metrics_sources
        ms.local = services_for(cluster, "n1")
        ms.plugins, ms.builtin_sources = metrics_sources(ms.local, load_service)
        return await ms.scrape()
    text = asyncio.run(scenario())
    assert "health" in ms.builtin_sources and ("health", "metrics") in asked
    assert 'ecluster_check_healthy{check="mta",kind="tcp"} 1' in text
    assert 'ecluster_service_up{service="health"} 1' in text
    assert 'service="hooks"' not in text                      # not started here: left out
    assert 'ecluster_service_up{service="vip"} 0' in text     # a core source not answering is down
