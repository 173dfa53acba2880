"""Soak: the lab cluster for N minutes with both cores busy; count false failovers.

A false failover is any change of a VIP's holder while no fault was injected (nothing is
killed or cut here). A lapse (the VIP unheld for a while, then back on the same node) is
no failover but an outage all the same: counted apart, with the longest. Also reports the largest resident-memory growth per service between
the first and the last minute, and the holders invariant.

    sudo .venv/bin/python bench/soak.py --minutes 10 --preset lan
    make soak                       # both presets, 10 minutes each

Exits 1 when a VIP ever had two holders or a false failover happened.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)                  # not bench/: bench/bus.py would shadow the bus package
sys.path.insert(1, str(ROOT / "tests"))


def burn(stop_at: float) -> None:
    """Keep one core busy until ``stop_at`` (a plain busy loop, like stress-ng --cpu 1)."""
    x = 0
    while time.time() < stop_at:
        for _ in range(100_000):
            x += 1


def rss_by_service(root: Path) -> dict[str, int]:
    """Resident memory (kB) of every ecluster program, keyed by member/program."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmd if a]
        if str(root) not in " ".join(args) or "ecluster.cli" not in args:
            continue
        try:
            member = args[args.index("--member") + 1]
        except (ValueError, IndexError):
            continue
        what = args[args.index("ecluster.cli") + 1:]
        name = what[2] if what[:2] == ["service", "run"] else what[0]
        rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        out[f"{member}/{name}"] = rss
    return out


def soak(minutes: float, preset: str) -> dict:
    from vip_cluster import LabCluster, wait_for
    vips = [{"address": "10.99.0.100/24", "preference": "n1"}, {"address": "10.99.0.101/24"}]
    lc = LabCluster(3, 1, preset=preset, vips=vips)
    burners = []
    try:
        lc.start()
        sampler = lc.lab.start_sampler(["10.99.0.100", "10.99.0.101"])
        end = time.time() + minutes * 60
        burners = [multiprocessing.Process(target=burn, args=(end,), daemon=True) for _ in range(os.cpu_count() or 2)]
        for b in burners:
            b.start()
        first_rss, last_rss = None, {}
        owners_seen = []
        while time.time() < end:
            time.sleep(1.0)
            rss = rss_by_service(lc.root)
            if first_rss is None and time.time() > end - minutes * 60 + 60:
                first_rss = rss
            last_rss = rss
        sampler.stop()
        # holder changes, from the sampler's ground truth
        changes, lapses, longest_unheld = {}, {}, 0.0
        for vip in ("10.99.0.100", "10.99.0.101"):
            prev, n, gone = None, 0, 0
            unheld_since = None
            for t, holders in sampler.samples:
                h = tuple(holders[vip])
                if h and prev is not None and h != prev:
                    n += 1
                if not h and prev is not None and unheld_since is None:
                    unheld_since = t
                if h:
                    if unheld_since is not None:
                        gone += 1
                        longest_unheld = max(longest_unheld, t - unheld_since)
                        unheld_since = None
                    prev = h
            changes[vip], lapses[vip] = n, gone
            owners_seen.append(prev)
        growth = {k: last_rss.get(k, 0) - v for k, v in (first_rss or {}).items()}
        return {"preset": preset, "minutes": minutes, "false_failovers": sum(changes.values()),
                "changes_per_vip": changes, "unheld_spells": sum(lapses.values()),
                "longest_unheld_s": round(longest_unheld, 3), "max_holders": max(sampler.max_holders(v) for v in changes),
                "samples": len(sampler.samples),
                "rss_growth_kb_max": max(growth.values()) if growth else None,
                "rss_growth_kb": growth, "rss_last_kb": last_rss}
    finally:
        for b in burners:
            b.terminate()
        lc.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--preset", action="append", choices=["lan", "fast"])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces)", file=sys.stderr)
        return 2
    results = [soak(a.minutes, p) for p in (a.preset or ["lan"])]
    print(f"{'preset':8} {'minutes':>7} {'false failovers':>16} {'unheld spells':>14} {'longest (s)':>12} "
          f"{'max holders':>12} {'max RSS growth (kB)':>20}")
    for r in results:
        print(f"{r['preset']:8} {r['minutes']:7.1f} {r['false_failovers']:16d} {r['unheld_spells']:14d} "
              f"{r['longest_unheld_s']:12.3f} {r['max_holders']:12d} {str(r['rss_growth_kb_max']):>20}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    bad = any(r["max_holders"] > 1 for r in results) or results[0]["false_failovers"] > 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
