"""bench/pacemaker.py, the Pacemaker + Corosync IPaddr2 anchor: its pure parts (configuration
rendering, parsing of corosync / crm_mon / probe output, percentiles, arguments, the report)
without root; and one real ``--quick`` run in its namespace lab when root and pacemaker are here."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_PATH = ROOT / "bench" / "pacemaker.py"
# loaded by path: bench/ on sys.path would shadow the bus package with bench/bus.py
_spec = importlib.util.spec_from_file_location("bench_pacemaker", _PATH)
pm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = pm
_spec.loader.exec_module(pm)

NODES3 = [("node1", 1, "10.96.0.11"), ("node2", 2, "10.96.0.12"), ("node3", 3, "10.96.0.13")]

# crm_mon -1 --output-as=xml of Pacemaker 2.1.5, trimmed (as seen in the lab)
CRM_MON = """<pacemaker-result api-version="2.25" request="crm_mon -1 --output-as=xml">
  <pacemakerd sys_from="pacemakerd" state="running" last_updated="2026-12-07 16:18:32Z"/>
  <summary>
    <stack type="corosync"/>
    <current_dc present="true" version="2.1.5-a3f44794f94" name="node1" id="1" with_quorum="true" mixed_version="false"/>
    <nodes_configured number="3"/>
    <resources_configured number="1" disabled="0" blocked="0"/>
  </summary>
  <nodes>
    <node name="node1" id="1" online="true" standby="false" pending="false" unclean="false" is_dc="true" type="member"/>
    <node name="node2" id="2" online="true" standby="false" pending="false" unclean="false" is_dc="false" type="member"/>
    <node name="node3" id="3" online="true" standby="false" pending="false" unclean="false" is_dc="false" type="member"/>
  </nodes>
  <resources>
    <resource id="vip" resource_agent="ocf:heartbeat:IPaddr2" role="Started" active="true" orphaned="false"
              blocked="false" managed="true" failed="false" failure_ignored="false" nodes_running_on="1">
      <node name="node1" id="1" cached="true"/>
    </resource>
  </resources>
  <status code="0" message="OK"/>
