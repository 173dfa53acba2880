"""Unit tests of the chaos suite's pure parts: schedules (determinism, the quorum bound,
replay) and the checker (each broken history fails the verdict, a clean one passes)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from chaos.checker import AppliedFault, History, check, double_holders, format_verdict, longest_gap
from chaos.schedule import (
    DEFAULT_KINDS, MAX_IMPAIRED, Fault, ScheduleError, active_at, clock_targets, end_time, from_json,
    generate, impaired_at, to_json,
)

MEMBERS = ["n1", "n2", "n3", "m1", "m2"]


# -- schedules ------------------------------------------------------------------------------------------

def test_same_seed_same_schedule_other_seed_other_schedule():
    a, b = generate(42, 300), generate(42, 300)
    assert a == b and len(a) > 50
    assert generate(43, 300) != a


def test_schedule_round_trips_through_json():
    s = generate(7, 200)
    assert from_json(to_json(s)) == s
    assert from_json("# comment\n\n" + to_json(s[:3])) == s[:3]


@pytest.mark.parametrize("seed", range(12))
def test_majority_and_a_node_always_left_outside_no_quorum_windows(seed):
    s = generate(seed, 400)
    windows = [f for f in s if f.fault == "no_quorum"]
    assert windows, "a long run has a no-quorum window"
    for f in windows:          # exclusive: nothing else in force during it
        assert [g for g in s if g.fault != "no_quorum" and g.t <= f.end and f.t <= g.end] == []
    for step in range(0, 4000):
        t = step / 10
        if any(f.fault == "no_quorum" for f in active_at(s, t)):
            continue
        bad = impaired_at(s, t, MEMBERS)
        assert len(bad) <= MAX_IMPAIRED, (seed, t, bad)
        assert {"n1", "n2", "n3"} - bad, (seed, t, bad)
    assert end_time(s) <= 400
    assert all(f.t >= 0 and f.duration >= 0 for f in s)


@pytest.mark.parametrize("seed", range(6))
def test_one_fault_per_member_at_a_time_and_one_partition(seed):
    s = generate(seed, 300)
    for i, f in enumerate(s):
        for g in s[i + 1:]:
            if g.t > f.end or f.duration == 0 or g.duration == 0:
                continue
            assert not (f.fault == g.fault == "partition"), (f, g)
            if "partition" not in (f.fault, g.fault) and "no_quorum" not in (f.fault, g.fault):
                assert f.target != g.target, (f, g)


def test_every_default_kind_appears_and_clock_targets_are_known():
    s = generate(3, 600)
    assert {f.fault for f in s} == set(DEFAULT_KINDS)
    assert clock_targets(s) == {f.target for f in s if f.fault == "clock_jump"}
    assert all(f.target.split(":")[0] in ("n1", "n2", "n3") for f in s if f.fault == "disk_full")
    only = generate(3, 100, kinds=["service_kill"])
    assert only and {f.fault for f in only} == {"service_kill"}


@pytest.mark.parametrize("kwargs, text", [
    ({"seed": "x", "duration": 60}, "seed must be an integer"),
    ({"seed": 1, "duration": 1}, "duration must be"),
    ({"seed": 1, "duration": 60, "kinds": ["meteor"]}, "unknown fault kind"),
    ({"seed": 1, "duration": 60, "kinds": []}, "unknown fault kind"),
])
def test_bad_schedule_arguments_are_refused(kwargs, text):
    with pytest.raises(ScheduleError, match=text):
        generate(**kwargs)


def test_bad_schedule_files_are_refused():
    with pytest.raises(ScheduleError, match="line 1"):
        from_json("not json")
    with pytest.raises(ScheduleError, match="unknown fault"):
        from_json(json.dumps({"t": 1, "fault": "meteor", "target": "n1", "duration": 1}))
    with pytest.raises(ScheduleError, match="negative"):
        from_json(json.dumps({"t": -1, "fault": "kill", "target": "n1", "duration": 1}))


# -- the checker -----------------------------------------------------------------------------------------

REV_A, REV_B, REV_C = "a" * 40, "b" * 40, "c" * 40
VIP = "10.99.0.100"


def clean_history() -> History:
    """A run where everything held: one VIP moving n1 -> n2 cleanly, records and commits everywhere."""
    reads = []
    for k in range(200):
        t = 1000 + k * 0.01
        owner = "n1" if k < 100 else ("n2" if k > 110 else None)
        for j, m in enumerate(MEMBERS):
            held = (VIP,) if m == owner else ()
            reads.append((t + j * 0.001, m, held))
    probes = {VIP: [(1000 + k * 0.01, 1000 + k * 0.01 + 0.002, "n1" if k < 100 else ("n2" if k > 115 else None))
                    for k in range(200)]}
    acked = {"n1/chaosdisk": list(range(0, 40)), "n2/chaoslog": list(range(0, 20))}
    return History(
        vips=[VIP], members=list(MEMBERS), reads=reads, probes=probes,
        faults=[AppliedFault(1.0, "kill", "n1", 0.1, "", 1001.0, 1001.1)],
        journal_acked=acked, journal_maybe={"n1/chaosdisk": [40, 41]},
        sinks={"m1": {k: list(v) for k, v in acked.items()},
               "m2": {"n1/chaosdisk": list(range(0, 42)), "n2/chaoslog": list(range(0, 20))}},
        commits_acked=[REV_B, REV_C],
        member_revs={m: [REV_C, REV_B, REV_A] for m in MEMBERS},
        applied={m: REV_C for m in MEMBERS}, final_head=REV_C,
        process_states={m: {"broker": "RUNNING", "vip": "RUNNING"} for m in MEMBERS},
        mail_accepted=["id1", "id2"], mail_spooled={"n1": ["id1"], "n2": ["id2"]},
        phase=(1000.0, 1002.0), probe_end=1002.0,
    )


def failing(h: History) -> set[str]:
    return {r.check for r in check(h).failed()}


def test_a_clean_history_passes_and_reports_the_failover_gap():
    v = check(clean_history())
    assert v.passed, format_verdict(v)
    (f, gaps), = v.fault_rows
    assert 0.15 < gaps[VIP] < 0.2           # answers stop after k=99, resume at k=116
    text = format_verdict(v, seed=9)
    assert text.endswith("PASS (seed 9)") and "records missing" in text


def test_a_double_holder_fails():
    h = clean_history()
    h.reads.append((1000.505, "n2", (VIP,)))     # n2 shows the VIP while n1 holds it on both sides
    assert "max holders of one VIP" in failing(h)
    assert double_holders(h.reads)[0][2] == ["n1", "n2"]


def test_a_handover_seen_across_one_sampling_pass_is_not_a_double_holder():
    # n1's read at t shows it, n2's read 1 ms later too, but n1's next read no longer does
    reads = [(1.000, "n1", (VIP,)), (1.001, "n2", ()), (1.010, "n1", ()), (1.011, "n2", (VIP,)),
             (1.020, "n1", ()), (1.021, "n2", (VIP,))]
    assert double_holders(reads) == []


def test_an_arp_double_answer_fails():
    h = clean_history()
    h.arp_doubles = [(1000.5, VIP, ["n1", "n2"])]
    assert failing(h) == {"ARP rounds, two answers"}


def test_two_arp_answers_from_a_member_on_a_delaying_link_are_not_judged():
    h = clean_history()
    h.faults.append(AppliedFault(5.0, "netem", "n1", 1.0, "delay 40ms 20ms", 1000.0, 1000.6))
    h.arp_doubles = [(1001.2, VIP, ["n1", "n2"])]              # up to 1 s after the fault: excused
    v = check(h)
    assert v.passed and "not judged" in {r.check: r.detail for r in v.rows}["ARP rounds, two answers"]
    h.arp_doubles = [(1001.7, VIP, ["n1", "n2"])]              # later: judged
    assert failing(h) == {"ARP rounds, two answers"}


def test_a_lost_record_fails():
    h = clean_history()
    h.sinks["m2"]["n2/chaoslog"].remove(7)
    assert failing(h) == {"records missing"}
    assert "m2 n2/chaoslog: 7" in {r.check: r.detail for r in check(h).rows}["records missing"]


def test_a_doubled_record_fails():
    h = clean_history()
    h.sinks["m1"]["n1/chaosdisk"].append(3)
    assert failing(h) == {"records doubled"}


def test_a_record_nobody_wrote_fails_but_a_maybe_record_does_not():
    h = clean_history()
    assert check(h).passed                       # m2 holds 40 and 41, written but not acknowledged
    h.sinks["m1"]["n1/chaosdisk"].append(99)
    assert failing(h) == {"records unknown"}


def test_a_lost_commit_fails():
    h = clean_history()
    h.member_revs["n3"] = [REV_C, REV_A]          # n3's history lacks the acknowledged REV_B
    assert failing(h) == {"commits missing"}


def test_a_member_behind_fails():
    h = clean_history()
    h.applied["m2"] = REV_B
    assert failing(h) == {"members not caught up"}


def test_a_dead_service_fails():
    h = clean_history()
    h.process_states["n2"]["vip"] = "FATAL"
    assert failing(h) == {"services not running"}
    h = clean_history()
    del h.process_states["m1"]                    # its supervisord did not answer at all
    assert failing(h) == {"services not running"}


def test_lost_mail_and_a_vip_down_at_the_end_fail():
    h = clean_history()
    h.mail_spooled["n2"] = []
    assert failing(h) == {"mail missing"}
    h = clean_history()
    h.probe_end = 1010.0                          # the VIP's last answer was 8 s before the probes stopped
    assert failing(h) == {"VIPs down at the end"}


def test_a_run_that_did_nothing_fails():
    h = clean_history()
    h.journal_acked, h.commits_acked = {}, []
    assert {"records acknowledged", "commits acknowledged"} <= failing(h)


def test_history_survives_json():
    h = clean_history()
    again = History.from_dict(json.loads(json.dumps(dataclasses.asdict(h))))
    assert check(again).rows == check(h).rows


def test_longest_gap_is_clipped_to_what_the_probe_saw():
    att = [(0.0, 0.1, "n1"), (0.5, 0.6, None), (1.0, 1.1, "n2")]
    assert longest_gap(att, 0.0, 2.0) == pytest.approx(1.0)      # 0.1 .. 1.1
    assert longest_gap(att, 5.0, 6.0) == 0.0
    assert longest_gap([], 0.0, 1.0) == 0.0


def test_netem_stand_in_is_a_slower_link_for_more_loss():
    from chaos.schedule import NETEM_CHOICES, netem_to_tbf
    assert netem_to_tbf("loss 30%") == "tbf rate 128kbit burst 16kb latency 20ms"
    assert netem_to_tbf("delay 80ms 40ms loss 2%") == "tbf rate 512kbit burst 16kb latency 160ms"
    assert netem_to_tbf("delay 40ms 20ms") == "tbf rate 1mbit burst 16kb latency 80ms"
    assert all(netem_to_tbf(c).startswith("tbf rate ") for c in NETEM_CHOICES)
