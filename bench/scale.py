"""How the cost of an idle member grows with the cluster: 3, 5, 7 and 9 members, and a model.

Usage (as root): python bench/scale.py [--sizes 2+1,4+1,5+2,7+2] [--preset lan|fast] [--window S]
                                       [--quick] [--json FILE] [--rounds N]

For each cluster size ("4+1" = 4 nodes + 1 manager; default 2+1, 4+1, 5+2, 7+2, i.e. 3, 5, 7
and 9 members; ``--quick``: 2+1 and 4+1) a fresh cluster runs on loopback exactly as in
bench/footprint.py, whose machinery this bench imports (``ClusterRun``: distinct ports on
127.0.0.1, ``vip_dry_run = true``, one VIP on "lo" preferring n1, keys from ``ecluster keys
init``, commits through a manager). A size that would not fit in this box's memory
(MemAvailable < 200 MB per member) is skipped with the reason. Rows, per size:

  idle CPU        the configuration is bootstrapped, then after a settling pause (5 s,
                  ``--quick`` 2 s) an idle window (30 s, ``--quick`` 10 s) starts. Per member,
                  over the runner, supervisord and all their descendants, as footprint.py
                  measures it: CPU in % of one core by clock ticks ((utime + stime + cutime +
                  cstime) delta / CLK_TCK / window) and by schedstat (ns on CPU of every
                  thread, finer than a tick). Printed: the mean over the members and the worst
                  member.
  PSS             per member at the end of the window (sum of "Pss:" of smaps_rollup over the
                  tree), mean and worst, MB.
  bus msgs/s      per member: the member's broker counters from its ``bus.status`` RPC, asked
                  over the bus (a local client on the member's ipc socket) at the start and at
                  the end of the idle window: (delta routed + delta events_local + delta
                  events_remote) / the time between the two answers, minus the bench's own
                  status call. routed: every call, cast and reply the broker dispatched (one
                  that crosses members counts on both brokers); events_local: events its local
                  services published (sent to every peer); events_remote: events received from
                  peers (the per-peer split is in the JSON). Broker heartbeats ($hb) are not
                  counted. Printed: mean, worst, and the mean split.
  config commit   ``eccfg commit --member <manager>`` of an edit until the file is in every
                  member's live checkout, polled every 2 ms; median of 5 (``--quick`` 3) after
                  one warm-up (footprint.py's ``ClusterRun.commits``).
  failover        "failover (owner kill -9 -> VIP owned elsewhere, by the coordinator's report,
                  dry run)": the VIP owner's whole member process tree (runner, supervisord
                  and every descendant, and anything else in the runner's session, by PID)
                  is stopped (SIGSTOP, so nothing shuts down cleanly) and sent SIGKILL; from
                  the first SIGSTOP until the coordinator (asked with ``election.status``
                  every 15 ms; the new coordinator when the old one was killed) reports the
                  VIP owned by another node and held by it. Median of ``--rounds`` (3,
                  ``--quick`` 1); the killed member is restarted between rounds and the
                  cluster waits until it is settled again (every member alive, VIP owned,
                  back on its preferred node, unchanged for 3 s). This is NOT the
                  client-visible failover of bench/failover.py (no address is plumbed, no ARP,
                  no client): it is the control plane's part of it, on loopback.

Model (``ecluster.timing.idle_message_rate(timing, nodes, managers)``: the expected idle bus
messages per second per member of each role, with its terms; when the timing module has no
such function this part prints "model: not available in ecluster.timing" and extrapolates
nothing; the CPU fit and PSS lines are measured and printed anyway):

  model vs measured   per size and role, the model's msgs/s beside the measured mean.
  CPU per message     least squares over every member of every size: cpu% = c * msgs/s + b
                      (schedstat CPU; c in % of a core per message/s, b the fixed cost); also
                      c0 of the fit through the origin (cpu% = c0 * msgs/s).
  32 and 64 members   (N - managers nodes + as many managers as the largest measured size)
                      per role: the model's msgs/s and c * msgs/s + b; whether per-member
                      messages grow linearly or faster with N (model(2N) / model(N): 2 means
                      linear per member, i.e. the whole cluster's messages grow with the square
                      of the members), and the exponent measured over the sizes run.
  PSS                 extrapolated as the mean measured PSS per member (it should not depend
                      on N), with the measured slope of PSS over N (MB per extra member).

Absolute times on this noisy 2-core machine move with the load, which is printed. Exit
status 0 whether or not the figures look good; 1 when the bench itself failed (a cluster did
not come up, a command failed, no failover within 30 s), 2 for bad arguments. Everything the
bench starts is stopped by PID and its temporary directories removed, also on failure and on
Ctrl-C / SIGTERM. All traffic is on loopback.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the repository root first: bench/ (this script's directory) would shadow the bus package
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))


def _load(name: str, path: Path):
    """A bench module by path (bench/ is not a package), shared with whoever loaded it first."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod            # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


fp = _load("bench_footprint", REPO / "bench" / "footprint.py")
BenchError = fp.BenchError
log = fp.log

