"""jlog on the nodes and logagg on the managers, over real brokers and service processes.

The main test writes 100,000 records across three nodes while one manager's aggregator
is SIGKILLed and restarted, a node is SIGKILLed and restarted and the other manager is
down and catches up; afterwards each manager's files hold every acknowledged record
exactly once, in per-node order. Then: a torn tail, the disk budget (both policies) and
its alarm, garbage at the endpoint, the CLI. Plus unit tests of the pure parts and of the
sink's crash recovery.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import envelope as ch
from bus.client import BusError, RemoteError, SyncClient
from conftest import CLI, run_cli, wait_until
from ecluster.commands.logs import batches, last_lines, status_rows
from manager.logsink import (
    LINE_FORMAT,
    SLOT_SIZE,
    Sink,
    SinkState,
    aggregated_files,
    decode_line,
    decode_state,
    encode_record,
    encode_state,
    new_records,
    newest_state,
    read_records,
    render_lines,
    split_lines,
)
from services.base import ServiceError, services_for
from services.jlog import check_records, declared_subscribers, group_requests, journal_settings, log_names
from services.logagg import check_batch, journal_reset_floor

pytestmark = pytest.mark.timeout(120)

SERVICE = {"node": "jlog", "manager": "logagg"}


class LogLab:
    """Members as processes: each one a broker plus its jlog (node) or logagg (manager)."""

    def __init__(self, cluster, procs):
        self.cluster = cluster
        self.procs = procs
        self.running: dict[str, dict[str, subprocess.Popen]] = {}

    def start(self, member: str, broker: bool = True) -> None:
        role = self.cluster.member(member).role
        progs = self.running.setdefault(member, {})
        if broker and "broker" not in progs:
            progs["broker"] = self.procs.start(["bus", "run", "-c", self.cluster.path, "-m", member],
                                               name=f"broker-{member}")
        svc = SERVICE[role]
        progs[svc] = self.procs.start(["service", "run", svc, "-c", self.cluster.path, "-m", member],
                                      name=f"{svc}-{member}")

    def kill(self, member: str, service_only: bool = False, sig: int = signal.SIGKILL) -> None:
        progs = self.running.get(member, {})
        for name in list(progs):
            if service_only and name == "broker":
                continue
            self.procs.stop(progs.pop(name), sig)

    def ready(self, member: str, timeout: float = 30) -> None:
        svc = SERVICE[self.cluster.member(member).role]

        def ping():
            with SyncClient(self.cluster, via=member) as c:
                return c.call(member, svc, "ping", timeout=0.5)
        wait_until(ping, timeout=timeout, what=f"{svc} on {member} answers")

    def client(self, member: str) -> SyncClient:
        return SyncClient(self.cluster, via=member)


def root_of(cluster, manager: str) -> Path:
    m = cluster.member(manager)
    return Path(m.logs_root or m.data_dir / "logs")


def aggregated_lines(cluster, manager: str) -> dict[tuple[str, str], list[bytes]]:
    """(node, log) -> every record of that node's log on ``manager`` (decoded), days in order."""
    out: dict[tuple[str, str], list[bytes]] = {}
    for _day, log, node, path in aggregated_files(root_of(cluster, manager)):
        out.setdefault((node, log), []).extend(read_records(path))
    return out


def payload(node: str, log: str, k: int) -> bytes:
    head = f"{node}:{log}:{k:08d}:".encode()
    return head + b"x" * (120 - len(head))


def counter(line: bytes) -> int:
    return int(line.split(b":")[2])


# -- the main scenario --------------------------------------------------------------------------------

TOTAL = 100_000
BATCH = 500
LOGS = ("mainlog", "acctlog")


