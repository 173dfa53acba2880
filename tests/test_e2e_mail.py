"""End to end: mail keeps flowing through a VIP whose owner dies, and nothing is lost or doubled.

A namespace lab (tests/vip_cluster.py) with three nodes and a manager, one injection VIP
(preferred n1) and the SMTP plug-in on every node. A client in the lab's client namespace
(this file run as a script, see :func:`client_main`) sends a stream of messages to the
VIP, one SMTP session per attempt, each message with a unique Message-ID, retrying on a
new connection until it gets 250 after DATA. While mail flows, every process of the VIP
owner is killed with SIGKILL and its link goes down. Then:

(a) every message the client saw accepted is in exactly one spool (the dead node's data
    directory included), in the file the 250 reply named; a second copy is allowed only
    for a message one of whose attempts lost its answer after the whole body was sent
    (the SMTP duplicate problem, RFC 1047: no server can avoid it), and no spool holds
    a message the client was not told about, except from such an attempt;
(b) every accepted (indeed every spooled) message's reception record reaches the
    manager's aggregated mainlog exactly once (the dead node is brought back so its
    journal can be read);
(c) the messages accepted after the kill were accepted by another node;
(d) the CIDR count of ``connections`` for the client's /24 on the manager is exactly what
    the nodes journalled; for the survivors that is exactly their SMTP session counts, for
    the dead node it is bounded by the sessions the client opened to it (the kill loses
    its open 1 s window), see :func:`check_cidr`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import smtplib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ != "__main__":
    import pytest

    needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

HERE = Path(__file__).resolve().parent
SUBNET = "10.98.0"
VIP = f"{SUBNET}.100"
SMTP_PORT = 25
DOMAIN = "example.com"
#: the client's pace between messages, and how long it keeps retrying one message
CLIENT_PAUSE_S = 0.05
RETRY_PAUSE_S = 0.1
#: the client waits this long for a reply; more than the server's journal timeout (5 s)
#: plus the spool fsync, so a slow 250/451 is never mistaken for a lost answer
REPLY_TIMEOUT_S = 8.0
CONNECT_TIMEOUT_S = 1.0
#: as_logger windows (1 s here) close and reach the journal within this lag of the event
#: (tick 0.5 s + the SMTP plug-in's flush 0.25 s + the write), generously for a loaded box
AUDIT_LAG_S = 5.0
SERVER_ID_RE = re.compile(r"^[0-9a-f]{16}-(?P<node>[a-z0-9_-]+)-[0-9a-f]{8}$")


# -- the client (runs inside the client namespace) ----------------------------------------------

def message_bytes(token: str, n: int) -> tuple[str, bytes]:
    """(Message-ID, message) of message ``n`` of the run ``token``. Pure."""
    mid = f"<e2e.{token}.{n}@client.lab.test>"
    lines = ["From: sender@client.lab.test", f"To: user{n}@{DOMAIN}", f"Subject: e2e {n}",
             f"Message-ID: {mid}", "", f"message {n} of run {token}", ""]
    return mid, "\r\n".join(lines).encode()


def one_attempt(vip: str, port: int, data: bytes, n: int) -> dict:
    """One SMTP session; what happened, stage by stage (``stage`` is the last one reached)."""
    rec: dict = {"t0": time.time(), "tc": None, "banner": False, "stage": "connect", "code": 0, "text": ""}
    sock = None
    try:
        sock = socket.create_connection((vip, port), timeout=CONNECT_TIMEOUT_S)
        rec["tc"] = time.time()
        sock.settimeout(REPLY_TIMEOUT_S)
        s = smtplib.SMTP()
        s.sock = sock                  # connected by hand, to time the connection apart from the banner
        code, _ = s.getreply()
        rec["banner"] = code == 220
        steps = [("ehlo", lambda: s.ehlo("client.lab.test")),
                 ("mail", lambda: s.mail("sender@client.lab.test")),
                 ("rcpt", lambda: s.rcpt(f"user{n}@{DOMAIN}"))]
        if code != 220:
            rec.update(stage="banner", code=code)
            return rec
        for stage, step in steps:
            rec["stage"] = stage
            code, text = step()
            if code >= 400:
                rec.update(code=code, text=text.decode(errors="replace"))
                return rec
        rec["stage"] = "data"
        code, text = s.docmd("DATA")
        if code != 354:
            rec.update(code=code, text=text.decode(errors="replace"))
            return rec
        s.send(re.sub(rb"(?m)^\.", b"..", data) + b".\r\n")     # dot-stuffed; data ends with CRLF
        rec["stage"] = "body"          # from here a missing answer may hide an accepted message
        code, text = s.getreply()
        rec.update(code=code, text=text.decode(errors="replace"))
        try:
            s.quit()
        except (OSError, smtplib.SMTPException):
            pass
    except (OSError, smtplib.SMTPException) as e:
        rec["text"] = f"{type(e).__name__}: {e}"
    finally:
        rec["t1"] = time.time()
        if sock is not None:
            sock.close()
    return rec


def client_main(argv: list[str]) -> int:
    """Send messages until the stop file appears; retry each until 250 or the deadline."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--vip", required=True)
    ap.add_argument("--port", type=int, default=SMTP_PORT)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--give-up-after", type=float, default=120.0, help="seconds, for the whole run")
    args = ap.parse_args(argv)
    give_up = time.monotonic() + args.give_up_after
    with open(args.out, "a") as out:
        n = 0
        while not os.path.exists(args.stop) and time.monotonic() < give_up:
            n += 1
            mid, data = message_bytes(args.token, n)
            attempt = 0
            while time.monotonic() < give_up:
                attempt += 1
                rec = one_attempt(args.vip, args.port, data, n)
                rec.update(n=n, attempt=attempt, mid=mid)
                out.write(json.dumps(rec) + "\n")
                out.flush()
                if rec["code"] == 250 and rec["stage"] == "body" or 500 <= rec["code"] < 600:
                    break
                time.sleep(RETRY_PAUSE_S)
            time.sleep(CLIENT_PAUSE_S)
    return 0