DEFAULT_SIZES = "2+1,4+1,5+2,7+2"
QUICK_SIZES = "2+1,4+1"
EXTRAPOLATE_TO = (32, 64)
MEM_PER_MEMBER_MB = 200          # a member's PSS is ~100 MB; twice that of MemAvailable to run one
FAILOVER_POLL_S = 0.015
FAILOVER_TIMEOUT_S = 30.0
RESETTLE_TIMEOUT_S = 90.0
STABLE_FOR_S = 3.0
OWN_STATUS_CALLS = 1             # the end-of-window bus.status call is in the end counters
FAILOVER_ROW = "failover (owner kill -9 -> VIP owned elsewhere, by the coordinator's report, dry run)"


# -- pure helpers ---------------------------------------------------------------------------------

def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"2+1,4+1" -> [(2, 1), (4, 1)] (nodes, managers): footprint.py's rules (at least one node
    and one manager: commits go through a manager), no size twice. Pure; BenchError."""
    sizes = fp.parse_sizes(text)
    seen = set()
    for s in sizes:
        if s in seen:
            raise BenchError(f"size {s[0]}+{s[1]} given twice")
        seen.add(s)
    return sizes


def fits_in_memory(members: int, available_mb: float | None, per_member_mb: float = MEM_PER_MEMBER_MB) -> str | None:
    """None when ``members`` members fit in ``available_mb`` (None: unknown, assumed to fit),
    else why not. Pure."""
    if available_mb is None or members * per_member_mb <= available_mb:
        return None
    return (f"{members} members need about {members * per_member_mb:.0f} MB, "
            f"this box has {available_mb:.0f} MB available")


def counter_rates(before: dict, after: dict, seconds: float, own_calls: int = OWN_STATUS_CALLS) -> dict:
    """Bus messages per second of one broker from two ``bus.status`` answers ``seconds``
    apart: routed (less the bench's own ``own_calls`` calls), events_local, events_remote,
    their sum "msgs_per_s", and the events received from each peer per second. Pure.
    ValueError when the broker restarted in between (a counter went down) or seconds <= 0."""
    if seconds <= 0:
        raise ValueError("the two answers must be apart in time")
    cb, ca = before["counters"], after["counters"]
    d = {k: ca.get(k, 0) - cb.get(k, 0) for k in ("routed", "events_local", "events_remote")}
    if any(v < 0 for v in d.values()) or before.get("pid") != after.get("pid"):
        raise ValueError("the broker restarted during the window")
    d["routed"] = max(0, d["routed"] - own_calls)
    peers = {}
    for name, p in (after.get("peers") or {}).items():
        pb = (before.get("peers") or {}).get(name, {})
        peers[name] = round((p.get("events", 0) - pb.get("events", 0)) / seconds, 3)
    out = {f"{k}_per_s": round(v / seconds, 3) for k, v in d.items()}
    out["msgs_per_s"] = round(sum(d.values()) / seconds, 3)
    out["peer_events_per_s"] = peers
    out["seconds"] = round(seconds, 3)
    return out


def mean_worst(values: dict[str, float | None]) -> dict:
    """{mean, worst, worst_on} over {member: value} (None values ignored). Pure."""
    vals = {k: v for k, v in values.items() if v is not None}
    if not vals:
        return {"mean": None, "worst": None, "worst_on": None}
    on = max(vals, key=lambda k: vals[k])
    return {"mean": round(statistics.fmean(vals.values()), 3), "worst": vals[on], "worst_on": on}


def fit_line(xs: list[float], ys: list[float]) -> dict:
    """Least squares y = c x + b, and c0 of y = c0 x (through the origin). When the xs do not
    vary (one point, or all equal) only the fit through the origin is defined: b = 0,
    "degenerate" True. Pure; ValueError without points."""
    if not xs or len(xs) != len(ys):
        raise ValueError("need as many ys as xs, at least one")
    sxx0 = sum(x * x for x in xs)
    c0 = sum(x * y for x, y in zip(xs, ys)) / sxx0 if sxx0 else 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if len(xs) < 2 or sxx <= 1e-12 * max(1.0, mx * mx):
        return {"c": c0, "b": 0.0, "c0": c0, "points": len(xs), "degenerate": True, "r2": None}
    c = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    b = my - c * mx
    syy = sum((y - my) ** 2 for y in ys)
    r2 = 1 - sum((y - (c * x + b)) ** 2 for x, y in zip(xs, ys)) / syy if syy else None
    return {"c": c, "b": b, "c0": c0, "points": len(xs), "degenerate": False, "r2": r2}


def growth_exponent(at_n: float, at_2n: float) -> float | None:
    """k of a cost ~ N^k from its values at N and 2N (log2 of their ratio). Pure."""
    if not at_n or at_n <= 0 or at_2n is None or at_2n <= 0:
        return None
    return math.log2(at_2n / at_n)


def loglog_exponent(ns: list[float], ys: list[float]) -> float | None:
    """k of y ~ N^k fitted over (N, y) points (least squares on the logs); None with fewer
    than two distinct Ns or a value <= 0. Pure."""
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys) if n > 0 and y and y > 0]
    if len(pts) != len(ns) or len({p[0] for p in pts}) < 2:
        return None
    f = fit_line([p[0] for p in pts], [p[1] for p in pts])
    return None if f["degenerate"] else f["c"]


def describe_growth(k: float | None) -> str:
    """Words for a per-member cost ~ N^k, naming the square when the cluster's total (N times
    the per-member cost) or the per-member cost itself grows with it. Pure."""
    if k is None:
        return "unknown"
    if k < 0.25:
        return f"about constant in N (N^{k:.2f})"
    if k < 0.75:
        return f"sub-linear in N (N^{k:.2f})"
    if k < 1.35:
        return (f"linear in N (N^{k:.2f}): the whole cluster's messages grow with the square of the "
                f"members")
    if k < 1.75:
        return f"faster than linear in N (N^{k:.2f})"
    return (f"with the square of N per member (N^{k:.2f}): the whole cluster's messages grow with "
            f"the cube of the members")


def model_rate(model: dict, role: str) -> float | None:
    """The model's msgs/s for ``role`` ("node" / "manager") from its answer. Pure."""
    v = model.get(role)
    return float(v) if isinstance(v, (int, float)) else None


