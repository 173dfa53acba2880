"""The pure helpers of bench/footprint.py: /proc parsing, CPU, program names, the cost of a
process tree, cold-start steps. No cluster is started here."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "footprint.py"
# loaded by path: bench/ on sys.path would shadow the bus package with bench/bus.py
_spec = importlib.util.spec_from_file_location("bench_footprint", _PATH)
fp = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fp          # dataclasses look their module up there
_spec.loader.exec_module(fp)

SMAPS = """55d0c0000000-7ffd00000000 ---p 00000000 00:00 0                          [rollup]
Rss:               45612 kB
Pss:               27311 kB
Pss_Dirty:         19000 kB
Pss_Anon:          18800 kB
Pss_File:           8511 kB
Shared_Clean:      20000 kB
"""

# a command name with a space and a ")" in it, as the kernel writes it
STAT = ("4242 (py thon) x) S 4200 4242 4242 0 -1 4194304 5000 0 0 0 "
        "123 45 6 7 20 0 3 0 98765 300000000 11000 18446744073709551615 1 1 0 0 0 0 0 16781312 134234626 0 0 0 17 1 0 0")


def test_pss_is_the_pss_line_not_its_variants():
    assert fp.parse_pss_kb(SMAPS) == 27311
    assert fp.parse_pss_kb(SMAPS.replace("Pss:               27311 kB\n", "")) is None
    assert fp.parse_pss_kb("") is None


def test_stat_fields_counted_from_the_last_parenthesis():
    st = fp.parse_stat(STAT)
    assert (st.pid, st.comm, st.state, st.ppid) == (4242, "py thon) x", "S", 4200)
    assert (st.utime, st.stime, st.cutime, st.cstime, st.starttime) == (123, 45, 6, 7, 98765)
    with pytest.raises(ValueError):
        fp.parse_stat("garbage")


def test_stat_of_this_process_parses():
    st = fp.parse_stat(Path(f"/proc/{os.getpid()}/stat").read_text())
    assert st.pid == os.getpid() and st.ppid == os.getppid()


def test_cpu_percent_of_one_core():
    assert fp.cpu_percent(100, 10, clk_tck=100) == pytest.approx(10.0)   # 1 s of CPU in 10 s
    assert fp.cpu_percent(0, 30, clk_tck=100) == 0
    with pytest.raises(ValueError):
        fp.cpu_percent(1, 0)


def test_program_names_from_cmdlines():
    py = "/work/main/.venv/bin/python"
    assert fp.program_name(fp.split_cmdline(
        f"{py}\0-m\0ecluster.cli\0--keys\0/k\0service\0run\0election\0--config\0/c.toml\0--member\0n1\0".encode())) \
        == "election"
    assert fp.program_name([py, "-m", "ecluster.cli", "--keys", "/k", "bus", "run", "--config", "c", "--member", "n1"]) \
        == "broker"
    assert fp.program_name([py, "-m", "ecluster.cli", "node", "run", "-c", "c", "--node", "n1"]) == "runner"
    assert fp.program_name([py, "-m", "node.program", "--keys", "/k", "service", "run", "vip", "-c", "c", "-m", "n1"]) == "vip"
    assert fp.program_name(["/v/bin/ecluster", "manager", "run", "-c", "c", "-m", "m1"]) == "runner"
    assert fp.program_name([py, "/v/bin/supervisord", "-n", "-c", "x.conf"]) == "supervisord"
    assert fp.program_name(["/usr/sbin/keepalived", "--dont-fork"]) == "keepalived"
    assert fp.program_name(["git", "cat-file", "--batch"]) == "git"
    assert fp.program_name([]) == "?"


def _sample(pid, ppid, argv, ticks, child=0, ns=None, pss=1024, start=1):
    return fp.ProcSample(pid=pid, starttime=start, ppid=ppid, argv=argv, ticks=ticks, child_ticks=child,
                         sched_ns=ns, pss_kb=pss)


def test_tree_cost_deltas_programs_and_pid_reuse():
    cli = ["python", "-m", "ecluster.cli"]
    runner, sup = cli + ["node", "run"], ["python", "/v/bin/supervisord", "-n"]
    sync = cli + ["service", "run", "configsync"]
    before = {1: _sample(1, 0, runner, 50, ns=0), 2: _sample(2, 1, sup, 10, ns=0),
              3: _sample(3, 2, sync, 100, ns=0), 9: _sample(9, 2, cli + ["bus", "run"], 5, ns=0)}
    after = {1: _sample(1, 0, runner, 50, ns=0), 2: _sample(2, 1, sup, 12, ns=20_000_000),
             3: _sample(3, 2, sync, 110, child=4, ns=100_000_000),        # + a reaped git: 4 ticks
             4: _sample(4, 3, ["git", "cat-file"], 3, ns=30_000_000, start=7),     # started in the window
             9: _sample(9, 2, cli + ["bus", "run"], 1, ns=0, start=99)}            # pid 9 reused
    c = fp.tree_cost(before, after, 10.0, root=1, clk_tck=100)
    assert c["processes"] == 5 and c["pss_mb"] == 5.0
    # 0 + 2 + (10 + 4) + 3 + 1 (the new pid 9 from zero) = 20 ticks = 0.2 s in 10 s
    assert c["cpu_pct"] == pytest.approx(2.0)
    assert c["sched_cpu_pct"] == pytest.approx(1.5)
    assert (c["started_in_window"], c["ended_in_window"]) == (2, 1)
    progs = c["programs"]
    assert set(progs) == {"runner", "supervisord", "configsync", "broker"}
    assert progs["configsync"]["processes"] == 2 and progs["configsync"]["cpu_pct"] == pytest.approx(1.7)


def test_breakdown_sorted_by_cpu_and_role_means():
    members = {
        "n1": {"role": "node", "processes": 3, "pss_mb": 90.0, "cpu_pct": 1.0, "sched_cpu_pct": 1.0,
               "programs": {"broker": {"processes": 1, "pss_mb": 30.0, "cpu_pct": 0.6, "sched_cpu_pct": 0.6},
                            "vip": {"processes": 1, "pss_mb": 30.0, "cpu_pct": 0.4, "sched_cpu_pct": 0.4}}},
        "m1": {"role": "manager", "processes": 2, "pss_mb": 60.0, "cpu_pct": 0.8, "sched_cpu_pct": 0.8,
               "programs": {"broker": {"processes": 1, "pss_mb": 30.0, "cpu_pct": 0.8, "sched_cpu_pct": 0.8}}},
    }
    rows = fp.program_breakdown(members)
    assert [r["program"] for r in rows] == ["broker", "vip"]
    assert rows[0]["members"] == 2 and rows[0]["cpu_pct"] == pytest.approx(0.7)
    assert (rows[0]["max_cpu_pct"], rows[0]["max_on"]) == (0.8, "m1")
    roles = fp.role_means(members)
    assert roles["node"]["pss_mb"] == 90.0 and roles["manager"]["members"] == 1


def test_cold_start_steps():
    members = ["n1", "m1"]
    view = {"members": {"n1": {"state": "alive"}, "m1": {"state": "alive"}}}
    vip = {"address": "192.0.2.10/24", "owner": "n1", "holders": ["n1"]}
    up = {"n1": {"leader": "m1", "role": "follower", "view": view},
          "m1": {"leader": "m1", "role": "leader", "view": view, "vips": [vip]}}
    assert fp.settled(up, members) == "m1"
    assert fp.settled({**up, "n1": None}, members) is None
    suspect = {"members": {"n1": {"state": "alive"}, "m1": {"state": "suspect"}}}
    steps = fp.start_phases({**up, "n1": {**up["n1"], "view": suspect}}, members)
    assert steps == {"answering": True, "alive": False, "coordinator": True, "vips": True}
    unheld = {**up, "m1": {**up["m1"], "vips": [{**vip, "holders": []}]}}
    assert fp.start_phases(unheld, members)["vips"] is False


def test_sizes_and_keepalived_conf():
    assert fp.parse_sizes("3+1, 7+2") == [(3, 1), (7, 2)]
    for bad in ("3", "3+0", "x+1", ""):
        with pytest.raises(fp.BenchError):
            fp.parse_sizes(bad)
    conf = fp.keepalived_conf("ka0", "10.97.0.100", 1)
    assert "advert_int 1\n" in conf and "interface ka0" in conf and "10.97.0.100/24 dev ka0" in conf
    assert conf.count("{") == conf.count("}")
