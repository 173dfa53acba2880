"""as_logger + cidr_server end to end: real brokers and services on loopback.

Three nodes (bus, jlog, as_logger each) and one manager (bus, cidr_server), windows of
1 s. Events go in through the as_logger RPC and ``ecluster audit add``; the manager's
answers are checked against a brute-force recount of the events sent.
"""
from __future__ import annotations

import ipaddress
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import time
from collections import Counter, defaultdict

import pytest

from bus.client import RemoteError, SyncClient
from conftest import CLI, Procs, make_cluster_file, run_cli, short_dir, wait_until

pytestmark = pytest.mark.timeout(120)

NODES = ("n1", "n2", "n3")
MANAGER = "m1"
SINCE = "since 20200101"


# -- the cluster (one for the module: starting 11 processes is the slow part) -------------------

class Lab:
    def __init__(self, cluster, procs: Procs):
        self.cluster = cluster
        self.procs = procs
        self.manager_procs: list[subprocess.Popen] = []
        self.node_procs: dict[str, subprocess.Popen] = {}     # "jlog-n1" -> process
        self.sent: list[tuple[str, str, int]] = []      # every event counted, for the recount

    def start_manager(self) -> None:
        path = self.cluster.path
        self.manager_procs = [
            self.procs.start(["bus", "run", "-c", path, "-m", MANAGER], name=f"bus-{MANAGER}"),
            self.procs.start(["service", "run", "cidr_server", "-c", path, "-m", MANAGER], name="cidr_server"),
        ]
        wait_until(lambda: self.call(MANAGER, "cidr_server", "status", timeout=0.5), timeout=30,
                   what="cidr_server answers")

    def start_service(self, service: str, node: str) -> None:
        self.node_procs[f"{service}-{node}"] = self.procs.start(
            ["service", "run", service, "-c", self.cluster.path, "-m", node], name=f"{service}-{node}")

    def call(self, member: str, service: str, method: str, timeout: float = 3.0, **args):
        with SyncClient(self.cluster, via=member) as c:
            return c.call(member, service, method, timeout=timeout, **args)

    def add_batch(self, node: str, events: list[tuple[str, str, int]], batch: tuple[str, int] | None = None) -> dict:
        """Count ``events`` on ``node`` (under the id ``batch`` if given); a batch as_logger
        answers as a duplicate is not added to what the recount expects."""
        args = {} if batch is None else {"batch": list(batch)}
        rep = self.call(node, "as_logger", "add_batch", events=[list(e) for e in events], **args)
        if rep.get("duplicate"):
            assert rep == {"counted": 0, "ignored": 0, "duplicate": True}
            return rep
        assert rep == {"counted": sum(e[2] for e in events), "ignored": 0, **({} if batch is None else {"duplicate": False})}
        self.sent += events
        return rep

    def query(self, text: str) -> dict:
        return self.call(MANAGER, "cidr_server", "query", timeout=5.0, text=text)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("cidr")
    root = short_dir()
    procs = Procs(base / "logs")
    try:
        cluster = make_cluster_file(base / "c", 3, 1, extra="[as_logger]\nlog_interval = 1\n", data_root=root)
        for n in NODES:
            procs.start(["bus", "run", "-c", cluster.path, "-m", n], name=f"bus-{n}")
        lab = Lab(cluster, procs)
        for n in NODES:
            lab.start_service("jlog", n)
            lab.start_service("as_logger", n)
        lab.start_manager()
        for n in NODES:
            wait_until(lambda: lab.call(n, "as_logger", "status", timeout=0.5), timeout=30, what=f"as_logger on {n}")
            wait_until(lambda: lab.call(n, "jlog", "status", timeout=0.5), timeout=30, what=f"jlog on {n}")
        yield lab
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


# -- brute force ---------------------------------------------------------------------------------

def recount(events, series: list[str], prefix: int, version: int = 4) -> dict[str, tuple[int, ...]]:
    """Counts per network of length ``prefix``, one column per series, from the raw events."""
    table: dict[str, Counter] = defaultdict(Counter)
    for s, address, n in events:
        ip = ipaddress.ip_address(address)
        if ip.version == 6 and ip.ipv4_mapped:     # as a dual-stack listener reports IPv4 clients
            ip = ip.ipv4_mapped
        if ip.version != version or s not in series:
            continue
        table[str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))][s] += n
    return {net: tuple(c[s] for s in series) for net, c in table.items()}


def parse_rows(lines: list[str]) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in lines:
        cidr, counts = line.split(" : ")
        out[cidr] = tuple(int(c) for c in counts.split(","))
    return out