def split_members(total: int, managers: int) -> tuple[int, int]:
    """(nodes, managers) of a cluster of ``total`` members with ``managers`` managers. Pure."""
    if total <= managers:
        raise ValueError(f"{total} members cannot have {managers} managers and a node")
    return total - managers, managers


def model_section(model_fn, timing, sizes: dict[str, dict], targets: tuple[int, ...] = EXTRAPOLATE_TO) -> dict:
    """Everything of the model part from the measured sizes {size: row} (rows as
    :func:`size_row` makes them) and ``model_fn(timing, nodes, managers)``; None model_fn:
    {"available": False}. Pure but for calling model_fn."""
    measured = {s: r for s, r in sizes.items() if r.get("members")}
    out: dict = {"available": model_fn is not None}
    # the fit and PSS need no model
    xs, ys, pss_n, pss_y = [], [], [], []
    for r in measured.values():
        n = r["nodes"] + r["managers"]
        for m in r["members"].values():
            cpu = m["sched_cpu_pct"] if m.get("sched_cpu_pct") is not None else m["cpu_pct"]
            if m.get("msgs_per_s") is not None and cpu is not None:
                xs.append(m["msgs_per_s"])
                ys.append(cpu)
            if m.get("pss_mb") is not None:
                pss_n.append(n)
                pss_y.append(m["pss_mb"])
    out["cpu_fit"] = fit_line(xs, ys) if xs else None
    if pss_y:
        slope = fit_line(pss_n, pss_y)
        out["pss"] = {"mean_mb": round(statistics.fmean(pss_y), 2),
                      "slope_mb_per_member": None if slope["degenerate"] else round(slope["c"], 3)}
    else:
        out["pss"] = None
    ns = [r["nodes"] + r["managers"] for r in measured.values() if r["msgs"]["mean"]]
    ms = [r["msgs"]["mean"] for r in measured.values() if r["msgs"]["mean"]]
    out["measured_exponent"] = loglog_exponent(ns, ms)
    if model_fn is None:
        return out
    compare = []
    for size, r in measured.items():
        mod = model_fn(timing, r["nodes"], r["managers"])
        for role in ("node", "manager"):
            got = [m["msgs_per_s"] for m in r["members"].values() if m["role"] == role and m.get("msgs_per_s") is not None]
            want = model_rate(mod, role)
            if not got:
                continue
            meas = statistics.fmean(got)
            compare.append({"size": size, "members": r["nodes"] + r["managers"], "role": role,
                            "model": want, "measured": round(meas, 3),
                            "ratio": round(meas / want, 3) if want else None})
    out["compare"] = compare
    managers = max((r["managers"] for r in measured.values()), default=1)
    fit = out["cpu_fit"]
    rows = []
    for total in targets:
        nodes, mg = split_members(total, managers)
        mod = model_fn(timing, nodes, mg)
        mod2 = model_fn(timing, *split_members(2 * total, managers))
        row = {"members": total, "nodes": nodes, "managers": mg, "terms": mod.get("terms")}
        for role in ("node", "manager"):
            rate, rate2 = model_rate(mod, role), model_rate(mod2, role)
            row[role] = {"msgs_per_s": rate,
                         "cpu_pct": None if rate is None or fit is None else round(fit["c"] * rate + fit["b"], 3),
                         "exponent": growth_exponent(rate, rate2)}
        row["pss_mb"] = out["pss"]["mean_mb"] if out["pss"] else None
        rows.append(row)
    out["extrapolated"] = rows
    # growth over the measured range too: model at the largest measured size and twice that
    if measured:
        big = max(measured.values(), key=lambda r: r["nodes"] + r["managers"])
        n = big["nodes"] + big["managers"]
        a, b = model_fn(timing, big["nodes"], big["managers"]), model_fn(timing, *split_members(2 * n, big["managers"]))
        out["exponent_at_largest"] = {"members": n, **{role: growth_exponent(model_rate(a, role), model_rate(b, role))
                                                     for role in ("node", "manager")}}
    return out


