"""VIP failover: ecluster beside keepalived, measured in one run, in namespace labs.

Usage (as root): python bench/failover.py [--rounds N] [--quick] [--json FILE]
                                         [--presets fast,lan] [--no-keepalived]

The anchor is keepalived, run by the unchanged scripts in ../shared/anchors (namespaces
``lab-*``, subnet 10.77.0.0/24; they build and remove their own lab):

  keepalived_failover.sh ADV N      kill -9 the owner's namespace + link down, N rounds, for
                                    advert_int 1 and 0.1; then the killed (highest-priority)
                                    node returns and preempts the VIP back
  keepalived_partition.sh ADV R     nodes cut off from each other while the client reaches
                                    all of them: holders during the cut, client cut-off after
                                    the heal

ecluster runs in its own lab (tests/vip_cluster.LabCluster: namespaces ``ecl…-*``, subnet
10.99.0.0/24, 3 nodes + 1 manager, one VIP preferring n1), once per timing preset:

  failover    N rounds: the client starts a connection to the VIP every 5 ms (overlapping
              attempts, tests/probe.py); kill -9 everything in the owner's
              namespace and down its link; seconds until another node answers the client
  failback    after each kill: the node returns; the longest client gap while the VIP moves
              back to it (release, then acquire)
  move        N graceful ``election.move`` calls (n2, n3, n1, ...): the longest client gap
  partition   the owner cut off from every other member (the client still reaches all) for
              HOLD s: most nodes holding the VIP at one sampled instant (every 10 ms, by the
              nodes' addresses and by ARP answers to the client); then
              the heal: the longest client gap until the VIP is back on n1
  isolation   every member cut off from every other: holders once the leases lapsed (must be
              0), then the heal: seconds until the VIP is owned again and the client answered

Definitions (the same for both systems): failover = first probe answered by another node
(the earliest answer to an attempt started after the kill) minus the kill instant. "gap" =
the longest window between two answered probes (tests/probe_analysis), so a clean move still
shows the probe cadence (~5 ms). ecluster's probe overlaps attempts, so a SYN lost in a
handover costs one attempt, not the gap; keepalived's anchor probe (unchanged) is blocking
with a 50 ms connect timeout, so its gaps and failovers can carry up to ~50 ms more;
"outage" = keepalived's figure, the summed windows that contain failed probes (0 when no
probe failed). p99 is the nearest-rank percentile (with 10 rounds it is the maximum).

Where the time goes: every ecluster round also carries a breakdown read from the members'
service logs (suspected / dead / assigned / plumbed, seconds after the event; for moves the
"hole" between the old holder's unplumb and the new one's plumb), the probe's failed attempts
by error, and every sampled instant with two holders with the scenario it fell in and how long
that sampling pass took. ``ECL_KEEP=1`` keeps the labs' data dirs (logs) for a closer look.
Everything the bench starts is stopped (by PID) and every namespace removed, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

ANCHORS = (REPO.parent / "shared" / "anchors").resolve()
KA_FAILOVER = ANCHORS / "keepalived_failover.sh"
KA_PARTITION = ANCHORS / "keepalived_partition.sh"
KA_NETLAB = ANCHORS / "netlab.sh"
KA_TMP_PATTERNS = ("kafo.", "kapart.")       # the anchor scripts' mktemp -d /tmp/<name>.XXXXXX
APT_COMMAND = "apt-get update && apt-get install -y keepalived arping"

VIP = "10.99.0.100"
HOLD_S = 3.0              # how long a partition / isolation lasts (keepalived's HOLD is 3 s too)
TRAIL_S = 0.3             # probe data kept after the end of a measured window
KA_PARTITION_ROUNDS = 3   # keepalived partition rounds per advert_int (1 with --quick)
MAX_CONSECUTIVE_FAILURES = 3   # ecluster scenarios failing in a row: the lab is broken, stop

# (system key, keepalived advert_int it is compared with)
PRESET_ANCHOR = {"fast": "0.1", "lan": "1"}

TARGETS = {
    "fast_median_s": 0.25,       # below keepalived at advert_int 0.1 (0.29 s)
    "lan_median_s": 1.0,         # keepalived at advert_int 1: 3.07 s
    "p99_over_median": 2.0,
    "move_gap_s": 0.05,          # graceful move and failback
    "holders": 1,
    "heal_gap_s": 0.1,
}


class BenchError(Exception):
    """A precondition of the benchmark is not met (not root, a tool missing, a bad argument)."""


# -- pure figures ---------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0..100) of ``values``; None when empty."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    rank = max(1, math.ceil(q / 100 * len(v)))
    return v[min(rank, len(v)) - 1]


def summarize(values: list[float | None]) -> dict:
    """n, missing (None values), min, median, p99, max of ``values`` (seconds)."""
    v = [x for x in values if x is not None]
    out = {"n": len(v), "missing": len(values) - len(v)}
    if v:
        out.update(min=round(min(v), 4), median=round(statistics.median(v), 4),
                   p99=round(percentile(v, 99), 4), max=round(max(v), 4))
    return out


def outage(attempts, a: float, b: float | None = None) -> tuple[float, int]:
    """keepalived's definition: (summed unreachable windows, number of windows) for failed
    probes started in [a, b]; a window runs from the last answer before a run of failed
    probes to the first answer after it (t1 to t1). An outage still open at the end of the
    log runs to its last attempt."""
    total, windows, last_ok, failing = 0.0, 0, None, False
    for x in attempts:
        if x.t0 < a:
            if x.who is not None:
                last_ok = x
            continue
        if b is not None and x.t0 > b:
            break
        if x.who is None:
            failing = True
            last = x
        else:
            if failing and last_ok is not None:
                total += x.t1 - last_ok.t1
                windows += 1
            failing, last_ok = False, x
    if failing:
        total += last.t1 - (last_ok.t1 if last_ok is not None else a)
        windows += 1
    return round(total, 4), windows


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, None when either is missing or b is 0."""
    if a is None or not b:
        return None
    return round(a / b, 3)


