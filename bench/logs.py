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
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgpack  # noqa: E402
import zmq  # noqa: E402

RECORD = 200
WRITE_BATCH = 5000
TARGET = 100_000


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def payload(k: int) -> bytes:
    head = b"%010d " % k
    return head + b"r" * (RECORD - len(head))


class Children:
    """Subprocesses of the bench, stopped by PID at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], name: str) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def stop_all(self) -> None:
        for p in self.procs:
            self.stop(p)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ecluster.cli", *args]


def make_cluster(base: Path):
    """A one-node, one-manager cluster file on loopback with its keys."""
    from bus import keys as keymod
    from ecluster.clusterfile import load_cluster
    ports = free_ports(7)
    text = f"""[cluster]
name = "bench"
keys = "keys"

[nodes.n1]
address = "127.0.0.1"
data_dir = "{base / 'n1'}"
bus_port = {ports[0]}
pub_port = {ports[1]}
metrics_port = {ports[2]}

[managers.m1]
address = "127.0.0.1"
data_dir = "{base / 'm1'}"
bus_port = {ports[3]}
pub_port = {ports[4]}
metrics_port = {ports[5]}
console_port = {ports[6]}
"""
    path = base / "cluster.toml"
    path.write_text(text)
    for name in ("n1", "m1", keymod.ADMIN):
        keymod.create(base / "keys", name)
    return load_cluster(path)


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception:  # noqa: BLE001 - not yet
            pass
        time.sleep(0.02)
    raise SystemExit(f"bench: {what} not true within {timeout:g}s")


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


def child_push(port: int, n: int, batch: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.connect(f"tcp://127.0.0.1:{port}")
    packb = msgpack.packb
    recs = [payload(k) for k in range(min(n, 10_000))]
    if batch == 1:
        for k in range(n):
            s.send(packb([k, recs[k % len(recs)]], use_bin_type=True))
    else:
        for i in range(0, n, batch):
            s.send(packb([[k, recs[k % len(recs)]] for k in range(i, min(n, i + batch))], use_bin_type=True))
    s.close(linger=-1)
    ctx.term()


def bench_raw(n: int, batch: int, base: Path) -> float:
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    kids = Children(base)
    try:
        p = kids.start([sys.executable, os.path.abspath(__file__), "--child-push", str(port), str(n), str(batch)],
                       f"push-{batch}")
        got = 0
        t0 = None
        unpackb = msgpack.unpackb
        while got < n:
            msg = unpackb(pull.recv(), raw=False)
            if t0 is None:
                t0 = time.perf_counter()
                got += len(msg) if batch > 1 else 1
                continue
            got += len(msg) if batch > 1 else 1
        rate = (n - (batch if batch > 1 else 1)) / (time.perf_counter() - t0)
        p.wait(timeout=30)
    finally:
        kids.stop_all()
        pull.close(linger=0)
    return rate


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-push":
        child_push(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="records per e2e row (default 200000)")
    parser.add_argument("--append-records", type=int, default=300_000,
                        help="records per journal append row (default 300000)")
    parser.add_argument("--skip-append", action="store_true", help="skip the journal append rows")
    args = parser.parse_args()
    if args.records < 20_000:
        parser.error("--records must be at least 20000")

    if not args.skip_append:
        import importlib.util
        # by path: bench/ is not a package, and bench/bus.py would shadow the bus package
        spec = importlib.util.spec_from_file_location(
            "logs_append", os.path.join(os.path.dirname(os.path.abspath(__file__)), "logs_append.py"))
        logs_append = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(logs_append)
        sys.argv = [sys.argv[0], "--records", str(args.append_records)]
        logs_append.main()
        print()

    base = Path(tempfile.mkdtemp(prefix="ecl-logs-bench-", dir="/tmp"))
    try:
        e2e = bench_e2e(args.records, base)
        raw_batch = bench_raw(args.records, WRITE_BATCH, base)
        raw_single = bench_raw(args.records, 1, base)
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
