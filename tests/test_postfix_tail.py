"""The Postfix plug-in's log reader against a journal that loses answers and a process that dies.

The reader (ecluster_postfix.service.PostfixService: _next_batch, _ship, _recover) runs here on
real files with a stand-in for the node's jlog and as_logger services (an in-memory journal
that can append a batch and then lose the answer, and as_logger's replay rule); the lab test
(tests/test_postfix_lab.py) runs the same code against the real services and Postfix.
Invariant checked every time: the journal holds every complete line of the log exactly once,
in order, and as_logger counted every ``connect from`` line once.
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("ecluster_postfix")

from bus.client import CallTimeout                      # noqa: E402
from ecluster.clusterfile import parse_cluster          # noqa: E402
from ecluster_postfix import service as pf              # noqa: E402
from ecluster_postfix.maillog import TailState          # noqa: E402


class FakeNode:
    """jlog (one log) and as_logger as the plug-in sees them over the bus."""

    def __init__(self):
        self.journal: list[bytes] = []
        self.lose_next_answers = 0        # append, then raise CallTimeout (a lost answer)
        self.fail_next_writes = 0         # raise before appending
        self.counted: dict[str, int] = {}
        self.last_batch: dict[str, int] = {}

    async def call(self, member, service, method, timeout=2.0, **args):
        if (service, method) == ("jlog", "status"):
            return {"logs": {"mainlog": {"last_seq": len(self.journal)}}}
        if (service, method) == ("jlog", "write"):
            if self.fail_next_writes:
                self.fail_next_writes -= 1
                raise CallTimeout("jlog.write timed out")
            self.journal.extend(args["records"])
            if self.lose_next_answers:
                self.lose_next_answers -= 1
                raise CallTimeout("jlog.write timed out")
            return {"last_seq": len(self.journal)}
        if (service, method) == ("as_logger", "add_batch"):
            sender, seq = args["batch"]
            if seq <= self.last_batch.get(sender, -1):
                return {"duplicate": True}
            self.last_batch[sender] = seq
            for _, ip, n in args["events"]:
                self.counted[ip] = self.counted.get(ip, 0) + n
            return {"duplicate": False, "counted": len(args["events"])}
        raise AssertionError(f"unexpected call {service}.{method}")


def make_service(tmp_path: Path, node: FakeNode) -> pf.PostfixService:
    text = f"""
[cluster]
name = "t"
[nodes.n1]
address = "127.0.0.1"
data_dir = "{tmp_path / 'n1'}"
[services.postfix]
domains = ["example.com"]
"""
    cluster = parse_cluster(text, tmp_path / "cluster.toml")
    svc = pf.PostfixService(cluster, "n1")
    svc.paths.log_dir.mkdir(parents=True)
    svc.call = node.call

    async def no_alarm(*a, **k):
        return None
    svc.alarm = no_alarm
    return svc


def write_log(svc, lines: list[str], path: Path | None = None) -> None:
    with open(path or svc.paths.maillog, "ab") as f:
        for line in lines:
            f.write(line.encode() + b"\n")


def connect(n: int, ip: str = "10.1.2.3") -> str:
    return f"Dec 07 01:00:{n % 60:02d} n1 postfix/smtpd[{100 + n}]: connect from client{n}[{ip}]"


async def drain(svc) -> None:
    """Ship batches until the reader has nothing more to read."""
    while True:
        batch = await svc.offload(svc._next_batch)
        if batch is None:
            return
        await svc._ship(*batch)


def expected(svc, *files: Path) -> list[bytes]:
    out = []
    for f in files:
        out += [ln for ln in f.read_bytes().split(b"\n") if ln]
    return out


@pytest.fixture
def env(tmp_path):
    node = FakeNode()
    return node, make_service(tmp_path, node)


def test_every_line_once_with_lost_answers_and_failed_writes(env, monkeypatch):
    node, svc = env
    monkeypatch.setattr(pf, "MAX_BATCH_LINES", 7)       # many batches
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    write_log(svc, [connect(i) if i % 3 == 0 else f"line {i}" for i in range(50)])
    with open(svc.paths.maillog, "ab") as f:
        f.write(b"a partial line")                      # not shipped until it ends
    node.lose_next_answers = 2
    node.fail_next_writes = 1
    asyncio.run(drain(svc))
    lines = expected(svc, svc.paths.maillog)
    assert node.journal == lines[:50] and b"a partial line" not in node.journal
    assert node.counted == {"10.1.2.3": 17}
    with open(svc.paths.maillog, "ab") as f:
        f.write(b" ends here\n")
    asyncio.run(drain(svc))
    assert node.journal[-1] == b"a partial line ends here" and len(node.journal) == 51


@pytest.mark.parametrize("landed_lines", [0, 3, 7])
def test_a_batch_in_flight_at_a_crash_is_settled_from_the_journal(env, tmp_path, monkeypatch, landed_lines):
    """A crash between the journal's append and the state file's update: the restarted
    reader counts what the journal holds of the batch and goes on after it."""
    node, svc = env
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    write_log(svc, [connect(i) for i in range(7)] + [f"after {i}" for i in range(5)])
    ino = os.stat(svc.paths.maillog).st_ino
    batch = expected(svc, svc.paths.maillog)[:7]
    end = sum(len(ln) + 1 for ln in batch)
    node.journal = [b"older record"] + batch[:landed_lines]        # what landed before the crash
    state = TailState(ino=ino, offset=0, seq=1, pending={"ino": ino, "start": 0, "end": end, "lines": 7})
    svc.state_path.parent.mkdir(parents=True, exist_ok=True)
    svc.state_path.write_text(json.dumps(state.to_json()))
    svc.state = svc._load_state()

    async def restart():
        await svc._recover()
        await drain(svc)
    asyncio.run(restart())
    assert node.journal == [b"older record"] + expected(svc, svc.paths.maillog)
    assert node.counted == {"10.1.2.3": 7}


def test_an_audit_batch_sent_again_after_a_crash_counts_once(env, monkeypatch):
    node, svc = env
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    write_log(svc, [connect(i) for i in range(4)])
    asyncio.run(drain(svc))
    assert node.counted == {"10.1.2.3": 4}
    # as if the process died after as_logger counted but before the state said so
    ino = os.stat(svc.paths.maillog).st_ino
    svc.state.audit = {"ino": ino, "start": 0, "end": svc.state.offset}
    asyncio.run(svc._recover())
    assert node.counted == {"10.1.2.3": 4} and len(node.journal) == 4


def test_rotation_reads_the_old_file_to_its_end_then_the_new_one(env, monkeypatch):
    node, svc = env
    monkeypatch.setattr(pf, "ROTATION_GRACE", 0.0)
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    write_log(svc, [f"first {i}" for i in range(5)])
    asyncio.run(drain(svc))
    rotated = svc.paths.log_dir / "maillog.20261207-010000"
    keep = svc.paths.log_dir.parent / "kept-link"
    os.link(svc.paths.maillog, keep)
    os.rename(svc.paths.maillog, rotated)
    write_log(svc, ["late line written before postlogd reopened"], rotated)
    write_log(svc, [f"second {i}" for i in range(3)])
    for _ in range(4):                               # notice the rename, finish, switch, read
        asyncio.run(drain(svc))
    assert node.journal == expected(svc, keep) + expected(svc, svc.paths.maillog)
    assert not rotated.exists(), "a rotated file read to its end is removed"
    assert svc.counters["rotations"] == 1


async def _no_sleep(delay, *a, **k):
    await _real_sleep(0)

_real_sleep = asyncio.sleep