def max_in_window(samples, vip: str, a: float, b: float) -> int:
    """Most members holding ``vip`` at one instant among sampler samples taken in [a, b]."""
    return max((len(h.get(vip, [])) for t, h in samples if a <= t <= b), default=0)


def first_time(samples, vip: str, a: float, pred) -> float | None:
    """Time of the first sample at or after ``a`` whose holder count satisfies ``pred``."""
    for t, h in samples:
        if t >= a and pred(len(h.get(vip, []))):
            return t
    return None


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ ecluster\.(\w+): (.*)$")


def parse_service_log(text: str, member: str) -> list[tuple[float, str, str, str]]:
    """(time.time() instant, member, service, message) of each line of a service log
    (Python logging's default asctime, local time, millisecond resolution)."""
    out = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            out.append((t, member, m.group(3), m.group(4)))
    return out


def _first(events, t0: float, pred) -> float | None:
    for t, member, service, msg in events:
        if t >= t0 and pred(member, service, msg):
            return round(t - t0, 3)
    return None


def _assigned_to(msg: str, vip: str) -> str | None:
    m = re.search(r"assignment: \{.*'" + re.escape(vip) + r"': (?:'(\w+)'|None)", msg)
    return m.group(1) if m else None


def failover_breakdown(events, t0: float, killed: str, vip: str) -> dict:
    """Where a failover's time goes, from the service logs (seconds after the kill)."""
    return {
        "suspected_s": _first(events, t0, lambda m, s, x: s == "membership" and x.startswith(f"{killed}: alive -> ")),
        "dead_s": _first(events, t0, lambda m, s, x: s == "membership" and x.startswith(f"{killed}: ")
                         and x.endswith("-> dead")),
        "new_coordinator_s": _first(events, t0, lambda m, s, x: s == "election" and x.startswith("coordinator for term")),
        "assigned_s": _first(events, t0, lambda m, s, x: s == "election" and _assigned_to(x, vip) not in (None, killed)),
        "plumbed_s": _first(events, t0, lambda m, s, x: s == "vip" and m != killed and x.startswith(f"{vip}/")
                            and "plumbed on" in x),
    }


def move_breakdown(events, t0: float, old: str, new: str, vip: str) -> dict:
    """Where a move's time goes (seconds after ``t0``): the assignment, the old holder's
    unplumb, the new holder's plumb; the hole between the last two is when no node has it."""
    out = {
        "assigned_s": _first(events, t0, lambda m, s, x: s == "election" and _assigned_to(x, vip) == new),
        "unplumbed_s": _first(events, t0, lambda m, s, x: s == "vip" and m == old and x.startswith(f"{vip}/")
                              and x.endswith(": unplumbed")),
        "plumbed_s": _first(events, t0, lambda m, s, x: s == "vip" and m == new and x.startswith(f"{vip}/")
                            and "plumbed on" in x),
        "assignment_changes": sum(1 for t, m, s, x in events if t >= t0 and s == "election" and " assignment: " in x),
        "suspicions": sum(1 for t, m, s, x in events if t >= t0 and s == "membership" and x.endswith("-> suspect")),
        "election_up_s": _first(events, t0, lambda m, s, x: s == "election" and m == new and x.startswith("election up")),
    }
    if out["unplumbed_s"] is not None and out["plumbed_s"] is not None:
        out["hole_ms"] = round((out["plumbed_s"] - out["unplumbed_s"]) * 1000)
    return out


