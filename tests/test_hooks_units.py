"""The hooks service (services/hooks.py): pure parts, one hook run, then a two-node loopback
cluster (VIP dry-run) with a vip hook script that logs every call.

The loopback cluster runs broker, membership, election, vip and hooks on n1 and n2; the VIPs
are loopback addresses, recorded (not plumbed). The lab test (tests/test_hooks_lab.py) checks
the timing against real plumbing.
"""
from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import zmq

from bus import envelope as ch
from bus.client import SyncClient
from conftest import Procs, make_cluster_file, short_dir, wait_until
from ecluster.clusterfile import Vip
from services.hooks import (
    MAX_QUEUED, OUTPUT_LIMIT, HookEvent, alive_members, failure_reason, hook_argv, hook_env, load_state,
    member_events, push_bounded, run_hook, vip_events,
)

VIP_A, VIP_B, VIP_OUT = "127.0.0.100", "127.0.0.101", "127.0.0.102"


# -- pure parts ---------------------------------------------------------------------------------

def test_vip_events_releases_first_then_acquires_sorted():
    assert vip_events({"10.0.0.2", "10.0.0.1"}, {"10.0.0.3", "10.0.0.1"}) == [
        ("release", "10.0.0.2"), ("acquire", "10.0.0.3")]
    assert vip_events(set(), set()) == []
    assert vip_events([], ["b", "a"]) == [("acquire", "a"), ("acquire", "b")]
    assert vip_events(["a"], []) == [("release", "a")]


def test_member_events_first_view_is_the_baseline():
    view = {"members": {"n1": {"state": "alive"}, "n2": {"state": "suspect"}, "n3": {"state": "dead"}}}
    alive = alive_members(view)
    assert alive == {"n1": True, "n2": False, "n3": False}
    assert member_events(None, alive) == []
    assert member_events(alive, {"n1": False, "n2": True, "n3": False}) == [("dead", "n1"), ("alive", "n2")]
    # appearing alive is told, appearing dead is not; leaving the view counts as dead
    assert member_events({"n1": True}, {"n1": True, "n4": True, "n5": False}) == [("alive", "n4")]
    assert member_events({"n1": True, "n2": True}, {"n1": True}) == [("dead", "n2")]
    assert alive_members("junk") is None and alive_members({"members": 3}) is None
    assert alive_members({"members": {"n1": "alive"}}) == {"n1": False}


def test_argv_and_environment():
    ev = HookEvent("vip", "acquire", "10.99.0.100/24")
    assert ev.name == "vip.acquire"
    assert hook_argv(("/bin/on-vip", "--x"), ev) == ["/bin/on-vip", "--x", "acquire", "10.99.0.100/24"]
    env = hook_env("prod", "n1", ev, Vip("10.99.0.100/24", "eth0", kind="outbound"), "/bin")
    assert env == {"PATH": "/bin", "ECLUSTER_CLUSTER": "prod", "ECLUSTER_MEMBER": "n1",
                   "ECLUSTER_EVENT": "vip.acquire", "ECLUSTER_VIP": "10.99.0.100/24",
                   "ECLUSTER_VIP_KIND": "outbound", "ECLUSTER_VIP_INTERFACE": "eth0"}
    env = hook_env("prod", "n1", HookEvent("member", "dead", "n2"))
    assert env["ECLUSTER_EVENT"] == "member.dead" and "ECLUSTER_VIP" not in env and env["PATH"]


def test_failure_reasons():
    assert failure_reason(0, False, None, 10) is None
    assert failure_reason(3, False, None, 10) == "exit status 3"
    assert failure_reason(-9, True, None, 2.5) == "timed out after 2.5 s (process group killed)"
    assert failure_reason(-15, False, None, 10) == "killed by SIGTERM"
    assert failure_reason(None, False, "No such file or directory", 10).startswith("cannot start: No such")