def events_for(node_index: int, round_: int) -> list[tuple[str, str, int]]:
    """A deterministic mix: shared /24s across nodes, several series, IPv6, counts > 1."""
    out = []
    for i in range(40):
        out.append(("connections", f"10.{round_}.{i % 5}.{(i * 7 + node_index) % 250 + 1}", 1 + i % 3))
        if i % 4 == 0:
            out.append(("rejects", f"10.{round_}.{i % 5}.{i + 1}", 2))
    out.append(("connections", f"2001:db8:{round_}::{node_index + 1}", 5))
    out.append(("connections", f"::ffff:192.0.2.{node_index + 1}", 1))   # counts as IPv4
    return out


def answered_matches(lab: Lab) -> bool:
    v4 = parse_rows(lab.query(f"show count for 0.0.0.0/0 in connections,rejects {SINCE} cidrsize 24")["rows"])
    v6 = parse_rows(lab.query(f"show count for ::/0 in connections {SINCE} cidrsize 64")["rows"])
    return (v4 == recount(lab.sent, ["connections", "rejects"], 24)
            and v6 == recount(lab.sent, ["connections"], 64, version=6))


def caught_up(lab: Lab) -> bool:
    nodes = lab.call(MANAGER, "cidr_server", "status")["nodes"]
    return all(st["up"] and st["lag"] == 0 and st["checkpoint"] > 0 for st in nodes.values())


# -- tests ---------------------------------------------------------------------------------------

def test_windows_of_three_nodes_are_summed_on_the_manager(lab):
    for i, node in enumerate(NODES):
        lab.add_batch(node, events_for(i, 1))
    for node, address, count in (("n1", "10.1.0.77", 4), ("n3", "10.1.4.200", 1)):
        r = run_cli(["audit", "add", "-c", lab.cluster.path, "-m", node, "connections", address, str(count)])
        assert r.returncode == 0, r.stderr
        assert f"counted {count} connections" in r.stdout
        lab.sent.append(("connections", address, count))

    wait_until(lambda: answered_matches(lab), timeout=20, what="manager counts equal the recount")
    status = lab.call(MANAGER, "cidr_server", "status")
    assert all(status["nodes"][n]["windows_new"] > 0 for n in NODES), status["nodes"]
    assert status["series"] == ["connections", "rejects"]

    # a union is the sum of its series; order by count + limit gives the biggest networks
    union = parse_rows(lab.query(f"show count for 10.0.0.0/8 in union(connections,rejects) {SINCE} "
                                 "cidrsize 24 order by count limit 3")["rows"])
    full = {net: (sum(c),) for net, c in recount(lab.sent, ["connections", "rejects"], 24).items()
            if ipaddress.ip_network(net).subnet_of(ipaddress.ip_network("10.0.0.0/8"))}
    top = sorted(full.items(), key=lambda kv: (-kv[1][0], ipaddress.ip_network(kv[0])))[:3]
    assert union == dict(top)
    # the CLI answers with the same rows, and --json with the structured result
    r = run_cli(["cidr", "-c", lab.cluster.path, f"show count for 10.1.0.0/16 in connections {SINCE} cidrsize 24"])
    assert r.returncode == 0, r.stderr
    assert parse_rows(r.stdout.splitlines()) == recount(
        [e for e in lab.sent if e[1].startswith("10.1.")], ["connections"], 24)
    r = run_cli(["cidr", "-c", lab.cluster.path, "--json", "show available"])
    assert r.returncode == 0, r.stderr
    assert [s["name"] for s in json.loads(r.stdout)["series"]] == ["connections", "rejects"]


def test_manager_killed_and_restarted_loses_and_double_counts_nothing(lab):
    # events before, around and during the outage
    for i, node in enumerate(NODES):
        lab.add_batch(node, events_for(i, 2))
    time.sleep(0.3)      # not synchronisation: lets some windows land unacknowledged mid-way
    for p in lab.manager_procs:
        lab.procs.stop(p, signal.SIGKILL)
    for i, node in enumerate(NODES):
        lab.add_batch(node, events_for(i, 3))
    # wait until every node's windows are in its journal while the manager is down
    wait_until(lambda: all(lab.call(n, "as_logger", "status")["pending_windows"] == 0
                           and not lab.call(n, "as_logger", "status")["open_windows"] for n in NODES),
               timeout=10, what="as_logger journalled every window")
    # at-least-once delivery made real: n1's journal gets every window it ever wrote again
    # (read through the idle logagg-m1 subscriber, which is still at the start), and junk
    everything = lab.call("n1", "jlog", "read", log="audit", subscriber="logagg-m1")["records"]
    assert len(everything) >= 2
    lab.call("n1", "jlog", "write", log="audit", records=[payload for _, payload in everything] + [b"junk"])
    lab.start_manager()
    wait_until(lambda: caught_up(lab), timeout=20, what="cidr_server consumed every journal")
    assert answered_matches(lab), "counts after the restart differ from the recount"
    n1 = lab.call(MANAGER, "cidr_server", "status")["nodes"]["n1"]
    assert n1["windows_repeated"] >= len(everything) and n1["bad_records"] == 1, n1
    # nothing more arrives later (a replay counted twice would show now)
    wait_until(lambda: caught_up(lab), timeout=5)
    assert answered_matches(lab)