def parse_jsonl(text: str) -> list[dict]:
    """The JSON objects of a JSON-lines text (other lines ignored)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def keepalived_partition_row(row: dict) -> dict:
    """The figures we use from one keepalived_partition.sh result line."""
    still = bool(row.get("still_unreachable_at_end"))
    heal = (row.get("heal_gap_s") or 0) + (row.get("unreachable_at_end_for_s") or 0 if still else 0)
    return {"holders_during": len(row.get("holders_during") or []),
            "heal_cutoff_s": round(heal, 4),
            "still_unreachable_at_end": still,
            "t_3_holders_s": row.get("t_3_holders_s"),
            "heal_to_1_holder_s": row.get("heal_to_1_holder_s")}


def system_summary(failover: list, failback_gap: list, failback_outage: list, move_gap: list,
                   partitions: list[dict], isolation: dict | None) -> dict:
    """One row of the table, from the per-round figures of one system/preset."""
    return {
        "failover_s": summarize(failover),
        "failback_gap_s": summarize(failback_gap),
        "failback_outage_s": summarize(failback_outage),
        "move_gap_s": summarize(move_gap),
        "partition_max_holders": max((p["holders_during"] for p in partitions), default=None),
        "heal_cutoff_s": max((p["heal_cutoff_s"] for p in partitions), default=None),
        "heal_still_unreachable": any(p.get("still_unreachable_at_end") for p in partitions),
        "isolation_holders_after_lapse": None if isolation is None else isolation.get("holders_after_lapse"),
        "isolation_owned_again_s": None if isolation is None else isolation.get("owned_again_s"),
        "isolation_client_back_s": None if isolation is None else isolation.get("client_back_s"),
    }


def evaluate_targets(summaries: dict[str, dict]) -> list[dict]:
    """Each target beside its measured figure: name, system, value, target, met."""
    out = []

    def add(name, system, value, target, met):
        out.append({"target": name, "system": system, "value": value, "limit": target,
                    "met": None if value is None else met})

    for preset, limit_key in (("fast", "fast_median_s"), ("lan", "lan_median_s")):
        s = summaries.get(f"ecluster {preset}")
        if not s:
            continue
        fo = s["failover_s"]
        med, p99 = fo.get("median"), fo.get("p99")
        add("failover median <= %.2f s" % TARGETS[limit_key], f"ecluster {preset}", med,
            TARGETS[limit_key], med is not None and med <= TARGETS[limit_key] and fo["missing"] == 0)
        add("failover p99 <= 2x median", f"ecluster {preset}", p99,
            None if med is None else round(TARGETS["p99_over_median"] * med, 4),
            med is not None and p99 is not None and p99 <= TARGETS["p99_over_median"] * med)
        for key, label in (("failback_gap_s", "failback gap"), ("move_gap_s", "move gap")):
            mx = s[key].get("max")
            add(f"{label} <= 50 ms (max)", f"ecluster {preset}", mx, TARGETS["move_gap_s"],
                mx is not None and mx <= TARGETS["move_gap_s"])
        h = s["partition_max_holders"]
        add("holders during partition <= 1", f"ecluster {preset}", h, TARGETS["holders"],
            h is not None and h <= TARGETS["holders"])
        g = s["heal_cutoff_s"]
        add("client gap after heal <= 0.1 s", f"ecluster {preset}", g, TARGETS["heal_gap_s"],
            g is not None and g <= TARGETS["heal_gap_s"])
        z = s["isolation_holders_after_lapse"]
        add("holders in full isolation (after the leases lapse) = 0", f"ecluster {preset}", z, 0,
            z is not None and z == 0)
        back = s["isolation_client_back_s"]
        add(f"client answered after isolation heal <= {TARGETS[limit_key]:.2f} s", f"ecluster {preset}",
            back, TARGETS[limit_key], back is not None and back <= TARGETS[limit_key])
    return out


def comparisons(summaries: dict[str, dict]) -> list[dict]:
    """ecluster / keepalived ratios: fast vs advert_int 0.1, lan vs advert_int 1."""
    out = []
    for preset, adv in PRESET_ANCHOR.items():
        e, k = summaries.get(f"ecluster {preset}"), summaries.get(f"keepalived {adv}")
        if not e or not k:
            continue
        out.append({
            "ecluster": preset, "keepalived_advert_int": adv,
            "failover_median_ratio": ratio(e["failover_s"].get("median"), k["failover_s"].get("median")),
            "failover_p99_ratio": ratio(e["failover_s"].get("p99"), k["failover_s"].get("p99")),
            "failback_gap_max_ratio": ratio(e["failback_gap_s"].get("max"), k["failback_gap_s"].get("max")),
            "partition_holders": [e["partition_max_holders"], k["partition_max_holders"]],
            "heal_cutoff_s": [e["heal_cutoff_s"], k["heal_cutoff_s"]],
        })
    return out


def _f(v, unit="s", digits=3) -> str:
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v * 1000:.0f}"
    return f"{v:.{digits}f}"


def format_table(summaries: dict[str, dict], comps: list[dict], targets: list[dict]) -> str:
    """The report: one row per system/preset, the ratios, the targets."""
    head = (f"{'system':<17}{'failover s: min':>16}{'median':>8}{'p99':>8}{'max':>8}"
            f"{'failback gap ms':>17}{'(outage)':>9}{'move gap ms':>13}"
            f"{'holders':>9}{'heal cut s':>11}{'iso holders':>12}{'iso back s':>14}")
    sub = (f"{'':<17}{'':>16}{'':>8}{'':>8}{'':>8}{'med / max':>17}{'max':>9}{'med / max':>13}"
           f"{'(part.)':>9}{'(max)':>11}{'(lapsed)':>12}{'client/coord':>14}")
    lines = [head, sub, "-" * len(head)]
    for name, s in summaries.items():
        fo, fb, fbo, mv = s["failover_s"], s["failback_gap_s"], s["failback_outage_s"], s["move_gap_s"]
        miss = f" ({fo['missing']} missed)" if fo.get("missing") else ""
        heal = _f(s["heal_cutoff_s"], digits=3) + ("+" if s.get("heal_still_unreachable") else "")
        lines.append(
            f"{name:<17}{_f(fo.get('min')):>16}{_f(fo.get('median')):>8}{_f(fo.get('p99')):>8}{_f(fo.get('max')):>8}"
            f"{_f(fb.get('median'), 'ms') + ' / ' + _f(fb.get('max'), 'ms'):>17}{_f(fbo.get('max'), 'ms'):>9}"
            f"{(_f(mv.get('median'), 'ms') + ' / ' + _f(mv.get('max'), 'ms')) if mv['n'] else '-':>13}"
            f"{s['partition_max_holders'] if s['partition_max_holders'] is not None else '-':>9}{heal:>11}"
            f"{s['isolation_holders_after_lapse'] if s['isolation_holders_after_lapse'] is not None else '-':>12}"
            f"{(_f(s.get('isolation_client_back_s')) + '/' + _f(s['isolation_owned_again_s'])) if s['isolation_owned_again_s'] is not None else '-':>14}{miss}")
    for name, s in summaries.items():
        if s.get("double_holder_instants") is not None:
            d = s.get("double_holder_samples") or []
            detail = "; ".join(f"members {x['members']} in '{x['phase']}'" for x in d[:3])
            lines.append(f"{name}: instants with two holders (addresses read every 10 ms, whole run): "
                         f"{s['double_holder_instants']}" + (f" ({detail})" if detail else ""))
        if s.get("arp_rounds") is not None:
            d = s.get("arp_double_samples") or []
            detail = "; ".join(f"members {x['members']} in '{x['phase']}'" for x in d[:3])
            lines.append(f"{name}: ARP rounds from the client answered by two members (every 10 ms, "
                         f"whole run): {s['arp_double_rounds']} of {s['arp_rounds']}"
                         + (f" ({detail})" if detail else ""))
    lines.append("")
    lines.append("failback gap: longest window between two answers while the VIP moves back (outage: summed "
                 "windows with failed probes); heal cut s: longest client gap after the heal (ecluster),\n"
                 "keepalived: summed outage after the heal (+ = still cut off when the script stopped probing); "
                 "iso back: s after the heal until the client is answered / the coordinator reports it owned")
    for c in comps:
        lines.append(f"ecluster {c['ecluster']} / keepalived advert_int {c['keepalived_advert_int']}: "
                     f"failover median x{c['failover_median_ratio']}, p99 x{c['failover_p99_ratio']}, "
                     f"failback gap max x{c['failback_gap_max_ratio']}; partition holders "
                     f"{c['partition_holders'][0]} vs {c['partition_holders'][1]}; heal cut-off "
                     f"{c['heal_cutoff_s'][0]} s vs {c['heal_cutoff_s'][1]} s")
    lines.append("")
    lines.append("targets:")
    for t in targets:
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[t["met"]]
        lines.append(f"  {mark} {t['system']:<14} {t['target']:<58} value {t['value']}  limit {t['limit']}")
    return "\n".join(lines)


# -- process hygiene --------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_keepalived() -> None:
    """Install keepalived and arping with apt-get when missing (once)."""
    missing = [t for t in ("keepalived", "arping") if shutil.which(t) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise BenchError(f"missing {' '.join(missing)}; install them: {APT_COMMAND}")
    log(f"installing keepalived arping ({' '.join(missing)} missing)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "keepalived", "arping"]):
        r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed ({r.stderr.strip().splitlines()[-1:]}); run: {APT_COMMAND}")
    still = [t for t in ("keepalived", "arping") if shutil.which(t) is None]
    if still:
        raise BenchError(f"still missing after apt-get: {' '.join(still)}")


def _anchor_tmp_dirs() -> set[str]:
    return {str(p) for p in Path("/tmp").iterdir() if p.name.startswith(KA_TMP_PATTERNS)}


def run_anchor(argv: list[str], log_path: Path, timeout: float, env: dict | None = None) -> str:
    """Run one anchor script (KEEP=1 so its probe logs survive); return its output.

    On any failure or interrupt the script's process group is killed by PID, its lab is
    removed with its own ``netlab.sh down`` and its work directory deleted.
    """
    before = _anchor_tmp_dirs()
    env = dict(os.environ, KEEP="1", **(env or {}))
    with open(log_path, "wb") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=env, cwd=str(ANCHORS))
        ok = False
        try:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{Path(argv[0]).name} did not finish within {timeout:.0f} s") from None
            ok = p.returncode == 0
            if not ok:
                raise BenchError(f"{Path(argv[0]).name} exited with {p.returncode} (see {log_path})")
        finally:
            if p.returncode is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
            if not ok:
                subprocess.run([str(KA_NETLAB), "down"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for d in _anchor_tmp_dirs() - before:
                    shutil.rmtree(d, ignore_errors=True)
    return log_path.read_text(errors="replace")


def kept_dir(output: str) -> Path | None:
    """The work directory an anchor script kept (it prints ``kept /tmp/kafo.XXXXXX``)."""
    m = re.search(r"^kept (/tmp/(?:kafo|kapart)\.[A-Za-z0-9]+)\s*$", output, re.M)
    return Path(m.group(1)) if m else None


# -- keepalived ---------------------------------------------------------------------------------

def bench_keepalived(adv: str, rounds: int, part_rounds: int, work: Path) -> dict:
    """keepalived_failover.sh and keepalived_partition.sh for one advert_int."""
    from probe_analysis import analyze, parse_lines

    res: dict = {"advert_int": adv}
    out_fo = work / f"ka_failover_{adv}.jsonl"
    log(f"keepalived advert_int {adv}: {rounds} failover rounds")
    per_round = max(6, 8 * float(adv)) * 2 + 4
    text = run_anchor([str(KA_FAILOVER), adv, str(rounds), str(out_fo)], work / f"ka_failover_{adv}.log",
                      timeout=60 + rounds * per_round * 2)
    rows = parse_jsonl(out_fo.read_text()) if out_fo.exists() else []
    kept = kept_dir(text)
    # the move back measured like ecluster's failback: longest window between two answers in
    # the probe that covers the restart (it starts 1 s before it, while the VIP sits still)
    for row in rows:
        row["rejoin_longest_gap_s"] = None
        if kept is not None:
            path = kept / f"rj{row['round']}.log"
            if path.exists():
                a = analyze(parse_lines(path.read_text()))
                if a.attempts:
                    row["rejoin_longest_gap_s"] = round(
                        a.longest_gap(a.attempts[0].t0, a.attempts[-1].t1).length, 4)
    if kept is not None:
        shutil.rmtree(kept, ignore_errors=True)
    res["failover_rounds"] = rows
    for r in rows:
        log(f"  keepalived {adv} round {r.get('round')}: failover {r.get('failover_s')} s, "
            f"move back outage {r.get('rejoin_gap_s')} s, longest gap {r.get('rejoin_longest_gap_s')} s")

    if len(rows) < rounds:
        res.setdefault("errors", []).append(f"failover: {len(rows)} of {rounds} rounds reported; "
                                            f"script output ends: {text[-400:]!r}")

    out_p = work / f"ka_partition_{adv}.jsonl"
    # The script reports a round only when the split brain shows within HOLD s (else it
    # writes a Python `null` and the round is lost); keepalived at advert_int 1 needs
    # 3 advert_int + skew = ~3.2 s, past the default HOLD of 3 s, so hold 5 advert_int.
    hold = max(3.0, 5 * float(adv))
    res["partition_hold_s"] = hold
    log(f"keepalived advert_int {adv}: {part_rounds} partition rounds (HOLD {hold:g} s)")
    text = run_anchor([str(KA_PARTITION), adv, str(part_rounds), str(out_p)], work / f"ka_partition_{adv}.log",
                      timeout=60 + part_rounds * (40 + hold), env={"HOLD": f"{hold:g}"})
    kept = kept_dir(text)
    if kept is not None:
        shutil.rmtree(kept, ignore_errors=True)
    prows = parse_jsonl(out_p.read_text()) if out_p.exists() else []
    if len(prows) < part_rounds:
        res.setdefault("errors", []).append(f"partition: {len(prows)} of {part_rounds} rounds reported; "
                                            f"script output ends: {text[-400:]!r}")
    res["partition_rounds"] = prows
    parts = [keepalived_partition_row(r) for r in prows]
    for p in parts:
        log(f"  keepalived {adv} partition: {p['holders_during']} holders, cut off after heal "
            f"{p['heal_cutoff_s']} s{' (still at the end)' if p['still_unreachable_at_end'] else ''}")
    res["summary"] = system_summary(
        [r.get("failover_s") for r in rows], [r.get("rejoin_longest_gap_s") for r in rows],
        [r.get("rejoin_gap_s") for r in rows], [], parts, None)
    return res


# -- ecluster -------------------------------------------------------------------------------------

@dataclass
class Probe:
    """A client probe running in the lab's client namespace until stopped."""
    proc: subprocess.Popen
    started: float

    failures: list | None = None

    def stop(self):
        """SIGTERM (probe.py then prints what it recorded); the analysis of its records.
        The failed attempts with their error ("timeout", "refused", ...) go to ``failures``."""
        from probe_analysis import analyze, parse_lines
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        text = out.decode(errors="replace")
        self.failures = [(r["t0"], r["t1"], r.get("err")) for r in parse_jsonl(text) if not r.get("who")]
        return analyze(parse_lines(text))

    def errors(self, a: float, b: float | None = None) -> dict[str, int]:
        """How many attempts started in [a, b] failed, by error."""
        out: dict[str, int] = {}
        for t0, _, err in self.failures or []:
            if t0 >= a and (b is None or t0 <= b):
                out[str(err)] = out.get(str(err), 0) + 1
        return out


