"""Journal append/read throughput beside raw LMDB and plain file+fsync on the same disk.

Usage: python bench/logs_append.py [DIR] [--records N]

DIR defaults to a fresh directory under /tmp; everything the bench writes is removed at the
end. Records are 200 bytes. Rows:

  journal append_batch(1000), fsync=batch    one fdatasync per 1,000 records (the target row)
  journal append single, fsync=batch         one write per record, synced by close
  journal append single, fsync=always        one write + fdatasync per record (fewer records)
  journal read (1000 per call) + checkpoint  one subscriber draining the log
  raw LMDB put, 10k puts per txn             the anchor for storage engines (sync on commit)
  file append + fsync per 1,000 lines        the anchor for the disk itself
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lmdb  # noqa: E402

from node.jlog import Journal  # noqa: E402

RECORD = 200
BATCH = 1000


def _payloads(count: int) -> list[bytes]:
    base = os.urandom(RECORD)
    # Distinct payloads without spending the bench in os.urandom.
    return [base[i % RECORD :] + base[: i % RECORD] for i in range(count)]


def bench_journal_batch(root: str, total: int) -> float:
    payloads = _payloads(BATCH)
    journal = Journal.open(root, "bench_batch", subscribers=["s"], fsync="batch")
    try:
        start = time.perf_counter()
        for _ in range(total // BATCH):
            journal.append_batch(payloads)
        elapsed = time.perf_counter() - start
    finally:
        journal.close()
    return (total // BATCH) * BATCH / elapsed


def bench_journal_single(root: str, total: int, fsync: str, name: str) -> float:
    payloads = _payloads(BATCH)
    journal = Journal.open(root, name, subscribers=["s"], fsync=fsync)
    try:
        start = time.perf_counter()
        append = journal.append
        for i in range(total):
            append(payloads[i % BATCH])
        journal.sync()
        elapsed = time.perf_counter() - start
    finally:
        journal.close()
    return total / elapsed


def bench_journal_read(root: str) -> tuple[float, int]:
    journal = Journal.open(root, "bench_batch", subscribers=["s"])
    try:
        count = 0
        start = time.perf_counter()
        while True:
            batch = journal.read("s", max_records=BATCH)
            if not batch:
                break
            count += len(batch)
            journal.checkpoint("s", batch[-1][0])
        elapsed = time.perf_counter() - start
    finally:
        journal.close()
    return count / elapsed, count


def bench_lmdb(root: str, total: int) -> float:
    payloads = _payloads(BATCH)
    path = os.path.join(root, "raw.lmdb")
    env = lmdb.open(path, map_size=4 << 30, sync=True, metasync=True)
    per_txn = 10_000
    try:
        start = time.perf_counter()
        seq = 0
        for _ in range(total // per_txn):
            with env.begin(write=True) as txn:
                put = txn.put
                for _ in range(per_txn):
                    seq += 1
                    put(seq.to_bytes(8, "big"), payloads[seq % BATCH], append=True)
        elapsed = time.perf_counter() - start
    finally:
        env.close()
    return (total // per_txn) * per_txn / elapsed


def bench_file_fsync(root: str, total: int) -> float:
    lines = [p[: RECORD - 1].replace(b"\n", b" ") + b"\n" for p in _payloads(BATCH)]
    path = os.path.join(root, "plain.log")
    start = time.perf_counter()
    with open(path, "ab", buffering=1 << 20) as fh:
        for _ in range(total // BATCH):
            for line in lines:
                fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    elapsed = time.perf_counter() - start
    return (total // BATCH) * BATCH / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", help="directory on the disk to measure (default: under /tmp)")
    parser.add_argument("--records", type=int, default=500_000, help="records per row (default 500000)")
    args = parser.parse_args()
    if args.records < 10_000:
        parser.error("--records must be at least 10000")
    base = args.dir or "/tmp"
    if not os.path.isdir(base):
        parser.error(f"not a directory: {base}")
    root = tempfile.mkdtemp(prefix="jlog-bench-", dir=base)
    total = args.records
    try:
        rows = []
        batch = bench_journal_batch(root, total)
        rows.append(("journal append_batch(1000), fsync=batch", batch))
        read_rate, read_count = bench_journal_read(root)
        rows.append((f"journal read(1000)+checkpoint ({read_count} recs)", read_rate))
        single = bench_journal_single(root, total, "batch", "bench_single")
        rows.append(("journal append single, fsync=batch", single))
        always = bench_journal_single(root, max(2000, total // 100), "always", "bench_always")
        rows.append(("journal append single, fsync=always", always))
        raw_lmdb = bench_lmdb(root, total)
        rows.append(("raw LMDB put, 10k per txn", raw_lmdb))
        plain = bench_file_fsync(root, total)
        rows.append(("file append + fsync per 1,000 lines", plain))

        print(f"{RECORD}-byte records, {total} per row, directory {root}")
        print(f"{'what':<46} {'records/s':>12}")
        print("-" * 59)
        for label, rate in rows:
            print(f"{label:<46} {rate:>12,.0f}")
        print("-" * 59)
        print(f"journal batch / raw LMDB          {batch / raw_lmdb:6.2f}x")
        print(f"journal batch / file+fsync        {batch / plain:6.2f}x")
        print(f"journal single(batch) / file+fsync {single / plain:5.2f}x")
        print(f"target: append_batch >= 200,000/s: {'PASS' if batch >= 200_000 else 'FAIL'}")
        print(f"target: read >= 300,000/s:         {'PASS' if read_rate >= 300_000 else 'FAIL'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
