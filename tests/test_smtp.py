"""The SMTP plug-in (plugins/ecluster_smtp): pure parts, then a two-node loopback cluster.

The cluster runs with ``vip_dry_run = true`` and loopback VIPs (127.0.0.100 and .101 on
``lo``): the addresses exist on this host, so the plug-in can bind them although nothing
is plumbed; a third injection VIP (192.0.2.10) is held but not local, so it must not be
listened on; an outbound VIP is never listened on. The manager m1 is configured but not
run: it only makes the journals declare the subscriber ``logagg-m1`` this test reads with.
"""
from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from bus.client import SyncClient
from conftest import CLI, Procs, free_ports, make_cluster_file, short_dir, wait_until
from ecluster_smtp.audit import AuditOutbox
from ecluster_smtp.records import parse_record, reception_record
from bus.client import CallTimeout, RemoteError
from ecluster_smtp.service import (SmtpConfigError, check_settings, listener_changes, recipient_refusal,
                                   refused_for_good, wanted_listeners)
from ecluster_smtp.spool import Spool, SpoolError, new_message_id, parse_spool, spool_bytes
from node.audit import decode_window
from node.datadir import LockedError

pytestmark = pytest.mark.timeout(90)

VIP_A, VIP_B, VIP_FAR, VIP_OUT = "127.0.0.100", "127.0.0.101", "192.0.2.10", "127.0.0.102"
NODES = ("n1", "n2")
SERVICES = ("membership", "election", "vip", "jlog", "as_logger", "control", "metrics", "smtp")
SUB = "logagg-m1"


# -- pure parts ---------------------------------------------------------------------------------

def test_settings_are_checked():
    s = check_settings({"port": 2525, "domains": ["Example.COM"]}, ["mainlog", "smtplog"])
    assert (s.port, s.spool, s.log, s.domains) == (2525, "spool", "smtplog", frozenset({"example.com"}))
    for table, words in (({"port": 0}, "port"), ({"spool": "../x"}, "spool"), ({"spool": "a/b"}, "spool"),
                         ({"max_message_size": 10}, "max_message_size"), ({"domains": ["bad domain"]}, "domains"),
                         ({"log": "Bad"}, "log")):
        with pytest.raises(SmtpConfigError, match=words):
            check_settings(table, ["mainlog", "smtplog"])
    with pytest.raises(SmtpConfigError, match=r"add it to \[jlog\]\.logs"):
        check_settings({}, ["mainlog"])


def test_listeners_follow_injection_vips_held():
    injection = {VIP_A, VIP_B}
    assert wanted_listeners([VIP_A, VIP_OUT, "garbage", 7], injection) == {VIP_A}
    assert wanted_listeners(None, injection) == set()
    assert listener_changes({VIP_A}, {VIP_B}) == ([VIP_B], [VIP_A])
    assert listener_changes({VIP_A}, {VIP_A}) == ([], [])


def test_recipient_policy():
    doms = frozenset({"example.com"})
    assert recipient_refusal("a@example.com", doms, 0, 10) is None
    assert recipient_refusal("a@EXAMPLE.com.", doms, 0, 10) is None
    assert recipient_refusal("a@other.org", doms, 0, 10).startswith("550")
    assert recipient_refusal("a@other.org", frozenset(), 0, 10) is None
    assert recipient_refusal("a@example.com", doms, 10, 10).startswith("452")


def test_background_batches_are_kept_unless_refused_for_good():
    assert refused_for_good(RemoteError("unknown_log", "no such log"))
    assert refused_for_good(RemoteError("bad_batch", "batch seq must be an integer"))
    assert not refused_for_good(RemoteError("no_service", "jlog is not running"))
    assert not refused_for_good(CallTimeout("n1", "jlog", "write", 2.0))


def test_audit_batch_in_flight_is_resent_unchanged_under_its_id():
    box = AuditOutbox("n1", max_pending=3, token="t0")
    assert box.next_call() is None and box.waiting() == 0
    assert box.add("connections", "10.0.0.1") and box.add("connections", "10.0.0.1") and box.add("rejects", "10.0.0.2")
    first = box.next_call()
    assert first == ([["connections", "10.0.0.1", 2], ["rejects", "10.0.0.2", 1]], ["smtp-n1-t0", 1])
    # events that arrive while the batch is unanswered wait for the next one
    assert box.add("connections", "10.0.0.3")
    assert box.waiting() == 3
    assert box.next_call() == first                 # the call timed out: the very same batch again
    box.answered(1)
    assert box.next_call() == ([["connections", "10.0.0.3", 1]], ["smtp-n1-t0", 2])
    box.answered(1)                                 # a late answer to the old batch changes nothing
    assert box.next_call()[1] == ["smtp-n1-t0", 2]
    assert box.refused(2) == 1 and box.next_call() is None and box.waiting() == 0
    # bounded: a new address past the bound is not kept, a known one still counts
    for i in range(3):
        assert box.add("connections", f"10.1.0.{i}")
    assert not box.add("connections", "10.1.0.9") and box.add("connections", "10.1.0.0")
    assert box.next_call()[1] == ["smtp-n1-t0", 3]
    # another process of the plug-in gets another sender name, so its seqs never collide
    assert AuditOutbox("n1", 10).sender != AuditOutbox("n1", 10).sender


