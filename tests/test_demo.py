"""``ecluster demo``: the pure plan, then one whole run (namespace mode as root, else loopback),
and one with ``--mta postfix`` (root only)."""
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
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import CLI, short_dir, wait_until
from ecluster.clusterfile import parse_cluster
from ecluster.labnet import pids_in_namespaces
from ecluster.demo import (LOOPBACK, MTAS, NAMESPACES, DemoUsageError, choose_mode, cluster_text,
                           demo_argv_matches, make_plan, matching_pids, member_argv, member_argv_matches, refusal,
                           tally)

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


def test_postfix_plan_is_a_valid_cluster(tmp_path):
    plan = make_plan(NAMESPACES, tmp_path, mta="postfix")
    c = parse_cluster(cluster_text(plan), plan.cluster_path)
    assert "smtp" not in c.services and c.services["postfix"]["domains"] == ["example.com"]
    assert plan.client_net in c.services["postfix"]["mynetworks"]
    [check] = c.checks
    assert (check.kind, check.port, check.interval, check.timeout, check.fall, check.rise) == \
        ("smtp", 25, 0.5, 2.0, 3, 2)
    assert list(check.vips) == plan.vip_ips
    assert plan.smtp_port == 25 and make_plan(LOOPBACK, tmp_path, mta="postfix").smtp_port == 25


def test_postfix_refusals():
    postfix = MTAS["postfix"]
    root = short_dir("ecpf")
    try:
        root.chmod(0o711)                            # /tmp lets others pass, so does root now
        assert refusal(postfix, NAMESPACES, root / "demo", {"postfix"}) is None
        e = refusal(postfix, LOOPBACK, root / "demo", {"postfix"})
        assert isinstance(e, DemoUsageError) and e.code == 2 and "needs network namespaces" in str(e)
        e = refusal(replace(postfix, binary="/nonexistent/sbin/postfix"), NAMESPACES, root / "demo", {"postfix"})
        assert e.code == 1 and str(e) == ("Postfix is not installed (/nonexistent/sbin/postfix is missing): "
                                          "apt-get install postfix (or `make setup`)")
        assert "pip install -e plugins/ecluster_postfix" in str(refusal(postfix, NAMESPACES, root / "demo", {"smtp"}))
        closed = root / "closed"
        closed.mkdir(mode=0o700)
        assert f"{closed} does not let others pass (chmod o+x {closed}" in str(
            refusal(postfix, NAMESPACES, closed / "demo", {"postfix"}))
        assert refusal(MTAS["smtp"], LOOPBACK, closed / "demo", {"smtp"}) is None
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_demo_postfix_on_loopback_is_refused(tmp_path):
    # --loopback always; without root the demo cannot use namespaces either
    for extra in (["--loopback"], [] if os.geteuid() != 0 else ["--loopback"]):
        p = subprocess.run([*CLI, "demo", "--mta", "postfix", "--dir", str(tmp_path / "demo"), *extra],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, p
        assert p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith("ecluster: --mta postfix needs network namespaces (root"), p.stderr
        assert not (tmp_path / "demo").exists()


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


def _pids_with_cwd_inside(workdir: Path) -> list[int]:
    """Processes working in the demo's directory: Postfix's master and daemons (in its queue)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and os.readlink(d / "cwd").startswith(f"{workdir}/"):
                out.append(int(d.name))
        except OSError:
            pass
    return out


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="--mta postfix needs root and iproute2 "
                    "(network namespaces)")
@pytest.mark.skipif(not os.path.exists(MTAS["postfix"].binary),
                    reason="Debian's postfix is not installed (make setup installs it)")
def test_demo_with_postfix_delivers_into_maildirs_and_everything_is_removed():
    root = short_dir("ecpf")
    root.chmod(0o711)                 # Postfix's users (postfix, nobody) pass through to the data dirs
    workdir = root / "demo"
    log = root / "demo.out"
    before_ns = _namespaces()
    demo = None
    try:
        with open(log, "w") as out:
            demo = subprocess.Popen([*CLI, "demo", "--mta", "postfix", "--duration", "10", "--dir", str(workdir),
                                     "--keep"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "COLUMNS": "200"})
        wait_until(lambda: "ecluster demo is running" in log.read_text() or demo.poll() is not None,
                   timeout=200, interval=0.5, what="the demo up")
        assert demo.poll() is None, log.read_text()[-3000:]
        state = json.loads((workdir / "demo.json").read_text())
        assert "[services.postfix]" in (workdir / "cluster.toml").read_text()
        assert workdir.stat().st_mode & 0o777 == 0o711
        assert _pids_with_cwd_inside(workdir), "no Postfix runs in the demo's data directories"

        assert demo.wait(timeout=120) == 0, log.read_text()[-3000:]
        out = log.read_text()
        assert "waiting for Postfix to listen on the VIPs" in out and "removed everything" in out
        assert f"{workdir}/n1/mail/example.com/new/" in out and f"{workdir}/n1/postfix/log/maillog" in out
        assert "port 25" in out

        # every message the client saw accepted (250 queued) is in exactly one node's Maildir,
        # but for those still queued when the demo stopped
        results = [json.loads(line) for line in (workdir / "mail.jsonl").read_text().splitlines()]
        accepted = {r["n"] for r in results if r["result"] == "accepted"}
        # mail flowed (a rate is not what is checked: 40+ on a quiet box, 12 seen under CI load)
        assert len(accepted) >= 8, Counter(r["result"] for r in results)
        delivered: Counter = Counter()
        where = set()
        for n in ("n1", "n2", "n3"):
            for f in (workdir / n / "mail" / "example.com" / "new").glob("*"):
                m = re.search(rb"^Message-ID: <demo\.(\d+)\.", f.read_bytes(), re.M | re.I)
                assert m, f
                delivered[int(m.group(1))] += 1
                where.add(n)
        assert set(delivered) <= accepted and max(delivered.values()) == 1, "a message was delivered twice"
        assert len(accepted) - len(delivered) <= 3, sorted(accepted - set(delivered))
        assert len(where) >= 2                               # both VIPs, two nodes
        assert (workdir / "n1" / "postfix" / "log" / "maillog").stat().st_size > 0

        # nothing left: processes (Postfix's too), namespaces
        assert matching_pids(lambda argv: demo_argv_matches(argv, workdir)) == []
        assert _pids_with_cwd_inside(workdir) == []
        ours = set(filter(None, [*state["namespaces"].values(), state["client_ns"]]))
        assert ours and not (_namespaces() - before_ns) & ours
    finally:
        if demo is not None and demo.poll() is None:
            demo.send_signal(signal.SIGINT)           # the demo's own clean-up
            try:
                demo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                demo.kill()
        shutil.rmtree(root, ignore_errors=True)