def failover_seen(status: dict, victim: str) -> bool:
    """True when an ``election.status`` answer is the coordinator's (role leader) and every VIP
    in it is owned by a node other than ``victim`` and held by exactly that node. Pure."""
    if not status or status.get("role") != "leader" or status.get("member") == victim:
        return False
    vips = status.get("vips") or []
    return bool(vips) and all(v.get("owner") not in (None, victim) and v.get("state") == "owned"
                              and v.get("holders") == [v["owner"]] for v in vips)


def vip_owner(status: dict) -> str | None:
    """The owner of the first VIP in an ``election.status`` answer, when it holds it. Pure."""
    vips = status.get("vips") or []
    if not vips:
        return None
    v = vips[0]
    return v["owner"] if v.get("owner") and v.get("holders") == [v["owner"]] else None


def resettled(status: dict, members: list[str]) -> bool:
    """The coordinator's answer says: it leads, every member alive, every VIP owned by its
    holder and, where it has a preferred node, owned by that node. Pure."""
    if not status or status.get("role") != "leader":
        return False
    view = ((status.get("view") or {}).get("members") or {})
    if any(view.get(m, {}).get("state") != "alive" for m in members):
        return False
    vips = status.get("vips") or []
    return bool(vips) and all(v.get("state") == "owned" and (not v.get("preference") or v["owner"] == v["preference"])
                              for v in vips)


def parse_session(stat_text: str) -> int:
    """The session id (field 6) of /proc/PID/stat text. Pure; ValueError when malformed."""
    _, sep, tail = stat_text.rpartition(")")
    f = tail.split()
    if not sep or len(f) < 4:
        raise ValueError("not a /proc/PID/stat line")
    return int(f[3])


def alive_views(statuses: dict[str, dict | None]) -> str:
    """"n1 sees 1/5 alive, m1 no answer" from each member's election.status (None: no
    answer), for the message of a cluster that did not settle. Pure."""
    parts = []
    for m, st in statuses.items():
        if st is None:
            parts.append(f"{m} no answer")
            continue
        view = (st.get("view") or {}).get("members") or {}
        alive = sum(1 for v in view.values() if v.get("state") == "alive")
        parts.append(f"{m} sees {alive}/{len(statuses)} alive, leader {st.get('leader')}")
    return "; ".join(parts)


def size_row(nodes: int, managers: int, members: dict[str, dict]) -> dict:
    """The per-size summary of {member: figures} (role, cpu_pct, sched_cpu_pct, pss_mb,
    msgs_per_s, routed_per_s, events_local_per_s, events_remote_per_s). Pure."""
    def col(k):
        return {n: m.get(k) for n, m in members.items()}
    split = {k: round(statistics.fmean([m[k] for m in members.values()]), 3) if members else None
             for k in ("routed_per_s", "events_local_per_s", "events_remote_per_s")}
    return {"nodes": nodes, "managers": managers, "members": members,
            "cpu": mean_worst(col("cpu_pct")), "sched": mean_worst(col("sched_cpu_pct")),
            "pss": mean_worst(col("pss_mb")), "msgs": mean_worst(col("msgs_per_s")), "split": split}


