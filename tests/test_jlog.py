"""Tests of the jlog durable journal (node.jlog): storage, subscribers, budget, recovery."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from node.jlog import (
    ALARM_AHEAD,
    ALARM_DROPPED,
    ALARM_FULL,
    ALARM_LOST,
    CheckpointError,
    Journal,
    JournalClosed,
    JournalConfigError,
    JournalError,
    JournalFull,
    JournalLocked,
    SubscriberStalled,
    UnknownSubscriber,
    inspect,
    parse_fsync_policy,
)
from node.jlog.format import (
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    decode_records,
    encode_records,
    encode_segment_header,
    parse_segment_name,
    scan_segment,
    segment_name,
)
from node.jlog.journal import deletable_segment_count, records_lost_by_drop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seg_files(journal_or_path) -> list[str]:
    path = journal_or_path if isinstance(journal_or_path, str) else journal_or_path.path
    return sorted(e for e in os.listdir(path) if parse_segment_name(e) is not None)


def drain(journal: Journal, sub: str, checkpoint: bool = True, **kw) -> list[tuple[int, bytes]]:
    """Read everything for ``sub``, checkpointing as it goes."""
    out = []
    while True:
        batch = journal.read(sub, **kw)
        if not batch:
            return out
        assert not out or batch[0][0] > out[-1][0]
        out.extend(batch)
        journal.checkpoint(sub, batch[-1][0])


@pytest.fixture
def root():
    path = tempfile.mkdtemp(prefix="jlog-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- pure format


def test_segment_names_roundtrip_and_reject_others():
    assert segment_name(1) == "00000000000000000001.seg"
    assert parse_segment_name(segment_name(123456789)) == 123456789
    for bad in ("1.seg", "00000000000000000000.seg", "00000000000000000001.seg.tmp", "LOCK", "x" * 20 + ".seg"):
        assert parse_segment_name(bad) is None


def test_encode_decode_roundtrip_and_limits():
    payloads = [b"a" * 10, b"", b"c" * 300]
    blob, count, _ = encode_records(7, payloads)
    assert count == 3 and len(blob) == sum(RECORD_HEADER_SIZE + len(p) for p in payloads)
    res = decode_records(blob, 0, 7, 10, 10_000)
    assert res.records == [(7, payloads[0]), (8, b""), (9, payloads[2])] and res.stop == "end"
    # max_bytes stops before the big record, but an oversize first record is still given.
    assert [s for s, _ in decode_records(blob, 0, 7, 10, 20).records] == [7, 8]
    first_big = decode_records(blob[RECORD_HEADER_SIZE * 2 + 10 :], 0, 9, 10, 5)
    assert [s for s, _ in first_big.records] == [9]
    # room splits a batch, but the first record is always taken.
    _blob, count, _ = encode_records(1, payloads, room=RECORD_HEADER_SIZE + 10)
    assert count == 1
    _blob, count, _ = encode_records(1, [b"z" * 1000], room=50)
    assert count == 1
    with pytest.raises(JournalError, match="must be bytes, got str"):
        encode_records(1, [b"ok", "text"])


def test_scan_finds_torn_tail_bad_crc_and_wrong_seq():
    blob, _, _ = encode_records(5, [b"one", b"two", b"three"])
    data = encode_segment_header(5) + blob
    full = scan_segment(data, 5)
    assert (full.count, full.next_seq, full.torn_bytes) == (3, 8, 0)
    cut = scan_segment(data[:-2], 5)
    assert (cut.count, cut.torn_bytes) == (2, len(b"three") + RECORD_HEADER_SIZE - 2)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    assert scan_segment(bytes(flipped), 5).count == 2
    assert "crc" in scan_segment(bytes(flipped), 5).reason
    # A valid record with the wrong seq (e.g. a stale block) ends the valid prefix.
    stale, _, _ = encode_records(99, [b"stale"])
    assert scan_segment(data + stale, 5).count == 3
    assert scan_segment(data + b"\x00" * 64, 5).torn_bytes == 64


def test_pure_retention_decisions():
    assert deletable_segment_count([10, 20, 30], [20, 25]) == 2
    assert deletable_segment_count([10, 20, 30], [9, 100]) == 0
    assert deletable_segment_count([10, 20, 30], [100]) == 2  # never the current segment
    assert deletable_segment_count([10, 20, 30], []) == 0  # no subscribers: keep everything
    assert records_lost_by_drop(0, 1, 10) == 10
    assert records_lost_by_drop(4, 1, 10) == 6
    assert records_lost_by_drop(12, 1, 10) == 0


def test_fsync_policy_parsing():
    assert str(parse_fsync_policy("batch")) == "batch"
    assert parse_fsync_policy("interval:250").interval_ms == 250
    for bad in ("sometimes", "interval:", "interval:0", "interval:-5", "interval:abc", 5):
        with pytest.raises(JournalConfigError):
            parse_fsync_policy(bad)


# ---------------------------------------------------------------------------- basic API


def test_append_read_checkpoint_roundtrip(root):
    with Journal.open(root, "mainlog", subscribers=["m1"]) as j:
        assert j.append(b"first") == 1
        assert j.append_batch([b"second", b"third"]) == 3
        assert j.append_batch([]) == 3
        assert j.read("m1") == [(1, b"first"), (2, b"second"), (3, b"third")]
        # at-least-once: read does not move the checkpoint
        assert j.read("m1", max_records=2) == [(1, b"first"), (2, b"second")]
        j.checkpoint("m1", 2)
        assert j.read("m1") == [(3, b"third")]
        assert j.lag("m1") == (1, RECORD_HEADER_SIZE + len(b"third"))
        j.checkpoint("m1", 3)
        assert j.read("m1") == [] and j.lag("m1") == (0, 0)
        assert j.subscribers() == ["m1"]
    # everything persists across reopen
    with Journal.open(root, "mainlog") as j:
        assert j.get_checkpoint("m1") == 3 and j.last_seq == 3
        assert j.append(b"fourth") == 4
        assert j.read("m1") == [(4, b"fourth")]


def test_two_subscribers_are_independent(root):
    with Journal.open(root, "mainlog", subscribers=["m1", "m2"], segment_size=1024) as j:
        j.append_batch([b"r%d" % i for i in range(1, 101)])
        assert len(drain(j, "m1", max_records=7)) == 100
        assert j.lag("m1")[0] == 0 and j.lag("m2")[0] == 100
        got = j.read("m2", max_records=3)
        assert [s for s, _ in got] == [1, 2, 3]
        j.checkpoint("m2", 50)
        assert j.get_checkpoint("m1") == 100 and j.read("m2", max_records=1) == [(51, b"r51")]


def test_subscriber_declared_at_open_sees_earlier_records_and_late_one_starts_at_oldest(root):
    with Journal.open(root, "mainlog", subscribers=["early"], segment_size=512) as j:
        j.append_batch([b"%03d" % i + b"x" * 60 for i in range(1, 41)])
        assert [s for s, _ in drain(j, "early")] == list(range(1, 41))
        # "early" passed everything: old segments are gone, a new subscriber starts at
        # the oldest retained record.
        assert j.first_seq > 1
        ckpt = j.add_subscriber("late")
        assert ckpt == j.first_seq - 1
        assert j.read("late")[0][0] == j.first_seq
    with Journal.open(root, "mainlog", subscribers=["early", "late", "third"]) as j:
        assert j.subscribers() == ["early", "late", "third"]
        assert j.read("third")[0][0] == j.first_seq


def test_segment_deleted_only_after_every_subscriber_passed(root):
    with Journal.open(root, "mainlog", subscribers=["a", "b"], segment_size=1024) as j:
        payloads = [b"%04d" % i + b"." * 96 for i in range(1, 31)]  # 116-byte records, 8 per segment
        j.append_batch(payloads)
        files = seg_files(j)
        assert len(files) == 4
        firsts = [parse_segment_name(f) for f in files]
        j.checkpoint("a", 30)
        assert seg_files(j) == files  # b has read nothing
        j.checkpoint("b", firsts[1] - 2)  # one short of the end of segment 0
        assert seg_files(j) == files
        j.checkpoint("b", firsts[1] - 1)  # passed segment 0 exactly
        assert seg_files(j) == files[1:]
        j.checkpoint("b", 30)
        assert seg_files(j) == files[-1:]  # the current segment always stays
        assert j.read("a") == [] and j.stats()["segments"] == 1
        j.remove_subscriber("b")
        with pytest.raises(UnknownSubscriber):
            j.read("b")


def test_no_subscribers_keeps_every_segment(root):
    with Journal.open(root, "mainlog", segment_size=512) as j:
        j.append_batch([b"y" * 100 for _ in range(30)])
        n = len(seg_files(j))
        assert n > 3
        j.add_subscriber("x")
        assert j.read("x", max_records=1)[0][0] == 1


def test_checkpoint_backwards_or_beyond_is_rejected(root):
    with Journal.open(root, "mainlog", subscribers=["m1"]) as j:
        j.append_batch([b"a", b"b", b"c"])
        j.checkpoint("m1", 2)
        with pytest.raises(CheckpointError, match="backwards"):
            j.checkpoint("m1", 1)
        with pytest.raises(CheckpointError, match="beyond the last written seq 3"):
            j.checkpoint("m1", 4)
        with pytest.raises(CheckpointError):
            j.checkpoint("m1", "3")
        with pytest.raises(UnknownSubscriber):
            j.checkpoint("nobody", 1)
        assert j.get_checkpoint("m1") == 2
        j.checkpoint("m1", 2)  # same value: fine


def test_bad_input_gets_clear_errors(root):
    for kwargs, match in (
        ({"name": "../evil"}, "bad log name"),
        ({"fsync": "never"}, "bad fsync policy"),
        ({"segment_size": 10}, "segment_size"),
        ({"budget_policy": "panic"}, "budget_policy"),
        ({"disk_budget": 1000, "segment_size": 1024}, "disk_budget"),
        ({"subscribers": "m1"}, "list of names"),
        ({"subscribers": [""]}, "bad subscriber name"),
    ):
        args = {"name": "mainlog", **kwargs}
        with pytest.raises(JournalConfigError, match=match):
            Journal.open(root, args.pop("name"), **args)
    with Journal.open(root, "mainlog", subscribers=["m1"]) as j:
        with pytest.raises(JournalError, match="got str"):
            j.append("text")
        with pytest.raises(JournalError, match="got int"):
            j.append_batch([b"ok", 5])
        with pytest.raises(JournalError, match="list of payloads"):
            j.append_batch(b"one payload")
        with pytest.raises(JournalConfigError):
            j.read("m1", max_records=0)
        assert j.last_seq == 0  # nothing half-written
    with pytest.raises(JournalClosed):
        j.append(b"x")
    with pytest.raises(JournalError, match="no log named"):
        inspect(root, "absent")


def test_record_larger_than_segment_and_max_bytes(root):
    with Journal.open(root, "mainlog", subscribers=["m1"], segment_size=1024) as j:
        big = os.urandom(5000)
        j.append_batch([b"small", big, b"after"])
        assert j.read("m1", max_bytes=3) == [(1, b"small")]  # one record even when over
        j.checkpoint("m1", 1)
        assert j.read("m1", max_bytes=10) == [(2, big)]
        assert j.read("m1", max_bytes=10_000) == [(2, big), (3, b"after")]


def test_second_writer_refused_in_process_and_from_another_process(root):
    j = Journal.open(root, "mainlog", subscribers=["m1"])
    try:
        with pytest.raises(JournalLocked, match=f"already open for writing \\(pid {os.getpid()}\\)"):
            Journal.open(root, "mainlog")
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]);"
            "from node.jlog import Journal, JournalLocked\n"
            "try:\n Journal.open(sys.argv[2], 'mainlog')\nexcept JournalLocked as e:\n print('LOCKED', e); sys.exit(3)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, REPO, root], capture_output=True, text=True, timeout=20
        )
        assert proc.returncode == 3 and "LOCKED" in proc.stdout, proc.stderr
        j.append(b"still writable")
    finally:
        j.close()
    with Journal.open(root, "mainlog") as again:  # released on close
        assert again.last_seq == 1


def test_threads_append_and_read_concurrently(root):
    with Journal.open(root, "mainlog", subscribers=["r"], segment_size=4096) as j:
        total = 5000
        errors = []

        def writer():
            try:
                for i in range(0, total, 50):
                    j.append_batch([b"%d" % k for k in range(i + 1, i + 51)])
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=writer)
        thread.start()
        got = []
        deadline = time.monotonic() + 20
        while len(got) < total and time.monotonic() < deadline:
            batch = j.read("r", max_records=300)
            if batch:
                got.extend(batch)
                j.checkpoint("r", batch[-1][0])
        thread.join(timeout=20)
        assert not errors
        assert [s for s, _ in got] == list(range(1, total + 1))
        assert all(p == b"%d" % s for s, p in got)


# ---------------------------------------------------------------------------- budget


def test_budget_block_raises_journal_full_counted_and_alarmed(root):
    with Journal.open(
        root, "mainlog", subscribers=["slow"], segment_size=1024, disk_budget=4096, budget_policy="block"
    ) as j:
        record = b"z" * 100
        appended = 0
        j.append_batch([record] * 4)
        appended += 4
        with pytest.raises(JournalFull, match="disk budget"):
            for _ in range(1000):
                j.append(record)
                appended += 1
        assert j.last_seq == appended  # the refused batch wrote nothing
        assert j.stats()["disk_bytes"] <= 4096
        with pytest.raises(JournalFull):
            j.append(record)
        st = j.stats()
        assert st["full_rejections"] == 2
        [alarm] = j.alarms()
        assert alarm["kind"] == ALARM_FULL and alarm["count"] == 2
        # Nothing was lost: the slow subscriber still gets every record from 1.
        got = drain(j, "slow")
        assert [s for s, _ in got] == list(range(1, appended + 1))
        assert j.append(record) == appended + 1  # room again; the alarm clears itself
        assert j.alarms() == [] and j.stats()["full_rejections"] == 2
    with Journal.open(root, "mainlog") as j:
        assert j.stats()["full_rejections"] == 2  # persisted


def test_budget_drop_oldest_counts_and_alarms_for_the_slow_subscriber(root):
    with Journal.open(
        root, "mainlog", subscribers=["fast", "slow"], segment_size=1024, disk_budget=3072, budget_policy="drop_oldest"
    ) as j:
        record = b"q" * 100
        for _ in range(50):
            j.append_batch([record] * 4)
            got = drain(j, "fast")
            assert got
        assert j.last_seq == 200
        assert j.stats()["disk_bytes"] <= 3072
        alarms = {(a["kind"], a["subscriber"]): a for a in j.alarms()}
        assert set(alarms) == {(ALARM_DROPPED, "slow")}
        dropped = alarms[(ALARM_DROPPED, "slow")]["count"]
        first_kept = j.first_seq
        assert dropped == first_kept - 1 > 0
        batch = j.read("slow", max_records=1000)
        assert batch.dropped == dropped
        assert [s for s, _ in batch] == list(range(first_kept, 201))
        st = j.stats()
        assert st["records_dropped"] == dropped and st["subscribers"]["slow"]["dropped"] == dropped
        assert st["subscribers"]["fast"]["dropped"] == 0
    with Journal.open(root, "mainlog") as j:  # the alarm is durable
        assert [a["count"] for a in j.alarms()] == [dropped]
        assert inspect(root, "mainlog")["alarms"][0]["count"] == dropped
        assert j.clear_alarm(ALARM_DROPPED, "slow") and j.alarms() == []
        assert j.read("slow").dropped == 0


def test_batch_larger_than_budget_is_refused_under_drop_oldest(root):
    with Journal.open(
        root, "mainlog", subscribers=["s"], segment_size=1024, disk_budget=2048, budget_policy="drop_oldest"
    ) as j:
        j.append(b"keep")
        with pytest.raises(JournalFull, match="exceeds the disk budget"):
            j.append_batch([b"x" * 500] * 10)
        assert j.read("s") == [(1, b"keep")]


# ---------------------------------------------------------------------------- recovery


_WRITE_AND_DIE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from node.jlog import Journal
j = Journal.open(sys.argv[2], "mainlog", subscribers=["m1"], segment_size=2048)
j.append_batch([b"rec-%03d" % i + b"-" * 40 for i in range(1, 61)])
os._exit(0)  # a crash: no close(), the high-water seq is not recorded
"""


