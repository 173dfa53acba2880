"""``ecluster doctor``: the pure judgements, then the command over a real cluster file, a
real key bundle (``ecluster keys bundle``), real sockets and this host's interfaces.

The passing run on a running cluster, inside a member's network namespace (ports held by the
member itself, clocks against the peers over IPv6, an IPv6 VIP interface), is in
test_vip6_lab.py, whose lab it reuses.
"""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from conftest import run_cli
from ecluster.commands.doctor import (FAIL, OK, SKIP, WARN, guess_member, host_groups, judge_clock,
                                      judge_interface, judge_ipv6, judge_keys, judge_layout, judge_port,
                                      judge_privileges)
from ecluster.clusterfile import Member


def statuses(findings):
    return [f.status for f in findings]


# ------------------------------------------------------------------------------ layouts

def layout(members: dict[str, str], local=frozenset()):
    n = len(members)
    return judge_layout(host_groups(members, set(local)), n // 2 + 1)


def test_one_member_per_host_survives_any_host():
    out = layout({"n1": "a", "n2": "b", "n3": "c", "m1": "d", "m2": "e"})
    assert statuses(out) == [OK] and "any one host may fail" in out[0].detail


def test_a_manager_on_a_nodes_host_counts_twice():
    # 3 nodes + 1 manager: 4 votes, quorum 3; n1's host carries 2 of them
    out = layout({"n1": "a", "n2": "b", "n3": "c", "m1": "a"})
    assert statuses(out) == [WARN]
    assert "losing a (m1, n1) leaves 2 of 4 votes, below the quorum of 3" in out[0].detail
    # 2 nodes + 1 manager beside n1: losing that host leaves one vote of three
    assert statuses(layout({"n1": "a", "n2": "b", "m1": "a"})) == [WARN]


def test_two_shared_hosts_can_still_survive():
    # 3 nodes + 2 managers, each manager beside a different node: losing any host leaves 3 >= 3
    assert statuses(layout({"n1": "a", "n2": "b", "n3": "c", "m1": "a", "m2": "b"})) == [OK]
    # ... but both managers beside one node do not
    out = layout({"n1": "a", "n2": "b", "n3": "c", "m1": "a", "m2": "a"})
    assert statuses(out) == [WARN] and "(m1, m2, n1)" in out[0].detail


def test_members_on_this_hosts_addresses_are_one_host():
    # loopback lab: 127.0.0.1 and 127.0.0.2 are both this host
    groups = host_groups({"n1": "127.0.0.1", "n2": "127.0.0.2", "n3": "10.0.0.3"}, {"127.0.0.1", "127.0.0.2"})
    assert groups == {"this host": ["n1", "n2"], "10.0.0.3": ["n3"]}
    assert statuses(judge_layout(groups, 2)) == [WARN]
    assert guess_member({"n1": "10.0.0.1", "n2": "10.0.0.2"}, {"10.0.0.2", "127.0.0.1"}) == "n2"
    assert guess_member({"n1": "127.0.0.1", "n2": "127.0.0.1"}, {"127.0.0.1"}) is None


# ------------------------------------------------------------------------------ other judgements

NODE = Member(name="n1", role="node", address="10.0.0.1", data_dir=Path("/tmp/x"))
MANAGER = Member(name="m1", role="manager", address="10.0.0.9", data_dir=Path("/tmp/y"))


def test_privileges():
    admin_raw = (1 << 12) | (1 << 13)
    assert judge_privileges(NODE, True, False, 1000, admin_raw).status == OK
    f = judge_privileges(NODE, True, False, 1000, 1 << 12)
    assert f.status == FAIL and "CAP_NET_RAW" in f.detail and "CAP_NET_ADMIN" not in f.detail
    assert judge_privileges(NODE, True, False, 1000, 0).detail.startswith("the vip service needs CAP_NET_ADMIN and CAP_NET_RAW")
    assert judge_privileges(NODE, True, True, 1000, 0).status == WARN          # vip_dry_run: said, not failed
    assert judge_privileges(NODE, False, False, 1000, 0).status == SKIP        # no VIP to plumb
    assert judge_privileges(MANAGER, True, False, 1000, 0).status == SKIP      # managers never plumb


def test_interfaces_and_ipv6():
    assert judge_interface("10.0.0.100/24", "eth0", None).status == FAIL
    down = judge_interface("10.0.0.100/24", "eth0", 0x1000)
    assert down.status == FAIL and "is down" in down.detail
    assert judge_interface("10.0.0.100/24", "eth0", 0x1043).status == OK
    assert judge_ipv6("eth0", None, None).status == FAIL
    assert judge_ipv6("eth0", "1\n", "1\n").status == FAIL
    assert judge_ipv6("eth0", "0\n", "1\n").status == OK


def test_ports():
    assert judge_port("bus_port", "10.0.0.1", 7400, None).status == OK
    assert "in use" in judge_port("bus_port", "10.0.0.1", 7400, errno.EADDRINUSE).detail
    assert "not an address of this host" in judge_port("bus_port", "10.0.0.1", 7400, errno.EADDRNOTAVAIL).detail
    assert "below 1024" in judge_port("bus_port", "10.0.0.1", 25, errno.EACCES).detail


def test_keys_judgement():
    d = Path("/k")
    ok = judge_keys("n1", d, 0o40700, 0o100600, None, {"n1", "n2", "admin"}, {"n1"}, ["n1", "n2", "admin"])
    assert statuses(ok) == [OK]
    assert statuses(judge_keys("n1", d, None, None, None, set(), set(), ["n1"])) == [FAIL]
    loose = judge_keys("n1", d, 0o40700, 0o100644, None, {"n1"}, {"n1"}, ["n1"])
    assert statuses(loose) == [FAIL] and "-rw-r--r--" in loose[0].detail
    planted = judge_keys("n1", d, 0o40777, 0o100600, None, {"n1"}, {"n1"}, ["n1"])
    assert statuses(planted) == [FAIL] and "writable by group or others" in planted[0].detail
    short = judge_keys("n1", d, 0o40700, 0o100600, None, {"n1"}, {"n1"}, ["n1", "n2", "admin"])
    assert statuses(short) == [FAIL] and "admin, n2" in short[0].detail
    shared = judge_keys("n1", d, 0o40700, 0o100600, None, {"n1", "n2"}, {"n1", "n2", "admin"}, ["n1", "n2"])
    assert statuses(shared) == [OK, WARN] and "admin, n2" in shared[1].detail


def test_clock_offsets_count_beyond_half_the_round_trip():
    assert judge_clock({"n2": None}).status == SKIP
    assert judge_clock({"n2": (0.004, 0.002), "n3": None}).status == OK
    assert judge_clock({"n2": (0.3, 0.01)}).status == WARN
    assert judge_clock({"n2": (-2.0, 0.01)}).status == FAIL
    # 1.1 s off but a 0.4 s round trip: at most 0.9 s is certain, a warning, not a failure
    assert judge_clock({"n2": (1.1, 0.4)}).status == WARN
    assert "n3" in judge_clock({"n2": (0.001, 0.001), "n3": (0.5, 0.001)}).detail


# ------------------------------------------------------------------------------ the command

@pytest.fixture
def site(make_cluster, tmp_path):
    """A 2 nodes + 1 manager cluster on loopback (not running) and n1's bundle."""
    cluster = make_cluster(2, 1)
    bundle = tmp_path / "n1-keys"
    r = run_cli(["keys", "bundle", "-c", cluster.path, "--member", "n1", "--out", bundle])
    assert r.returncode == 0, r.stderr
    return cluster, bundle


def doctor(cluster, bundle, *more, config=None):
    return run_cli(["--keys", bundle, "doctor", "-c", config or cluster.path, "--member", "n1", *more])


def lines_of(out: str) -> dict[str, list[str]]:
    by: dict[str, list[str]] = {}
    for line in out.splitlines():
        status, check, *_ = line.split()
        by.setdefault(check, []).append(status)
    return by


def test_doctor_passes_with_the_members_own_bundle(site):
    cluster, bundle = site
    r = doctor(cluster, bundle)
    assert r.returncode == 0, r.stdout + r.stderr
    by = lines_of(r.stdout)
    assert "FAIL" not in r.stdout
    assert by["keys"] == [OK]                   # its own secret only, every public key
    assert by["ports"] == [OK] * 3              # bus, pub, metrics of n1, free
    assert by["clock"] == [SKIP]                # nobody runs: nothing to compare
    assert by["layout"] == [WARN]               # three members on one host is not HA
    assert "this host" in r.stdout
    # the shared directory `keys init` made works too, but says what a stolen host would give away
    r = run_cli(["doctor", "-c", cluster.path, "--member", "n1"])
    assert r.returncode == 0 and lines_of(r.stdout)["keys"] == [OK, WARN]
    assert "also holds the secret keys of admin, m1, n2" in r.stdout


def test_a_world_readable_secret_key_fails(site):
    cluster, bundle = site
    os.chmod(bundle / "n1.key_secret", 0o644)
    r = doctor(cluster, bundle)
    assert r.returncode == 1
    assert "FAIL  keys" in r.stdout
    assert r.stderr.startswith("ecluster: doctor: keys: ") and "readable by group or others" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_a_port_in_use_fails_naming_it(site):
    cluster, bundle = site
    n1 = cluster.member("n1")
    with socket.socket() as squatter:
        squatter.bind((n1.address, n1.pub_port))
        squatter.listen()
        r = doctor(cluster, bundle)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"ecluster: doctor: ports: pub_port {n1.pub_port} on {n1.address} is in use by "
                                f"another process (ss -ltnp 'sport = :{n1.pub_port}')")
    assert lines_of(r.stdout)["ports"] == [OK, FAIL, OK]


