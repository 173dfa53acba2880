"""Journals and log aggregation, each figure beside its raw anchor, in one run.

Usage: python bench/logs.py [--records N] [--append-records N] [--skip-append]

Rows:

  journal append/read rows       bench/logs_append.py (append_batch, single, always, read,
                                 raw LMDB put loop, plain append+fsync), same disk
  e2e live                       one node (broker + jlog) and one manager (broker + logagg),
                                 the real services as processes; a client writes N 200-byte
                                 records (jlog.write, 5,000 a call) while logagg pulls them;
                                 from the first write until the last record is in the
                                 manager's file (fsynced, checkpointed)
  e2e drain                      N records already in the journal, logagg started: rate
                                 from its first written batch to the last
  raw PUSH/PULL msgpack, batch   pyzmq PUSH in another process -> PULL here on loopback tcp,
                                 5,000 [seq, payload] pairs per msgpack message
  raw PUSH/PULL msgpack, single  one msgpack [seq, payload] per message

Then the manager's file is compared with what was written: zero loss, zero duplicates,
in order. Target: e2e >= 100,000 records/s. Everything the bench starts is stopped by
PID and its directory removed at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]      # the repo first: bench/bus.py is not ``bus``

from anchors import Children, free_ports, member_table, raw_push_pull, record, wait_for, write_cluster  # noqa: E402

RECORD = 200
WRITE_BATCH = 5000
TARGET = 100_000


def payload(k: int) -> bytes:
    return record(k, RECORD)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ecluster.cli", *args]


def make_cluster(base: Path):
    """A one-node, one-manager cluster file on loopback with its keys."""
    ports = free_ports(7)
    keys = ("bus_port", "pub_port", "metrics_port", "console_port")
    text = "\n".join(['[cluster]\nname = "bench"\nkeys = "keys"\n',
                      member_table("nodes", "n1", base / "n1", dict(zip(keys[:3], ports[:3]))),
                      member_table("managers", "m1", base / "m1", dict(zip(keys, ports[3:])))])
    return write_cluster(base, text, ["n1", "m1"])


def line_count(path: Path) -> int:
    """Lines in an aggregated file of bench records (all RECORD + 1 bytes): cheap to poll."""
    try:
        return path.stat().st_size // (RECORD + 1)
    except FileNotFoundError:
        return 0


def aggregated_file(cluster) -> Path:
    from manager.logsink import aggregated_files
    files = [p for _d, _l, _n, p in aggregated_files(cluster.member("m1").data_dir / "logs", "n1", "mainlog")]
    return files[-1] if files else Path("/nonexistent")


def write_records(cluster, start: int, count: int) -> float:
    """Write ``count`` records through jlog.write; returns the seconds it took."""
    from bus.client import SyncClient
    with SyncClient(cluster, via="n1") as c:
        t0 = time.perf_counter()
        for i in range(start, start + count, WRITE_BATCH):
            c.call("n1", "jlog", "write", timeout=30, log="mainlog",
                   records=[payload(k) for k in range(i, min(start + count, i + WRITE_BATCH))])
        return time.perf_counter() - t0


def bench_e2e(n: int, base: Path) -> dict:
    from bus.client import SyncClient
    cluster = make_cluster(base)
    kids = Children(base)
    out: dict = {}
    try:
        for m in ("n1", "m1"):
            kids.start(cli("bus", "run", "-c", str(cluster.path), "-m", m), f"broker-{m}")
        kids.start(cli("service", "run", "jlog", "-c", str(cluster.path), "-m", "n1"), "jlog")
        agg = kids.start(cli("service", "run", "logagg", "-c", str(cluster.path), "-m", "m1"), "logagg")
        for m, svc in (("n1", "jlog"), ("m1", "logagg")):
            wait_for(lambda: SyncClient(cluster, via=m).call(m, svc, "ping", timeout=0.5), 30, f"{svc} up")
        # the whole path is up once logagg has had an answer from n1 (a reply sent while a
        # broker link is still coming up is lost, and the read would wait for its timeout)
        wait_for(lambda: SyncClient(cluster, via="m1").call("m1", "logagg", "status", timeout=2)
                 ["logs"]["n1"]["mainlog"]["node_last_seq"] is not None, 30, "logagg reads n1")

        # live: writer and aggregator at once
        t0 = time.perf_counter()
        out["write_s"] = write_records(cluster, 0, n)
        wait_for(lambda: line_count(aggregated_file(cluster)) >= n, 300, "live records aggregated")
        out["live"] = n / (time.perf_counter() - t0)
        out["write"] = n / out["write_s"]

        # drain: a backlog of n records, then the aggregator starts
        kids.stop(agg)
        write_records(cluster, n, n)
        path = aggregated_file(cluster)
        base_count = line_count(path)
        kids.start(cli("service", "run", "logagg", "-c", str(cluster.path), "-m", "m1"), "logagg2")
        first = wait_for(lambda: (lambda c: c > base_count and (time.perf_counter(), c))(line_count(path)),
                         60, "drain started")
        wait_for(lambda: line_count(aggregated_file(cluster)) >= 2 * n, 300, "backlog aggregated")
        t1 = time.perf_counter()
        out["drain"] = (2 * n - first[1]) / (t1 - first[0])

        data = b"".join(p.read_bytes() for p in sorted((cluster.member("m1").data_dir / "logs").rglob("n1"))
                        if p.is_file())
        lines = data.split(b"\n")[:-1]
        expected = [payload(k) for k in range(2 * n)]
        out["lost"] = len(set(expected) - set(lines))
        out["duplicates"] = len(lines) - len(set(lines))
        out["in_order"] = lines == expected
        with SyncClient(cluster, via="m1") as c:
            out["status"] = c.call("m1", "logagg", "status", timeout=5)["logs"]["n1"]["mainlog"]
    finally:
        kids.stop_all()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="records per e2e row (default 200000)")
    parser.add_argument("--append-records", type=int, default=300_000,
                        help="records per journal append row (default 300000)")
    parser.add_argument("--skip-append", action="store_true", help="skip the journal append rows")
    args = parser.parse_args()
    if args.records < 20_000:
        parser.error("--records must be at least 20000")

    if not args.skip_append:
        import logs_append      # bench/ is on sys.path (after the repo)
        sys.argv = [sys.argv[0], "--records", str(args.append_records)]
        logs_append.main()
        print()

    base = Path(tempfile.mkdtemp(prefix="ecl-logs-bench-", dir="/tmp"))
    try:
        e2e = bench_e2e(args.records, base)
        raw_batch = raw_push_pull(args.records, WRITE_BATCH, RECORD, base)
        raw_single = raw_push_pull(args.records, 1, RECORD, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    n = args.records
    rows = [
        (f"jlog.write only ({WRITE_BATCH} a call)", e2e["write"]),
        ("e2e live: write + aggregate at once", e2e["live"]),
        ("e2e drain: backlog -> manager file", e2e["drain"]),
        (f"raw PUSH/PULL msgpack, {WRITE_BATCH} a message", raw_batch),
        ("raw PUSH/PULL msgpack, 1 a message", raw_single),
    ]
    print(f"{RECORD}-byte records, {n} per e2e row (2 x {n} in the loss check), one node, one manager")
    print(f"{'what':<46} {'records/s':>12}")
    print("-" * 59)
    for label, rate in rows:
        print(f"{label:<46} {rate:>12,.0f}")
    print("-" * 59)
    print(f"e2e drain / raw batched PUSH/PULL   {e2e['drain'] / raw_batch:6.2f}x")
    ok = e2e["lost"] == 0 and e2e["duplicates"] == 0 and e2e["in_order"]
    print(f"loss check: lost {e2e['lost']}, duplicates {e2e['duplicates']}, in order {e2e['in_order']}: "
          f"{'PASS' if ok else 'FAIL'}")
    best = min(e2e["live"], e2e["drain"])
    print(f"target: e2e >= {TARGET:,}/s: {'PASS' if best >= TARGET else 'FAIL'} (slower of live/drain {best:,.0f})")


if __name__ == "__main__":
    main()