def test_windows_wait_for_a_journal_that_is_down_even_across_an_as_logger_restart(lab):
    node = "n2"
    lab.procs.stop(lab.node_procs[f"jlog-{node}"])
    before = lab.call(node, "as_logger", "status")
    lab.add_batch(node, events_for(1, 4))
    wait_until(lambda: (s := lab.call(node, "as_logger", "status"))["write_failures"] > before["write_failures"]
               and s["pending_windows"] > 0, timeout=10, what="a window waits for the journal")
    lab.add_batch(node, events_for(1, 5), batch=("restart-sender", 1))      # still open at the stop
    lab.procs.stop(lab.node_procs[f"as_logger-{node}"])
    state = lab.cluster.member(node).data_dir / "as_logger" / "state.msgpack"
    assert state.exists(), "the windows the journal did not take were not saved"
    lab.start_service("as_logger", node)
    wait_until(lambda: lab.call(node, "as_logger", "status", timeout=0.5), timeout=20, what="as_logger back")
    # the batch ledger survived the graceful restart: a resend of the last batch is a replay
    assert lab.add_batch(node, events_for(1, 5), batch=("restart-sender", 1))["duplicate"] is True
    lab.add_batch(node, events_for(1, 6))           # in the window after the flushed one
    lab.start_service("jlog", node)
    wait_until(lambda: answered_matches(lab), timeout=25, what="every saved and new window reached the manager")


def test_a_resent_batch_is_counted_once_and_the_next_seq_counts(lab):
    node, sender = "n3", "smtp-n3-test"
    before = lab.call(node, "as_logger", "status")
    first, second = events_for(2, 7), events_for(2, 8)
    assert lab.add_batch(node, first, batch=(sender, 1))["duplicate"] is False
    assert lab.add_batch(node, first, batch=(sender, 1))["duplicate"] is True      # the resend
    assert lab.add_batch(node, second, batch=(sender, 2))["duplicate"] is False     # the next batch
    assert lab.add_batch(node, first, batch=(sender, 1))["duplicate"] is True       # older: still a replay
    after = lab.call(node, "as_logger", "status")
    assert after["events_counted"] - before["events_counted"] == sum(e[2] for e in first + second)
    assert after["batches_duplicate"] - before["batches_duplicate"] == 2 and after["batch_senders"] >= 1
    with pytest.raises(RemoteError) as err:
        lab.call(node, "as_logger", "add_batch", events=[["connections", "10.9.9.9", 1]], batch=[sender, "3"])
    assert err.value.code == "bad_batch" and "batch seq must be an integer" in err.value.message
    # the manager's counts are the recount of each batch once
    wait_until(lambda: answered_matches(lab), timeout=20, what="the batches reached the manager, each once")


def test_malformed_query_is_one_line_with_token_and_column(lab):
    text = "show count for 10.0.0.0/8 in connections limit zero"
    r = run_cli(["cidr", "-c", lab.cluster.path, text])
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "'zero'" in lines[0] and f"column {text.index('zero') + 1}" in lines[0]
    # the server says the same, with a typed error
    with pytest.raises(RemoteError) as err:
        lab.query("show count for 10.0.0.0/8 in")
    assert err.value.code == "bad_query" and "column 29" in err.value.message


def _read_until(fd: int, needle: bytes, buf: bytearray, timeout: float = 15.0) -> bytes:
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen; output so far: {bytes(buf)!r}")
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:          # EIO: the child closed its terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"{needle!r} not seen before EOF; output: {bytes(buf)!r}")
            buf += chunk
    at = buf.index(needle) + len(needle)
    seen = bytes(buf[:at])
    del buf[:at]
    return seen