def median_or_none(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


def _f(v, digits=2, unit="") -> str:
    return "-" if v is None else f"{v:.{digits}f}{unit}"


def _terms(terms) -> str:
    if not isinstance(terms, dict):
        return str(terms) if terms is not None else "-"
    parts = []
    for k, v in terms.items():
        if isinstance(v, dict):
            parts.append(f"{k}: {{{_terms(v)}}}")
        elif isinstance(v, float):
            parts.append(f"{k}={v:.3g}")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def _round_text(x: dict) -> str:
    """"0.734 s (n1 -> n2, dead seen at 0.450 s)": one failover round. Pure."""
    notes = [f"{x['victim']} -> {x['new_owner']}"]
    if x.get("coordinator_killed"):
        notes.append("coordinator killed too")
    if x.get("dead_seen_s") is not None:
        notes.append(f"dead seen at {x['dead_seen_s']:.3f} s")
    return f"{x['s']:.3f} s ({', '.join(notes)})"


def format_report(doc: dict) -> str:
    """The printed report of a run's JSON document. Pure."""
    meta = doc["meta"]
    lines = [f"scale: idle ecluster members by cluster size (preset {meta['preset']}, idle window "
             f"{meta['window_s']:g} s, {meta['cpus']} CPUs, load average {meta['loadavg_start'][0]:.1f} at start, "
             f"{meta.get('loadavg_end', [0])[0]:.1f} at the end)", ""]
    for size, r in doc["sizes"].items():
        total = r["nodes"] + r["managers"]
        lines.append(f"== {size}: {r['nodes']} node{'s' * (r['nodes'] != 1)} + {r['managers']} "
                     f"manager{'s' * (r['managers'] != 1)} = {total} members ==")
        if r.get("skipped"):
            lines.append(f"  skipped: {r['skipped']}")
        if r.get("error"):
            lines.append(f"  FAILED: {r['error']}")
        if r.get("cold_start_s") is not None:
            lines.append(f"  cold start {r['cold_start_s']:.2f} s (coordinator {r.get('coordinator')}); "
                         f"bootstrap applied everywhere in {_f(r.get('bootstrap_s'))} s")
        if r.get("members"):
            w = r.get("window") or {}
            lines.append(f"  idle window {w.get('window_s', 0):g} s (machine {_f(w.get('machine_busy_pct'), 0)} % busy, "
                         f"load {_f((w.get('loadavg') or [None])[0], 1)} -> {_f((w.get('loadavg') or [None, None])[1], 1)})")
            lines.append(f"    {'member':<8}{'role':<9}{'CPU %':>7}{'sched %':>9}{'PSS MB':>8}{'msgs/s':>9}"
                         f"{'routed':>8}{'ev.loc':>8}{'ev.rem':>8}")
            for name, m in r["members"].items():
                lines.append(f"    {name:<8}{m['role']:<9}{_f(m['cpu_pct']):>7}{_f(m['sched_cpu_pct']):>9}"
                             f"{_f(m['pss_mb'], 1):>8}{_f(m.get('msgs_per_s'), 1):>9}{_f(m.get('routed_per_s'), 1):>8}"
                             f"{_f(m.get('events_local_per_s'), 1):>8}{_f(m.get('events_remote_per_s'), 1):>8}")
            c, s, p, g = r["cpu"], r["sched"], r["pss"], r["msgs"]
            lines.append(f"  idle CPU % per member: mean {_f(c['mean'])}, worst {_f(c['worst'])} ({c['worst_on']}) "
                         f"by ticks; mean {_f(s['mean'])}, worst {_f(s['worst'])} ({s['worst_on']}) by schedstat")
            lines.append(f"  PSS MB per member: mean {_f(p['mean'], 1)}, worst {_f(p['worst'], 1)} ({p['worst_on']})")
            sp = r["split"]
            lines.append(f"  bus msgs/s per member: mean {_f(g['mean'], 1)}, worst {_f(g['worst'], 1)} ({g['worst_on']}); "
                         f"mean split: routed {_f(sp['routed_per_s'], 1)} + events_local {_f(sp['events_local_per_s'], 1)}"
                         f" + events_remote {_f(sp['events_remote_per_s'], 1)}")
        cm = r.get("commit")
        if cm:
            lines.append(f"  config commit (to all {total} live copies): median {cm['median_s']:.3f} s of "
                         f"{len(cm['runs_s'])}")
        fo = r.get("failover")
        if fo:
            if fo.get("skipped"):
                lines.append(f"  {FAILOVER_ROW}: not measured ({fo['skipped']})")
            else:
                runs = ", ".join(_round_text(x) for x in fo["rounds"])
                lines.append(f"  {FAILOVER_ROW}: median {_f(fo['median_s'], 3)} s of {len(fo['rounds'])} ({runs})")
        lines.append("")
    rows = [r for r in doc["sizes"].values() if r.get("members")]
    if rows:
        lines.append("summary (per member; CPU by ticks / schedstat, % of one core):")
        lines.append(f"  {'members':>7}{'CPU mean':>10}{'worst':>7}{'sched':>7}{'worst':>7}{'PSS MB':>8}{'worst':>7}"
                     f"{'msgs/s':>8}{'worst':>7}{'commit s':>10}{'failover s':>12}")
        for r in rows:
            lines.append(f"  {r['nodes'] + r['managers']:>7}{_f(r['cpu']['mean']):>10}{_f(r['cpu']['worst']):>7}"
                         f"{_f(r['sched']['mean']):>7}{_f(r['sched']['worst']):>7}{_f(r['pss']['mean'], 1):>8}"
                         f"{_f(r['pss']['worst'], 1):>7}{_f(r['msgs']['mean'], 1):>8}{_f(r['msgs']['worst'], 1):>7}"
                         f"{_f((r.get('commit') or {}).get('median_s'), 3):>10}"
                         f"{_f((r.get('failover') or {}).get('median_s'), 3):>12}")
        lines.append("")
    lines += format_model(doc.get("model") or {})
    return "\n".join(lines)


def format_model(mod: dict) -> list[str]:
    """The model part of the report. Pure."""
    lines = []
    fit = mod.get("cpu_fit")
    if fit:
        how = " (one message rate only: through the origin)" if fit["degenerate"] else ""
        lines.append(f"CPU per message (least squares over {fit['points']} members, schedstat CPU): "
                     f"cpu% = {fit['c']:.4f} * msgs/s + {fit['b']:.3f}{how}; R^2 {_f(fit['r2'])}; "
                     f"through the origin: cpu% = {fit['c0']:.4f} * msgs/s")
    k = mod.get("measured_exponent")
    if k is not None:
        lines.append(f"measured msgs/s per member over the sizes run: {describe_growth(k)}")
    pss = mod.get("pss")
    if pss:
        lines.append(f"PSS per member: mean {pss['mean_mb']:.1f} MB over every size; measured slope "
                     f"{_f(pss['slope_mb_per_member'], 3)} MB per extra member")
    if not mod.get("available"):
        lines.append("model: not available in ecluster.timing (no extrapolation)")
        return lines
    if mod.get("error"):
        lines.append(f"model: failed: {mod['error']}")
        return lines
    lines.append("model (ecluster.timing.idle_message_rate) vs measured, msgs/s per member:")
    lines.append(f"  {'members':>7}  {'role':<8}{'model':>9}{'measured':>10}{'meas/model':>12}")
    for c in mod.get("compare", []):
        lines.append(f"  {c['members']:>7}  {c['role']:<8}{_f(c['model'], 1):>9}{_f(c['measured'], 1):>10}"
                     f"{_f(c['ratio']):>12}")
    lines.append("extrapolated (model msgs/s; CPU = c * msgs/s + b; PSS = measured mean):")
    for r in mod.get("extrapolated", []):
        for role in ("node", "manager"):
            x = r[role]
            lines.append(f"  {r['members']:>3} members ({r['nodes']}+{r['managers']}) {role:<8} "
                         f"{_f(x['msgs_per_s'], 1):>8} msgs/s  {_f(x['cpu_pct'])} % CPU  "
                         f"{_f(r['pss_mb'], 1)} MB PSS  growth to {2 * r['members']}: {describe_growth(x['exponent'])}")
        lines.append(f"      terms: {_terms(r.get('terms'))}")
    big = mod.get("exponent_at_largest")
    if big:
        lines.append(f"model growth from {big['members']} to {2 * big['members']} members: node "
                     f"{describe_growth(big.get('node'))}; manager {describe_growth(big.get('manager'))}")
    return lines


# -- I/O -------------------------------------------------------------------------------------------

def mem_available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def session_pids(sid: int) -> list[int]:
    """Every process whose session is ``sid`` (a runner is started in a session of its own)."""
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                if parse_session(Path(f"/proc/{e}/stat").read_text()) == sid:
                    out.append(int(e))
            except (OSError, ValueError):
                continue
    return out


def kill_tree(root: int) -> list[int]:
    """kill -9 of a member: ``root`` and every descendant by PID, and whatever else is in its
    session. All are stopped (SIGSTOP, parents first) before any is killed, so none can
    react: supervisord gets SIGTERM from the runner's death (PR_SET_PDEATHSIG) and would
    otherwise stop its programs cleanly, or restart one killed before it."""
    pids = fp.tree_pids(root, fp.ppid_map())
    pids += [p for p in session_pids(root) if p not in pids and p != os.getpid()]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    return pids


def bus_status(cluster, member: str, timeout: float = 2.0) -> tuple[float, dict]:
    from bus.client import SyncClient
    with SyncClient(cluster, via=member) as c:
        st = c.call(member, "bus", "status", timeout=timeout)
    return time.perf_counter(), st


class Clients:
    """One SyncClient per member (local client over its ipc socket), made when first used."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.c: dict = {}

    def call(self, member: str, service: str, method: str, timeout: float = 0.3):
        from bus.client import SyncClient
        if member not in self.c:
            self.c[member] = SyncClient(self.cluster, via=member)
        try:
            return self.c[member].call(member, service, method, timeout=timeout)
        except Exception:
            self.drop(member)        # a late reply must not linger in the socket
            raise

    def drop(self, member: str) -> None:
        c = self.c.pop(member, None)
        if c is not None:
            c.close()

    def close(self) -> None:
        for m in list(self.c):
            self.drop(m)


def coordinator_status(clients: Clients, members: list[str], prefer: str | None = None) -> dict | None:
    """The coordinator's election.status, asking ``prefer`` first, then whom it names leader."""
    order = ([prefer] if prefer in members else []) + [m for m in members if m != prefer]
    for m in order:
        try:
            st = clients.call(m, "election", "status")
        except Exception:  # noqa: BLE001 - down or busy: ask the next one
            continue
        if st.get("role") == "leader":
            return st
        lead = st.get("leader")
        if lead in members:
            try:
                st2 = clients.call(lead, "election", "status")
                if st2.get("role") == "leader":
                    return st2
            except Exception:  # noqa: BLE001
                pass
    return None


def election_statuses(cr) -> dict[str, dict | None]:
    """Every member's election.status now (None: no answer within 1 s)."""
    clients, out = Clients(cr.cluster), {}
    try:
        for x in cr.members:
            try:
                out[x] = clients.call(x, "election", "status", timeout=1.0)
            except Exception:  # noqa: BLE001 - down or busy
                out[x] = None
    finally:
        clients.close()
    return out


def wait_resettled(cr, clients: Clients, timeout: float = RESETTLE_TIMEOUT_S) -> dict:
    """Until the coordinator reports :func:`resettled` continuously for STABLE_FOR_S."""
    deadline = time.monotonic() + timeout
    since, owner, lead = None, None, None
    while time.monotonic() < deadline:
        st = coordinator_status(clients, cr.members, lead)
        now = time.monotonic()
        if st is not None and resettled(st, cr.members):
            lead = st["member"]
            if since is None or vip_owner(st) != owner:
                since, owner = now, vip_owner(st)
            elif now - since >= STABLE_FOR_S:
                return st
        else:
            since = None
        dead = [x for x, p in cr.runners.items() if p.poll() is not None]
        if dead:
            raise BenchError(f"runner of {', '.join(dead)} exited (see {cr.work / 'logs'})")
        time.sleep(0.1)
    raise BenchError(f"cluster {cr.size} not settled again within {timeout:.0f} s after a restart "
                     f"({alive_views(election_statuses(cr))})")


def failover_round(cr, clients: Clients, start: dict, k: int) -> dict:
    """Kill the VIP owner's member tree; seconds until the coordinator reports the VIP owned
    elsewhere. ``start``: the coordinator's status before (VIP owned by its holder)."""
    victim = vip_owner(start)
    if victim is None:
        raise BenchError("no VIP owner to kill")
    old_lead = start["member"]
    survivors = [m for m in cr.members if m != victim]
    cr.remember()
    runner = cr.runners[victim]
    t0 = time.perf_counter()
    kill_tree(runner.pid)
    clients.drop(victim)
    try:
        runner.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    cur = old_lead if old_lead != victim else survivors[0]
    dead_seen, new_lead = None, None
    i = 0
    while True:
        now = time.perf_counter()
        if now - t0 > FAILOVER_TIMEOUT_S:
            raise BenchError(f"round {k}: the VIP was not owned elsewhere within {FAILOVER_TIMEOUT_S:.0f} s "
                             f"of killing {victim}")
        try:
            st = clients.call(cur, "election", "status", timeout=0.25)
            at = time.perf_counter()
        except Exception:  # noqa: BLE001 - busy or not the one: try the next survivor
            i += 1
            cur = survivors[i % len(survivors)]
            time.sleep(FAILOVER_POLL_S)
            continue
        if st.get("role") == "leader":
            state = (((st.get("view") or {}).get("members") or {}).get(victim) or {}).get("state")
            if dead_seen is None and state not in (None, "alive", "suspect"):
                dead_seen = at - t0
            if failover_seen(st, victim):
                new_lead = st["member"]
                return {"s": round(at - t0, 4), "victim": victim, "new_owner": st["vips"][0]["owner"],
                        "coordinator_before": old_lead, "coordinator_after": new_lead,
                        "coordinator_killed": old_lead == victim,
                        "dead_seen_s": None if dead_seen is None else round(dead_seen, 4)}
        elif st.get("leader") in survivors and st.get("leader") != cur:
            cur = st["leader"]
            continue
        else:
            i += 1
            cur = survivors[i % len(survivors)]
        time.sleep(FAILOVER_POLL_S)


def restart(cr, member: str, k: int) -> None:
    role = cr.role(member)
    cr.runners[member] = cr.procs.start([role, "run", "-c", str(cr.path), f"--{role}", member],
                                        name=f"{member}-restart{k}")


def failovers(cr, rounds: int) -> dict:
    if sum(1 for x in cr.members if cr.role(x) == "node") < 2:
        return {"skipped": "one node only: nowhere for the VIP to go", "rounds": []}
    clients = Clients(cr.cluster)
    out = []
    try:
        st = wait_resettled(cr, clients)
        for k in range(1, rounds + 1):
            r = failover_round(cr, clients, st, k)
            log(f"  failover round {k}: {r['s']:.3f} s ({r['victim']} killed, VIP owned by {r['new_owner']}"
                f"{', coordinator killed too' if r['coordinator_killed'] else ''})")
            out.append(r)
            restart(cr, r["victim"], k)
            if k < rounds:       # after the last round the cluster is stopped anyway
                t0 = time.perf_counter()
                st = wait_resettled(cr, clients)
                r["resettled_after_restart_s"] = round(time.perf_counter() - t0, 2)
                cr.remember()
    finally:
        clients.close()
    return {"rounds": out, "median_s": median_or_none([r["s"] for r in out])}


def idle_window(cr, window: float) -> tuple[dict[str, dict], dict]:
    """Per member: footprint's tree cost and bus message rates over one idle window."""
    load0, busy0 = os.getloadavg()[0], fp.machine_cpu()
    st0 = {x: bus_status(cr.cluster, x) for x in cr.members}
    before = cr.sample()
    t0 = time.perf_counter()
    time.sleep(window)
    after = cr.sample()
    span = time.perf_counter() - t0
    st1 = {x: bus_status(cr.cluster, x) for x in cr.members}
    busy1 = fp.machine_cpu()
    cr.remember()
    members = {}
    for x in cr.members:
        c = fp.tree_cost(before[x], after[x], span, cr.runners[x].pid)
        try:
            rates = counter_rates(st0[x][1], st1[x][1], st1[x][0] - st0[x][0])
        except ValueError as e:
            raise BenchError(f"{x}: {e}") from None
        members[x] = {"role": cr.role(x), "processes": c["processes"], "pss_mb": c["pss_mb"],
                      "cpu_pct": c["cpu_pct"], "sched_cpu_pct": c["sched_cpu_pct"], **rates,
                      "programs": c["programs"]}
    info = {"window_s": round(span, 2), "loadavg": [load0, os.getloadavg()[0]],
            "machine_busy_pct": round(100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 1)}
    return members, info


def bench_size(n: int, m: int, args, work: Path) -> dict:
    size = f"{n}+{m}"
    res: dict = {"nodes": n, "managers": m}
    why = fits_in_memory(n + m, mem_available_mb())
    if why:
        log(f"cluster {size}: skipped ({why})")
        res["skipped"] = why
        return res
    log(f"cluster {size}: cold start")
    cr = None
    try:
        cr = fp.ClusterRun(n, m, args.preset, work / size)
        try:
            res["cold_start_s"], res["coordinator"], _ = cr.cold_start()
        except BenchError as e:
            raise BenchError(f"{e} ({alive_views(election_statuses(cr))})") from None
        res["bootstrap_s"] = cr.bootstrap()
        log(f"  settled after {res['cold_start_s']} s, bootstrapped in {res['bootstrap_s']} s; "
            f"idle window of {args.window:g} s in {args.settle:g} s")
        time.sleep(args.settle)
        members, info = idle_window(cr, args.window)
        res.update(size_row(n, m, members))
        res["window"] = info
        log(f"  idle: {res['msgs']['mean']} msgs/s, {res['sched']['mean']} % CPU (sched), "
            f"{res['pss']['mean']} MB per member; config commits")
        res["commit"] = cr.commits(args.commits, fp.COMMIT_WARMUP)
        log(f"  commit median {res['commit']['median_s']} s; failover rounds: {args.rounds}")
        res["failover"] = failovers(cr, args.rounds)
    except BenchError as e:
        log(f"  cluster {size} failed: {e}")
        res["error"] = str(e)
    finally:
        if cr is not None:
            log(f"  stopping cluster {size}")
            cr.close()
    return res


# -- main -------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):            # one line, exit 2 (argparse's own usage block is long)
        raise BenchError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None,
                    help=f"cluster sizes NODES+MANAGERS, comma-separated (default {DEFAULT_SIZES}; --quick {QUICK_SIZES})")
    ap.add_argument("--preset", choices=("lan", "fast"), default="lan", help="timing preset (default lan)")
    ap.add_argument("--window", type=float, default=None, help="idle window in s (default 30, --quick 10)")
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, a 10 s window, 1 failover round")
    ap.add_argument("--json", metavar="FILE", help="write every figure as JSON to FILE")
    ap.add_argument("--rounds", type=int, default=None, help="failover rounds per size (default 3, --quick 1)")
    args = ap.parse_args(argv)
    args.sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    if args.window is None:
        args.window = 10.0 if args.quick else 30.0
    if args.window < 1:
        raise BenchError("--window must be at least 1 s")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        raise BenchError("--rounds must be at least 1")
    args.settle = 2.0 if args.quick else fp.SETTLE_EXTRA_S
    args.commits = 3 if args.quick else fp.COMMITS
    return args