def test_a_missing_vip_interface_fails(site, tmp_path):
    cluster, bundle = site
    text = cluster.path.read_text().replace("vip_dry_run = true", "vip_dry_run = false")
    text += '\n[[vip]]\naddress = "10.98.0.100/24"\ninterface = "ecldoc0"\npreference = "n1"\n'
    path = cluster.path.with_name("with-vip.toml")
    path.write_text(text)
    r = doctor(cluster, bundle, config=path)
    assert r.returncode == 1
    assert "FAIL  interface   vip 10.98.0.100/24: interface ecldoc0 does not exist on this host" in r.stdout
    first = "privileges" if os.geteuid() != 0 else "interface"    # a non-root run lacks the capabilities first
    assert r.stderr.startswith(f"ecluster: doctor: {first}: ")


def test_json_and_usage_errors(site):
    import json
    cluster, bundle = site
    r = doctor(cluster, bundle, "--json")
    assert r.returncode == 0
    rows = json.loads(r.stdout)
    assert {"check", "status", "detail"} == set(rows[0]) and rows[0]["check"] == "config"
    r = run_cli(["doctor", "-c", cluster.path, "--member", "n9"])
    assert r.returncode == 2 and r.stderr.startswith("ecluster: 'n9' is not a member") and "Traceback" not in r.stderr
    # every member of this cluster is on 127.0.0.1: which one is meant cannot be guessed
    r = run_cli(["doctor", "-c", cluster.path])
    assert r.returncode == 2 and "give --member NAME" in r.stderr
