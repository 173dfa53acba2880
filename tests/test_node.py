"""The node runner under real supervisord, the data-directory lock, and the CLI around them."""
from __future__ import annotations

import configparser
import json
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bus.client import SyncClient
from conftest import CLI, alive, descendants, run_cli, wait_until
from node.datadir import DirLock, LockedError, data_dir_lock, ensure_data_dir, locked_message
from node.supervisor import SupervisorError, conf_path, supervisor_conf
from services.base import services_for

pytestmark = pytest.mark.timeout(90)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert "Traceback" not in stderr
    assert lines[0].startswith("ecluster: ")
    return lines[0]


# -- the lock -------------------------------------------------------------------------------------

def test_dir_lock_refuses_a_second_holder_and_is_released(tmp_path):
    path = tmp_path / "d" / ".lock"
    with DirLock(path, "node n1"):
        with pytest.raises(LockedError) as err:
            DirLock(path, "node n2").acquire()
        assert str(err.value) == f"data directory {path.parent} is in use by node n1 (pid {os.getpid()})"
    with DirLock(path, "node n2") as again:          # released: free again
        assert again.fd is not None
    assert path.read_text() == ""                     # no stale holder text left behind


def test_dir_lock_unlinked_on_release_never_gives_two_holders(tmp_path):
    """A lock file removed on release: a process that opened the old file before the unlink
    must not count its flock on the orphaned inode as holding the lock."""
    path = tmp_path / "demo.lock"
    first = DirLock(path, "demo 1", unlink_on_release=True).acquire()
    stale_fd = os.open(path, os.O_RDWR)               # a second process opened it, then waits
    try:
        first.release()
        assert not path.exists()                      # nothing left behind
        fcntl.flock(stale_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # the orphan locks fine...
        probe = DirLock(path, "demo 2", unlink_on_release=True)
        assert not probe._still_named(stale_fd)       # ...but acquire() would see it is not named
        with DirLock(path, "demo 3", unlink_on_release=True) as third:
            assert third._still_named(third.fd)
            with pytest.raises(LockedError, match="in use by demo 3"):
                DirLock(path, "demo 4", unlink_on_release=True).acquire()
        assert not path.exists()
    finally:
        os.close(stale_fd)


def test_dir_lock_held_by_a_killed_process_is_free(tmp_path):
    path = tmp_path / ".lock"
    code = ("import sys, time; from pathlib import Path; from node.datadir import DirLock; "
            f"l = DirLock(Path({str(path)!r}), 'node n7').acquire(); print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=rf"in use by node n7 \(pid {p.pid}\)"):
            DirLock(path, "node n1").acquire()
    finally:
        p.kill()
        p.wait()
    with DirLock(path, "node n1"):     # the kernel dropped the dead holder's lock
        pass


def test_locked_message_without_holder_details():
    assert locked_message("run directory", Path("/x"), "") == "run directory /x is in use by another process"


def test_ensure_data_dir_is_private(make_cluster):
    cluster = make_cluster(1)
    m = cluster.member("n1")
    ensure_data_dir(m)
    for d in (m.data_dir, m.run_dir, m.data_dir / "log"):
        assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700


# -- the supervisord configuration ------------------------------------------------------------------

def parse_conf(text: str) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser()
    cp.read_string(text)
    return cp


def test_supervisor_conf_has_a_program_per_service(make_cluster):
    cluster = make_cluster(2, 1)
    r = run_cli(["supervisor-conf", "-c", cluster.path, "-m", "n2"])
    assert r.returncode == 0, r.stderr
    cp = parse_conf(r.stdout)
    expected = ["broker", *services_for(cluster, "n2")]
    assert "control" in expected
    assert sorted(s.split(":", 1)[1] for s in cp.sections() if s.startswith("program:")) == sorted(expected)
    m = cluster.member("n2")
    assert cp["unix_http_server"]["file"] == str(m.run_dir / "supervisor.sock")
    assert cp["unix_http_server"]["chmod"] == "0700"
    assert cp["supervisord"]["nodaemon"] == "true"
    assert cp["program:broker"]["command"].endswith(f"bus run --config {cluster.path} --member n2")
    assert cp["program:broker"]["priority"] == "10"
    for name in expected[1:]:
        prog = cp[f"program:{name}"]
        assert prog["command"].endswith(f"service run {name} --config {cluster.path} --member n2")
        assert prog["priority"] == "20"
        assert (prog["autorestart"], prog["stopasgroup"], prog["killasgroup"]) == ("true", "true", "true")
        assert prog["stdout_logfile"].startswith(str(m.data_dir / "log"))


def test_supervisor_conf_takes_plugins_and_escapes(make_cluster):
    cluster = make_cluster(1)
    text = supervisor_conf(cluster, "n1", "/etc/ec%1/cluster.toml", python="/opt/py/bin/python",
                           services=["control", "smtp"])
    cp = parse_conf(text)
    assert cp["program:smtp"]["command"] == \
        (f"/opt/py/bin/python -m node.program --keys {cluster.keys_dir} service run smtp"
         " --config /etc/ec%%1/cluster.toml --member n1")
    with pytest.raises(SupervisorError, match="broker"):
        supervisor_conf(cluster, "n1", services=["broker"])


def test_manager_role_is_checked(make_cluster):
    cluster = make_cluster(1, 1)
    r = run_cli(["node", "run", "-c", cluster.path, "--node", "m1"])
    assert r.returncode == 1
    assert "m1 is a manager" in one_error_line(r.stderr)


# -- the broker lock ---------------------------------------------------------------------------------

def test_second_broker_on_the_same_data_dir_refuses(make_cluster, procs):
    cluster = make_cluster(1)
    first = procs.start(["bus", "run", "-c", cluster.path, "-m", "n1"], name="broker")
    with SyncClient(cluster, via="n1") as c:
        wait_until(lambda: c.call("n1", "bus", "ping", timeout=0.5), timeout=15)
    r = run_cli(["bus", "run", "-c", cluster.path, "-m", "n1"], timeout=20)
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert f"is in use by the bus broker of n1 (pid {first.pid})" in line
    with SyncClient(cluster, via="n1") as c:        # the first one still serves its socket
        assert c.call("n1", "bus", "ping", timeout=2.0)["member"] == "n1"


# -- node run under supervisord ----------------------------------------------------------------------

def control_status(cluster, timeout=1.0) -> dict:
    with SyncClient(cluster, remote="n1") as c:
        return c.call("n1", "control", "status", timeout=timeout)


def test_node_run_restarts_a_killed_service_refuses_a_second_runner_and_stops_cleanly(make_cluster, procs):
    cluster = make_cluster(1, preset="fast")
    runner = procs.start(["node", "run", "-c", cluster.path, "--node", "n1"], name="node-n1")
    first = wait_until(lambda: control_status(cluster), timeout=30, what="control.status answers over tcp")
    assert first["member"] == "n1"
    conf = conf_path(cluster.member("n1"))
    assert conf.exists()

    # status through the CLI sees the running member
    r = run_cli(["status", "-c", cluster.path, "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["answered_by"] == "n1" and rep["control"]["pid"] == first["pid"]
    assert [m["link"] for m in rep["members"]] == ["self"]

    # supervisorctl talks to this supervisord (unix socket from the generated conf)
    ctl = Path(sys.executable).parent / "supervisorctl"
    out = subprocess.run([str(ctl), "-c", str(conf), "pid", "control"], capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == str(first["pid"])

    # a killed service is restarted by supervisord and answers again
    procs.remember_tree(runner)
    os.kill(first["pid"], signal.SIGKILL)
    second = wait_until(lambda: (s := control_status(cluster)) and s["pid"] != first["pid"] and s,
                        timeout=30, what="control restarted with a new pid")
    assert not alive(first["pid"])

    # a second runner on the same data directory refuses, in one line
    r = run_cli(["node", "run", "-c", cluster.path, "--node", "n1"], timeout=20)
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert line == f"ecluster: data directory {cluster.member('n1').data_dir} is in use by node n1 (pid {runner.pid})"

    # SIGTERM stops everything: supervisord, the broker, every service
    tree = procs.remember_tree(runner)
    assert second["pid"] in tree and len(tree) >= 3       # supervisord, broker, control, ...
    t0 = time.monotonic()
    rc = procs.stop(runner, signal.SIGTERM, timeout=20)
    assert rc == 0
    assert time.monotonic() - t0 < 15
    wait_until(lambda: not any(alive(p) for p in tree), timeout=5, what="every child gone")
    with data_dir_lock(cluster.member("n1")):        # and the data directory is free again
        pass


def test_status_with_nobody_running_is_one_line(make_cluster):
    cluster = make_cluster(2)
    r = run_cli(["status", "-c", cluster.path, "--timeout", "0.3"])
    assert r.returncode == 1
    assert "no member answered" in one_error_line(r.stderr)


def test_keys_init_keeps_pairs_and_list_shows_them(make_cluster):
    cluster = make_cluster(1, 1)
    before = (cluster.keys_dir / "n1.key_secret").read_bytes()
    r = run_cli(["keys", "init", "-c", cluster.path])
    assert r.returncode == 0 and "n1: kept" in r.stdout
    assert (cluster.keys_dir / "n1.key_secret").read_bytes() == before
    r = run_cli(["keys", "list", "-c", cluster.path, "--json"], env={"COLUMNS": "200"})
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"n1", "m1", "admin"} and all(row["secret"] for row in rows.values())
    assert rows["m1"]["role"] == "manager"
    r = run_cli(["keys", "init", "-c", cluster.path, "--force"])
    assert r.returncode == 0 and "n1: regenerated" in r.stdout
    assert (cluster.keys_dir / "n1.key_secret").read_bytes() != before


def test_config_from_the_environment_and_help_examples(make_cluster):
    cluster = make_cluster(1)
    r = run_cli(["service", "list", "-m", "n1", "--json"], env={"ECLUSTER_CONFIG": str(cluster.path)})
    assert r.returncode == 0, r.stderr
    assert "control" in [row["name"] for row in json.loads(r.stdout)]
    from typer.testing import CliRunner

    from ecluster.cli import build_app
    app, runner = build_app(), CliRunner()
    for cmd in (["node", "run"], ["manager", "run"], ["service", "run"], ["service", "list"], ["bus", "run"],
                ["supervisor-conf"], ["keys", "init"], ["keys", "list"], ["status"], ["demo"]):
        r = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0 and "Example: ecluster" in r.output, cmd


def test_python_m_cli_and_usage_errors():
    r = subprocess.run([*CLI, "service", "run"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert one_error_line(r.stderr).endswith("(see: ecluster service run --help)")
    r = subprocess.run([*CLI, "demo", "--help"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0 and "make demo" in r.stdout


def test_ensure_data_dir_can_keep_a_granted_search_bit(make_cluster):
    """A plug-in (Postfix) may let its own user pass through the data directory; the broker,
    restarted inside a running member, keeps that bit, and never gives read or write."""
    cluster = make_cluster(1)
    m = cluster.member("n1")
    ensure_data_dir(m)
    os.chmod(m.data_dir, 0o755)                       # what a umask leaves: not kept
    ensure_data_dir(m, keep_search=True)
    assert (m.data_dir.stat().st_mode & 0o777) == 0o700
    os.chmod(m.data_dir, 0o711)                       # given on purpose (the Postfix plug-in)
    ensure_data_dir(m, keep_search=True)
    assert (m.data_dir.stat().st_mode & 0o777) == 0o711
    assert (m.run_dir.stat().st_mode & 0o777) == 0o700
    ensure_data_dir(m)
    assert (m.data_dir.stat().st_mode & 0o777) == 0o700


def test_programs_run_without_the_admin_cli(make_cluster, tmp_path):
    """supervisord's programs start through node.program: typer and the command modules are
    never imported by a broker or a service, and bad input is still one line."""
    import subprocess
    import sys
    cluster = make_cluster(1)
    probe = ("import sys, runpy; sys.argv = ['node.program', 'service', 'run', 'nosuch', '--config', %r, "
             "'--member', 'n1']\ntry:\n    runpy.run_module('node.program', run_name='__main__')\n"
             "except SystemExit as e:\n    print(e.code, 'typer' in sys.modules, 'ecluster.cli' in sys.modules)\n"
             % str(cluster.path))
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert r.stdout.split() == ["1", "False", "False"], r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("ecluster: ") and "nosuch" in r.stderr
    r = subprocess.run([sys.executable, "-m", "node.program", "service", "run", "vip", "--config",
                        str(tmp_path / "none.toml"), "--member", "n1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "node.program", "bus"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