def test_every_acknowledged_record_reaches_each_manager_exactly_once(make_cluster, procs):
    cluster = make_cluster(3, 2)
    lab = LogLab(cluster, procs)
    for m in ("n1", "n2", "n3", "m1", "m2"):
        lab.start(m)
    for m in ("n1", "n2", "n3", "m1", "m2"):
        lab.ready(m)

    acked: dict[tuple[str, str], set[int]] = {}
    maybe: dict[tuple[str, str], set[int]] = {}
    stop_writing = threading.Event()
    progress = {"batches": 0, "failed": 0}

    def writer():
        clients = {n: lab.client(n) for n in ("n1", "n2", "n3")}
        next_k = {}
        try:
            for i in range(TOTAL // BATCH):
                if stop_writing.is_set():
                    return
                node, log = ("n1", "n2", "n3")[i % 3], LOGS[(i // 3) % 2]
                start = next_k.get((node, log), 0)
                ks = range(start, start + BATCH)
                next_k[(node, log)] = start + BATCH
                try:
                    clients[node].call(node, "jlog", "write", timeout=1.5, log=log,
                                       records=[payload(node, log, k) for k in ks])
                    acked.setdefault((node, log), set()).update(ks)
                except BusError:
                    maybe.setdefault((node, log), set()).update(ks)
                    progress["failed"] += 1
                progress["batches"] += 1
                time.sleep(0.03)        # spread the writes over the chaos below
        finally:
            for c in clients.values():
                c.close()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        # (c) m2 goes down (whole member) and stays down while most records are written
        lab.kill("m2")
        # (a) m1's aggregator is SIGKILLed and restarted, three times
        for _ in range(3):
            wait_until(lambda: progress["batches"] > 10, timeout=30)
            time.sleep(random.uniform(0.2, 0.8))
            lab.kill("m1", service_only=True)
            lab.start("m1", broker=False)
            lab.ready("m1")
        # (b) node n2 (broker and jlog) is SIGKILLed and restarted
        lab.kill("n2")
        time.sleep(0.5)
        lab.start("n2")
        lab.ready("n2")
        # and m1 once more, the whole member this time
        lab.kill("m1")
        lab.start("m1")
        lab.ready("m1")
        t.join(timeout=60)
        assert not t.is_alive(), "the writer did not finish"
        # (c) m2 catches up, and its aggregator is SIGKILLed twice while it is busy doing so
        lab.start("m2")
        lab.ready("m2")
        for _ in range(2):
            wait_until(lambda: len(aggregated_lines(cluster, "m2")) > 0, timeout=20)
            time.sleep(random.uniform(0.05, 0.3))
            lab.kill("m2", service_only=True)
            lab.start("m2", broker=False)
            lab.ready("m2")
    finally:
        stop_writing.set()
        t.join(timeout=10)

    total_acked = sum(map(len, acked.values()))
    assert total_acked >= TOTAL * 0.8, f"too few writes acknowledged: {total_acked} ({progress})"

    def complete(manager):
        lines = aggregated_lines(cluster, manager)
        return all(len(lines.get(key, [])) >= len(ks) for key, ks in acked.items())

    for manager in ("m1", "m2"):
        wait_until(lambda: complete(manager), timeout=60, what=f"{manager} has every acknowledged record")
    for manager in ("m1", "m2"):
        lines = aggregated_lines(cluster, manager)
        for key, ks in acked.items():
            got = [counter(ln) for ln in lines.get(key, [])]
            assert all(a < b for a, b in zip(got, got[1:])), f"{manager} {key}: out of order or duplicated"
            assert ks <= set(got), f"{manager} {key}: {len(ks - set(got))} acknowledged records missing"
            assert set(got) <= ks | maybe.get(key, set()), f"{manager} {key}: records nobody wrote"
            assert all(ln == payload(key[0], key[1], counter(ln)) for ln in lines[key]), "a line was altered"
    # each manager checkpointed its own subscriber everywhere: nothing left to read
    with lab.client("m1") as c:
        st = wait_until(lambda: (lambda s: all(v["lag_records"] == 0 for n in s["logs"].values()
                                                for v in n.values()) and s)(
            c.call("m1", "logagg", "status", timeout=5)), timeout=20, what="m1 lag 0")
    assert st["subscriber"] == "logagg-m1"
    assert st["logs"]["n1"]["mainlog"]["written_seq"] > 0


# -- a torn tail ----------------------------------------------------------------------------------------

def test_torn_last_record_is_cut_and_aggregation_goes_on(make_cluster, procs):
    cluster = make_cluster(1, 1)
    lab = LogLab(cluster, procs)
    lab.start("n1")
    lab.ready("n1")
    with lab.client("n1") as c:
        assert c.call("n1", "jlog", "write", log="mainlog",
                      records=[payload("n1", "mainlog", k) for k in range(50)])["last_seq"] == 50
    lab.kill("n1")
    log_dir = cluster.member("n1").data_dir / "jlog" / "mainlog"
    seg = sorted(log_dir.glob("*.seg"))[-1]
    with open(seg, "r+b") as fh:                # cut the last record in its middle
        fh.truncate(seg.stat().st_size - 60)
    lab.start("n1")
    lab.ready("n1")
    r = run_cli(["logs", "inspect", "-c", cluster.path, "-m", "n1", "--log", "mainlog", "--json"])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["last_seq"] == 49 and info["torn_bytes_last"] == 76  # 16 header + 120 payload - 60
    with lab.client("n1") as c:
        last = c.call("n1", "jlog", "write", log="mainlog",
                      records=[payload("n1", "mainlog", k) for k in range(50, 60)])["last_seq"]
    assert last >= 59
    lab.start("m1")
    lab.ready("m1")
    want = [k for k in range(60) if k != 49]
    wait_until(lambda: len(aggregated_lines(cluster, "m1").get(("n1", "mainlog"), [])) >= len(want), timeout=20)
    assert [counter(ln) for ln in aggregated_lines(cluster, "m1")[("n1", "mainlog")]] == want


# -- disk budget ---------------------------------------------------------------------------------------

def alarm_listener(cluster, member: str) -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"alarm.")
    sub.connect(cluster.member(member).ipc_pub)
    return sub


def next_alarm(sub: zmq.Socket, kind: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sub.poll(100):
            topic, data = sub.recv_multipart()
            if topic.decode() == f"alarm.{kind}":
                return ch.unpack(data).body
    raise AssertionError(f"no alarm.{kind} within {timeout}s")


BUDGET = """
[jlog]
budget_mb = 0.125
segment_mb = 0.03125
policy = "{policy}"
"""


@pytest.mark.parametrize("policy", ["block", "drop_oldest"])
def test_a_subscriber_that_never_reads_meets_the_disk_budget(make_cluster, procs, policy):
    cluster = make_cluster(1, 1, extra=BUDGET.format(policy=policy))
    lab = LogLab(cluster, procs)
    lab.start("n1")
    lab.ready("n1")
    alarms = alarm_listener(cluster, "n1")
    time.sleep(0.3)     # let the SUB connect before anything can be published
    written = 0
    refused = None
    with lab.client("n1") as c:
        for i in range(40):              # 40 x 50 x 136 bytes on disk: 2x the budget
            try:
                c.call("n1", "jlog", "write", log="mainlog",
                       records=[payload("n1", "mainlog", k) for k in range(written, written + 50)])
                written += 50
            except RemoteError as e:
                refused = e
                break
        st = c.call("n1", "jlog", "status", timeout=5)["logs"]["mainlog"]
    kinds = {a["kind"] for a in st["alarms"]}
    if policy == "block":
        assert refused is not None and refused.code == "journal_full", "the budget never blocked a write"
        assert st["counters"]["full_rejections"] >= 1 and "journal_full" in kinds
        assert st["bytes"] <= 0.125 * 1024 * 1024
        body = next_alarm(alarms, "jlog.journal_full")
    else:
        assert refused is None and written == 2000
        assert st["counters"]["records_dropped"] > 0 and "records_dropped" in kinds
        assert st["subscribers"]["logagg-m1"]["dropped"] == st["counters"]["records_dropped"]
        body = next_alarm(alarms, "jlog.records_dropped")
    assert body["member"] == "n1" and body["log"] == "mainlog"
    alarms.close(linger=0)
    # the subscriber starts reading: what the node kept arrives, in order, once
    lab.start("m1")
    lab.ready("m1")
    kept = st["last_seq"] - st["first_seq"] + 1
    wait_until(lambda: len(aggregated_lines(cluster, "m1").get(("n1", "mainlog"), [])) >= kept, timeout=20)
    got = [counter(ln) for ln in aggregated_lines(cluster, "m1")[("n1", "mainlog")]]
    assert got == list(range(written - kept, written))
    if policy == "block":      # room again: writes are accepted and the alarm is gone
        with lab.client("n1") as c:
            wait_until(lambda: c.call("n1", "jlog", "write", log="mainlog", records=[b"after"]), timeout=10)
            assert "journal_full" not in {a["kind"] for a in c.call("n1", "jlog", "status")["logs"]["mainlog"]["alarms"]}


# -- garbage and the CLI ---------------------------------------------------------------------------------

GARBAGE = [
    ({"log": "mainlog", "records": "one record"}, "bad_records", "must be a list"),
    ({"log": "mainlog", "records": os.urandom(64)}, "bad_records", "must be a list"),
    ({"log": "mainlog", "records": [1, 2, 3]}, "bad_records", "record 0 must be bytes"),
    ({"log": "mainlog", "records": [b"ok", {"a": 1}]}, "bad_records", "record 1 must be bytes"),
    ({"log": "mainlog", "records": [b"x" * (5 << 20)]}, "bad_records", "more than"),
    ({"log": "nope", "records": [b"x"]}, "unknown_log", "unknown log 'nope'"),
    ({"log": 7, "records": [b"x"]}, "bad_arguments", "log must be a non-empty string"),
    ({"log": "../../etc", "records": [b"x"]}, "unknown_log", "unknown log"),
    ({"records": [b"x"]}, "bad_arguments", "missing a required argument"),
    ({"log": "mainlog", "records": [b"x"], "extra": 1}, "bad_arguments", "unexpected keyword"),
]


def test_garbage_is_refused_and_the_journal_keeps_serving(make_cluster, procs):
    cluster = make_cluster(1, 1)
    lab = LogLab(cluster, procs)
    lab.start("n1")
    lab.ready("n1")
    pid = lab.running["n1"]["jlog"].pid
    with lab.client("n1") as c:
        for args, code, text in GARBAGE:
            with pytest.raises(RemoteError) as err:
                c.call("n1", "jlog", "write", timeout=5, **args)
            assert err.value.code == code and text in err.value.message, (args.keys(), err.value.message)
        for method, args, code in [
            ("read", {"log": "mainlog", "subscriber": "nobody"}, "unknown_subscriber"),
            ("read", {"log": "mainlog", "subscriber": "logagg-m1", "max_records": "many"}, "bad_arguments"),
            ("read", {"log": "mainlog", "subscriber": "logagg-m1", "max_records": 0}, "bad_arguments"),
            ("checkpoint", {"log": "mainlog", "subscriber": "logagg-m1", "seq": 10**9}, "bad_checkpoint"),
            ("checkpoint", {"log": "mainlog", "subscriber": "logagg-m1", "seq": -1}, "bad_arguments"),
            ("repair", {"log": "mainlog", "force": "yes"}, "bad_arguments"),
            ("nosuchmethod", {}, "unknown_method"),
        ]:
            with pytest.raises(RemoteError) as err:
                c.call("n1", "jlog", method, timeout=5, **args)
            assert err.value.code == code, (method, err.value.message)
    # raw garbage at the node's bus socket (the journal endpoint's front door)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(cluster.member("n1").ipc_router)
    for frame in [os.urandom(100), msgpack.packb([1, 2, 3]),
                  msgpack.packb({"v": 1, "k": "req", "id": "x", "dm": "n1", "ds": "jlog", "m": "write",
                                 "b": {"log": "mainlog", "records": os.urandom(30)}})]:
        raw.send(frame)
    raw.close(linger=500)
    with lab.client("n1") as c:
        assert c.call("n1", "jlog", "write", log="mainlog", records=["text is encoded", b"\xff bytes"])["last_seq"] == 2
        batch = c.call("n1", "jlog", "read", log="mainlog", subscriber="logagg-m1")
        assert batch["records"] == [[1, b"text is encoded"], [2, b"\xff bytes"]] and batch["dropped"] == 0
    assert lab.running["n1"]["jlog"].poll() is None and lab.running["n1"]["jlog"].pid == pid


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("ecluster: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_cli_write_status_tail_and_errors(make_cluster, procs):
    cluster = make_cluster(2, 1)
    lab = LogLab(cluster, procs)
    for m in ("n1", "m1"):
        lab.start(m)
    for m in ("n1", "m1"):
        lab.ready(m)
    cfg = ["-c", cluster.path]
    text = "".join(f"line {i} from the shell\n" for i in range(2500)) + "a line with a \\ backslash\n"
    r = subprocess.run([*CLI, "logs", "write", *cfg, "-m", "n1", "--log", "mainlog"], input=text.encode(),
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    want = text.encode().split(b"\n")[:-1]
    wait_until(lambda: aggregated_lines(cluster, "m1").get(("n1", "mainlog"), []) == want, timeout=20,
               what="the lines at m1")
    r = run_cli(["logs", "tail", *cfg, "-m", "m1", "--node", "n1", "--log", "mainlog", "--lines", "3"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [w.decode() for w in want[-3:]]
    r = run_cli(["logs", "tail", *cfg, "-m", "m1", "--lines", "1"])
    assert r.stdout.splitlines() == ["n1/mainlog: a line with a \\ backslash"]
    # status: the manager's subscriber has read everything (the tail shows it arrived)
    with lab.client("n1") as c:
        wait_until(lambda: c.call("n1", "jlog", "status")["logs"]["mainlog"]["subscribers"]["logagg-m1"]
                   ["lag_records"] == 0, timeout=15, what="logagg-m1 checkpointed everything")
    r = run_cli(["logs", "status", *cfg, "--json", "-t", "1"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["n1"]["logs"]["mainlog"]["subscribers"]["logagg-m1"] == {
        "checkpoint": 2501, "lag_records": 0, "lag_bytes": 0, "stalled": False, "dropped": 0}
    assert rep["n1"]["logs"]["mainlog"]["last_seq"] == 2501
    assert "error" in rep["n2"] and "logs" not in rep["n2"]          # n2 is not running
    assert set(rep["n1"]["logs"]["audit"]["subscribers"]) == {"logagg-m1", "cidr-m1"}
    r = run_cli(["logs", "status", *cfg, "-t", "1"])
    assert r.returncode == 0 and "logagg-m1" in r.stdout
    r = run_cli(["logs", "subscribers", *cfg, "-m", "n1", "--log", "audit"])
    assert r.returncode == 0 and "cidr-m1" in r.stdout
    r = run_cli(["logs", "repair", *cfg, "-m", "n1", "--log", "mainlog"])
    assert r.returncode == 0 and json.loads(r.stdout)["corrupt_segments"] == []
    r = run_cli(["logs", "remove-subscriber", "cidr-m1", *cfg, "-m", "n1", "--log", "audit"])
    assert r.returncode == 0 and "comes back" in r.stdout
    # tail -f follows new lines
    follower = subprocess.Popen([*CLI, "logs", "tail", *cfg, "-m", "m1", "-n", "n1", "-l", "mainlog", "--lines", "0",
                                 "-f"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(1.0)     # it has taken its starting offsets
        subprocess.run([*CLI, "logs", "write", *cfg, "-m", "n1", "--log", "mainlog"], input=b"followed\n",
                       check=True, timeout=30)
        assert follower.stdout.readline() == b"followed\n"
    finally:
        follower.kill()
        follower.wait()
    # one-line errors
    assert "unknown log 'nope'" in one_error_line(run_cli(["logs", "inspect", *cfg, "-m", "n1", "--log", "nope"]))
    assert "m1 is a manager" in one_error_line(run_cli(["logs", "inspect", *cfg, "-m", "m1", "--log", "mainlog"]))
    assert "n1 is a node" in one_error_line(run_cli(["logs", "tail", *cfg, "-m", "n1"]))
    assert "no reply" in one_error_line(run_cli(["logs", "inspect", *cfg, "-m", "n2", "-l", "mainlog", "-t", "0.5"]))
    r = subprocess.run([*CLI, "logs", "write", *cfg, "-m", "n1", "--log", "nope"], input="x\n",
                       capture_output=True, text=True, timeout=30)
    assert "0 records acknowledged" in one_error_line(r)
    r = run_cli(["logs", "write", "--help"])
    assert r.returncode == 0 and "Example" in r.stdout


# -- pure parts and the sink ------------------------------------------------------------------------------

def test_line_format_2_examples():
    """The format on disk, byte for byte (a change here is a format change: bump LINE_FORMAT)."""
    assert LINE_FORMAT == 2
    payloads = [b"a", b"b\nc", b"", b"\xff\\n", b"C:\\path\\", b"\\\n", b"x\\\\ny", b"no escapes \\ here"]
    data = render_lines(payloads)
    assert data == (b"a\nb\\nc\n\n\xff\\\\n\nC:\\path\\\n\\\\\\n\nx\\\\\\\\ny\n"
                    b"no escapes \\ here\n")
    assert split_lines(data) == payloads
    assert render_lines([]) == b"" and split_lines(b"") == []
    assert split_lines(b"one\ntorn") == [b"one"]               # a line still being written is left out
    # a payload with neither a newline nor backslash + n is written as it is (as in format 1)
    assert render_lines([b"plain", b"a \\ b", b"end\\"]) == b"plain\na \\ b\nend\\\n"


def test_binary_audit_windows_get_distinct_lines():
    """The review's case: two windows whose encodings differ only in a newline vs a literal
    backslash + n gave the same format-1 line."""
    from node.audit import Window, decode_window, encode_window
    windows = [Window("connections", 1_700_000_040, 1_700_000_100, {(4, addr): 1})
               for addr in (0x0A5C6E0A, 0x5C6E0A0A)]
    records = [encode_window(w) for w in windows]
    assert records[0] != records[1]
    lines = [encode_record(r) for r in records]
    assert lines[0] != lines[1] and not any(b"\n" in ln for ln in lines)
    assert [decode_window(decode_line(ln)) for ln in lines] == windows
    assert split_lines(render_lines(records)) == records


# bytes rich in what the format treats specially, and arbitrary bytes
_special = st.lists(st.sampled_from([b"\\", b"n", b"\n", b"x", b"\xff", b"\r"]), max_size=30).map(b"".join)
records_st = st.one_of(st.binary(max_size=200), _special)


@settings(max_examples=400, deadline=None)
@given(record=records_st)
def test_bytes_record_line_round_trip(record: bytes):
    line = encode_record(record)
    assert b"\n" not in line
    assert decode_line(line) == record
    assert split_lines(render_lines([record])) == [record]


@settings(max_examples=200, deadline=None)
@given(record=st.text(max_size=100))
def test_str_record_line_round_trip(record: str):
    line = encode_record(record)
    assert b"\n" not in line and decode_line(line).decode() == record


@settings(max_examples=400, deadline=None)
@given(a=records_st, b=records_st)
def test_distinct_records_give_distinct_lines(a: bytes, b: bytes):
    assert (encode_record(a) == encode_record(b)) == (a == b)


@settings(max_examples=200, deadline=None)
@given(batch=st.lists(records_st, max_size=20))
def test_batches_round_trip_one_record_a_line(batch: list):
    data = render_lines(batch)
    assert data.count(b"\n") == len(batch)
    assert split_lines(data) == batch


def test_state_slots_round_trip_and_damage():
    s = SinkState(seq=42, path="2024/01/02/mainlog/n1", size=999, generation=7)
    slot = encode_state(s)
    assert len(slot) == SLOT_SIZE and decode_state(slot) == s
    bad = bytearray(slot)
    bad[20] ^= 1
    assert decode_state(bytes(bad)) is None
    older = encode_state(SinkState(seq=40, path="p", size=1, generation=6))
    assert newest_state(older + slot) == s and newest_state(slot + older) == s
    assert newest_state(older + bytes(bad)).seq == 40          # a torn newer slot: the older one holds
    assert newest_state(b"\0" * 2 * SLOT_SIZE) is None


def test_dedup_and_reset_decisions():
    recs = [[5, b"a"], [6, b"b"], [7, b"c"]]
    assert new_records(recs, 4) == recs and new_records(recs, 6) == [[7, b"c"]] and new_records(recs, 9) == []
    assert journal_reset_floor(10, 12, recs) is None
    assert journal_reset_floor(10, 7, recs) == 4 and journal_reset_floor(10, 3, []) == 3
    assert check_batch({"records": recs, "last_seq": 7, "dropped": 0}) == (recs, 7, 0)
    for bad in [[], {"records": [[6, b"b"], [5, b"a"]], "last_seq": 7}, {"records": [[1, "str"]], "last_seq": 1},
                {"records": None, "last_seq": 1}]:
        with pytest.raises(ValueError):
            check_batch(bad)


def test_write_argument_checks_and_grouping():
    assert check_records(["é", b"\x00"]) == ["é".encode(), b"\x00"]
    for bad in ["x", b"x", None, [None], [3.5]]:
        with pytest.raises(ServiceError):
            check_records(bad)
    assert group_requests([(10, 100), (10, 100), (10, 100)], 25, 10_000) == 2
    assert group_requests([(100, 1), (1, 1)], 25, 10_000) == 1       # one too big still goes alone
    assert group_requests([(1, 600), (1, 600)], 100, 1000) == 1


def test_logs_and_subscribers_follow_the_cluster_file(make_cluster):
    cluster = make_cluster(2, 2, extra='[jlog]\nlogs = ["smtp", "mainlog"]\nbudget_mb = 2\nsegment_mb = 0.5\n')
    assert log_names(cluster) == ["mainlog", "rejectlog", "bouncelog", "paniclog", "acctlog", "audit", "smtp"]
    assert declared_subscribers(cluster, "smtp") == ["logagg-m1", "logagg-m2"]
    assert declared_subscribers(cluster, "audit") == ["logagg-m1", "logagg-m2", "cidr-m1", "cidr-m2"]
    assert journal_settings(cluster.section("jlog")) == {"fsync": "batch", "segment_size": 512 * 1024,
                                                         "disk_budget": 2 << 20, "budget_policy": "block"}
    assert "jlog" in services_for(cluster, "n1") and "logagg" not in services_for(cluster, "n1")
    assert "logagg" in services_for(cluster, "m1") and "jlog" not in services_for(cluster, "m1")


def test_sink_recovers_from_a_crash_between_data_and_state(tmp_path):
    recs = [[s, f"r{s}".encode()] for s in range(1, 11)]
    sink = Sink(tmp_path, "n1", "mainlog").open()
    assert sink.append(recs[:5], day="2024/01/01") == 5
    path = tmp_path / "2024/01/01/mainlog/n1"
    committed = path.read_bytes()
    # a crash after the data write, before the state update (and a torn line after it)
    with open(path, "ab") as fh:
        fh.write(b"r6\nr7\nr")
    sink.close()
    again = Sink(tmp_path, "n1", "mainlog").open()
    assert again.recovered_bytes == 7 and path.read_bytes() == committed and again.state.seq == 5
    # the node sends the unacknowledged batch again, plus more: each record lands once
    assert again.append(recs[3:8], day="2024/01/01") == 3
    # a new day: a new file, and the state follows it
    assert again.append(recs[6:], day="2024/01/02") == 2
    again.close()
    third = Sink(tmp_path, "n1", "mainlog").open()
    assert third.recovered_bytes == 0 and third.state.seq == 10 and third.state.path == "2024/01/02/mainlog/n1"
    third.close()
    days = [(d, p.read_bytes()) for d, _l, _n, p in aggregated_files(tmp_path)]
    assert days == [("2024/01/01", b"r1\nr2\nr3\nr4\nr5\nr6\nr7\nr8\n"), ("2024/01/02", b"r9\nr10\n")]
    assert [f for f in aggregated_files(tmp_path, node="n2")] == []
    # an operator archives the last day's file: noted, not fatal, and writing goes on
    (tmp_path / "2024/01/02/mainlog/n1").unlink()
    fourth = Sink(tmp_path, "n1", "mainlog").open()
    assert fourth.notes and fourth.state.seq == 10 and fourth.state.size == 0
    assert fourth.append([[10, b"r10"], [11, b"r11"]], day="2024/01/02") == 1
    fourth.close()
    assert (tmp_path / "2024/01/02/mainlog/n1").read_bytes() == b"r11\n"
    fifth = Sink(tmp_path, "n1", "mainlog").open()
    assert fifth.recovered_bytes == 0 and not fifth.notes
    fifth.close()


def test_cli_helpers(tmp_path):
    import io
    got = list(batches(io.BytesIO(b"a\r\nb\n\nlast"), max_records=2))
    assert got == [[b"a", b"b"], [b"", b"last"]]
    f = tmp_path / "f"
    f.write_bytes(b"1\n2\n3\npartial")
    assert last_lines(f, 2) == ([b"2", b"3"], 6)
    assert last_lines(f, 0) == ([], 6)
    rows = status_rows({"n1": {"node": "n1", "logs": {"mainlog": {
        "last_seq": 5, "first_seq": 1, "bytes": 100, "alarms": [{"kind": "journal_full"}],
        "subscribers": {"logagg-m1": {"checkpoint": 3, "lag_records": 2, "lag_bytes": 40}}}}},
        "n2": {"error": "no reply"}})
    assert rows[0]["lag_records"] == 2 and rows[0]["alarms"] == "journal_full"
    assert rows[1] == {"node": "n2", "log": None, "subscriber": None, "error": "no reply"}