if __name__ == "__main__":
    sys.exit(client_main(sys.argv[1:]))


# -- reading what happened (pure) ------------------------------------------------------------------

@dataclass
class Attempts:
    """The client's records, with the views the checks need."""

    records: list[dict]
    accepted: dict[str, dict] = field(default_factory=dict)       # Message-ID -> the accepting attempt
    lost_answers: dict[str, int] = field(default_factory=dict)    # Message-ID -> attempts without answer

    def __post_init__(self):
        for r in self.records:
            if r["stage"] == "body" and r["code"] == 250:
                assert r["mid"] not in self.accepted, f"{r['mid']} accepted twice by the client's own count"
                self.accepted[r["mid"]] = r
            elif r["stage"] == "body" and r["code"] == 0:
                self.lost_answers[r["mid"]] = self.lost_answers.get(r["mid"], 0) + 1


def server_node(reply_text: str) -> str:
    """The node named by a 250 reply (``OK queued as <id>``, the id carries the node). Pure."""
    server_id = reply_text.rsplit(" ", 1)[-1]
    m = SERVER_ID_RE.match(server_id)
    assert m, f"250 reply without a server message id: {reply_text!r}"
    return m.group("node")


def read_client(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def spooled_message_ids(spool_dir: Path) -> dict[str, str]:
    """server id -> Message-ID of every message in a spool directory."""
    from ecluster_smtp.spool import SUFFIX, parse_spool
    out = {}
    for p in sorted(spool_dir.glob(f"*{SUFFIX}")):
        msg = parse_spool(p.read_bytes()).message
        m = re.search(rb"^Message-ID: (<[^>\r\n]+>)\r$", msg, re.M)
        out[p.name[:-len(SUFFIX)]] = m.group(1).decode() if m else ""
    return out


def aggregated_records(logs_root: Path, log: str) -> dict[str, list[dict]]:
    """node -> the JSON records of ``log`` in a manager's aggregated files (all days)."""
    from manager.logsink import read_records
    out: dict[str, list[dict]] = {}
    for f in sorted(logs_root.glob(f"[0-9]*/*/*/{log}/*")):
        for record in read_records(f):
            out.setdefault(f.name, []).append(json.loads(record))
    return out


def aggregated_connections(logs_root: Path, node: str, block: str) -> int:
    """Connections from ``block`` in ``node``'s audit windows as the manager aggregated them;
    a window journalled twice (a retried write) counts once, as in the cidr_server."""
    import ipaddress
    from manager.logsink import read_records
    from node.audit import decode_window
    net = ipaddress.ip_network(block)
    seen, total = set(), 0
    for f in sorted(logs_root.glob(f"[0-9]*/*/*/audit/{node}")):
        for record in read_records(f):       # line format 2: each line decodes to exactly one window
            w = decode_window(record)
            key = (w.series, w.start, w.end, tuple(sorted(w.counts.items())))
            if w.series != "connections" or key in seen:
                continue
            seen.add(key)
            total += sum(c for (v, a), c in w.counts.items()
                         if v == 4 and ipaddress.ip_address(a) in net)
    return total


def check_spools(att: Attempts, spools: dict[str, dict[str, str]], killed: str) -> list[str]:
    """Check (a); returns the Message-IDs found twice (each explained by a lost answer)."""
    where: dict[str, list[tuple[str, str]]] = {}
    for node, ids in spools.items():
        for server_id, mid in ids.items():
            where.setdefault(mid, []).append((node, server_id))
    for mid, r in att.accepted.items():
        server_id = r["text"].rsplit(" ", 1)[-1]
        node = server_node(r["text"])
        assert (node, server_id) in where.get(mid, []), \
            f"{mid} was accepted as {server_id} by {node} but is not in its spool"
    doubled = []
    for mid, copies in where.items():
        expected = (1 if mid in att.accepted else 0)
        extra = len(copies) - expected
        if extra <= 0:
            continue
        lost = att.lost_answers.get(mid, 0)
        assert extra <= lost, (f"{mid} is spooled {len(copies)} times {copies} but the client saw "
                               f"{expected} acceptance(s) and {lost} lost answer(s)")
        if mid not in att.accepted:
            # an unacknowledged copy can only be one whose answer was lost in the kill
            assert all(node == killed for node, _ in copies), f"unacknowledged {mid} spooled on {copies}"
        doubled.append(mid)
    return doubled


# -- the test ------------------------------------------------------------------------------

SMTP_SECTIONS = f"""
[jlog]
logs = ["smtplog"]

[as_logger]
log_interval = 1

[services.smtp]
port = {SMTP_PORT}
hostname = "mx.lab.test"
domains = ["{DOMAIN}"]
"""


def smtp_lab_cluster():
    """A LabCluster (3 nodes, 1 manager, one injection VIP) with the SMTP plug-in on the nodes."""
    sys.path.insert(0, str(HERE))
    from vip_cluster import LabCluster

    class SmtpLabCluster(LabCluster):
        def write_cluster(self) -> Path:
            from ecluster.clusterfile import load_cluster
            path = super().write_cluster()
            path.write_text(path.read_text() + SMTP_SECTIONS)
            self.cluster = load_cluster(path)
            return path

    return SmtpLabCluster(3, 1, preset="lan", subnet=SUBNET,
                          vips=[{"address": f"{VIP}/24", "preference": "n1", "kind": "injection"}])


@pytest.fixture
def lab():
    lc = smtp_lab_cluster()
    try:
        lc.start()                     # closes itself if the start fails
        yield lc
    finally:
        lc.close()                     # every process (by PID), namespace and file of the lab


def wait_for(cond, timeout: float, what: str, interval: float = 0.1):
    from vip_cluster import wait_for as poll
    return poll(cond, timeout, interval=interval, what=what)


def smtp_status(lc, node: str) -> dict:
    return lc.call(node, "smtp", "status", timeout=2.0)


def lag(lc, node: str, log: str, subscriber: str) -> int:
    return lc.call(node, "jlog", "subscribers", timeout=2.0, log=log)["subscribers"][subscriber]["lag_records"]


def cidr_total(lc, block: str, series: str = "connections") -> int:
    rep = lc.call("m1", "cidr_server", "query", timeout=5.0, text=f"show count for {block} in {series}")
    return sum(row["total"] for row in rep["result"]["rows"])


def check_cidr(lc, att: Attempts, killed: str, survivors: list[str], t_kill: tuple[float, float],
               smtplog: dict[str, list[dict]]) -> dict:
    """(d). Each SMTP session a node's plug-in opens is one ``connections`` event for the
    peer; it reaches as_logger within 0.25 s and the journal when its 1 s window closes;
    the cidr_server counts each journalled window once. A kill -9 loses what the dead
    node had not journalled yet (its open window). With J(node) the connections from the
    client's /24 in the node's journalled windows (read from the manager's aggregated
    ``audit`` files, independently of the cidr_server):

        CIDR == sum over all nodes of J(node)                          exactly
        J(survivor) == that survivor's SMTP session count               exactly
        sessions the client began after the kill ended and got a banner
            <= sum of J(survivors) <= sessions it connected after the kill began
        the dead node's sessions that got a banner AUDIT_LAG_S before the kill
            <= J(dead) <= its journalled session records (each written before its
               window could close) <= connections the client made before the kill
    """
    block = f"{SUBNET}.0/24"
    logs_root = lc.root / "m1" / "logs"
    journalled = {n: aggregated_connections(logs_root, n, block) for n in [killed, *survivors]}
    sessions = {n: smtp_status(lc, n)["counters"]["connections"] for n in survivors}
    total = cidr_total(lc, block)
    k_start, k_end = t_kill
    before = [r for r in att.records if r["tc"] is not None and r["tc"] < k_start]
    surely_counted = [r for r in before if r["banner"] and r["tc"] < k_start - AUDIT_LAG_S]
    dead_sessions = sum(1 for r in smtplog.get(killed, []) if r["type"] == "connect")
    after_low = sum(1 for r in att.records if r["t0"] > k_end and r["banner"])
    after_high = sum(1 for r in att.records if r["tc"] is not None and r["tc"] >= k_start)
    figures = {"cidr": total, "journalled": journalled, "survivor_sessions": sessions,
               "dead_session_records": dead_sessions, "client_before_kill": len(before),
               "client_surely_counted": len(surely_counted), "after_low": after_low, "after_high": after_high}
    assert total == sum(journalled.values()), figures
    assert all(journalled[n] == sessions[n] for n in survivors), figures
    assert after_low <= sum(sessions.values()) <= after_high, figures
    assert len(surely_counted) <= journalled[killed] <= dead_sessions <= len(before), figures
    return figures


def test_checks_catch_what_they_must():
    """The pure checks fail on what they are meant to catch."""
    ok = {"stage": "body", "code": 250, "t0": 1.0, "t1": 1.1}
    lost = {"stage": "body", "code": 0, "t0": 2.0, "t1": 2.1}
    att = Attempts([{**ok, "n": 1, "attempt": 1, "mid": "<a>", "text": "2.0.0 OK queued as 0000000000000001-n1-0000000a"},
                    {**lost, "n": 2, "attempt": 1, "mid": "<b>", "text": ""},
                    {**ok, "n": 2, "attempt": 2, "mid": "<b>", "text": "2.0.0 OK queued as 0000000000000002-n2-0000000b"}])
    assert server_node(att.accepted["<b>"]["text"]) == "n2" and att.lost_answers == {"<b>": 1}
    good = {"n1": {"0000000000000001-n1-0000000a": "<a>", "0000000000000003-n1-0000000c": "<b>"},
            "n2": {"0000000000000002-n2-0000000b": "<b>"}}
    assert check_spools(att, good, killed="n1") == ["<b>"]          # a lost answer explains the copy
    with pytest.raises(AssertionError, match="spooled 2 times"):
        check_spools(att, {**good, "n3": {"0000000000000004-n3-0000000d": "<a>"}}, killed="n1")
    with pytest.raises(AssertionError, match="not in its spool"):
        check_spools(att, {"n1": {}, "n2": good["n2"]}, killed="n1")


def test_spool_commits_only_after_staging(tmp_path):
    """The order the plug-in relies on: a staged message is invisible in the spool, is
    dropped by the next open (a crash before the commit), and appears only when committed."""
    from ecluster_smtp.spool import Spool, new_message_id
    spool = Spool(tmp_path / "spool", "test")
    spool.open()
    try:
        staged, committed = new_message_id("n1"), new_message_id("n1")
        spool.stage(staged, b"x")
        spool.stage(committed, b"y")
        assert spool.ids() == []
        assert spool.commit(committed).read_bytes() == b"y" and spool.ids() == [committed]
        assert spool.discard(committed) is False                # no longer staged
    finally:
        spool.close()
    again = Spool(tmp_path / "spool", "test")
    assert again.open() == 1 and again.ids() == [committed]     # the staged one is gone
    again.close()


@needs_root
@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mail_survives_owner_kill(lab):
    lc = lab
    killed = "n1"
    wait_for(lambda: smtp_status(lc, killed)["listening"] == [VIP], 30, "n1 listens on the VIP")
    out, stop = lc.root / "client.jsonl", lc.root / "client.stop"
    token = os.urandom(4).hex()
    with open(lc.root / "client.err", "wb") as err:
        client = lc.lab.popen(lc.lab.client_ns, [sys.executable, str(Path(__file__).resolve()), "--vip", VIP,
                                                 "--out", out, "--stop", stop, "--token", token],
                              stdout=subprocess.DEVNULL, stderr=err)

    def accepted_count(after: float = 0.0, by: str | None = None) -> int:
        att = Attempts(read_client(out))
        return sum(1 for r in att.accepted.values()
                   if r["t0"] > after and (by is None or server_node(r["text"]) == by))

    # enough mail before the kill that the audit lower bound of (d) is not empty
    t_first = time.time()
    wait_for(lambda: accepted_count() >= 1, 20, "first message accepted")
    wait_for(lambda: time.time() - t_first > AUDIT_LAG_S + 2 and accepted_count() >= 10, 30,
             "a stream of accepted messages")
    assert lc.holders()[VIP] == [killed], "the VIP must be on its preferred node before the kill"
    k_start = time.time()
    lc.kill_member(killed, link_down=True)
    k_end = time.time()
    survivors = [n for n in lc.names if n.startswith("n") and n != killed]
    wait_for(lambda: accepted_count(after=k_end) >= 15, 60, "15 messages accepted after the kill")
    stop.touch()
    client.wait(timeout=2 * REPLY_TIMEOUT_S + 10)
    att = Attempts(read_client(out))
    # the dead namespace keeps the address until its kernel lifetime ends (its link is down):
    # the owner is the coordinator's
    new_owner = {r["address"].split("/")[0]: r["owner"] for r in lc.vip_rows()}[VIP]
    first_after = min((r["t1"] for r in att.accepted.values() if r["t0"] > k_end), default=float("nan"))
    print(f"\n{len(att.accepted)} messages accepted in {len(att.records)} attempts; "
          f"{killed} killed at +{k_start - t_first:.1f} s, VIP now on {new_owner}; "
          f"first 250 from it {first_after - k_start:.2f} s after the kill began")

    # (c) the retries went on and succeeded on the new owner
    after = [r for r in att.accepted.values() if r["t0"] > k_end]
    assert after and all(server_node(r["text"]) in survivors for r in after), \
        {server_node(r["text"]) for r in after}
    assert {server_node(r["text"]) for r in after} == {new_owner}
    before = [r for r in att.accepted.values() if r["t1"] < k_start]
    assert before and all(server_node(r["text"]) == killed for r in before)
    assert any(r["attempt"] > 1 for r in att.accepted.values()), "the kill made no message retry"
    unfinished = max(r["n"] for r in att.records) - len(att.accepted)
    assert unfinished <= 0, f"{unfinished} message(s) never accepted"

    # (a) each accepted message in exactly one spool (the dead node's data dir included)
    spools = {n: spooled_message_ids(lc.root / n / "spool") for n in [killed, *survivors]}
    doubled = check_spools(att, spools, killed)
    if doubled:
        print(f"lost answers made duplicates (RFC 1047), allowed: {doubled}")

    # (b) bring the dead node back, so the manager can read its journal; every reception record
    #     of an accepted message then stands exactly once in the aggregated mainlog
    lc.revive_member(killed)
    logs_root = lc.root / "m1" / "logs"
    wanted = {r["text"].rsplit(" ", 1)[-1] for r in att.accepted.values()}

    def receptions() -> dict[str, int]:
        seen: dict[str, int] = {}
        for recs in aggregated_records(logs_root, "mainlog").values():
            for r in recs:
                if r.get("type") == "reception":
                    seen[r["id"]] = seen.get(r["id"], 0) + 1
        return seen
    # a spooled message always has its reception record (staged, journalled, then committed),
    # also the copies whose answer the kill swallowed
    wanted |= {server_id for ids in spools.values() for server_id in ids}
    wait_for(lambda: wanted <= set(receptions()), 90, "every reception record in the aggregated mainlog",
             interval=0.5)
    twice = {i: c for i, c in receptions().items() if c > 1}
    assert not twice, f"reception records aggregated more than once: {twice}"

    # (d) the CIDR count: wait until every window is journalled and consumed, then compare
    nodes = [killed, *survivors]

    def drained() -> bool:
        for n in survivors:
            st = lc.call(n, "as_logger", "status", timeout=2.0)
            if st["open_windows"] or st["pending_windows"] or smtp_status(lc, n)["pending_audit"]:
                return False
        return all(lag(lc, n, "audit", "cidr-m1") == 0 and lag(lc, n, "audit", "logagg-m1") == 0
                   and lag(lc, n, "smtplog", "logagg-m1") == 0 for n in nodes)
    wait_for(drained, 60, "audit windows journalled and consumed", interval=0.5)
    smtplog = aggregated_records(logs_root, "smtplog")
    figures = check_cidr(lc, att, killed, survivors, (k_start, k_end), smtplog)
    print(f"CIDR check: {figures}")