def timing_model():
    """ecluster.timing's idle_message_rate, or None when it has none."""
    import ecluster.timing as timing_module
    return getattr(timing_module, "idle_message_rate", None) if hasattr(timing_module, "idle_message_rate") else None


def run(args: argparse.Namespace) -> dict:
    doc: dict = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "preset": args.preset,
                          "window_s": args.window, "rounds": args.rounds, "cpus": os.cpu_count(),
                          "clk_tck": fp.CLK_TCK, "kernel": platform.release(), "python": platform.python_version(),
                          "loadavg_start": os.getloadavg()},
                 "sizes": {}}
    work = Path(tempfile.mkdtemp(prefix="eclsc-work-"))
    try:
        for n, m in args.sizes:
            doc["sizes"][f"{n}+{m}"] = bench_size(n, m, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from ecluster.timing import preset
    fn = timing_model()
    try:
        doc["model"] = model_section(fn, preset(args.preset), doc["sizes"])
    except Exception as e:  # noqa: BLE001 - the model is someone else's work in progress: report it
        doc["model"] = {"available": True, "error": f"{type(e).__name__}: {e}"}
    doc["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["meta"]["loadavg_end"] = os.getloadavg()
    return doc


def main(argv: list[str]) -> int:
    anchors = _load("bench_anchors", REPO / "bench" / "anchors.py")
    return anchors.bench_main("scale", argv, parse_args, run, format_report, BenchError,
                              exit_code=lambda doc: 1 if any("error" in r for r in doc["sizes"].values()) else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