class EclusterBench:
    """The ecluster scenarios against one LabCluster (3 nodes + 1 manager, one VIP)."""

    def __init__(self, lc, sampler):
        self.lc, self.sampler = lc, sampler
        self.phases: list[tuple[float, str]] = []     # (start, scenario), to place sampled events

    def phase(self, label: str) -> None:
        self.phases.append((time.time(), label))

    def label_at(self, t: float) -> str | None:
        return next((lab for t0, lab in reversed(self.phases) if t0 <= t), None)

    def double_holders(self) -> list[dict]:
        """Every instant with two holders by the members' addresses
        (AddressSampler.address_double_holder_instants: one member's read shows the VIP while
        another's reads just before and just after it do too), with the scenario it fell in."""
        return [{"t": round(t, 3), "vip": vip, "members": h, "phase": self.label_at(t)}
                for t, vip, h in self.sampler.address_double_holder_instants()]

    def arp_double_holders(self) -> list[dict]:
        """Every ARP round from the client answered by two members (ArpSampler), with the
        scenario it fell in."""
        return [{"t": round(t, 3), "vip": vip, "members": h, "phase": self.label_at(t)}
                for t, vip, h in self.sampler.arp_double_holders()]

    def pass_level_doubles(self) -> int:
        """Sampling passes that saw two holders. A pass reads the members one after the
        other, so under load a move during a slow pass shows both: an upper bound only."""
        return sum(1 for _, d in self.sampler.snapshot() for h in d.values() if len(h) > 1)

    def max_holders(self, a: float, b: float) -> int:
        """Most members holding the VIP at one instant within [a, b] (addresses or ARP)."""
        doubles = [len(h) for t, v, h in self.sampler.double_holder_instants() if a <= t <= b and v == VIP]
        if doubles:
            return max(doubles)
        return max_in_window(self.sampler.snapshot(), VIP, a, b)

    def probe(self) -> Probe:
        # long enough for any scenario; stopped explicitly
        return Probe(self.lc.start_probe(600), time.time())

    def client_on(self, probe: Probe, who: str | None, timeout: float = 10) -> None:
        """Until the client reaches the VIP on ``who`` (any node when None) and the probe has
        been running for a moment (so the log has answers before the event)."""
        from vip_cluster import wait_for
        def ok():
            w = self.lc.ask_vip()
            return time.time() - probe.started > 0.5 and w is not None and (who is None or w == who)
        wait_for(ok, timeout, interval=0.02, what=f"client answered by {who or 'a node'}")

    def events(self, a: float, b: float | None = None) -> list[tuple[float, str, str, str]]:
        """Every member's election / membership / vip log lines in [a, b], by time."""
        out = []
        for name in self.lc.names:
            for service in ("election", "membership", "vip"):
                path = self.lc.root / name / "log" / f"{service}.err.log"
                try:
                    text = path.read_text(errors="replace")
                except OSError:
                    continue
                out += [e for e in parse_service_log(text, name)
                        if e[0] >= a - 0.002 and (b is None or e[0] <= b)]
        return sorted(out)

    def owner(self) -> str | None:
        return self.lc.vip_rows()[0]["owner"]

    def coordinator(self) -> str | None:
        try:
            return self.lc.leader_status()["member"]
        except AssertionError:
            return None

    def restore(self) -> None:
        """Every member running, no partition, the VIP on n1."""
        for name in self.lc.names:
            if name not in self.lc.member_procs:
                self.lc.revive_member(name)
        self.lc.lab.heal()
        owner = None
        try:
            owner = self.owner()
        except AssertionError:
            pass
        rows = self.lc.vip_rows()
        if owner != "n1" or rows[0].get("pinned"):
            try:
                self.lc.call("m1", "election", "unpin", timeout=3, vip=VIP)
            except Exception:  # noqa: BLE001 - nothing pinned or a coordinator change: settle below
                pass
        self.lc.wait_settled(timeout=40, expect={VIP: "n1"})

    def failover_round(self) -> dict:
        """Kill n1 (the owner) + link down; then revive it and measure the move back."""
        lc = self.lc
        coord = self.coordinator()
        p = self.probe()
        self.client_on(p, "n1")
        t_kill = lc.kill_member("n1", link_down=True)
        lc.wait_settled(timeout=20)
        self.client_on(p, None)
        time.sleep(TRAIL_S)
        a = p.stop()
        fo = a.failover_s(t_kill, "n1")
        new = a.first_answer_by_other(t_kill, "n1")
        row = {"coordinator_killed": coord == "n1", "failover_s": None if fo is None else round(fo, 4),
               "new_owner": new.who if new else None,
               "failed_probes": p.errors(t_kill)}
        row["breakdown"] = failover_breakdown(self.events(t_kill), t_kill, "n1", VIP)
        try:
            row.update(self.failback(t_kill))
        except Exception as e:  # noqa: BLE001 - the failover figure stands; the failback is lost
            row["failback_error"] = f"{type(e).__name__}: {e}"
        return row

    def failback(self, t_kill: float) -> dict:
        """n1 returns (fresh network configuration, then its member): the move back to it."""
        lc = self.lc
        holder = self.owner()
        p = self.probe()
        self.client_on(p, None)
        self.phase((self.phases[-1][1] if self.phases else "") + " / failback")
        t_back = lc.revive_member("n1")
        lc.wait_settled(timeout=40, expect={VIP: "n1"})
        self.client_on(p, "n1")
        done = time.time()
        time.sleep(TRAIL_S)
        a = p.stop()
        back = a.first_answer(t_back, "n1")
        gap = a.longest_gap(t_back, done + TRAIL_S)
        return {"failback_breakdown": move_breakdown(self.events(t_back, done), t_back, holder, "n1", VIP),
                "failback_gap_s": round(gap.length, 4),
                "failback_outage_s": outage(a.attempts, t_back)[0],
                "failback_s": None if back is None else round(back.t1 - t_back, 3),
                "failback_failed_probes": p.errors(t_back),
                "failback_sequence": a.who_sequence(t_back)}

    def move_round(self, target: str) -> dict:
        """A graceful ``election.move`` to ``target``; the longest client gap."""
        lc = self.lc
        before = self.owner()
        p = self.probe()
        self.client_on(p, before)
        t0 = time.time()
        lc.call("m1", "election", "move", timeout=3, vip=VIP, node=target)
        lc.wait_settled(timeout=20, expect={VIP: target})
        self.client_on(p, target)
        done = time.time()
        time.sleep(TRAIL_S)
        a = p.stop()
        first = a.first_answer(t0, target)
        return {"from": before, "to": target,
                "breakdown": move_breakdown(self.events(t0, done), t0, before, target, VIP),
                "gap_s": round(a.longest_gap(t0, done + TRAIL_S).length, 4),
                "outage_s": outage(a.attempts, t0)[0],
                "failed_probes": p.errors(t0),
                "moved_s": None if first is None else round(first.t1 - t0, 3),
                "sequence": a.who_sequence(t0)}

    def partition_round(self) -> dict:
        """n1 (the owner) cut off from every other member for HOLD_S, then the heal."""
        lc = self.lc
        p = self.probe()
        self.client_on(p, "n1")
        t_cut = time.time()
        lc.lab.partition([[1], [2, 3, 4]])
        time.sleep(HOLD_S)            # the partition lasts HOLD_S (a scenario length, not a wait)
        lc.wait_settled(timeout=20)
        taken_by = self.owner()
        self.phase("partition / heal")
        t_heal = time.time()
        lc.lab.heal()
        lc.wait_settled(timeout=40, expect={VIP: "n1"})
        self.client_on(p, "n1")
        done = time.time()
        time.sleep(TRAIL_S)
        a = p.stop()
        samples = self.sampler.snapshot()
        n1_off = next((t for t, h in samples if t >= t_cut and 1 not in h.get(VIP, [])), None)
        fo = a.failover_s(t_cut, "n1")
        return {"holders_during": self.max_holders(t_cut, t_heal),
                "holders_after_heal": self.max_holders(t_heal, done),
                "owner_fenced_s": None if n1_off is None else round(n1_off - t_cut, 3),
                "taken_over_by": taken_by,
                "client_failover_s": None if fo is None else round(fo, 4),
                "heal_cutoff_s": round(a.longest_gap(t_heal, done + TRAIL_S).length, 4),
                "heal_outage_s": outage(a.attempts, t_heal)[0],
                "heal_failed_probes": p.errors(t_heal),
                "cut_breakdown": failover_breakdown(self.events(t_cut, t_heal), t_cut, "n1", VIP),
                "heal_breakdown": move_breakdown(self.events(t_heal, done), t_heal, taken_by, "n1", VIP),
                "after_heal_sequence": a.who_sequence(t_heal),
                "still_unreachable_at_end": False}

    def isolation_round(self) -> dict:
        """Every member cut off from every other for HOLD_S; then the heal."""
        lc = self.lc
        p = self.probe()
        self.client_on(p, "n1")
        t_iso = time.time()
        lc.lab.isolate_all()
        time.sleep(HOLD_S)
        self.phase("isolation / heal")
        t_heal = time.time()
        lc.lab.heal()
        lc.wait_settled(timeout=40)
        t_owned = time.time()
        self.client_on(p, None)
        time.sleep(TRAIL_S)
        a = p.stop()
        samples = self.sampler.snapshot()
        lapsed = first_time(samples, VIP, t_iso, lambda n: n == 0)
        first = a.first_answer(t_heal)
        ev = self.events(t_heal, t_owned + 1)
        return {"holders_during_isolation": self.max_holders(t_iso, t_heal),
                "heal_breakdown": {
                    "plumbed_s": _first(ev, t_heal, lambda m, s, x: s == "vip" and x.startswith(f"{VIP}/")
                                        and "plumbed on" in x),
                    "coordinator_s": _first(ev, t_heal, lambda m, s, x: s == "election"
                                            and x.startswith("coordinator for term")),
                    "candidacies": sum(1 for e in ev if e[2] == "election" and e[3].startswith("standing for"))},
                "heal_failed_probes": p.errors(t_heal),
                "lapsed_after_s": None if lapsed is None else round(lapsed - t_iso, 3),
                "holders_after_lapse": None if lapsed is None or lapsed > t_heal
                else max_in_window(samples, VIP, lapsed, t_heal),
                "owned_again_s": round(t_owned - t_heal, 3),
                "client_back_s": None if first is None else round(first.t1 - t_heal, 3),
                "client_unreachable_during_s": outage(a.attempts, t_iso, t_heal)[0]}


