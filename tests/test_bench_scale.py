"""bench/scale.py: its pure helpers with plain data (sizes, counter rates, the fit, growth,
the model part, failover and settling from election.status answers, the report), and one
quick run of the bench itself (root, slow: one 2+1 cluster, a 3 s window, one failover)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "scale.py"
# loaded by path: bench/ on sys.path would shadow the bus package with bench/bus.py
_spec = importlib.util.spec_from_file_location("bench_scale", _PATH)
sc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sc
_spec.loader.exec_module(sc)


def test_sizes_parse_and_refuse():
    assert sc.parse_sizes("2+1, 4+1,5+2") == [(2, 1), (4, 1), (5, 2)]
    assert [n + m for n, m in sc.parse_sizes(sc.DEFAULT_SIZES)] == [3, 5, 7, 9]
    assert [n + m for n, m in sc.parse_sizes(sc.QUICK_SIZES)] == [3, 5]
    for bad in ("3", "3+0", "0+1", "x+1", "", "2+1,2+1"):
        with pytest.raises(sc.BenchError):
            sc.parse_sizes(bad)


def test_args_defaults_quick_and_errors():
    a = sc.parse_args([])
    assert (a.window, a.rounds, len(a.sizes)) == (30.0, 3, 4)
    q = sc.parse_args(["--quick"])
    assert (q.window, q.rounds, q.sizes) == (10.0, 1, [(2, 1), (4, 1)])
    assert sc.parse_args(["--quick", "--sizes", "2+1", "--window", "3"]).sizes == [(2, 1)]
    for bad in (["--rounds", "0"], ["--window", "0.5"], ["--nope"], ["--preset", "wan"], ["--window", "x"]):
        with pytest.raises(sc.BenchError):
            sc.parse_args(bad)


def test_bad_arguments_exit_2_with_one_line():
    r = subprocess.run([sys.executable, str(_PATH), "--sizes", "3+0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "3+0" in r.stderr and "Traceback" not in r.stderr


def test_memory_check():
    assert sc.fits_in_memory(9, 24000) is None
    assert sc.fits_in_memory(9, None) is None
    why = sc.fits_in_memory(9, 1000, per_member_mb=200)
    assert why and "9 members" in why and "1000 MB" in why


def _bus(pid, routed, local, remote, peers):
    return {"pid": pid, "counters": {"routed": routed, "events_local": local, "events_remote": remote, "malformed": 0},
            "peers": {p: {"events": e} for p, e in peers.items()}}


def test_counter_rates_subtract_own_call_and_split_by_peer():
    before = _bus(7, 100, 50, 200, {"n2": 120, "m1": 80})
    after = _bus(7, 301, 150, 600, {"n2": 370, "m1": 230})
    r = sc.counter_rates(before, after, 10.0)
    # routed: 201 - the bench's own end-of-window call = 200 -> 20/s
    assert (r["routed_per_s"], r["events_local_per_s"], r["events_remote_per_s"]) == (20.0, 10.0, 40.0)
    assert r["msgs_per_s"] == pytest.approx(70.0)
    assert r["peer_events_per_s"] == {"n2": 25.0, "m1": 15.0}
    with pytest.raises(ValueError):      # broker restarted: counters went down
        sc.counter_rates(after, before, 10.0)
    with pytest.raises(ValueError):      # same counters, other pid
        sc.counter_rates(before, {**after, "pid": 8}, 10.0)
    with pytest.raises(ValueError):
        sc.counter_rates(before, after, 0)


def test_mean_worst():
    assert sc.mean_worst({"n1": 1.0, "n2": 3.0, "m1": None}) == {"mean": 2.0, "worst": 3.0, "worst_on": "n2"}
    assert sc.mean_worst({"n1": None}) == {"mean": None, "worst": None, "worst_on": None}


def test_fit_line_recovers_slope_and_intercept():
    xs = [10, 20, 30, 40]
    f = sc.fit_line(xs, [0.002 * x + 0.1 for x in xs])
    assert f["c"] == pytest.approx(0.002) and f["b"] == pytest.approx(0.1) and f["r2"] == pytest.approx(1.0)
    assert not f["degenerate"] and f["points"] == 4
    # through the origin: sum(xy)/sum(x^2)
    assert f["c0"] == pytest.approx(sum(x * (0.002 * x + 0.1) for x in xs) / sum(x * x for x in xs))
    one = sc.fit_line([50, 50], [0.5, 0.7])
    assert one["degenerate"] and one["b"] == 0 and one["c"] == pytest.approx(0.012)
    with pytest.raises(ValueError):
        sc.fit_line([], [])


def test_growth_exponents_and_words():
    assert sc.growth_exponent(10, 20) == pytest.approx(1.0)
    assert sc.growth_exponent(10, 40) == pytest.approx(2.0)
    assert sc.growth_exponent(0, 5) is None and sc.growth_exponent(5, None) is None
    assert "square" in sc.describe_growth(1.0) and "linear" in sc.describe_growth(1.0)
    assert "constant" in sc.describe_growth(0.05)
    assert "cube" in sc.describe_growth(2.0) and "square of N per member" in sc.describe_growth(2.0)
    assert sc.describe_growth(None) == "unknown"
    ns = [3, 5, 7, 9]
    assert sc.loglog_exponent(ns, [4 * n for n in ns]) == pytest.approx(1.0)
    assert sc.loglog_exponent(ns, [n * n for n in ns]) == pytest.approx(2.0)
    assert sc.loglog_exponent([3], [1.0]) is None and sc.loglog_exponent([3, 5], [1.0, 0]) is None


def _member(role, msgs, cpu, pss):
    return {"role": role, "msgs_per_s": msgs, "cpu_pct": cpu, "sched_cpu_pct": cpu, "pss_mb": pss,
            "routed_per_s": msgs / 2, "events_local_per_s": msgs / 4, "events_remote_per_s": msgs / 4}


def _sizes():
    """Two measured sizes whose members cost 0.01 % per msg/s + 0.2 %, msgs/s = 10 (N - 1)."""
    def members(n, m):
        out = {}
        for i in range(1, n + 1):
            out[f"n{i}"] = _member("node", 10 * (n + m - 1), 0.01 * 10 * (n + m - 1) + 0.2, 80.0 + (n + m))
        for i in range(1, m + 1):
            out[f"m{i}"] = _member("manager", 12 * (n + m - 1), 0.01 * 12 * (n + m - 1) + 0.2, 80.0 + (n + m))
        return out
    return {"2+1": sc.size_row(2, 1, members(2, 1)), "4+1": sc.size_row(4, 1, members(4, 1)),
            "9+1": {"nodes": 9, "managers": 1, "skipped": "no memory"}}


def fake_model(timing, nodes, managers):
    peers = nodes + managers - 1
    return {"node": 10.0 * peers, "manager": 12.0 * peers, "terms": {"heartbeats": 10.0 * peers, "timing": timing}}


def test_size_row_summaries():
    r = _sizes()["4+1"]
    assert r["msgs"] == {"mean": pytest.approx(41.6), "worst": 48, "worst_on": "m1"}
    assert r["pss"]["worst"] == 85.0 and r["split"]["routed_per_s"] == pytest.approx(20.8)


def test_model_section_fit_extrapolation_and_growth():
    out = sc.model_section(fake_model, "lan", _sizes())
    fit = out["cpu_fit"]
    assert fit["c"] == pytest.approx(0.01) and fit["b"] == pytest.approx(0.2) and fit["points"] == 8
    assert out["measured_exponent"] is not None and out["measured_exponent"] > 0.5
    cmp_ = {(c["size"], c["role"]): c for c in out["compare"]}
    assert set(cmp_) == {("2+1", "node"), ("2+1", "manager"), ("4+1", "node"), ("4+1", "manager")}
    assert all(c["ratio"] == pytest.approx(1.0) for c in out["compare"])
    ex = {r["members"]: r for r in out["extrapolated"]}
    assert set(ex) == {32, 64}
    assert (ex[32]["nodes"], ex[32]["managers"]) == (31, 1)
    assert ex[32]["node"]["msgs_per_s"] == pytest.approx(310) and ex[32]["node"]["cpu_pct"] == pytest.approx(3.3)
    assert ex[64]["manager"]["msgs_per_s"] == pytest.approx(756)
    # per member ~ N - 1: from 32 to 64 just over twice: linear, the cluster's total with N^2
    assert 0.9 < ex[32]["node"]["exponent"] < 1.1
    assert out["exponent_at_largest"]["members"] == 5
    # PSS: the measured mean of all 8 members, and its slope over N (1 MB per member by construction)
    assert out["pss"]["slope_mb_per_member"] == pytest.approx(1.0)
    assert out["pss"]["mean_mb"] == pytest.approx((3 * 83 + 5 * 85) / 8, abs=0.01)
    text = "\n".join(sc.format_model(out))
    assert "cpu% = 0.0100 * msgs/s + 0.200" in text and "32 members (31+1)" in text and "square" in text


def test_model_absent_still_fits_but_extrapolates_nothing():
    out = sc.model_section(None, "lan", _sizes())
    assert not out["available"] and out["cpu_fit"]["c"] == pytest.approx(0.01)
    assert "extrapolated" not in out and "compare" not in out
    text = "\n".join(sc.format_model(out))
    assert "model: not available in ecluster.timing" in text and "extrapolated" not in text


def test_timing_model_is_called_only_when_there():
    import ecluster.timing as t
    fn = sc.timing_model()
    assert (fn is None) == (not hasattr(t, "idle_message_rate"))


def _status(member, role="leader", owner="n2", holders=("n2",), state="owned", alive=("n1", "n2", "m1"),
            dead=(), preference="n1"):
    view = {"members": {**{m: {"state": "alive"} for m in alive}, **{m: {"state": "dead"} for m in dead}}}
    return {"member": member, "role": role, "leader": member if role == "leader" else "m1", "view": view,
            "vips": [{"address": "192.0.2.10/24", "owner": owner, "holders": list(holders), "state": state,
                      "preference": preference}]}


def test_failover_seen_only_from_the_coordinator_and_elsewhere():
    assert sc.failover_seen(_status("m1"), victim="n1")
    assert not sc.failover_seen(_status("m1", owner="n1", holders=("n1",)), victim="n1")
    assert not sc.failover_seen(_status("m1", holders=("n1", "n2"), state="unsafe"), victim="n1")
    assert not sc.failover_seen(_status("m1", holders=(), state="broken"), victim="n1")
    assert not sc.failover_seen(_status("n2", role="follower"), victim="n1")
    assert not sc.failover_seen({"role": "leader", "member": "m1", "vips": []}, victim="n1")
    assert sc.vip_owner(_status("m1")) == "n2"
    assert sc.vip_owner(_status("m1", holders=())) is None


def test_resettled_needs_everyone_alive_and_the_preferred_owner():
    members = ["n1", "n2", "m1"]
    assert sc.resettled(_status("m1", owner="n1", holders=("n1",)), members)
    assert not sc.resettled(_status("m1"), members)                            # not back on n1 yet
    assert sc.resettled(_status("m1", preference=None), members)
    assert not sc.resettled(_status("m1", owner="n1", holders=("n1",), alive=("n2", "m1"), dead=("n1",)), members)
    assert not sc.resettled(_status("n2", role="follower", owner="n1", holders=("n1",)), members)


def test_alive_views_for_a_cluster_that_did_not_settle():
    text = sc.alive_views({"n1": _status("n1", role="follower", alive=("n1",), dead=("n2", "m1")), "n2": None,
                           "m1": _status("m1")})
    assert text == "n1 sees 1/3 alive, leader m1; n2 no answer; m1 sees 3/3 alive, leader m1"


def test_session_field_and_own_session():
    stat = "4242 (py thon) x) S 4200 4242 4100 0 -1 4194304 5000 0 0 0 123 45 6 7 20 0 3 0 98765"
    assert sc.parse_session(stat) == 4100
    assert sc.parse_session(Path(f"/proc/{os.getpid()}/stat").read_text()) == os.getsid(0)
    with pytest.raises(ValueError):
        sc.parse_session("garbage")


def test_report_has_every_row():
    sizes = _sizes()
    sizes["2+1"].update(cold_start_s=2.5, coordinator="m1", bootstrap_s=1.0,
                        window={"window_s": 10.0, "machine_busy_pct": 40.0, "loadavg": [1.0, 1.2]},
                        commit={"median_s": 0.2, "runs_s": [0.2, 0.21, 0.19]},
                        failover={"median_s": 1.2, "rounds": [{"s": 1.2, "victim": "n1", "new_owner": "n2", "dead_seen_s": 0.5}]})
    sizes["4+1"]["failover"] = {"skipped": "why not", "rounds": []}
    sizes["5+1"] = {"nodes": 5, "managers": 1, "error": "did not come up"}
    doc = {"meta": {"preset": "lan", "window_s": 10.0, "cpus": 2, "loadavg_start": [1.0], "loadavg_end": [1.5]},
           "sizes": sizes, "model": sc.model_section(fake_model, "lan", sizes)}
    text = sc.format_report(doc)
    assert sc.FAILOVER_ROW + ": median 1.200 s of 1 (1.200 s (n1 -> n2, dead seen at 0.500 s))" in text
    assert "not measured (why not)" in text and "FAILED: did not come up" in text and "skipped: no memory" in text
    assert "config commit (to all 3 live copies): median 0.200 s of 3" in text
    assert "bus msgs/s per member: mean" in text and "PSS MB per member: mean" in text
    assert "idle CPU % per member: mean" in text and "summary" in text
    json.dumps(doc, default=str)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the bench runs member processes as root "
                                                          "(as bench/footprint.py); not root")


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(150)
@needs_root
def test_quick_run_of_the_bench(tmp_path):
    """One 2+1 cluster, a 3 s window, one failover round: every figure there and sensible."""
    out = tmp_path / "scale.json"
    before = set(_bench_processes())
    started = time.time() - 1
    r = subprocess.run([sys.executable, str(_PATH), "--quick", "--sizes", "2+1", "--window", "3", "--rounds", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=140, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    row = doc["sizes"]["2+1"]
    assert "error" not in row
    assert set(row["members"]) == {"n1", "n2", "m1"}
    for name, m in row["members"].items():
        assert m["pss_mb"] > 10, name
        assert m["msgs_per_s"] > 0 and m["events_local_per_s"] > 0 and m["events_remote_per_s"] > 0, name
        assert m["sched_cpu_pct"] > 0, name
        assert set(m["peer_events_per_s"]) == {"n1", "n2", "m1"} - {name}
    assert row["commit"]["median_s"] > 0 and len(row["commit"]["runs_s"]) == 3
    fo = row["failover"]
    assert len(fo["rounds"]) == 1 and math.isfinite(fo["median_s"]) and 0 < fo["median_s"] < 30
    assert fo["rounds"][0]["new_owner"] != fo["rounds"][0]["victim"]
    assert doc["model"]["cpu_fit"]["points"] == 3
    assert sc.FAILOVER_ROW in r.stdout and "bus msgs/s per member" in r.stdout
    if not doc["model"]["available"]:
        assert "model: not available in ecluster.timing" in r.stdout
    # nothing left behind: no process started with one of the bench's cluster files, no work directory
    assert not set(_bench_processes()) - before
    assert not [p for p in Path(tempfile.gettempdir()).glob("eclsc-work-*") if p.stat().st_mtime >= started]


def _bench_processes() -> list[int]:
    """PIDs whose command line names a cluster file of bench/scale.py (its work directory)."""
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                if b"eclsc-work-" in Path(f"/proc/{e}/cmdline").read_bytes():
                    out.append(int(e))
            except OSError:
                continue
    return out
