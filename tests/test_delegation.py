"""Command delegation: command classes, broadcast/unicast through managers, real processes.

A module cluster on loopback: nodes n1..n3 run ``control``; managers m1, m2 run ``control``
and ``console``. The tests that break members run last and in file order (n2 hung, n3
killed, then m1 killed).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import httpx
import pytest

from conftest import Procs, make_cluster_file, run_cli, short_dir, wait_until
from delegation_cluster import MiniCluster

from bus.client import RemoteError, SyncClient
from services import control as ctl

NODES = ["n1", "n2", "n3"]
MANAGERS = ["m1", "m2"]


# -- pure: command classes -----------------------------------------------------------------------

def test_every_builtin_command_resolves_and_has_help():
    table = ctl.command_classes()
    for name in ("status", "vip show", "vip move", "config status", "config reload", "logs status",
                 "membership", "version", "help"):
        cls = table[name]
        assert cls.help_text() and cls.summary() and cls.usage().startswith(name)
    assert table["vip move"].usage() == "vip move ADDRESS NODE"
    assert table["help"].usage() == "help [COMMAND]"


def test_resolve_takes_the_longest_name_and_names_the_near_commands():
    table = ctl.command_classes()
    cls, rest = ctl.resolve(["vip", "move", "10.0.0.1", "n1"], table)
    assert cls is ctl.VipMoveCommand and rest == ["10.0.0.1", "n1"]
    with pytest.raises(ctl.CommandError) as e:
        ctl.resolve(["vip"], table)
    assert e.value.code == "unknown_command" and "vip move" in e.value.message and "vip show" in e.value.message
    with pytest.raises(ctl.CommandError) as e:
        ctl.resolve(["frobnicate", "now"], table)
    assert "unknown command 'frobnicate now'" in e.value.message and "status" in e.value.message


@pytest.mark.parametrize("words, code, fragment", [
    (["vip", "move", "10.0.0.1"], "bad_arguments", "missing NODE"),
    (["vip", "move", "not-an-ip", "n1"], "bad_arguments", "is not an IP address"),
    (["status", "extra"], "bad_arguments", "too many arguments"),
    (["help", "nope"], "unknown_command", "unknown command 'nope'"),
    ([], "unknown_command", "no command given"),
])
def test_validate_refuses_bad_arguments_with_one_clear_line(words, code, fragment):
    with pytest.raises(ctl.CommandError) as e:
        ctl.prepare(words, [])
    assert e.value.code == code and fragment in e.value.message and "\n" not in e.value.message


def test_vip_move_checks_the_node_against_the_cluster(make_cluster):
    cluster = make_cluster(2, 1)
    with pytest.raises(ctl.CommandError) as e:
        ctl.prepare("vip move", ["10.0.0.1", "n9"], cluster)
    assert e.value.code == "unknown_node" and "n9" in e.value.message
    cmd, args = ctl.prepare(["vip", "move"], ["10.0.0.1", "n2"], cluster)
    assert args == {"address": "10.0.0.1", "node": "n2"}


def test_a_plugin_command_from_the_entry_point_group(monkeypatch):
    class Echo(ctl.Command):
        """Echo the words back."""
        name = "echo words"
        params = ("text",)

        async def execute(self, service, args):
            return {"echo": args["text"]}

    monkeypatch.setattr(ctl, "_plugins", {"echo words": Echo})
    table = ctl.command_classes()
    assert table["echo words"] is Echo
    cmd, args = ctl.prepare("echo words hello", [])
    assert args == {"text": "hello"}
    # a plug-in cannot replace a built-in
    monkeypatch.setattr(ctl, "_plugins", {"status": Echo})
    assert ctl.command_classes()["status"] is ctl.StatusCommand


def test_format_replies_one_block_per_member():
    from ecluster.commands.delegate import all_ok, format_replies
    rep = {"command": "status", "args": [], "manager": "m1", "elapsed": 0.1, "timeout": 2.0,
           "replies": {"n1": {"status": "ok", "result": {"member": "n1", "services": {"control": "up"}}},
                       "n2": {"status": "down", "message": "no reply within 2s"},
                       "n3": {"status": "error", "code": "bad_arguments", "message": "status: too many"}}}
    text = format_replies(rep)
    assert "== n1: ok\n  member: n1\n  services:\n    control: up" in text
    assert "== n2: DOWN (no reply within 2s)" in text
    assert "== n3: ERROR bad_arguments: status: too many" in text
    assert not all_ok(rep)


# -- real processes ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    base = tmp_path_factory.mktemp("deleg")
    root = short_dir()
    procs = Procs(base / "logs")
    try:
        cluster = make_cluster_file(base, n_nodes=3, n_managers=2, data_root=root)
        mc = MiniCluster(cluster, procs)
        for n in NODES:
            mc.start(n, ["control"])
        for m in MANAGERS:
            mc.start(m, ["control", "console"])
        mc.wait_ready(NODES + MANAGERS, via="m1")
        mc.wait_ready(["m1", "m2"], service="console", method="status", via="m1")
        yield mc
    finally:
        for p in procs.procs:       # a test may have stopped one: let it go before the kill
            if p.returncode is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def cli(mini, *args, timeout=30):
    return run_cli([*args, "-c", mini.cluster.path], timeout=timeout)


def manager_call(mini, manager, method, timeout=6.0, **args):
    with SyncClient(mini.cluster, remote=manager) as c:
        return c.call(manager, "control", method, timeout=timeout, **args)


def test_run_on_a_member_gives_a_typed_reply(mini):
    with SyncClient(mini.cluster, remote="n1") as c:
        ok = c.call("n1", "control", "run", timeout=3, command="version")
        err = c.call("n1", "control", "run", timeout=3, command="vip move", args=["x", "n1"])
        st = c.call("n1", "control", "run", timeout=3, command=["status"])
    assert ok["status"] == "ok" and ok["member"] == "n1" and ok["result"]["ecluster"]
    assert err == {"status": "error", "member": "n1", "command": "vip move", "code": "bad_arguments",
                   "message": "vip move: 'x' is not an IP address"}
    # services that do not run here are "not available", not a failure
    assert st["status"] == "ok" and st["result"]["services"]["control"] == "up"
    assert st["result"]["services"]["election"] == "not available"
    assert st["result"]["election"]["available"] is False


def test_broadcast_answers_from_every_node(mini):
    rep = manager_call(mini, "m1", "broadcast", command="version", timeout_s=2.0)
    assert set(rep["replies"]) == set(NODES)
    assert all(r["status"] == "ok" and r["result"]["member"] == n for n, r in rep["replies"].items())
    rep = manager_call(mini, "m2", "broadcast", command="membership", timeout_s=2.0, include_managers=True)
    assert set(rep["replies"]) == set(NODES + MANAGERS)
    # membership is not running in this cluster: each member says so, in a typed ok reply
    assert all(r["status"] == "ok" and r["result"]["available"] is False for r in rep["replies"].values())


def test_cli_broadcast_prints_one_block_per_node(mini):
    r = cli(mini, "broadcast", "help", "vip", "move", "--manager", "m2")
    assert r.returncode == 0, r.stderr
    for n in NODES:
        assert f"== {n}: ok" in r.stdout
    assert r.stdout.count("usage: vip move ADDRESS NODE") == 3
    r = cli(mini, "broadcast", "version", "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["replies"]) == set(NODES)


def test_unicast_runs_on_one_member(mini):
    r = cli(mini, "unicast", "n2", "status", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert list(rep["replies"]) == ["n2"] and rep["replies"]["n2"]["result"]["member"] == "n2"
    rep = manager_call(mini, "m1", "unicast", node="m2", command="version")
    assert rep["replies"]["m2"]["status"] == "ok"


def test_unknown_command_and_bad_arguments_are_one_clear_error(mini):
    r = cli(mini, "broadcast", "frobnicate")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().startswith("ecluster: unknown command 'frobnicate'") and r.stderr.count("\n") == 1
    r = cli(mini, "unicast", "n1", "vip", "move", "10.0.0.1")
    assert r.returncode == 1 and "vip move: missing NODE (usage: vip move ADDRESS NODE)" in r.stderr
    r = cli(mini, "unicast", "n9", "status")
    assert r.returncode == 1 and "no member named 'n9'" in r.stderr
    with pytest.raises(RemoteError) as e:
        manager_call(mini, "m1", "broadcast", command="status", timeout_s=-1)
    assert e.value.code == "bad_arguments"
    with SyncClient(mini.cluster, remote="n1") as c, pytest.raises(RemoteError) as e:
        c.call("n1", "control", "broadcast", timeout=2, command="status")
    assert e.value.code == "wrong_role" and "served by managers" in e.value.message


def test_broadcast_with_a_hung_and_a_dead_node_answers_within_the_timeout(mini):
    """n2's services hang (SIGSTOP: its broker still routes, nobody answers); n3 is killed."""
    os.kill(mini.services_pid("n2"), signal.SIGSTOP)
    try:
        mini.kill("n3")
        timeout = 1.5
        started = time.monotonic()
        rep = manager_call(mini, "m1", "broadcast", command="status", timeout_s=timeout)
        elapsed = time.monotonic() - started
        assert elapsed < timeout + 1.0, f"broadcast took {elapsed:.2f}s with a {timeout}s timeout"
        assert rep["elapsed"] <= timeout + 0.3
        r = rep["replies"]
        assert r["n1"]["status"] == "ok" and r["n1"]["result"]["member"] == "n1"
        assert r["n2"] == {"status": "down", "member": "n2", "command": "status",
                           "message": f"no reply within {timeout:g}s"}
        assert r["n3"]["status"] == "down"
        # the CLI shows it and exits non-zero, still within the timeout
        started = time.monotonic()
        out = cli(mini, "broadcast", "version", "--timeout", "1")
        assert time.monotonic() - started < 1.0 + 5.0      # + interpreter start-up
        assert out.returncode == 1, out.stderr
        assert "== n1: ok" in out.stdout and "== n2: DOWN" in out.stdout and "== n3: DOWN" in out.stdout
    finally:
        os.kill(mini.services_pid("n2"), signal.SIGCONT)
    # n2 answers again once it runs
    rep = wait_until(lambda: manager_call(mini, "m1", "unicast", node="n2", command="version", timeout_s=1.0)
                     ["replies"]["n2"]["status"] == "ok", timeout=10, what="n2 answering again")
    assert rep


def test_one_manager_killed_the_other_serves_delegation_and_the_console(mini):
    mini.kill("m1")
    # without --manager the CLI goes on to the next manager
    r = cli(mini, "broadcast", "version")
    assert "== n1: ok" in r.stdout and "via m2" in r.stdout, r.stderr
    r = cli(mini, "unicast", "n1", "version", "--manager", "m1", "--timeout", "1")
    assert r.returncode == 1 and "no manager answered (m1:" in r.stderr
    # m2's console still answers, with the token
    from manager.console.auth import ensure_token
    m2 = mini.cluster.member("m2")
    token = ensure_token(mini.cluster.keys_dir)
    base = f"http://{m2.console_address}:{m2.console_port}"
    got = httpx.get(f"{base}/api/cluster", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert got.status_code == 200 and got.json()["manager"] == "m2"
    rep = httpx.post(f"{base}/api/command", json={"mode": "unicast", "node": "n1", "command": "version"},
                     headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert rep.status_code == 200, rep.text
    assert rep.json()["replies"]["n1"]["status"] == "ok" and rep.json()["manager"] == "m2"
    assert httpx.get(f"{base}/api/cluster", timeout=5).status_code == 401