def bench_ecluster(preset: str, rounds: int) -> dict:
    """Every ecluster scenario for one timing preset, in a lab of its own."""
    from vip_cluster import LabCluster

    res: dict = {"preset": preset, "failover_rounds": [], "move_rounds": [], "errors": []}
    log(f"ecluster {preset}: starting 3 nodes + 1 manager")
    lc = LabCluster(3, 1, preset=preset, vips=[{"address": f"{VIP}/24", "preference": "n1"}])
    try:
        lc.start()
        res["data_dir"] = str(lc.root)
        sampler = lc.lab.start_sampler([VIP])
        b = EclusterBench(lc, sampler)
        t_start = time.time()

        failures = [0]        # consecutive failed scenarios: the lab is unusable after a few

        def attempt(kind: str, fn, *args, restore: bool = True):
            if failures[0] >= MAX_CONSECUTIVE_FAILURES:
                res["errors"].append(f"{kind}: skipped (the lab failed {failures[0]} times in a row)")
                return None
            b.phase(f"{kind} {args[0] if args else ''}".strip())
            try:
                if restore:
                    b.restore()
                out = fn(*args)
            except Exception as e:  # noqa: BLE001 - a failed round is a figure too (wait_for raises AssertionError)
                failures[0] += 1
                res["errors"].append(f"{kind}: {type(e).__name__}: {e}")
                log(f"  ecluster {preset} {kind} failed: {e}")
                return None
            failures[0] = 0
            return out

        for r in range(1, rounds + 1):
            row = attempt(f"round {r}: failover", b.failover_round)
            if row is not None:
                row["round"] = r
                res["failover_rounds"].append(row)
                log(f"  ecluster {preset} round {r}: failover {row['failover_s']} s -> {row['new_owner']}"
                    f"{' (coordinator killed)' if row['coordinator_killed'] else ''}, " + (
                        f"failback gap {row['failback_gap_s'] * 1000:.0f} ms (outage "
                        f"{row['failback_outage_s'] * 1000:.0f} ms), back after {row['failback_s']} s"
                        if "failback_gap_s" in row else f"failback failed: {row.get('failback_error')}"))
        targets = ["n2", "n3", "n1"]
        for r in range(rounds):
            # moves chain from wherever the previous one left the VIP (n1 -> n2 -> n3 -> n1 ...);
            # the normal state is restored only first and after a failed move
            fresh = r == 0 or failures[0] > 0
            target = targets[r % 3]
            if fresh and target == "n1":
                target = "n2"
            row = attempt(f"move {r + 1} to", b.move_round, target, restore=fresh)
            if row is not None:
                res["move_rounds"].append(row)
                log(f"  ecluster {preset} move {row['from']} -> {row['to']}: gap {row['gap_s'] * 1000:.0f} ms "
                    f"(outage {row['outage_s'] * 1000:.0f} ms), client on it after {row['moved_s']} s")
        res["partition"] = attempt("partition", b.partition_round)
        if res["partition"]:
            pr = res["partition"]
            log(f"  ecluster {preset} partition: {pr['holders_during']} holder(s) max, n1 fenced after "
                f"{pr['owner_fenced_s']} s, {pr['taken_over_by']} took over (client after {pr['client_failover_s']} s); "
                f"heal gap {pr['heal_cutoff_s'] * 1000:.0f} ms")
        res["isolation"] = attempt("isolation", b.isolation_round)
        if res["isolation"]:
            ir = res["isolation"]
            log(f"  ecluster {preset} isolation: unplumbed everywhere after {ir['lapsed_after_s']} s, holders after "
                f"that {ir['holders_after_lapse']}; owned again {ir['owned_again_s']} s after the heal")
        try:
            b.restore()
        except Exception as e:  # noqa: BLE001
            res["errors"].append(f"final restore: {e}")
        sampler.stop()
        res["double_holder_samples"] = b.double_holders()
        res["double_holder_instants"] = len(res["double_holder_samples"])
        res["arp_double_samples"] = b.arp_double_holders()
        res["arp"] = sampler.arp.stats() if sampler.arp is not None else None
        res["pass_level_doubles"] = b.pass_level_doubles()
        res["max_holders_whole_run"] = sampler.max_holders(VIP)
        res["sampler_pass"] = sampler.pass_stats()
        res["span_s"] = round(time.time() - t_start, 1)
    finally:
        lc.close()
    fr, mr = res["failover_rounds"], res["move_rounds"]
    parts = [res["partition"]] if res.get("partition") else []
    res["summary"] = system_summary(
        [r["failover_s"] for r in fr] + [None] * sum(1 for e in res["errors"] if ": failover:" in e),
        [r.get("failback_gap_s") for r in fr], [r.get("failback_outage_s") for r in fr],
        [r["gap_s"] for r in mr], parts, res.get("isolation"))
    res["summary"]["double_holder_instants"] = res.get("double_holder_instants")
    res["summary"]["double_holder_samples"] = res.get("double_holder_samples", [])[:20]
    res["summary"]["arp_double_rounds"] = len(res.get("arp_double_samples", []))
    res["summary"]["arp_double_samples"] = res.get("arp_double_samples", [])[:20]
    res["summary"]["arp_rounds"] = (res.get("arp") or {}).get("rounds")
    res["summary"]["pass_level_doubles"] = res.get("pass_level_doubles")
    return res


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="VIP failover: ecluster beside keepalived (run as root)")
    ap.add_argument("--rounds", type=int, default=10, help="failover and move rounds per system (default 10)")
    ap.add_argument("--quick", action="store_true", help="3 rounds (and 1 keepalived partition round)")
    ap.add_argument("--json", metavar="FILE", help="write every figure as JSON to FILE")
    ap.add_argument("--presets", default="fast,lan", help="ecluster timing presets (default fast,lan)")
    ap.add_argument("--no-keepalived", action="store_true", help="skip the keepalived anchor")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 3
    if args.rounds < 1:
        raise BenchError("--rounds must be at least 1")
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in args.presets if p not in PRESET_ANCHOR]
    if unknown:
        raise BenchError(f"unknown preset(s) {', '.join(unknown)} (known: {', '.join(PRESET_ANCHOR)})")
    return args