def test_torn_tail_is_truncated_and_numbering_continues(root):
    subprocess.run([sys.executable, "-c", _WRITE_AND_DIE, REPO, root], check=True, timeout=30)
    path = os.path.join(root, "mainlog")
    last_file = os.path.join(path, seg_files(path)[-1])
    size = os.path.getsize(last_file)
    record = RECORD_HEADER_SIZE + len(b"rec-001" + b"-" * 40)
    assert (size - SEGMENT_HEADER_SIZE) % record == 0 and size - SEGMENT_HEADER_SIZE > record
    os.truncate(last_file, size - record // 2)  # cut the last record in half
    cut = record - record // 2
    with Journal.open(root, "mainlog") as j:
        assert j.stats()["torn_bytes"] == cut
        assert j.repair()["torn_bytes"] == cut
        assert j.last_seq == 59 and j.alarms() == []
        assert os.path.getsize(last_file) == size - record
        got = j.read("m1", max_records=1000)
        assert [s for s, _ in got] == list(range(1, 60))
        assert all(p == b"rec-%03d" % s + b"-" * 40 for s, p in got)
        assert j.append(b"next") == 60
        assert [s for s, _ in j.read("m1", max_records=1000)] == list(range(1, 61))
    assert inspect(root, "mainlog")["torn_bytes_last"] == cut


def test_records_cut_after_a_clean_close_are_counted_and_their_ids_not_reused(root):
    with Journal.open(root, "mainlog", subscribers=["m1"]) as j:
        j.append_batch([b"a", b"b", b"c"])
        path = j.path
    last_file = os.path.join(path, seg_files(path)[-1])
    os.truncate(last_file, os.path.getsize(last_file) - 3)
    with Journal.open(root, "mainlog") as j:
        assert j.stats()["torn_bytes"] == RECORD_HEADER_SIZE - 2
        assert [(a["kind"], a["subscriber"], a["count"]) for a in j.alarms()] == [(ALARM_LOST, "m1", 1)]
        assert j.append(b"d") == 4  # seq 3 was acknowledged once: never issued again
        batch = j.read("m1")
        assert batch == [(1, b"a"), (2, b"b"), (4, b"d")] and batch.dropped == 1


def test_garbage_after_the_tail_is_recovered_from(root):
    with Journal.open(root, "mainlog", subscribers=["m1"]) as j:
        j.append_batch([b"a", b"b", b"c"])
        path = j.path
    last_file = os.path.join(path, seg_files(path)[-1])
    garbage = random.Random(7).randbytes(333)
    with open(last_file, "ab") as fh:
        fh.write(garbage)
    info = inspect(root, "mainlog")
    assert info["tail_unverified_bytes"] == 333 and info["last_seq"] == 3
    with Journal.open(root, "mainlog") as j:
        assert j.stats()["torn_bytes"] == 333
        assert j.read("m1") == [(1, b"a"), (2, b"b"), (3, b"c")]
        assert j.append(b"d") == 4
        assert j.read("m1")[-1] == (4, b"d")


_CHECKPOINT_AND_DIE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from node.jlog import Journal
j = Journal.open(sys.argv[2], "mainlog", subscribers=["ahead", "behind"], segment_size=4096)
j.append_batch([b"%d" % i for i in range(1, 11)])
j.checkpoint("ahead", 10)
j.checkpoint("behind", 4)
os._exit(0)  # a crash: no close()
"""


def test_checkpoint_beyond_recovered_end_stalls_until_forced_repair(root):
    subprocess.run([sys.executable, "-c", _CHECKPOINT_AND_DIE, REPO, root], check=True, timeout=30)
    path = os.path.join(root, "mainlog")
    # Simulate lost acknowledged data (e.g. power loss under interval fsync): cut records 8..10.
    last_file = os.path.join(path, seg_files(path)[-1])
    with open(last_file, "rb") as fh:
        data = fh.read()
    keep = scan_segment(data, 1)
    cut_at = SEGMENT_HEADER_SIZE + sum(RECORD_HEADER_SIZE + len(b"%d" % i) for i in range(1, 8))
    assert keep.count == 10
    os.truncate(last_file, cut_at)
    with Journal.open(root, "mainlog") as j:
        kinds = {(a["kind"], a["subscriber"]): a["count"] for a in j.alarms()}
        assert kinds == {(ALARM_AHEAD, "ahead"): 3, (ALARM_LOST, "behind"): 3}
        assert j.get_checkpoint("ahead") == 10  # not moved silently
        with pytest.raises(SubscriberStalled, match="repair"):
            j.read("ahead")
        # the subscriber that had not read them sees what survived, and the count
        batch = j.read("behind")
        assert [s for s, _ in batch] == [5, 6, 7] and batch.dropped == 3
        # ids are never reused: the next record gets 11, not 8
        assert j.append(b"new") == 11
        report = j.repair()
        assert "ahead" in report["stalled"] and report["actions"] == []
        with pytest.raises(SubscriberStalled):
            j.read("ahead")
        report = j.repair(force=True)
        assert report["actions"] == ["released stalled subscriber 'ahead'"]
        assert j.read("ahead") == [(11, b"new")]
        assert [s for s, _ in j.read("behind")] == [5, 6, 7, 11]
        assert j.stats()["subscribers"]["ahead"]["stalled"] is False
    with Journal.open(root, "mainlog") as j:  # the gap in seqs reads the same after a reopen
        assert [s for s, _ in j.read("behind")] == [5, 6, 7, 11]
        assert j.lag("ahead") == (1, RECORD_HEADER_SIZE + 3)


_CRASH_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from node.jlog import Journal
j = Journal.open(sys.argv[2], "crashlog", subscribers=["c"], segment_size=64 * 1024)
seq = j.last_seq
out = sys.stdout
while True:
    batch = [b"rec-%012d-" % (seq + 1 + i) + b"x" * 180 for i in range(300)]
    seq = j.append_batch(batch)
    out.write("%d\n" % seq)
    out.flush()
"""


def test_kill_9_loses_no_acknowledged_record(root):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    acked = 0
    for _round in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CRASH_CHILD, REPO, root],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            first = proc.stdout.readline()  # wait until it really writes
            assert first, proc.stderr.read().decode()
            acked = max(acked, int(first))
            time.sleep(rng.uniform(0.0, 0.3))  # the random moment of the kill, not synchronisation
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            for line in proc.stdout.read().decode().split():
                acked = max(acked, int(line))  # acknowledged before it died
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        with Journal.open(root, "crashlog") as j:
            assert j.last_seq >= acked, f"seed {seed}"
            # Read everything through a scratch subscriber so "c" stays at 0 (and keeps
            # every segment alive for the next round).
            scratch = f"verify{_round}"
            j.add_subscriber(scratch)
            everything = drain(j, scratch, max_records=5000, max_bytes=4 << 20)
            j.remove_subscriber(scratch)
            assert [s for s, _ in everything] == list(range(1, j.last_seq + 1)), f"seed {seed}"
            for s, p in everything:
                assert p == b"rec-%012d-" % s + b"x" * 180, f"seed {seed}: record {s} damaged"
            assert j.get_checkpoint("c") == 0
    assert acked > 0


