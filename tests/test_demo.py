"""``ecluster demo``: the pure plan, then one whole run (namespace mode as root, else loopback)."""
from __future__ import annotations

import http.cookiejar
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from conftest import CLI, short_dir, wait_until
from ecluster.clusterfile import parse_cluster
from ecluster.labnet import pids_in_namespaces
from ecluster.demo import (LOOPBACK, NAMESPACES, choose_mode, cluster_text, demo_argv_matches, make_plan,
                           matching_pids, member_argv, member_argv_matches, tally)

pytestmark = pytest.mark.timeout(300)


def test_mode_choice():
    assert choose_mode(0, True, False) == NAMESPACES
    assert choose_mode(0, False, False) == LOOPBACK
    assert choose_mode(0, True, True) == LOOPBACK
    assert choose_mode(1000, True, False) == LOOPBACK


@pytest.mark.parametrize("mode", [NAMESPACES, LOOPBACK])
def test_plan_is_a_valid_cluster(mode, tmp_path):
    plan = make_plan(mode, tmp_path)
    c = parse_cluster(cluster_text(plan), plan.cluster_path)
    assert list(c.nodes) == ["n1", "n2", "n3"] and list(c.managers) == ["m1"]
    assert [v.ip for v in c.vips] == plan.vip_ips and all(v.kind == "injection" for v in c.vips)
    assert c.vip_dry_run is (mode == LOOPBACK)
    assert c.services["smtp"]["port"] == plan.smtp_port
    assert "smtplog" in c.section("jlog")["logs"]
    assert c.member("n1").data_dir == tmp_path / "n1"
    assert set(plan.sources).isdisjoint(plan.addresses.values()) and set(plan.sources).isdisjoint(plan.vip_ips)


def test_process_matching_is_precise():
    wd = Path("/tmp/ecluster-demo-0")
    plan = make_plan(LOOPBACK, wd)
    runner = member_argv("/venv/bin/python", plan, "n1")
    sup = ["python", "supervisord", "-n", "-c", "/tmp/ecluster-demo-0/n1/run/supervisord.conf"]
    svc = ["python", "-m", "ecluster.cli", "service", "run", "vip", "--config", str(plan.cluster_path), "--member", "n1"]
    other = ["python", "-m", "ecluster.cli", "service", "run", "vip", "--config", str(plan.cluster_path), "--member", "n2"]
    for argv in (runner, sup, svc):
        assert member_argv_matches(argv, wd, "n1")
    assert not member_argv_matches(other, wd, "n1")
    assert not member_argv_matches(["ecluster", "demo", "--dir", str(wd), "kill", "n1"], wd, "n1")
    assert not demo_argv_matches(["ecluster", "demo", "--dir", str(wd)], wd)       # the demo itself
    assert not demo_argv_matches(["x", "/tmp/ecluster-demo-01/cluster.toml"], wd)  # a sibling directory
    assert tally([{"result": "accepted", "attempts": 2}, {"result": "refused"}]) == \
        Counter({"accepted": 1, "refused": 1, "retried": 1})


def test_demo_kill_without_a_demo_is_one_line(tmp_path):
    p = subprocess.run([*CLI, "demo", "kill", "n1", "--dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 1
    assert p.stderr.strip() == f"ecluster: no demo is running in {tmp_path} (start one with: ecluster demo)"


def _namespaces() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def test_demo_runs_mail_flows_and_everything_is_removed():
    workdir = short_dir("ecld") / "demo"
    log = workdir.parent / "demo.out"
    before_ns = _namespaces()
    demo = None
    try:
        with open(log, "w") as out:
            demo = subprocess.Popen([*CLI, "demo", "--duration", "25", "--dir", str(workdir), "--keep"],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "COLUMNS": "200"})
        wait_until(lambda: "ecluster demo is running" in log.read_text() or demo.poll() is not None,
                   timeout=200, interval=0.5, what="the demo up")
        assert demo.poll() is None, log.read_text()[-3000:]

        # the web console answers at the printed address (relayed from the host in namespace mode)
        m = re.search(r"web console:\s+(http://\S+)", log.read_text())
        if m:
            jar = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
            with jar.open(m.group(1), timeout=10) as r:
                assert r.status == 200 and b"<html" in r.read()

        # a second demo on the same directory refuses; `demo kill` kills one member
        p = subprocess.run([*CLI, "demo", "--dir", str(workdir)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and f"a demo already runs in {workdir}" in p.stdout + p.stderr, p
        state = json.loads((workdir / "demo.json").read_text())
        p = subprocess.run([*CLI, "demo", "kill", "n3", "--dir", str(workdir)], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and p.stdout.startswith("killed "), p
        if state["namespaces"]["n3"]:
            assert pids_in_namespaces([state["namespaces"]["n3"]]) == []
        assert matching_pids(lambda argv: member_argv_matches(argv, workdir, "n3")) == []

        assert demo.wait(timeout=120) == 0, log.read_text()[-3000:]
        out = log.read_text()
        mode = NAMESPACES if os.geteuid() == 0 and shutil.which("ip") else LOOPBACK
        assert ("namespace mode:" if mode == NAMESPACES else "loopback mode (") in out
        assert "what to try" in out and "removed everything" in out

        # mail flowed: every message the client saw accepted is in exactly one node's spool
        results = [json.loads(line) for line in (workdir / "mail.jsonl").read_text().splitlines()]
        accepted = [r["id"] for r in results if r["result"] == "accepted"]
        assert len(accepted) >= 20, Counter(r["result"] for r in results)
        assert any(r["result"] == "refused" for r in results)        # 1 in 10 goes to a refused domain
        spooled = Counter()
        for n in ("n1", "n2", "n3"):
            spooled.update(f.stem for f in (workdir / n / "spool").glob("*.eml"))
        assert all(spooled[i] == 1 for i in accepted), "an accepted message is missing or spooled twice"
        assert len(spooled) - len(accepted) <= 1       # at most the one in flight at the stop
        assert len({i.split("-")[1] for i in accepted}) >= 2        # both VIPs, two nodes

        # nothing left: processes, namespaces, lab markers
        assert matching_pids(lambda argv: demo_argv_matches(argv, workdir)) == []
        ours = set(filter(None, [*state["namespaces"].values(), state["client_ns"]]))
        assert not (_namespaces() - before_ns) & ours
        if state["client_ns"]:
            assert not Path(f"/run/ecluster-lab/{state['client_ns'][:-2]}.pid").exists()
    finally:
        if demo is not None and demo.poll() is None:
            demo.send_signal(signal.SIGINT)           # the demo's own clean-up
            try:
                demo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                demo.kill()
        shutil.rmtree(workdir.parent, ignore_errors=True)