def test_a_full_queue_drops_the_oldest():
    q: collections.deque = collections.deque()
    for i in range(MAX_QUEUED):
        assert push_bounded(q, i, MAX_QUEUED) is None
    assert push_bounded(q, "new", MAX_QUEUED) == 0
    assert len(q) == MAX_QUEUED and q[0] == 1 and q[-1] == "new"


def test_state_file_text():
    assert load_state(None) == {"vips_told": None, "config_told": None}
    assert load_state("not json") == {"vips_told": None, "config_told": None}
    assert load_state('{"vips_told": ["b", "a"], "config_told": "abc"}') == {"vips_told": ["a", "b"],
                                                                             "config_told": "abc"}
    assert load_state('{"vips_told": [1], "config_told": 2}') == {"vips_told": None, "config_told": None}


# -- one run ------------------------------------------------------------------------------------

def run(coro):
    return asyncio.run(coro)


def test_run_hook_captures_output_and_exit_status(tmp_path):
    env = {"PATH": os.environ["PATH"], "X": "1"}
    r = run(run_hook(["sh", "-c", 'echo out; echo err >&2; echo "X=$X"; exit 3'], env, 5, str(tmp_path)))
    assert r.returncode == 3 and not r.timed_out and r.start_error is None
    assert r.output.decode().split() == ["out", "err", "X=1"]
    r = run(run_hook(["sh", "-c", f"head -c {OUTPUT_LIMIT * 3} /dev/zero"], env, 5, None))
    assert r.returncode == 0 and len(r.output) == OUTPUT_LIMIT and r.truncated


def test_run_hook_kills_the_whole_group_at_the_timeout(tmp_path):
    pidfile = tmp_path / "child.pid"
    env = {"PATH": os.environ["PATH"]}
    t0 = time.monotonic()
    r = run(run_hook(["sh", "-c", f"sleep 1000 & echo $! > {pidfile}; wait"], env, 0.5, None))
    took = time.monotonic() - t0
    assert r.timed_out and r.returncode == -signal.SIGKILL and 0.5 <= took < 5
    child = int(pidfile.read_text())
    wait_until(lambda: not Path(f"/proc/{child}").exists() or
               Path(f"/proc/{child}/stat").read_text().split(")")[1].split()[0] == "Z",
               timeout=5, what="the hook's child killed too")


def test_run_hook_missing_program():
    r = run(run_hook(["/nonexistent/hook", "acquire", "x"], {"PATH": "/bin"}, 5, None))
    assert r.start_error and r.returncode is None
    assert failure_reason(r.returncode, r.timed_out, r.start_error, 5).startswith("cannot start")