def test_a_batch_whose_answer_was_lost_is_counted_once():
    """The plug-in's outbox against as_logger's ledger: answers lost at random (the call
    timed out after as_logger counted) never make an event count twice or go missing."""
    import random
    from collections import Counter
    from services.as_logger import BatchLedger
    rng = random.Random(7)
    ledger, counted, sent = BatchLedger(), Counter(), Counter()
    box = AuditOutbox("n1", max_pending=1000)

    def as_logger_add_batch(events, batch):
        if ledger.is_replay(*batch):
            return {"duplicate": True}
        for series, address, n in events:
            counted[(series, address)] += n
        ledger.record(*batch)
        return {"duplicate": False}

    for step in range(300):
        for _ in range(rng.randrange(3)):
            key = ("connections", f"10.0.0.{rng.randrange(5)}")
            box.add(*key)
            sent[key] += 1
        call = box.next_call()
        if call is None:
            continue
        rep = as_logger_add_batch(*call) if rng.random() > 0.2 else None   # not delivered at all
        if rep is not None and rng.random() > 0.4:                        # the answer arrives
            box.answered(call[1][1])
    while (call := box.next_call()) is not None:
        as_logger_add_batch(*call)
        box.answered(call[1][1])
    assert counted == sent


def test_spool_file_round_trip_and_atomic_write(tmp_path):
    msg = b"Subject: hi\r\n\r\n.leading dot kept\r\nbody\r\n"
    data = spool_bytes("0000000000000001-n1-abcdef01", "a@x.org", ["b@example.com", "c@example.com"],
                       "10.0.0.1", "client\r\nX-Injected: 1", VIP_A, "mx", msg, 0.0)
    back = parse_spool(data)
    assert (back.mail_from, back.rcpts, back.message) == ("a@x.org", ["b@example.com", "c@example.com"], msg)
    assert data.count(b"\r\n") == msg.count(b"\r\n") + 4          # the HELO cannot add a header line
    with pytest.raises(SpoolError):
        parse_spool(b"garbage")
    with pytest.raises(SpoolError):
        new_message_id("n1", rand="../../x")

    spool = Spool(tmp_path / "spool", "test")
    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    (tmp_path / "spool" / "tmp" / "half-written").write_bytes(b"x")
    assert spool.open() == 1                                       # a crash leftover is removed
    try:
        mid = new_message_id("n1")
        path = spool.write(mid, data)
        assert path.read_bytes() == data and spool.ids() == [mid]
        assert list((tmp_path / "spool" / "tmp").iterdir()) == []
        with pytest.raises(LockedError, match="spool directory .* is in use by test"):
            Spool(tmp_path / "spool", "other").open()
        assert spool.remove(mid) and spool.ids() == []
    finally:
        spool.close()


def test_spool_uses_the_shared_fsync_helper():
    import ecluster_smtp.spool as spool_module
    from node import fsutil
    assert not hasattr(spool_module, "_fsync_dir") and spool_module.fsync_dir is fsutil.fsync_dir


def test_reception_record_is_one_json_line():
    rec = reception_record(msg_id="i", node="n1", vip=VIP_A, port=25, peer="10.0.0.1", helo="h\nx",
                           mail_from="a@b", rcpts=["c@d"], size=3, spool="spool/i.eml", at=1.5)
    assert b"\n" not in rec
    assert parse_record(rec)["rcpt"] == ["c@d"]


# -- the cluster -------------------------------------------------------------------------------