</pacemaker-result>
"""

CMAP = """runtime.config.totem.block_unlisted_ips (u32) = 1
runtime.config.totem.consensus (u32) = 4380
runtime.config.totem.join (u32) = 50
runtime.config.totem.merge (u32) = 200
runtime.config.totem.token (u32) = 3650
runtime.config.totem.token_retransmit (u32) = 869
runtime.config.totem.token_retransmits_before_loss_const (u32) = 4
totem.cluster_name (str) = pcmbench
"""


# -- configuration rendering ----------------------------------------------------------------------

def test_corosync_conf_with_defaults_sets_no_timeout():
    text = pm.corosync_conf(NODES3)
    assert "token:" not in text and "token_coefficient" not in text and "consensus" not in text
    assert "transport: knet" in text and "provider: corosync_votequorum" in text
    for name, nodeid, addr in NODES3:
        assert f"ring0_addr: {addr}" in text and f"name: {name}" in text and f"nodeid: {nodeid}" in text
    assert text.count("node {") == 3
    assert "to_syslog: no" in text and "to_stderr: yes" in text
    assert text.count("{") == text.count("}")


def test_corosync_conf_tuned_sets_token_and_coefficient():
    text = pm.corosync_conf(NODES3, token=300, token_coefficient=0)
    assert "\ttoken: 300\n" in text and "\ttoken_coefficient: 0\n" in text
    totem = text.split("}", 1)[0]
    assert "token: 300" in totem            # inside totem { }, not elsewhere


def test_profiles_are_defaults_and_a_tuned_token():
    assert pm.PROFILES["default"] == {}
    assert pm.PROFILES["tuned"]["token"] < 3000


def test_primitive_is_ipaddr2_with_the_vip_and_a_1s_monitor():
    el = ET.fromstring(pm.primitive_xml())
    assert (el.tag, el.get("class"), el.get("provider"), el.get("type")) == \
        ("primitive", "ocf", "heartbeat", "IPaddr2")
    params = {nv.get("name"): nv.get("value") for nv in el.iter("nvpair")}
    assert params == {"ip": pm.VIP, "cidr_netmask": str(pm.CIDR), "nic": "eth0"}
    ops = el.findall("./operations/op")
    assert [(o.get("name"), o.get("interval")) for o in ops] == [("monitor", "1s")]
    ids = [x.get("id") for x in el.iter() if x.get("id")]
    assert len(ids) == len(set(ids))        # the CIB rejects duplicate ids


def test_location_prefers_node1_and_properties_match_the_brief():
    el = ET.fromstring(pm.location_xml())
    assert (el.tag, el.get("rsc"), el.get("node"), el.get("score")) == ("rsc_location", "vip", "node1", "100")
    props = {(t, n): v for t, n, v in pm.CLUSTER_PROPERTIES}
    assert props == {("crm_config", "stonith-enabled"): "false", ("crm_config", "no-quorum-policy"): "stop",
                     ("rsc_defaults", "resource-stickiness"): "0"}


def test_holder_script_mounts_tmpfs_then_binds_then_holds():
    text = pm.holder_script("/tmp/pcm 1/default/node2", "node2")
    lines = text.strip().splitlines()
    assert lines[0] == "set -e" and lines[-1] == "exec sleep infinity"
    assert "hostname node2" in lines
    shm = next(i for i, x in enumerate(lines) if x.endswith(" /dev/shm") and "tmpfs" in x)
    run = next(i for i, x in enumerate(lines) if x.endswith(" /run") and "tmpfs" in x)
    binds = [i for i, x in enumerate(lines) if x.startswith("mount --bind")]
    assert len(binds) == len(pm.BINDS) and shm < min(binds) and run < min(binds)
    assert any("install -d" in x and "/run/resource-agents" in x for x in lines[run:])
    # the path with a space is quoted
    assert "mount --bind '/tmp/pcm 1/default/node2/etc-corosync' /etc/corosync" in lines


def test_namespace_names_carry_the_prefix():
    names = pm.ns_names(4242)
    assert set(names) == {"switch", "client", "node1", "node2", "node3"}
    assert all(v.startswith("pcm4242-") for v in names.values())
    assert len(set(names.values())) == 5
    assert pm.node_addr(1) == "10.96.0.11" and pm.VIP.startswith("10.96.0.")


# -- parsing --------------------------------------------------------------------------------------

def test_cmap_lines_parse_with_integers():
    cmap = pm.parse_cmap(CMAP)
    assert cmap["runtime.config.totem.token"] == 3650
    assert cmap["totem.cluster_name"] == "pcmbench"
    assert pm.parse_cmap("garbage\n\n") == {}
    t = pm.totem_timeouts(cmap)
    assert (t["token"], t["consensus"], t["join"]) == (3650, 4380, 50)
    assert t["max_messages"] is None


def test_crm_mon_view():
    v = pm.parse_crm_mon(CRM_MON)
    assert v["dc"] == "node1" and v["quorum"] is True
    assert v["online"] == ["node1", "node2", "node3"] and v["offline"] == [] and v["pending"] == []
    assert v["resources"]["vip"] == {"role": "Started", "active": True, "failed": False, "nodes": ["node1"]}
    assert pm.placement_settled(v, ["node3", "node2", "node1"], "node1")
    assert not pm.placement_settled(v, ["node1", "node2", "node3"], "node2")
    assert not pm.placement_settled(v, ["node2", "node3"], "node1")


def test_crm_mon_view_after_a_loss():
    text = (CRM_MON.replace('name="node1" id="1" online="true"', 'name="node1" id="1" online="false"')
            .replace('name="node1" id="1" with_quorum', 'name="node2" id="2" with_quorum')
            .replace('<node name="node1" id="1" cached="true"/>', '<node name="node2" id="2" cached="true"/>'))
    v = pm.parse_crm_mon(text)
    assert v["online"] == ["node2", "node3"] and v["offline"] == ["node1"] and v["dc"] == "node2"
    assert pm.placement_settled(v, ["node2", "node3"], "node2")
    stopped = pm.parse_crm_mon(text.replace('role="Started" active="true"', 'role="Stopped" active="false"'))
    assert not pm.placement_settled(stopped, ["node2", "node3"], "node2")
    nodc = pm.parse_crm_mon(text.replace('present="true"', 'present="false"'))
    assert nodc["dc"] is None and not nodc["quorum"]
    with pytest.raises(ValueError):
        pm.parse_crm_mon("Connection to cluster failed")


def test_log_time_and_membership():
    year = 2026
    t0 = time.mktime(time.strptime("2026 Dec 07 16:17:12", "%Y %b %d %H:%M:%S")) + 0.5
    assert pm.parse_log_time("Dec 07 16:17:12.500 notice  [MAIN ] x", year) == pytest.approx(t0)
    assert pm.parse_log_time("Dec  7 16:17:12 notice", year) == pytest.approx(t0 - 0.5)
    assert pm.parse_log_time("no time here", year) is None
    log = ("Dec 07 16:16:40.227 notice  [TOTEM ] A new membership (1.d) was formed. Members joined: 3\n"
           "Dec 07 16:17:19.000 notice  [TOTEM ] A new membership (2.10) was formed. Members left: 3\n"
           "Dec 07 16:17:20.023 notice  [TOTEM ] A new membership (2.11) was formed. Members left: 1\n")
    assert pm.membership_after(log, t0, 1, year) == pytest.approx(7.523, abs=1e-3)
    assert pm.membership_after(log, t0, 2, year) is None
    assert pm.membership_after(log, t0 + 60, 1, year) is None


def test_line_after_and_unplanned_membership_losses():
    year = 2026
    base = time.mktime(time.strptime("2026 Dec 07 16:21:00", "%Y %b %d %H:%M:%S"))
    plog = ("Dec 07 16:21:22.851 node2 pacemaker-controld [1] (do_lrm_rsc_op) notice: Requesting local execution "
            "of start operation for vip on node2\n"
            "Dec 07 16:21:23.119 node2 pacemaker-controld [1] (log_executor_event) notice: Result of start "
            "operation for vip on node2: ok | CIB update 24\n")
    assert pm.line_after(plog, base + 19.5, "Result of start operation for vip on node2: ok", year) == \
        pytest.approx(3.619, abs=1e-3)
    assert pm.line_after(plog, base + 30, "Result of start", year) is None
    clog = ("Dec 07 16:21:02.011 notice  [TOTEM ] A new membership (2.11) was formed. Members left: 1 3\n"
            "Dec 07 16:21:19.575 notice  [TOTEM ] A new membership (2.29) was formed. Members left: 1\n"
            "Dec 07 16:21:20.267 notice  [TOTEM ] A new membership (2.2d) was formed. Members left: 3\n"
            "Dec 07 16:21:24.367 notice  [TOTEM ] A new membership (2.30) was formed. Members joined: 1\n"
            "Dec 07 16:21:28.279 notice  [TOTEM ] A new membership (2.39) was formed. Members left: 1\n")
    kills = [(base + 19.0, base + 23.0)]
    # 16:21:02 (1 and 3), 16:21:20 (3), 16:21:28 (1 after its restart); not the kill at 16:21:19
    assert pm.membership_flaps(clog, kills, 1, year) == 3
    assert pm.membership_flaps(clog, [], 1, year) == 4
    assert pm.membership_flaps("", kills, 1, year) == 0


def test_probe_event_lines():
    assert pm.parse_probe_event("answer node2 1796660240.123456 1796660240.124000\n") == \
        ("node2", 1796660240.123456, 1796660240.124)
    assert pm.parse_probe_event("probe.py: 10 attempts") is None
    assert pm.parse_probe_event("answer node2 x y") is None


# -- figures --------------------------------------------------------------------------------------

def test_percentile_is_nearest_rank():
    assert pm.percentile([], 50) is None
    assert pm.percentile([3.0], 99) == 3.0
    assert pm.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.0     # rank ceil(0.5 * 4) = 2
    assert pm.percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert pm.percentile([1.0, None, 2.0], 50) == 1.0


def test_summarize_rounds():
    s = pm.summarize([8.0, 7.5, None, 9.25])
    assert s == {"n": 3, "missing": 1, "min": 7.5, "median": 8.0, "p50": 8.0, "max": 9.25}
    assert pm.summarize([]) == {"n": 0, "missing": 0}
    assert pm.summarize([math.inf])["n"] == 0


def test_failover_from_probe_records_uses_the_shared_definition():
    from probe_analysis import analyze
    t = 1000.0
    recs = [{"t0": t - 0.02, "t1": t - 0.019, "who": "node1"},
            {"t0": t + 0.01, "t1": t + 0.26, "who": None},
            {"t0": t + 7.80, "t1": t + 7.801, "who": "node2"},
            {"t0": t + 7.79, "t1": t + 7.805, "who": "node2"}]
    assert analyze(recs).failover_s(t, "node1") == pytest.approx(7.801)


# -- arguments, report, not measured --------------------------------------------------------------

def test_args_defaults_quick_and_errors():
    a = pm.parse_args([])
    assert (a.rounds, a.window, a.profiles, a.json) == (3, 30.0, ["default", "tuned"], None)
    q = pm.parse_args(["--quick"])
    assert (q.rounds, q.window, q.profiles) == (1, 10.0, ["default"])
    assert pm.parse_args(["--quick", "--rounds", "2", "--window", "4"]).rounds == 2
    assert pm.parse_args(["--profiles", "tuned"]).profiles == ["tuned"]
    for bad in (["--rounds", "-1"], ["--rounds", "x"], ["--window", "-3"], ["--profiles", "fast"], ["--nope"]):
        with pytest.raises(pm.BenchError):
            pm.parse_args(bad)


def test_main_bad_args_exit_2(capsys):
    assert pm.main(["--rounds", "zero"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pacemaker:")


def test_not_root_is_not_measured(monkeypatch, capsys):
    monkeypatch.setattr(pm.os, "geteuid", lambda: 1000)
    doc = pm.measure(1, 1)
    assert doc == {"measured": False, "reason": "needs root (network and mount namespaces)"}
    assert pm.main(["--quick"]) == 0
    assert capsys.readouterr().out.strip() == \
        "pacemaker anchor: not measured (needs root (network and mount namespaces))"


def test_missing_pacemaker_is_not_measured(monkeypatch):
    monkeypatch.setattr(pm.os, "geteuid", lambda: 0)
    real = shutil.which
    monkeypatch.setattr(pm.shutil, "which", lambda t: None if t == "pacemakerd" else real(t))
    doc = pm.measure(1, 1)
    assert doc["measured"] is False and "pacemakerd" in doc["reason"] and "failed" not in doc


def test_report_of_a_measured_document():
    doc = {"measured": True, "versions": {"corosync": "3.1.7", "pacemaker": "2.1.5", "resource_agents": "1:4.12.0-2",
                                          "libknet": "1.25-1"},
           "meta": {"cpus": 2, "loadavg_start": (1.0, 1, 1), "loadavg_end": (2.0, 1, 1)},
           "profiles": {"default": {"config": {}, "timeouts": {"token": 3650, "consensus": 4380, "join": 50},
                                    "start_s": 26.4,
                                    "rounds": [{"round": 1, "killed": "node1", "dc_before": "node3",
                                                "new_owner": "node2", "failover_s": 7.89, "membership_s": 7.55,
                                                "failed_probes": 780, "restore_s": 4.2}],
                                    "failover": pm.summarize([7.89])}},
           "footprint": {"profile": "default", "window_s": 30.0, "vip_on": "node1", "machine_busy_pct_of_all_cpus": 50,
                         "nodes": {"node1": {"processes": 8, "pss_mb": 129.0, "cpu_pct": 1.5, "sched_cpu_pct": 1.2,
                                             "programs": {"corosync": {"cpu_pct": 0.9}}}},
                         "worst": {"processes": 8, "pss_mb": 129.0, "cpu_pct": 1.5, "sched_cpu_pct": 1.2}}}
    text = pm.format_report(doc)
    assert "Corosync 3.1.7 + Pacemaker 2.1.5" in text
    assert "token 3650 ms, consensus 4380 ms" in text
    assert "failover 7.890 s (node1 -> node2" in text and "median 7.890 s, p50 7.890 s, max 7.890 s" in text
    assert "8 processes, PSS 129.0 MB, CPU 1.50 %" in text
    assert pm.format_report({"measured": False, "failed": True, "reason": "boom"}) == \
        "pacemaker anchor: FAILED (boom)"


# -- the real thing -------------------------------------------------------------------------------

def _why_not_real() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    if shutil.which("corosync") is None or shutil.which("pacemakerd") is None:
        return "pacemaker / corosync not installed (apt-get install pacemaker corosync resource-agents)"
    if not pm.IPADDR2.exists():
        return "resource-agents not installed (no IPaddr2)"
    return None


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(_why_not_real() is not None, reason=_why_not_real() or "")
def test_quick_run_measures_failover_and_footprint_and_leaves_nothing(tmp_path):
    out = tmp_path / "pcm.json"
    env = {k: v for k, v in os.environ.items() if k != "PCM_KEEP"}
    p = subprocess.Popen([sys.executable, str(_PATH), "--quick", "--json", str(out)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = p.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        p.terminate()                   # SIGTERM: the bench cleans up
        stdout, stderr = p.communicate(timeout=60)
        pytest.fail(f"bench/pacemaker.py --quick took too long:\n{stderr[-2000:]}")
    assert p.returncode == 0, f"exit {p.returncode}\n{stdout}\n{stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["measured"] is True, doc.get("reason")
    rounds = doc["profiles"]["default"]["rounds"]
    assert len(rounds) == 1 and "error" not in rounds[0]
    fo = rounds[0]["failover_s"]
    assert fo is not None and math.isfinite(fo) and fo > 0
    worst = doc["footprint"]["worst"]
    assert worst["processes"] > 0 and worst["pss_mb"] > 0
    assert doc["profiles"]["default"]["timeouts"]["token"] > 0
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in ns.splitlines() if line.startswith(f"pcm{p.pid}-")], ns
    assert not list(Path(tempfile_dir()).glob(f"pcm{p.pid}-*"))
    assert "failover" in stdout and "PSS" in stdout


def tempfile_dir() -> str:
    import tempfile
    return tempfile.gettempdir()