def test_a_background_child_does_not_hold_the_run_up(tmp_path):
    env = {"PATH": os.environ["PATH"]}
    pidfile = tmp_path / "bg.pid"
    t0 = time.monotonic()
    r = run(run_hook(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; echo started"], env, 10, None))
    assert r.returncode == 0 and time.monotonic() - t0 < 5 and b"started" in r.output
    os.kill(int(pidfile.read_text()), signal.SIGKILL)    # ours: started by this test's hook


# -- over the bus -------------------------------------------------------------------------------

NODES = ("n1", "n2")
SERVICES = ("membership", "election", "vip", "hooks")
HOOK_TIMEOUT = 2.0


class HooksLab:
    def __init__(self, cluster, procs: Procs, logdir: Path):
        self.cluster = cluster
        self.procs = procs
        self.logdir = logdir
        self.hooks_proc: dict[str, object] = {}

    def call(self, member: str, service: str, method: str, timeout: float = 2.0, **args):
        with SyncClient(self.cluster, via=member) as c:
            return c.call(member, service, method, timeout=timeout, **args)

    def lines(self, node: str) -> list[list[str]]:
        f = self.logdir / f"{node}.log"
        return [ln.split() for ln in f.read_text().splitlines()] if f.exists() else []

    def calls(self, node: str) -> list[tuple[str, str]]:
        return [(ln[0], ln[1]) for ln in self.lines(node)]

    def start_hooks(self, node: str):
        self.hooks_proc[node] = self.procs.start(["service", "run", "hooks", "-c", self.cluster.path, "-m", node],
                                                 name=f"hooks-{node}")

    def held(self, node: str) -> list[str]:
        return self.call(node, "vip", "status")["held"]

    def idle(self) -> bool:
        """Every VIP where it belongs and each node's vip hooks told of it, nothing queued or running."""
        want = {"n1": [VIP_A, VIP_OUT], "n2": [VIP_B]}
        for node, vips in want.items():
            st = self.call(node, "hooks", "status", timeout=1.0)
            vip = st["kinds"]["vip"]
            if st["vips_told"] != vips or vip["queued"] or vip["running"]:
                return False
        return True


HOOK_SCRIPT = """#!/bin/sh
# test vip hook: one line per call; hangs while {logdir}/hang exists
echo "$1 $2 $ECLUSTER_VIP_KIND $ECLUSTER_VIP_INTERFACE $ECLUSTER_EVENT $ECLUSTER_MEMBER $ECLUSTER_CLUSTER $(date +%s.%N)" \
    >> {logdir}/$ECLUSTER_MEMBER.log
if [ -e {logdir}/hang ]; then
    echo $$ > {logdir}/hung.pid
    sleep 1000
fi
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("hooks")
    root = short_dir()
    procs = Procs(base / "logs")
    logdir = base / "hooklog"
    logdir.mkdir()
    script = base / "on-vip"
    script.write_text(HOOK_SCRIPT.format(logdir=logdir))
    script.chmod(0o755)
    extra = f"""
[[vip]]
address = "{VIP_A}/8"
interface = "lo"
preference = "n1"

[[vip]]
address = "{VIP_B}/8"
interface = "lo"
preference = "n2"

[[vip]]
address = "{VIP_OUT}/8"
interface = "lo"
preference = "n1"
kind = "outbound"

[hooks]
vip = "{script}"
timeout = {HOOK_TIMEOUT}
"""
    try:
        cluster = make_cluster_file(base / "c", 2, 0, extra=extra, data_root=root)
        lab = HooksLab(cluster, procs, logdir)
        for n in NODES:
            procs.start(["bus", "run", "-c", cluster.path, "-m", n], name=f"bus-{n}")
            for s in SERVICES:
                if s == "hooks":
                    lab.start_hooks(n)
                else:
                    procs.start(["service", "run", s, "-c", cluster.path, "-m", n], name=f"{s}-{n}")
        # the net state told (a start-up reshuffle may have told more before it)
        wait_until(lambda: lab.call("n1", "hooks", "status", timeout=1.0)["vips_told"] == [VIP_A, VIP_OUT],
                   timeout=40, what="n1's hooks told of its VIPs")
        wait_until(lambda: lab.call("n2", "hooks", "status", timeout=1.0)["vips_told"] == [VIP_B], timeout=20,
                   what="n2's hook told of its VIP")
        yield lab
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


pytestmark_bus = pytest.mark.timeout(120)


@pytestmark_bus
def test_every_call_has_its_environment(lab):
    by_vip = {ln[1]: ln for ln in lab.lines("n1")}
    action, vip, kind, interface, event, member, cluster, _ = by_vip[f"{VIP_OUT}/8"]
    assert (action, kind, interface, event, member, cluster) == ("acquire", "outbound", "lo", "vip.acquire", "n1",
                                                                  lab.cluster.name)
    assert by_vip[f"{VIP_A}/8"][2] == "injection"
    st = lab.call("n1", "hooks", "status")
    assert st["kinds"]["vip"]["counters"]["ok"] >= 2 and st["vips_told"] == [VIP_A, VIP_OUT]
    assert by_vip[f"{VIP_A}/8"][0] == "acquire"
    assert st["kinds"]["member"]["argv"] == []


@pytestmark_bus
def test_a_move_gives_release_on_the_old_owner_and_acquire_on_the_new(lab):
    wait_until(lab.idle, timeout=20, what="the hooks of the tests before done")
    n1, n2 = len(lab.lines("n1")), len(lab.lines("n2"))
    lab.call(coordinator(lab), "election", "move", vip=VIP_A, node="n2")
    try:
        wait_until(lambda: lab.calls("n1")[n1:] == [("release", f"{VIP_A}/8")], timeout=10, what="release on n1")
        wait_until(lambda: lab.calls("n2")[n2:] == [("acquire", f"{VIP_A}/8")], timeout=10, what="acquire on n2")
    finally:
        lab.call(coordinator(lab), "election", "unpin", vip=VIP_A)
    wait_until(lambda: lab.calls("n1")[n1:] == [("release", f"{VIP_A}/8"), ("acquire", f"{VIP_A}/8")], timeout=20,
               what="acquire on n1 after the unpin")
    wait_until(lambda: lab.calls("n2")[n2:] == [("acquire", f"{VIP_A}/8"), ("release", f"{VIP_A}/8")], timeout=10,
               what="release on n2 after the unpin")


@pytestmark_bus
def test_a_restart_of_the_hooks_service_repeats_nothing_and_tells_what_it_missed(lab):
    wait_until(lab.idle, timeout=20, what="the hooks of the tests before done")
    n1 = len(lab.lines("n1"))
    lab.procs.stop(lab.hooks_proc["n1"], sig=signal.SIGKILL)
    lab.call(coordinator(lab), "election", "move", vip=VIP_A, node="n2")       # while n1's hooks service is down
    try:
        wait_until(lambda: VIP_A not in lab.held("n1") and VIP_A in lab.held("n2"), timeout=10, what="the move")
        lab.start_hooks("n1")
        wait_until(lambda: lab.call("n1", "hooks", "status", timeout=1.0)["vips_told"] == [VIP_OUT], timeout=20,
                   what="n1's restarted hooks service catches up")
        # only the release it missed: no repeated acquire of VIP_OUT, held all along
        assert lab.calls("n1")[n1:] == [("release", f"{VIP_A}/8")]
    finally:
        lab.call(coordinator(lab), "election", "unpin", vip=VIP_A)
    wait_until(lambda: lab.calls("n1")[n1:] == [("release", f"{VIP_A}/8"), ("acquire", f"{VIP_A}/8")], timeout=20,
               what="acquire on n1 after the unpin")


@pytestmark_bus
def test_a_hung_hook_is_killed_at_its_timeout_and_alarmed_and_holds_nothing_up(lab):
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"alarm.hook_failed")
    sub.connect(lab.cluster.member("n2").ipc_pub)
    hang = lab.logdir / "hang"
    wait_until(lab.idle, timeout=20, what="the hooks of the tests before done")
    n2 = len(lab.lines("n2"))
    hang.touch()
    try:
        time.sleep(0.2)        # the SUB connection settles (a slow joiner would miss the alarm)
        lab.call(coordinator(lab), "election", "move", vip=VIP_A, node="n2")
        # the move completes and the hooks service answers while its hook hangs
        wait_until(lambda: VIP_A in lab.held("n2"), timeout=10, what="n2 holds the VIP")
        running = wait_until(lambda: lab.call("n2", "hooks", "status", timeout=1.0)["kinds"]["vip"]["running"],
                             timeout=5, what="the hook running")
        assert running["event"] == "vip.acquire" and running["subject"] == f"{VIP_A}/8"
        hung = int(wait_until(lambda: (lab.logdir / "hung.pid").read_text().strip(), timeout=5, what="hung pid"))
        t0 = time.monotonic()
        alarm = None
        while alarm is None and time.monotonic() - t0 < HOOK_TIMEOUT + 10:
            if sub.poll(100):
                topic, data = sub.recv_multipart()
                body = ch.unpack(data).body
                if body.get("member") == "n2":      # n1's release hook hangs too (one hang file)
                    alarm = body
        assert alarm is not None, "no alarm.hook_failed"
        assert alarm["hook"] == "vip" and alarm["event"] == "vip.acquire" and "timed out" in alarm["reason"]
        wait_until(lambda: not Path(f"/proc/{hung}").exists(), timeout=5, what="the hung hook killed and reaped")
        st = lab.call("n2", "hooks", "status")["kinds"]["vip"]
        assert st["counters"]["timeouts"] == 1 and st["last"]["result"] == "failed" and st["running"] is None
        assert lab.calls("n2")[n2:] == [("acquire", f"{VIP_A}/8")]
    finally:
        hang.unlink()
        sub.close(0)
        lab.call(coordinator(lab), "election", "unpin", vip=VIP_A)
    wait_until(lambda: VIP_A in lab.held("n1"), timeout=20, what="the VIP back on n1")


@pytestmark_bus
def test_metrics_are_prometheus_families(lab):
    from services.metrics import family_from_dict, render

    fams = [family_from_dict(d) for d in lab.call("n1", "hooks", "metrics")]
    text = render(fams)
    assert 'ecluster_hooks_runs_total{member="n1",hook="vip",result="ok"}' in text
    assert "ecluster_hooks_queued" in text


# -- the service's own bookkeeping, without a bus -------------------------------------------------

def test_the_service_drops_the_oldest_run_and_alarms_once(make_cluster):
    from services.hooks import HooksService

    cluster = make_cluster(1, extra=f'[[vip]]\naddress = "{VIP_A}/8"\ninterface = "lo"\n[hooks]\nvip = "/bin/true"\n')
    svc = HooksService(cluster, "n1")
    alarms = []

    async def alarm(kind, message, **details):
        alarms.append((kind, details))

    svc.alarm = alarm

    async def scenario():
        svc.vips_known = set()
        for i in range(MAX_QUEUED + 5):
            svc._vips_now({"injection": (VIP_A,) if i % 2 == 0 else (), "outbound": ()})
        await asyncio.sleep(0)           # the alarm task
        return svc.rpc_status()["kinds"]["vip"]

    st = asyncio.run(scenario())
    assert st["queued"] == MAX_QUEUED and st["counters"]["dropped"] == 5
    assert st["waiting"][0] == f"release {VIP_A}/8"       # the oldest five went (acquire, release, ...)
    assert [k for k, _ in alarms] == ["hook_queue_full"]      # once, not five times
    assert svc.vips_told == {VIP_A}                           # dropped runs count as told


def test_a_missing_program_or_a_failing_hook_raises_hook_failed(make_cluster, tmp_path):
    from services.hooks import HooksService

    cluster = make_cluster(1, extra='[hooks]\nmember = "/nonexistent/on-member"\nconfig = ["sh", "-c", "exit 4"]\n')
    svc = HooksService(cluster, "n1")
    alarms = []

    async def alarm(kind, message, **details):
        alarms.append((kind, details))

    svc.alarm = alarm

    async def scenario():
        await svc._run(svc.kinds["member"], HookEvent("member", "dead", "n2"))
        await svc._run(svc.kinds["config"], HookEvent("config", "applied", "a" * 40))

    asyncio.run(scenario())
    (k1, d1), (k2, d2) = alarms
    assert k1 == k2 == "hook_failed"
    assert (d1["hook"], d1["event"], d1["subject"]) == ("member", "member.dead", "n2")
    assert d1["reason"].startswith("cannot start")
    assert (d2["hook"], d2["event"], d2["reason"]) == ("config", "config.applied", "exit status 4")
    st = svc.rpc_status()["kinds"]
    assert st["member"]["counters"]["not_started"] == 1 and st["config"]["last"]["returncode"] == 4


def coordinator(lab) -> str:
    """The coordinator now: a node's own key may not move or unpin VIPs (bus.roles), the
    coordinator's own call may."""
    return lab.call("n1", "election", "status")["leader"]
