"""The lease-promise protocol of services/election.py, driven by hypothesis.

The voters are the real ElectionService objects (their promise/release/vote handlers,
no bus); the nodes are modelled after services/vip.py's holding rule: a node holds a VIP
while a majority of voters' promises are unexpired on its own clock, counting a
*successor* promise only after the previous holder confirmed it no longer holds the
address. Messages are lost, reordered in time, assignments change at random, clocks
advance in random steps: at no step may two nodes hold the VIP.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import services.election as election_mod
from ecluster.clusterfile import parse_cluster

VIP = "10.99.0.100"


class FakeTime:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def time(self):
        return self.now

    def uniform(self, a, b):
        return a


CLUSTER = """
[cluster]
name = "p"
[nodes.n1]
address = "127.0.0.1"
data_dir = "{root}/n1"
bus_port = 1
pub_port = 2
metrics_port = 3
[nodes.n2]
address = "127.0.0.1"
data_dir = "{root}/n2"
bus_port = 4
pub_port = 5
metrics_port = 6
[nodes.n3]
address = "127.0.0.1"
data_dir = "{root}/n3"
bus_port = 7
pub_port = 8
metrics_port = 9
[managers.m1]
address = "127.0.0.1"
data_dir = "{root}/m1"
bus_port = 10
pub_port = 11
metrics_port = 12
console_port = 13
[[vip]]
address = "10.99.0.100/24"
interface = "eth0"
"""


class Node:
    """The holding rule of services/vip.py, without sockets."""

    def __init__(self, name, lease, quorum):
        self.name, self.lease, self.quorum = name, lease, quorum
        self.promises: dict[str, tuple[float, str | None]] = {}
        self.confirmed: set[str] = set()
        self.holding = False
        self.wants = False

    def valid_until(self) -> float:
        exps = sorted((e for e, after in self.promises.values() if after is None or after in self.confirmed),
                      reverse=True)
        return exps[self.quorum - 1] if len(exps) >= self.quorum else 0.0


@pytest.fixture
def world(tmp_path, monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(election_mod, "time", fake)
    cluster = parse_cluster(CLUSTER.format(root=tmp_path), Path(tmp_path / "c.toml"))
    voters = {}
    for name in cluster.voters:
        v = election_mod.ElectionService(cluster, name)
        v.grant_after = 0.0
        voters[name] = v
    nodes = {n: Node(n, cluster.timing.lease, cluster.quorum) for n in cluster.nodes}
    return fake, cluster, voters, nodes


# most messages arrive: all voters half the time, a random subset otherwise
reach = st.one_of(st.just(frozenset({"n1", "n2", "n3", "m1"})), st.sets(st.sampled_from(["n1", "n2", "n3", "m1"])))
step = st.one_of(
    st.tuples(st.just("tick"), st.floats(0.001, 0.5)),
    st.tuples(st.just("assign"), st.sampled_from(["n1", "n2", "n3"]), reach),
    st.tuples(st.just("ask"), st.sampled_from(["n1", "n2", "n3"]), reach),
    st.tuples(st.just("handover"), st.sampled_from(["n1", "n2", "n3"]), st.sampled_from(["n1", "n2", "n3"])),
    st.tuples(st.just("learn"), st.sampled_from(["n1", "n2", "n3"])),
    st.tuples(st.just("release"), st.sampled_from(["n1", "n2", "n3"]), reach),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=5, max_size=80))
def test_never_two_holders(world, steps):
    run_steps(world, steps)


ALL = {"n1", "n2", "n3", "m1"}


@pytest.mark.parametrize("steps", [
    # a graceful move while the old owner has not yet heard of it
    [("assign", "n1", ALL), ("learn", "n1"), ("ask", "n1", ALL), ("assign", "n2", ALL), ("learn", "n2"),
     ("ask", "n2", ALL), ("tick", 0.01), ("ask", "n2", ALL)],
    # the old owner confirms the handover, then the assignment comes back to it
    [("assign", "n1", ALL), ("learn", "n1"), ("ask", "n1", ALL), ("assign", "n2", ALL), ("learn", "n2"),
     ("ask", "n2", ALL), ("learn", "n1"), ("handover", "n2", "n1"), ("assign", "n1", ALL), ("learn", "n1"),
     ("ask", "n1", ALL), ("tick", 0.01), ("ask", "n1", ALL)],
    # as above, with the old owner's release lost everywhere and its renewals arriving late
    [("assign", "n1", ALL), ("learn", "n1"), ("ask", "n1", ALL), ("assign", "n2", ALL), ("learn", "n2"),
     ("ask", "n2", ALL), ("learn", "n1"), ("handover", "n2", "n1"), ("ask", "n2", ALL),
     ("assign", "n1", ALL), ("learn", "n1"), ("ask", "n1", ALL), ("tick", 0.01), ("ask", "n1", ALL)],
    # a lapsed owner: its promises run out, the next one takes over without a handover
    [("assign", "n1", ALL), ("learn", "n1"), ("ask", "n1", ALL), ("assign", "n2", ALL), ("learn", "n2"),
     ("ask", "n2", ALL), ("tick", 0.5), ("ask", "n2", ALL), ("tick", 0.3), ("ask", "n2", ALL), ("ask", "n1", ALL)],
    # ... asked just before the old owner's own clock says its lease is over
    *[[("assign", "n1", ALL), ("learn", "n1"), ("ask", "n1", ALL), ("assign", "n2", ALL), ("learn", "n2"),
       ("tick", dt), ("ask", "n2", ALL)] for dt in (0.6, 0.65, 0.69, 0.699, 0.7)],
])
def test_known_hard_cases(world, steps):
    run_steps(world, steps)


def run_steps(world, steps):
    fake, cluster, voters, nodes = world
    for v in voters.values():
        v.promises.clear()
        v.successors.clear()
        v.assignment = {"term": 1, "leader": "m1", "seq": 0, "owners": {VIP: None}}
    for n in nodes.values():
        n.__init__(n.name, n.lease, n.quorum)
    seq = 0
    latest = None

    def settle():
        # every node acts on its own clock: unplumb at expiry, stop when not assigned
        for n in nodes.values():
            if n.holding and (not n.wants or n.valid_until() <= fake.now):
                n.holding = False               # releases travel separately ("release" steps)
        for n in nodes.values():
            if n.wants and not n.holding and n.valid_until() > fake.now:
                n.holding = True
        holders = [n.name for n in nodes.values() if n.holding]
        assert len(holders) <= 1, f"two holders at t={fake.now}: {holders}"

    for s in steps:
        if s[0] == "tick":
            fake.now += s[1]
        elif s[0] == "assign":
            seq += 1
            owner, reached = s[1], s[2]
            for name in reached:                      # some voters miss the new assignment
                voters[name].assignment = {"term": 1, "leader": "m1", "seq": seq, "owners": {VIP: owner}}
            latest = owner
        elif s[0] == "learn":                         # a node hears the latest assignment, late
            n = nodes[s[1]]
            wanted = n.name == latest
            if wanted != n.wants:
                n.promises.clear()
                n.confirmed.clear()
            n.wants = wanted
        elif s[0] == "ask":
            n = nodes[s[1]]
            if not n.wants:
                continue
            t_req = fake.now
            for name in s[2]:                          # requests to voters not listed are lost
                r = voters[name].rpc_promise(n.name, [VIP])["results"][VIP]
                if r["granted"]:
                    n.promises[name] = (t_req + n.lease, r.get("after"))
                else:
                    n.promises.pop(name, None)
        elif s[0] == "release":                      # a node that does not hold tells (some) voters
            n = nodes[s[1]]
            if not n.holding and not n.wants:
                for name in s[2]:
                    voters[name].rpc_release(n.name, [VIP])
        elif s[0] == "handover":
            asker, holder = nodes[s[1]], nodes[s[2]]
            if asker is not holder and asker.wants and not holder.holding:
                asker.confirmed.add(holder.name)
        settle()


def test_vote_refused_to_a_candidate_behind_on_config(world, tmp_path):
    fake, cluster, voters, nodes = world
    v = voters["n1"]
    v.data_dir.mkdir(parents=True, exist_ok=True)
    (v.data_dir / election_mod.CONFIG_HEIGHT_FILE).write_text("5")
    assert not v.rpc_vote(term=3, candidate="n2", config_height=4)["granted"]
    assert v.rpc_vote(term=4, candidate="n2", config_height=5)["granted"]
    # one vote per term
    assert not v.rpc_vote(term=4, candidate="n3", config_height=9)["granted"]


def test_promise_rejects_garbage(world):
    fake, cluster, voters, nodes = world
    from services.base import ServiceError
    with pytest.raises(ServiceError):
        voters["n1"].rpc_promise("stranger", [VIP])
    with pytest.raises(ServiceError):
        voters["n1"].rpc_promise("n1", "not a list")
