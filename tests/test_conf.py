"""conf/: what an operator copies to a host. The example cluster file is a valid cluster,
the systemd units pass ``systemd-analyze verify`` and keep the contract the node runner
needs, the sysctl file sets what the Postfix plug-in asks for."""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ecluster.clusterfile import load_cluster

CONF = Path(__file__).resolve().parent.parent / "conf"
UNITS = {"ecluster-node@.service": ("node run --node %i", "n1"),
         "ecluster-manager@.service": ("manager run --manager %i", "m1")}


def test_example_cluster_file_is_a_cluster_that_survives_a_host():
    c = load_cluster(CONF / "cluster.toml.example")
    assert len(c.nodes) == 3 and len(c.managers) == 2 and c.quorum == 3
    # one member per host: losing any one host leaves a majority
    assert len({m.address for m in c.members.values()}) == len(c.members)
    assert len(c.members) - 1 >= c.quorum
    injection = {v.ip for v in c.vips if v.kind == "injection"}
    outbound = [v for v in c.vips if v.kind == "outbound"]
    assert outbound and all(v.follow in injection for v in outbound)
    assert {v.preference for v in c.vips if v.kind == "injection"} == set(c.nodes)
    assert [ch.name for ch in c.checks] == ["mta"] and "postfix" in c.services


def unit(name: str) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False)
    cp.optionxform = str
    cp.read(CONF / "systemd" / name)
    return cp


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_contract(name):
    cp = unit(name)
    svc = cp["Service"]
    args, _ = UNITS[name]
    assert svc["ExecStart"].endswith(f"/ecluster {args}")
    assert svc["KillMode"] == "mixed"          # TERM to the runner, which stops supervisord in order
    assert svc["Restart"] == "on-failure"
    assert "ExecReload" not in svc             # a reload must not restart everything
    assert cp["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_pass_systemd_analyze_verify(name, tmp_path):
    """verify wants the ExecStart program to exist: the instance is verified with this
    venv's ecluster in place of /usr/local/bin/ecluster."""
    args, instance = UNITS[name]
    ecluster = Path(sys.executable).with_name("ecluster")
    assert ecluster.exists()
    text = (CONF / "systemd" / name).read_text().replace("/usr/local/bin/ecluster", str(ecluster))
    path = tmp_path / name.replace("@.", f"@{instance}.")
    path.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if path.name in ln or str(tmp_path) in ln]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr
    # a broken copy is caught, so the check above can fail
    bad = tmp_path / name.replace("@.", f"@{instance}x.")
    bad.write_text(text.replace("KillMode=mixed", "KillMode=sometimes"))
    r = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert any(bad.name in ln for ln in (r.stdout + r.stderr).splitlines())


def test_sysctl_sets_nonlocal_bind():
    settings = {}
    for line in (CONF / "sysctl.d" / "60-ecluster.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            settings[k.strip()] = v.strip()
    assert settings["net.ipv4.ip_nonlocal_bind"] == "1"
