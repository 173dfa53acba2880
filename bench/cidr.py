"""Benchmark as_logger and cidr_server against their anchors, in one run.

1. as_logger: cost per recorded connection of ``AuditLogger.add`` (and ``add_batch``)
   beside a bare dict increment, over 1,000,000 events from 100,000 addresses.
   Target: ≤ 3 µs per event.
2. cidr_server: ``show count for 0.0.0.0/0 in connections cidrsize 24 order by count
   limit 10`` over one hour holding 1,000,000 connections from 100,000 addresses (fed
   through as_logger into 60 one-minute windows, stored by CidrStore), beside a naive
   scan: a Python loop summing the same 60 windows by /24 and sorting.  Target ≤ 50 ms.

Run: ``.venv/bin/python bench/cidr.py`` (add ``--events N`` to scale down).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from manager.cidr.query import parse_query  # noqa: E402
from manager.cidr.store import CidrStore, format_rows  # noqa: E402
from node.audit import AuditLogger  # noqa: E402

HOUR_START = 1212624000 + 10 * 3600  # 2008-06-05T10:00:00Z
QUERY = "show count for 0.0.0.0/0 in connections cidrsize 24 order by count limit 10"


def make_traffic(n_events: int, n_addresses: int, seed: int = 1) -> list[str]:
    """Source addresses of ``n_events`` connections from ``n_addresses`` hosts, skewed like real traffic."""
    rng = np.random.default_rng(seed)
    hosts = rng.choice(2**32 - 2**24, n_addresses, replace=False) + 2**24  # skip 0.0.0.0/8
    weights = 1.0 / np.arange(1, n_addresses + 1) ** 0.5  # busier hosts first, a long tail
    picks = rng.choice(n_addresses, n_events, p=weights / weights.sum())
    texts = [socket.inet_ntoa(int(h).to_bytes(4, "big")) for h in hosts]
    return [texts[i] for i in picks]


def best_per_event(fn, events: list[str], repeat: int = 3) -> float:
    """Best of ``repeat`` runs, seconds per event."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(events)
        times.append(time.perf_counter() - start)
    return min(times) / len(events)


def bench_logger(events: list[str]) -> None:
    def bare_dict(evs: list[str]) -> None:
        counts: dict[str, int] = {}
        get = counts.get
        for a in evs:
            counts[a] = get(a, 0) + 1

    def logger_add(evs: list[str]) -> None:
        log = AuditLogger(log_interval=60)
        add = log.add
        for a in evs:
            add("connections", a)

    def logger_batch(evs: list[str]) -> None:
        log = AuditLogger(log_interval=60)
        step = 1000
        for i in range(0, len(evs), step):
            log.add_batch([("connections", a, 1) for a in evs[i:i + step]])

    base = best_per_event(bare_dict, events)
    add = best_per_event(logger_add, events)
    batch = best_per_event(logger_batch, events)
    print(f"as_logger, {len(events):,} events from {len(set(events)):,} addresses")
    print(f"  bare dict increment        {base * 1e6:7.3f} µs/event   (anchor)")
    print(f"  AuditLogger.add            {add * 1e6:7.3f} µs/event   {add / base:5.1f}x anchor   "
          f"target ≤ 3 µs: {'OK' if add <= 3e-6 else 'MISSED'}")
    print(f"  AuditLogger.add_batch      {batch * 1e6:7.3f} µs/event   {batch / base:5.1f}x anchor "
          f"(includes building the tuples)")


def naive_top(windows, n: int = 10) -> list[tuple[int, int]]:
    """The anchor: a Python loop over the raw window counts, summing by /24."""
    sums: dict[int, int] = {}
    for w in windows:
        for (version, address), count in w.counts.items():
            if version == 4:
                net = address >> 8
                sums[net] = sums.get(net, 0) + count
    ranked = sorted(sums.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [(net << 8, c) for net, c in ranked]


def bench_query(events: list[str]) -> None:
    clock_now = [float(HOUR_START)]
    log = AuditLogger(log_interval=60, clock=lambda: clock_now[0])
    per_minute = -(-len(events) // 60)
    for minute in range(60):
        clock_now[0] = HOUR_START + minute * 60 + 1
        log.add_batch([("connections", a, 1) for a in events[minute * per_minute:(minute + 1) * per_minute]])
    windows = log.roll(HOUR_START + 3600)
    path = tempfile.mkdtemp(prefix="bench-cidr-")
    try:
        with CidrStore(path) as store:
            start = time.perf_counter()
            stored = store.add_windows("mta1", windows)
            load = time.perf_counter() - start
            now = HOUR_START + 3599  # inside the hour: the default range (last 24 h) holds just it
            query = parse_query(QUERY)
            store.execute(query, now)  # warm the page cache
            runs = []
            for _ in range(15):
                start = time.perf_counter()
                result = store.execute(query, now)
                runs.append(time.perf_counter() - start)
            start = time.perf_counter()
            result_text = store.execute(QUERY, now)  # parse + execute + format, once
            lines = format_rows(result_text)
            with_parse = time.perf_counter() - start
        naive_runs = []
        for _ in range(3):
            start = time.perf_counter()
            expected = naive_top(windows)
            naive_runs.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    got = [(int(r.cidr.split("/")[0].split(".")[0]) << 24 | int(r.cidr.split(".")[1]) << 16
            | int(r.cidr.split(".")[2]) << 8, r.counts[0]) for r in result.rows]
    assert got == expected, (got, expected)
    store_ms = statistics.median(runs) * 1e3
    naive_ms = statistics.median(naive_runs) * 1e3
    entries = sum(len(w.counts) for w in windows)
    print(f"cidr_server, one hour: {sum(w.total() for w in windows):,} connections, "
          f"{len({a for w in windows for a in w.counts}):,} addresses, {len(windows)} windows "
          f"({entries:,} window entries)")
    print(f"  storing the 60 windows     {load * 1e3:7.1f} ms ({stored} windows)")
    print(f"  naive scan (Python loop)   {naive_ms:7.1f} ms   (anchor)")
    print(f"  CidrStore.execute top-10   {store_ms:7.2f} ms median (min {min(runs) * 1e3:.2f}, "
          f"max {max(runs) * 1e3:.2f})   {naive_ms / store_ms:5.0f}x faster than anchor   "
          f"target ≤ 50 ms: {'OK' if store_ms <= 50 else 'MISSED'}")
    print(f"  with parse + format        {with_parse * 1e3:7.2f} ms")
    print(f"  query: {QUERY}")
    for line in lines[:3]:
        print(f"    {line}")
    print("    ...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--addresses", type=int, default=100_000)
    args = parser.parse_args()
    events = make_traffic(args.events, args.addresses)
    bench_logger(events)
    bench_query(events)


if __name__ == "__main__":
    main()
