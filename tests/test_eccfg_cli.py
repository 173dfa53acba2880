"""``eccfg`` / ``ecluster config``: the commands and their errors, over a real cluster
(two nodes and a manager running; a third node n3 configured but never started)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, wait_until
from test_configsync import Lab

pytestmark = pytest.mark.timeout(120)

EccfgBin = Path(sys.executable).parent / "eccfg"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    # 4 voters (quorum 3): n1, n2, m1 run, n3 never does
    lab = Lab(tmp_path_factory.mktemp("eccfg"), n_nodes=3, n_managers=1)
    try:
        lab.start("n1", "n2", "m1")
        lab.coordinator()
        r = lab.cli("bootstrap", "-m", "n2")
        assert r.returncode == 0 and "created" in r.stdout, r.stderr
        lab.wait_all_applied(lab.call("n2", "head")["head"])
        yield lab
    finally:
        lab.close()


@pytest.fixture
def run(capfd):
    """Run ``eccfg ARGS`` in this process (the installed program is tested once, below)."""
    from ecluster.cli import eccfg_main

    def call(*args: str) -> subprocess.CompletedProcess:
        capfd.readouterr()
        code = eccfg_main(list(args))
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["eccfg", *args], code, out, err)
    return call


def one_line_error(r: subprocess.CompletedProcess, prog: str = "eccfg") -> str:
    assert r.returncode != 0, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_programs_and_help_with_an_example_on_every_command(run):
    # the installed programs
    r = subprocess.run([str(EccfgBin), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "Example:" in r.stdout
    r = run_cli(["config", "log", "-c", "/nonexistent.toml", "-m", "n1"])
    assert r.returncode == 1 and r.stderr.startswith("ecluster: ") and len(r.stderr.splitlines()) == 1
    for cmd in ("bootstrap", "status", "commit", "pull", "log", "diff", "revert", "show"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "Example: eccfg " + cmd in " ".join(r.stdout.split()), (cmd, r.stdout)


def test_errors_are_one_line(lab, tmp_path, run):
    cfg = lab.cfg
    assert "no cluster file" in one_line_error(run("status", "-m", "n1"))
    assert "no member named 'zz'" in one_line_error(run("status", "-c", cfg, "-m", "zz"))
    assert "give --member" in one_line_error(run("log", "-c", cfg))
    assert "no such working copy" in one_line_error(run("log", "--wc", str(tmp_path / "nope")))
    (tmp_path / "plain").mkdir()
    assert "not a working copy" in one_line_error(run("log", "--wc", str(tmp_path / "plain")))
    assert "unknown revision 'deadbeef'" in one_line_error(run("diff", "-m", "n1", "deadbeef", "-c", lab.cfg))
    assert "nothing to commit" in one_line_error(run("commit", "--member", "n1", "-m", "noop", "-c", lab.cfg))
    assert "empty commit message" in one_line_error(run("commit", "--member", "n1", "-m", " ", "-c", lab.cfg))
    assert "bad node name 'global'" in one_line_error(run("show", "-m", "n1", "--node", "global", "-c", lab.cfg))
    first = lab.call("n1", "log", n=50)[-1]["rev"]
    assert "cannot revert" in one_line_error(run("revert", "-m", "n1", first, "-c", lab.cfg))
    # a configured member that is not running
    assert "n3" in one_line_error(run("status", "-m", "n3", "-t", "0.5", "-c", lab.cfg))
    r = run("log", "-m", "n1", "-n", "0", "-c", lab.cfg)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_show_node_resolution_order(lab, run):
    conf = lab.conf("n1")
    for path, text in {"global/a.conf": "g", "n1/a.conf": "n1", "default/a.conf": "d",
                       "n2/b.conf": "n2", "default/b.conf": "d", "default/c.conf": "d"}.items():
        (conf / path).parent.mkdir(exist_ok=True)
        (conf / path).write_text(text + "\n")
    r = run("commit", "--member", "n1", "-m", "layered files", "--add-all", "-c", lab.cfg)
    assert r.returncode == 0, r.stderr
    lab.wait_all_applied(lab.call("n1", "head")["head"])

    r = run("show", "-m", "n1", "--node", "n1", "--json", "-c", lab.cfg)
    files = {f["name"]: (f["file"], f["shadowed"]) for f in json.loads(r.stdout)["files"]}
    assert files["a.conf"] == ("global/a.conf", ["n1/a.conf", "default/a.conf"])
    assert files["b.conf"] == ("default/b.conf", [])
    assert files["c.conf"] == ("default/c.conf", [])
    r = run("show", "-m", "n1", "--node", "n2", "-c", lab.cfg)
    assert r.returncode == 0
    assert re.search(r"^b\.conf\s+->\s+n2/b\.conf\s+\(shadows default/b\.conf\)$", r.stdout, re.M), r.stdout
    assert re.search(r"^a\.conf\s+->\s+global/a\.conf\s+\(shadows default/a\.conf\)$", r.stdout, re.M), r.stdout
    # the same straight from a working copy, without the bus
    r = run("show", "--wc", str(lab.conf("m1")), "--node", "n2", "--json")
    assert r.returncode == 0, r.stderr
    assert {f["name"]: f["file"] for f in json.loads(r.stdout)["files"]}["b.conf"] == "n2/b.conf"


def test_log_and_diff(lab, run):
    conf = lab.conf("n2")
    (conf / "default" / "limits.toml").write_text("max = 1\n")
    r = run("commit", "--member", "n2", "-m", "limits one", "--add-all", "-c", lab.cfg)
    assert r.returncode == 0, r.stderr
    lab.wait_all_applied(lab.call("n2", "head")["head"], ["n2"])
    # a different size: node/configrepo's scratch index misses a same-size edit made in the
    # second of the checkout (its copy of the index gets a new mtime; reported)
    (conf / "default" / "limits.toml").write_text("max = 22\n")
    # uncommitted edits in the live copy
    r = run("diff", "-m", "n2", "-c", lab.cfg)
    assert r.returncode == 0 and "-max = 1" in r.stdout and "+max = 22" in r.stdout, r.stdout
    assert "+max = 22" in run("diff", "--wc", str(conf)).stdout
    r = run("commit", "--member", "n2", "-m", "limits two", "-c", lab.cfg)
    assert r.returncode == 0, r.stderr
    lab.wait_all_applied(lab.call("n2", "head")["head"])

    r = run("log", "-m", "n1", "-n", "2", "-c", lab.cfg)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 2
    assert lines[0].endswith("limits two") and lines[1].endswith("limits one")
    entries = json.loads(run("log", "-m", "m1", "-n", "3", "--json", "-c", lab.cfg).stdout)
    assert [e["subject"] for e in entries[:2]] == ["limits two", "limits one"]
    assert json.loads(run("log", "--wc", str(lab.conf("n1")), "-n", "1", "--json").stdout)[0]["rev"] == entries[0]["rev"]
    # what one commit changed, by a short revision
    r = run("diff", "-m", "n1", entries[0]["rev"][:10], "-c", lab.cfg)
    assert "-max = 1" in r.stdout and "+max = 22" in r.stdout and "default/limits.toml" in r.stdout


def test_revert_restores_everywhere(lab, run):
    last = lab.call("n1", "log", n=1)[0]
    assert last["subject"] == "limits two"
    r = run("revert", "-m", "n1", last["rev"][:12], "-c", lab.cfg)
    assert r.returncode == 0 and "reverted" in r.stdout, r.stderr
    head = lab.call("n1", "head")["head"]
    lab.wait_all_applied(head)
    for m in lab.running:
        assert (lab.conf(m) / "default" / "limits.toml").read_text() == "max = 1\n"


def test_status_cluster_json_and_single(lab, run):
    def rows_when_in_sync():
        r = run("status", "-m", "n1", "--cluster", "--json", "-c", lab.cfg)
        assert r.returncode == 0, r.stderr
        rows = {m["member"]: m for m in json.loads(r.stdout)["members"]}
        return rows if all(rows[m]["state"] == "in sync" for m in ("n1", "n2", "m1")) else None
    got = wait_until(rows_when_in_sync, 10, what="n1, n2, m1 in sync")
    assert set(got) == {"n1", "n2", "n3", "m1"}
    assert got["n3"]["state"] == "unreachable"
    head = lab.call("n1", "head")["head"]
    assert all(got[m]["rev"] == head for m in ("n1", "n2", "m1"))
    r = run("status", "-m", "n1", "--cluster", "-c", lab.cfg)
    assert r.returncode == 0 and "unreachable" in r.stdout and "in sync" in r.stdout
    r = run("status", "-m", "m1", "-c", lab.cfg)
    assert r.returncode == 0 and r.stdout.startswith(f"m1: in sync at {head[:12]}"), r.stdout
    # a hand edit shows from the bus and from the working copy
    (lab.conf("m1") / "default" / "limits.toml").write_text("max = 9\n")
    try:
        st = json.loads(run("status", "-m", "m1", "--json", "-c", lab.cfg).stdout)
        assert st["state"] == "modified locally" and st["modified"] == ["default/limits.toml"]
        r = run("status", "--wc", str(lab.conf("m1")))
        assert "modified locally" in r.stdout and "default/limits.toml" in r.stdout
    finally:
        assert run("pull", "-m", "m1", "--theirs", "-c", lab.cfg).returncode == 0
    assert (lab.conf("m1") / "default" / "limits.toml").read_text() == "max = 1\n"
