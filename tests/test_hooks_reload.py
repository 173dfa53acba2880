"""Reload that reloads, on a real member without root: one node under ``ecluster node run``
(supervisord, every service of the member in its own process, VIP dry-run) on loopback.

A configuration commit made with the real CLI must reach every service process of the
member as ``handle_reload(rev)`` (``ping`` answers ``reloads`` and ``last_reload_rev``),
and run the config hook once with the revision. The namespace lab test
(tests/test_hooks_lab.py) checks the same on every member of a 4-member cluster.
"""
from __future__ import annotations

import pytest

from bus.client import SyncClient
from conftest import run_cli, wait_until
from services.base import services_for

pytestmark = pytest.mark.timeout(180)


def call(cluster, service: str, method: str, timeout: float = 2.0, **args):
    with SyncClient(cluster, via="n1") as c:
        return c.call("n1", service, method, timeout=timeout, **args)


def test_a_commit_reaches_every_service_of_the_member_and_the_config_hook(make_cluster, procs, tmp_path):
    log = tmp_path / "config-hook.log"
    hook = tmp_path / "on-config"
    hook.write_text(f'#!/bin/sh\necho "$1 $2 $ECLUSTER_EVENT $ECLUSTER_MEMBER" >> {log}\n')
    hook.chmod(0o755)
    cluster = make_cluster(1, extra=f'[[vip]]\naddress = "127.0.0.100/8"\ninterface = "lo"\n\n'
                                    f'[hooks]\nconfig = "{hook}"\n')
    names = services_for(cluster, "n1")
    assert "hooks" in names
    procs.start(["node", "run", "-c", cluster.path, "--node", "n1"], name="node-n1")
    for svc in names:
        wait_until(lambda: call(cluster, svc, "ping", timeout=1.0), timeout=60, what=f"{svc} answers")
    wait_until(lambda: call(cluster, "configsync", "head", timeout=1.0).get("coordinator"), timeout=30,
               what="a configuration coordinator")

    r = run_cli(["config", "bootstrap", "-c", cluster.path, "--member", "n1"], timeout=60)
    assert r.returncode == 0, r.stderr
    head = call(cluster, "configsync", "head")["head"]
    conf = cluster.member("n1").data_dir / "conf" / "global"
    wait_until(lambda: conf.is_dir(), timeout=20, what="the bootstrap applied")
    (conf / "relay.toml").write_text('domains = ["example.org"]\n')
    r = run_cli(["config", "commit", "-c", cluster.path, "--member", "n1", "-m", "relay", "--add-all"], timeout=60)
    assert r.returncode == 0, r.stderr
    rev = call(cluster, "configsync", "head")["head"]
    assert rev != head

    for svc in names:
        ping = wait_until(lambda: (lambda p: p if p["last_reload_rev"] == rev else None)(
            call(cluster, svc, "ping")), timeout=20, what=f"{svc} reloaded {rev[:12]}")
        assert ping["reloads"] >= 1
    wait_until(lambda: log.exists() and f"applied {rev} config.applied n1" in log.read_text().splitlines(),
               timeout=20, what="the config hook told of the commit")
    # once per revision: the commit's line is there once
    assert log.read_text().splitlines().count(f"applied {rev} config.applied n1") == 1
    # the hooks service's families reach the member's Prometheus endpoint
    import urllib.request
    m = cluster.member("n1")

    def scrape():
        with urllib.request.urlopen(f"http://{m.address}:{m.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()
    wait_until(lambda: 'ecluster_hooks_runs_total{member="n1",hook="config",result="ok"}' in scrape(), timeout=15,
               what="hooks families in the scrape")
