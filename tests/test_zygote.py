"""node.zygote: supervisord forking a member's programs from pages imported once.

The pure parts (which exec is ours, which services a conf runs), the preload (never the
admin CLI's stack), and a real member under it: every program is supervisord's own child,
titled with its program's command line, sharing pages with supervisord; supervisord
restarts a killed one; and when supervisord itself is killed -9, every program goes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import xmlrpc.client

import pytest

from conftest import alive, wait_until
from node.supervisor import conf_path, socket_path, supervisor_conf
from node.zygote import our_program, services_in

pytestmark = pytest.mark.timeout(90)
PY = sys.executable


def test_only_our_programs_run_forked():
    run = ["-m", "node.program", "--keys", "/k", "service", "run", "vip", "--config", "/c", "--member", "n1"]
    assert our_program(PY, [PY, *run], PY) == run[2:]
    assert our_program(PY, [PY, "-m", "node.program", "bus", "run", "-c", "/c", "-m", "n1"], PY) == \
        ["bus", "run", "-c", "/c", "-m", "n1"]
    assert our_program("/usr/bin/python3.9", ["/usr/bin/python3.9", *run], PY) is None   # another python
    assert our_program(PY, [PY, "-m", "node.program", "member", "run", "-c", "/c", "-m", "n1"], PY) is None
    assert our_program(PY, [PY, "-m", "other", "service", "run", "x"], PY) is None
    assert our_program("/usr/sbin/postfix", ["/usr/sbin/postfix", "start-fg"], PY) is None
    assert our_program(PY, [PY, "-m", "node.program"], PY) is None


def test_services_in_reads_the_conf_we_write(make_cluster):
    cluster = make_cluster(1)
    text = supervisor_conf(cluster, "n1", services=["membership", "vip", "odd%name"])
    assert services_in(text) == ["membership", "vip", "odd%name"]
    assert services_in("[program:x]\ncommand=/bin/true\n") == []


def test_preload_imports_the_services_but_never_the_cli(make_cluster):
    cluster = make_cluster(1)
    text = supervisor_conf(cluster, "n1", services=["membership", "election", "vip", "jlog"])
    probe = ("import sys\nfrom node.zygote import preload\nloaded = preload(sys.stdin.read())\n"
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('typer', 'rich', 'click') "
             "or m.startswith(('ecluster.cli', 'ecluster.commands')))\n"
             "print(','.join(loaded)); print(','.join(bad) or '-')\n"
             "print(all(m in sys.modules for m in ('services.vip', 'services.election', 'bus.broker')))\n")
    r = subprocess.run([PY, "-c", probe], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded, bad, present = r.stdout.split()
    assert loaded == "membership,election,vip,jlog"
    assert bad == "-", f"the admin CLI's stack was imported: {bad}"
    assert present == "True"


def program_pids(member) -> dict[str, int]:
    from supervisor.xmlrpc import SupervisorTransport
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(
        None, None, f"unix://{socket_path(member)}"))
    return {p["name"]: p["pid"] for p in proxy.supervisor.getAllProcessInfo() if p["statename"] == "RUNNING"}


def rollup(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def test_a_member_runs_forked_shares_pages_restarts_and_dies_with_supervisord(make_cluster, procs):
    cluster = make_cluster(1, preset="fast")
    member = cluster.member("n1")
    runner = procs.start(["node", "run", "-c", cluster.path, "--node", "n1"], name="node-n1")
    wait_until(lambda: conf_path(member).exists(), timeout=20, what="supervisord.conf written")
    expected = {"broker", *services_in(conf_path(member).read_text())}
    pids = wait_until(lambda: (p := program_pids(member)) and set(p) >= expected and p,
                      timeout=40, what="every program RUNNING")
    assert {"broker", "membership", "election", "vip", "control"} <= set(pids)
    for name, pid in pids.items():
        # supervisord's own child (the runner became supervisord: one process fewer)
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        assert ppid == runner.pid, f"{name} (pid {pid}) is not supervisord's child"
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode()
        word = "bus run" if name == "broker" else f"service run {name}"
        assert "node.program" in title and word in title, f"{name}: {title!r}"
        # forked, not exec'd: most of what it maps it shares with supervisord
        mem = rollup(pid)
        assert mem["Shared_Dirty"] > mem["Private_Dirty"] / 2, f"{name}: {mem}"

    # supervisord restarts a killed program, forked again
    os.kill(pids["control"], signal.SIGKILL)
    again = wait_until(lambda: (p := program_pids(member)).get("control") not in (None, pids["control"]) and p,
                       timeout=30, what="control restarted")
    assert not alive(pids["control"])

    # supervisord killed -9: every program gets SIGTERM (PR_SET_PDEATHSIG) and goes
    tree = list(again.values())
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait(timeout=10)
    wait_until(lambda: not any(alive(p) for p in tree), timeout=15, what="every program gone with supervisord")