class SmtpLab:
    def __init__(self, cluster, procs: Procs, port: int):
        self.cluster = cluster
        self.procs = procs
        self.port = port

    def call(self, member: str, service: str, method: str, timeout: float = 2.0, **args):
        with SyncClient(self.cluster, via=member) as c:
            return c.call(member, service, method, timeout=timeout, **args)

    def smtp_status(self, node: str) -> dict:
        return self.call(node, "smtp", "status", timeout=1.0)

    def read_all(self, node: str, log: str) -> list[bytes]:
        return [bytes(p) for _, p in self.call(node, "jlog", "read", log=log, subscriber=SUB)["records"]]

    def spool_dir(self, node: str) -> Path:
        return self.cluster.member(node).data_dir / "spool"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("smtp")
    root = short_dir()
    procs = Procs(base / "logs")
    port = free_ports(1, VIP_A)[0]
    extra = f"""
[[vip]]
address = "{VIP_A}/8"
interface = "lo"
preference = "n1"

[[vip]]
address = "{VIP_B}/8"
interface = "lo"
preference = "n2"

[[vip]]
address = "{VIP_FAR}/24"
interface = "lo"
preference = "n2"

[[vip]]
address = "{VIP_OUT}/8"
interface = "lo"
preference = "n1"
kind = "outbound"

[jlog]
logs = ["smtplog"]

[as_logger]
log_interval = 1

[services.smtp]
port = {port}
hostname = "mx.test"
domains = ["example.com"]
max_message_size = 4096
"""
    try:
        cluster = make_cluster_file(base / "c", 2, 1, extra=extra, data_root=root)
        for n in NODES:
            procs.start(["bus", "run", "-c", cluster.path, "-m", n], name=f"bus-{n}")
            for s in SERVICES:
                procs.start(["service", "run", s, "-c", cluster.path, "-m", n], name=f"{s}-{n}")
        lab = SmtpLab(cluster, procs, port)
        wait_until(lambda: lab.smtp_status("n1")["listening"] == [VIP_A], timeout=40, what="n1 listens on its VIP")
        wait_until(lambda: lab.smtp_status("n2")["listening"] == [VIP_B], timeout=20, what="n2 listens on its VIP")
        yield lab
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def send(vip: str, port: int, rcpts: list[str], message: bytes) -> tuple[int, str, dict]:
    """One SMTP transaction; returns (DATA reply code, text, refused recipients)."""
    with smtplib.SMTP(vip, port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("sender@client.test")
        refused = {}
        for r in rcpts:
            code, text = s.rcpt(r)
            if code >= 400:
                refused[r] = (code, text.decode())
        if len(refused) == len(rcpts):
            return 0, "", refused
        code, text = s.data(message)
        return code, text.decode(), refused


def test_only_held_local_injection_vips_are_listened_on(lab):
    st1, st2 = lab.smtp_status("n1"), lab.smtp_status("n2")
    assert VIP_OUT in st1["held"] and VIP_OUT not in st1["listening"]        # outbound: no listener
    assert VIP_FAR in st2["held"] and VIP_FAR not in st2["listening"]        # held, but not on this host
    assert st1["dry_run"] is True


def test_mail_is_spooled_journalled_and_audited(lab):
    message = (b"From: sender@client.test\r\nTo: rcpt@example.com\r\nSubject: test "
               + str(time.time()).encode() + b"\r\n\r\nline one\r\n.a line that starts with a dot\r\n")
    code, text, refused = send(VIP_A, lab.port, ["rcpt@example.com"], message)
    assert code == 250 and not refused, text
    msg_id = text.rsplit(" ", 1)[1]
    assert "-n1-" in msg_id

    spooled = parse_spool((lab.spool_dir("n1") / f"{msg_id}.eml").read_bytes())
    assert spooled.message == message
    assert (spooled.mail_from, spooled.rcpts) == ("sender@client.test", ["rcpt@example.com"])
    assert "from client.test ([127.0.0.1]) by mx.test (127.0.0.100)" in spooled.received

    receptions = [parse_record(r) for r in lab.read_all("n1", "mainlog")]
    mine = [r for r in receptions if r.get("id") == msg_id]
    assert len(mine) == 1
    assert mine[0]["type"] == "reception" and mine[0]["vip"] == VIP_A and mine[0]["size"] == len(message)
    assert mine[0]["spool"] == f"spool/{msg_id}.eml"

    # session events reach the plug-in's own log (written in the background)
    def accepted_logged():
        return any(parse_record(r).get("id") == msg_id and parse_record(r)["type"] == "accept"
                   for r in lab.read_all("n1", "smtplog"))
    wait_until(accepted_logged, timeout=10, what="accept event in smtplog")

    # as_logger closes 1 s windows into the audit journal: connections from 127.0.0.1
    def connections_counted():
        total = 0
        for rec in lab.read_all("n1", "audit"):
            w = decode_window(rec)
            if w.series == "connections":
                total += sum(c for (v, a), c in w.counts.items() if (v, a) == (4, 0x7F000001))
        return total >= 1
    wait_until(connections_counted, timeout=15, what="connections window in the audit journal")


def test_a_journal_write_that_times_out_is_withdrawn_once_it_lands(lab):
    """jlog stopped past JOURNAL_TIMEOUT: the client gets 451, nothing is spooled, and when
    jlog resumes the reception record it then writes is followed by a withdrawal."""
    import signal
    rcpt = f"withdrawn-{int(time.time() * 1000)}@example.com"
    pid = lab.call("n1", "jlog", "ping")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        code, text, refused = send(VIP_A, lab.port, [rcpt], b"Subject: late journal\r\n\r\nx\r\n")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert code == 451 and not refused, text

    def paired():
        recs = [parse_record(r) for r in lab.read_all("n1", "mainlog")]
        mine = [i for i, r in enumerate(recs) if r["type"] == "reception" and r.get("rcpt") == [rcpt]]
        if not mine:
            return None
        msg_id = recs[mine[0]]["id"]
        after = [r for r in recs[mine[0] + 1:] if r["type"] == "withdrawn" and r["id"] == msg_id]
        return (msg_id, len(mine), after) if after else None
    msg_id, receptions, withdrawals = wait_until(paired, timeout=30, what="reception record, then its withdrawal")
    assert receptions == 1 and withdrawals[0]["reason"] == "journal write timed out"
    assert not (lab.spool_dir("n1") / f"{msg_id}.eml").exists(), "a 451'd message must not be spooled"
    assert lab.smtp_status("n1")["counters"]["withdrawn"] >= 1


def test_refusals_count_as_rejects(lab):
    before = lab.smtp_status("n2")["counters"]
    code, _, refused = send(VIP_B, lab.port, ["someone@elsewhere.org"], b"Subject: x\r\n\r\nx\r\n")
    assert code == 0 and refused["someone@elsewhere.org"][0] == 550
    code, text, _ = send(VIP_B, lab.port, ["big@example.com"], b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 100
                         + (b"y" * 900 + b"\r\n") * 10)
    assert code == 552, text
    after = lab.smtp_status("n2")["counters"]
    assert after["rejected"] - before["rejected"] == 2
    assert after["accepted"] == before["accepted"]

    def rejects_counted():
        n = 0
        for rec in lab.read_all("n2", "audit"):
            w = decode_window(rec)
            if w.series == "rejects":
                n += w.total()
        return n >= 2
    wait_until(rejects_counted, timeout=15, what="rejects windows in the audit journal")
    stages = {parse_record(r).get("stage") for r in lab.read_all("n2", "smtplog")
              if parse_record(r)["type"] == "reject"}
    assert {"rcpt", "size"} <= stages


def test_plugin_command_through_the_control_service(lab):
    rep = lab.call("n2", "control", "run", timeout=5.0, command="smtp status", args=[])
    assert rep["status"] == "ok" and rep["command"] == "smtp status", rep
    assert rep["result"]["member"] == "n2" and VIP_B in rep["result"]["listening"]


def test_plugin_metrics_reach_the_prometheus_endpoint(lab):
    import urllib.request
    m = lab.cluster.member("n1")

    def scrape():
        with urllib.request.urlopen(f"http://{m.address}:{m.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()
    text = wait_until(lambda: (t := scrape()) and 'ecluster_smtp_listening{member="n1",vip="127.0.0.100"} 1' in t
                      and t, timeout=15, what="smtp families in the scrape")
    assert "# TYPE ecluster_smtp_connections_total counter" in text
    assert 'ecluster_service_up{service="smtp"} 1' in text


def test_second_process_on_the_same_spool_refuses(lab):
    p = subprocess.run([*CLI, "service", "run", "smtp", "-c", str(lab.cluster.path), "-m", "n1"],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert err[-1].startswith("ecluster: spool directory") and "in use by smtp service of n1 (pid" in err[-1], err
    assert lab.smtp_status("n1")["listening"] == [VIP_A]           # the first one is unaffected


def test_listener_stops_when_the_vip_moves_away(lab):
    lab.call(coordinator(lab), "election", "move", vip=VIP_A, node="n2")
    try:
        wait_until(lambda: lab.smtp_status("n1")["listening"] == [], timeout=10, what="n1 stops listening")
        wait_until(lambda: VIP_A in lab.smtp_status("n2")["listening"], timeout=10, what="n2 listens on the VIP")
        code, text, _ = send(VIP_A, lab.port, ["rcpt@example.com"], b"Subject: moved\r\n\r\nafter the move\r\n")
        assert code == 250 and "-n2-" in text
        msg_id = text.rsplit(" ", 1)[1]
        assert (lab.spool_dir("n2") / f"{msg_id}.eml").exists()
        assert not (lab.spool_dir("n1") / f"{msg_id}.eml").exists()
    finally:
        lab.call(coordinator(lab), "election", "unpin", vip=VIP_A)


def coordinator(lab) -> str:
    """The coordinator now: a node's own key may not move or unpin VIPs (bus.roles), the
    coordinator's own call may."""
    return lab.call("n1", "election", "status")["leader"]