def run(args: argparse.Namespace) -> dict:
    """The whole benchmark; returns the JSON document."""
    part_rounds = 1 if args.quick else KA_PARTITION_ROUNDS
    doc: dict = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rounds": args.rounds,
                          "keepalived_partition_rounds": part_rounds, "cpus": os.cpu_count(),
                          "kernel": platform.release(), "python": platform.python_version(),
                          "hold_s": HOLD_S, "targets": TARGETS, "loadavg_start": os.getloadavg()},
                 "keepalived": {}, "ecluster": {}}
    work = Path(tempfile.mkdtemp(prefix="eclbench-failover-"))
    try:
        if not args.no_keepalived:
            ensure_keepalived()
            for adv in ("1", "0.1"):
                try:
                    doc["keepalived"][adv] = bench_keepalived(adv, args.rounds, part_rounds, work)
                except BenchError as e:      # the other systems still run; the table says what is missing
                    log(f"keepalived advert_int {adv} failed: {e}")
                    doc["keepalived"][adv] = {"error": str(e)}
        for preset in args.presets:
            try:
                doc["ecluster"][preset] = bench_ecluster(preset, args.rounds)
            except Exception as e:  # noqa: BLE001 - e.g. the lab did not start: report, go on
                log(f"ecluster {preset} failed: {type(e).__name__}: {e}")
                doc["ecluster"][preset] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summaries = {}
    for adv in ("1", "0.1"):
        if doc["keepalived"].get(adv, {}).get("summary"):
            summaries[f"keepalived {adv}"] = doc["keepalived"][adv]["summary"]
    for preset in ("lan", "fast"):
        if doc["ecluster"].get(preset, {}).get("summary"):
            summaries[f"ecluster {preset}"] = doc["ecluster"][preset]["summary"]
    doc["summaries"] = summaries
    doc["comparisons"] = comparisons(summaries)
    doc["targets"] = evaluate_targets(summaries)
    doc["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["meta"]["loadavg_end"] = os.getloadavg()
    return doc


def checked_args(argv: list[str]) -> argparse.Namespace:
    """parse_args, and what this bench needs before it starts (BenchError: exit 2)."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise BenchError("bench/failover.py needs root (network namespaces, keepalived): run it with sudo")
    if not args.no_keepalived and not KA_FAILOVER.exists():
        raise BenchError(f"keepalived anchor scripts not found in {ANCHORS}")
    return args


def main(argv: list[str]) -> int:
    from anchors import bench_main   # bench/ is this script's directory
    return bench_main("failover", argv, checked_args, run,
                      lambda doc: format_table(doc["summaries"], doc["comparisons"], doc["targets"]),
                      BenchError, interrupted="interrupted; labs removed")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