def test_cidr_shell_on_a_terminal_answers_and_leaves_on_ctrl_d(lab, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    master, slave = pty.openpty()
    p = subprocess.Popen([*CLI, "cidr", "shell", "-c", str(lab.cluster.path)], stdin=slave, stdout=slave,
                         stderr=slave, env={**os.environ, "HOME": str(home), "TERM": "dumb"},
                         start_new_session=True)
    os.close(slave)
    buf = bytearray()
    try:
        _read_until(master, b"cidr> ", buf)
        expected = recount([e for e in lab.sent if e[1].startswith("10.1.0.")], ["connections"], 24)
        os.write(master, f"show count for 10.1.0.0/24 in connections {SINCE}\r".encode())
        out = _read_until(master, b"cidr> ", buf)
        assert f"10.1.0.0/24 : {expected['10.1.0.0/24'][0]}".encode() in out
        os.write(master, b"show count for 10.1.0.0/24 in nope limit 0\r")
        out = _read_until(master, b"cidr> ", buf)
        assert b"error: bad '0' at column" in out and b"^" in out      # and the prompt came back
        os.write(master, b"\x04")
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    assert "show count for 10.1.0.0/24 in connections" in (home / ".ecluster_cidr_history").read_text()


def test_cidr_shell_reads_queries_from_a_pipe(lab):
    r = subprocess.run([*CLI, "cidr", "shell", "-c", str(lab.cluster.path)], capture_output=True, text=True,
                       input=f"show available\nshow count for 1.2.3 in x\n\nshow count for 203.0.113.0/24 in "
                             f"connections {SINCE}\n", timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("cidr> ") == 5                      # four lines, then EOF
    assert "connections : " in r.stdout and "rejects : " in r.stdout
    assert "error: bad '1.2.3' at column 16" in r.stderr
    assert "(no rows)" in r.stderr


def test_bad_events_are_refused_clearly_and_the_service_keeps_serving(lab):
    before = lab.call("n2", "as_logger", "status")
    bad_calls = [
        ("add", {"series": "connections", "address": "10.0.0.256"}, "not an IPv4 or IPv6 address: '10.0.0.256'"),
        ("add", {"series": "two words", "address": "10.0.0.1"}, "invalid series name 'two words'"),
        ("add", {"series": "connections", "address": "10.0.0.1", "count": 0}, "count must be a positive integer"),
        ("add", {"series": "connections", "address": 167772161}, "address must be text"),
        ("add_batch", {"events": [["connections", "10.9.9.9", 1], ["connections", "bogus", 1]]},
         "event 1: not an IPv4 or IPv6 address: 'bogus'"),
        ("add_batch", {"events": "connections"}, "events must be a list"),
    ]
    for method, args, message in bad_calls:
        with pytest.raises(RemoteError) as err:
            lab.call("n2", "as_logger", method, **args)
        assert err.value.code == "bad_event", err.value
        assert message in err.value.message and "\n" not in err.value.message
    after = lab.call("n2", "as_logger", "status")
    assert after["events_counted"] == before["events_counted"]     # the half-good batch counted nothing
    assert after["events_refused"] == before["events_refused"] + len(bad_calls)
    r = run_cli(["audit", "add", "-c", lab.cluster.path, "-m", "n2", "connections", "300.1.1.1"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "300.1.1.1" in r.stderr
    # still serving: a good event is counted and reaches the manager
    lab.add_batch("n2", [("connections", "198.51.100.7", 3)])
    wait_until(lambda: lab.query(f"show count for 198.51.100.0/24 in connections {SINCE}")["rows"]
               == ["198.51.100.0/24 : 3"], timeout=15, what="the good event reached the manager")


def test_a_huge_window_is_split_into_parts_the_manager_counts_once_each(tmp_path):
    from manager.cidr.store import CidrStore
    from node.audit import Window, decode_window, encode_window
    from services.as_logger import split_window
    counts = {(4, (10 << 24) + i): 1 + i % 3 for i in range(2500)}
    window = Window("connections", 1_700_000_040, 1_700_000_100, counts)
    parts = [decode_window(encode_window(p)) for p in split_window(window, max_addresses=1000)]
    assert [len(p.counts) for p in parts] == [1000, 1000, 500]
    assert len({p.start for p in parts}) == 3 and all(p.start // 3600 == window.start // 3600 for p in parts)
    with CidrStore(tmp_path / "s") as store:
        assert store.add_windows("n1", parts) == 3
        assert store.add_windows("n1", parts) == 0          # a replay of the parts counts nothing
        rows = store.execute("show count for 10.0.0.0/8 in connections since 20230101").rows
    assert [r.counts for r in rows] == [(window.total(),)]