# ---------------------------------------------------------------------------- misc


def test_fsync_counts_follow_the_policy(root):
    with Journal.open(root, "b", fsync="batch") as j:
        j.append_batch([b"x"] * 100)
        j.append_batch([b"y"] * 100)
        assert j.stats()["fsyncs"] == 2  # one per batch, not per record
        j.append(b"single")
        assert j.stats()["fsyncs"] == 2  # synced by the next batch, sync() or close()
        j.sync()
        assert j.stats()["fsyncs"] == 3
    with Journal.open(root, "a", fsync="always") as j:
        j.append(b"1")
        j.append(b"2")
        j.append_batch([b"3", b"4"])
        assert j.stats()["fsyncs"] == 3


def test_interval_policy_syncs_in_the_background(root):
    with Journal.open(root, "mainlog", subscribers=["m1"], fsync="interval:20") as j:
        j.append(b"x")
        deadline = time.monotonic() + 5
        while j.stats()["fsyncs"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert j.stats()["fsyncs"] >= 1 and j.stats()["fsync"] == "interval:20"


def test_inspect_reports_segments_subscribers_lag_and_alarms(root):
    with Journal.open(root, "mainlog", subscribers=["m1", "m2"], segment_size=1024) as j:
        j.append_batch([b"w" * 84 for _ in range(20)])  # 100-byte records
        j.checkpoint("m1", 15)
        live = inspect(root, "mainlog")
        assert live["writer_pid"] == os.getpid()
    cold = inspect(root, "mainlog")
    for info in (live, cold):
        assert info["first_seq"] == 1 and info["last_seq"] == 20
        assert [s["first_seq"] for s in info["segments"]] == [parse_segment_name(f) for f in seg_files(info["path"])]
        assert info["subscribers"]["m1"] == {"checkpoint": 15, "lag_records": 5, "lag_bytes": 500}
        assert info["subscribers"]["m2"] == {"checkpoint": 0, "lag_records": 20, "lag_bytes": 2000}
        assert info["alarms"] == [] and info["torn_bytes_last"] == 0
    assert cold["writer_pid"] is None


# ---------------------------------------------------------------------------- model check


class JournalVsModel(RuleBasedStateMachine):
    """Random appends/reads/checkpoints/reopens agree with a plain list."""

    SUBS = ("a", "b")

    def __init__(self):
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="jlog-model-")
        self.journal = self._open()
        self.records: list[bytes] = []  # seq = index + 1
        self.ckpt = {s: 0 for s in self.SUBS}

    def _open(self):
        return Journal.open(self.root, "model", subscribers=list(self.SUBS), segment_size=256)

    def teardown(self):
        self.journal.close()
        shutil.rmtree(self.root, ignore_errors=True)

    @rule(payload=st.binary(max_size=300))
    def append(self, payload):
        assert self.journal.append(payload) == len(self.records) + 1
        self.records.append(payload)

    @rule(payloads=st.lists(st.binary(max_size=120), max_size=12))
    def append_batch(self, payloads):
        self.records.extend(payloads)
        assert self.journal.append_batch(payloads) == len(self.records)

    @rule(sub=st.sampled_from(SUBS), max_records=st.integers(1, 20), max_bytes=st.integers(1, 600))
    def read(self, sub, max_records, max_bytes):
        expected, total = [], 0
        for seq in range(self.ckpt[sub] + 1, len(self.records) + 1):
            payload = self.records[seq - 1]
            if len(expected) >= max_records or (expected and total + len(payload) > max_bytes):
                break
            expected.append((seq, payload))
            total += len(payload)
        assert self.journal.read(sub, max_records=max_records, max_bytes=max_bytes) == expected

    @rule(sub=st.sampled_from(SUBS), data=st.data())
    def checkpoint(self, sub, data):
        seq = data.draw(st.integers(self.ckpt[sub], len(self.records)))
        self.journal.checkpoint(sub, seq)
        self.ckpt[sub] = seq

    @rule(sub=st.sampled_from(SUBS), delta=st.integers(1, 5), backwards=st.booleans())
    def bad_checkpoint(self, sub, delta, backwards):
        seq = self.ckpt[sub] - delta if backwards else len(self.records) + delta
        if seq < 0:
            return
        with pytest.raises(CheckpointError):
            self.journal.checkpoint(sub, seq)

    @precondition(lambda self: len(self.records) > 0)
    @rule()
    def reopen(self):
        self.journal.close()
        self.journal = self._open()

    @invariant()
    def agrees_with_model(self):
        j = self.journal
        assert j.last_seq == len(self.records)
        for sub in self.SUBS:
            assert j.get_checkpoint(sub) == self.ckpt[sub]
            records = len(self.records) - self.ckpt[sub]
            assert j.lag(sub) == (records, sum(RECORD_HEADER_SIZE + len(p) for p in self.records[self.ckpt[sub] :]))
        # Segments are deleted eagerly, and never one holding an unread record.
        firsts = [parse_segment_name(f) for f in seg_files(j)]
        floor = min(self.ckpt.values())
        assert firsts[0] <= floor + 1
        if len(firsts) > 1:
            assert firsts[1] - 1 > floor


TestJournalVsModel = JournalVsModel.TestCase
TestJournalVsModel.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
