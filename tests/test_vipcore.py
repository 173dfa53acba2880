"""Tests of node/vipcore.py: VIP assignment, validation, owner state machine, lease arithmetic."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.vipcore import (CAP_NET_ADMIN, CAP_NET_RAW, DEFAULT_MAX_DRIFT_PPM, IGNORED, INVALID, TRANSITIONS,
                          Action, Event, Outcome, State, VipError, VipOwnerFSM, VipSpec, assign_vips,
                          effective_capabilities, handover_wait, lease_remaining, lease_valid,
                          missing_vip_capabilities, parse_vip_address, step, subnet_address_problem,
                          validate_vips, vip_key, vip_plumbing_refusal, vip_version)

pytestmark = pytest.mark.timeout(60)

NODES = ["a", "b", "c", "d"]


def vip(n: int, **kw) -> VipSpec:
    return VipSpec(address=f"10.99.0.{n}/24", interface="eth0", **kw)


def run(vips, candidates=NODES, loads=None, drained=(), pinned=None, current=None):
    return assign_vips(vips, list(candidates), dict(loads or {}), set(drained),
                       dict(pinned or {}), dict(current or {}))


# --------------------------------------------------------------------------- addresses

def test_parse_vip_address_and_key():
    assert parse_vip_address("10.99.0.100/24") == ("10.99.0.100", 24)
    assert parse_vip_address(" 10.99.0.100/32 ") == ("10.99.0.100", 32)
    assert parse_vip_address("10.99.0.100", require_prefix=False) == ("10.99.0.100", 32)
    assert vip_key("10.99.0.100/24") == vip_key("10.99.0.100") == "10.99.0.100"


def test_parse_ipv6_vip_address_canonical_key_and_version():
    assert parse_vip_address("fd00::100/64") == ("fd00::100", 64)
    assert parse_vip_address(" FD00:0:0::0100/128 ") == ("fd00::100", 128)
    assert parse_vip_address("fd00::100", require_prefix=False) == ("fd00::100", 128)
    assert vip_key("fd00:0000::100/64") == vip_key("FD00::100") == "fd00::100"
    assert vip_key("2001:db8::1/48") == "2001:db8::1"
    assert (vip_version("10.99.0.100/24"), vip_version("fd00::100")) == (4, 6)
    assert parse_vip_address("127.0.0.100/8") == ("127.0.0.100", 8)   # dry-run clusters on lo


@pytest.mark.parametrize("bad,needle", [
    ("", "expected"), ("10.99.0.100", "prefix is required"), ("fd00::100", "e.g. fd00::100/64"),
    ("10.99.0.300/24", "not an IPv4 or IPv6"), ("10.99.0.1/33", "1 to 32"), ("10.99.0.1/0", "1 to 32"),
    ("10.99.0.1/x", "1 to 32"), ("fd00::1/129", "1 to 128"), ("fd00::1/0", "1 to 128"),
    ("host/24", "not an IPv4 or IPv6"), (None, "expected"), ("fe80::1/64", "link-local"),
    ("fd00::1%eth0/64", "zone"), ("ff02::1/64", "multicast"), ("224.0.0.5/24", "multicast"),
    ("::/64", "unspecified"), ("0.0.0.0/8", "unspecified"), ("::1/128", "loopback"),
    ("::ffff:10.0.0.1/96", "use 10.0.0.1"), ("255.255.255.255/32", "limited broadcast"),
    ("fd00::1/6x", "1 to 128"),
])
def test_parse_vip_address_rejects(bad, needle):
    with pytest.raises(VipError) as info:
        parse_vip_address(bad)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_vip_address_never_fails_otherwise(text):
    """Whatever a cluster file or an RPC carries: a result or a VipError, nothing else."""
    try:
        ip, prefix = parse_vip_address(text, require_prefix=False)
    except VipError:
        return
    assert vip_key(ip) == ip and 1 <= prefix <= 128


def test_subnet_address_problem():
    assert "network address" in subnet_address_problem("10.0.0.0", 24)
    assert "broadcast address" in subnet_address_problem("10.0.0.255", 24)
    assert subnet_address_problem("10.0.0.0", 31) is None
    assert "subnet-router anycast" in subnet_address_problem("fd00::", 64)
    assert subnet_address_problem("fd00::", 127) is None
    assert subnet_address_problem("fd00::100", 64) is None


# --------------------------------------------------------------------------- privileges

STATUS_ROOT = "Name:\tpython3\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n"
STATUS_USER = STATUS_ROOT.replace("CapEff:\t000001ffffffffff", "CapEff:\t0000000000000000")


def test_effective_capabilities_decodes_the_capeff_line():
    assert effective_capabilities(STATUS_ROOT) == 0x1FFFFFFFFFF
    assert effective_capabilities(STATUS_USER) == 0
    assert effective_capabilities("CapEff:\t0000000000003000\n") == (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
    for bad in ("", "CapPrm:\t0\n", "CapEff:\tzz\n"):
        with pytest.raises(VipError):
            effective_capabilities(bad)


def test_missing_capabilities_and_refusal():
    assert missing_vip_capabilities(0x1FFFFFFFFFF) == []
    assert missing_vip_capabilities(0) == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert missing_vip_capabilities(1 << CAP_NET_ADMIN) == ["CAP_NET_RAW"]
    assert missing_vip_capabilities(1 << CAP_NET_RAW) == ["CAP_NET_ADMIN"]
    assert vip_plumbing_refusal(False, 0x1FFFFFFFFFF, "c.toml") is None
    assert vip_plumbing_refusal(True, 0, "c.toml") is None          # dry-run asked for: fine
    msg = vip_plumbing_refusal(False, 1 << CAP_NET_RAW, "/etc/ecluster/cluster.toml")
    assert "needs root or CAP_NET_ADMIN" in msg and "missing: CAP_NET_ADMIN" in msg
    assert "vip_dry_run = true in /etc/ecluster/cluster.toml" in msg and "\n" not in msg


# --------------------------------------------------------------------------- assignment table

CASES = [
    # (id, vips, kwargs, expected {vip number: owner})
    ("preferred node up wins",
     [vip(1, preference="b")], {}, {1: "b"}),
    ("preferred node down: least load, name tie-break",
     [vip(1, preference="b")], {"candidates": ["c", "a"]}, {1: "a"}),
    ("preferred node drained",
     [vip(1, preference="b")], {"drained": {"b"}}, {1: "a"}),
    ("preference beats stability (failback)",
     [vip(1, preference="b")], {"current": {"10.99.0.1": "c"}}, {1: "b"}),
    ("stability beats load",
     [vip(1), vip(2)], {"current": {"10.99.0.1/24": "c", "10.99.0.2": "c"},
                        "loads": {"c": 10}}, {1: "c", 2: "c"}),
    ("current owner drained: moves by load",
     [vip(1)], {"current": {"10.99.0.1": "a"}, "drained": {"a"}}, {1: "b"}),
    ("current owner no longer a candidate",
     [vip(1)], {"current": {"10.99.0.1": "d"}, "candidates": ["a", "b"]}, {1: "a"}),
    ("pin beats preference",
     [vip(1, preference="b")], {"pinned": {"10.99.0.1/24": "c"}}, {1: "c"}),
    ("pin to a drained node is not honoured",
     [vip(1, preference="b")], {"pinned": {"10.99.0.1": "c"}, "drained": {"c"}}, {1: "b"}),
    ("pin to a dead node is not honoured",
     [vip(1)], {"pinned": {"10.99.0.1": "z"}, "current": {"10.99.0.1": "b"}}, {1: "b"}),
    ("load balance spreads, ties by name",
     [vip(1), vip(2), vip(3), vip(4), vip(5)], {"candidates": ["c", "b", "a"]},
     {1: "a", 2: "b", 3: "c", 4: "a", 5: "b"}),
    ("given loads steer placement",
     [vip(1), vip(2)], {"candidates": ["a", "b"], "loads": {"a": 1.5}}, {1: "b", 2: "b"}),
    ("fixed placements count as load before balancing",
     [vip(1), vip(2, preference="a")], {"candidates": ["a", "b"]}, {1: "b", 2: "a"}),
    ("follower goes with its target",
     [vip(1, preference="c"), vip(2, follow="10.99.0.1")], {}, {1: "c", 2: "c"}),
    ("follow chain resolved, target with prefix",
     [vip(3, follow="10.99.0.2/24"), vip(2, follow="10.99.0.1"), vip(1, preference="d")], {},
     {1: "d", 2: "d", 3: "d"}),
    ("follower's own pin is ignored",
     [vip(1, preference="a"), vip(2, follow="10.99.0.1")], {"pinned": {"10.99.0.2": "b"}},
     {1: "a", 2: "a"}),
    ("a group counts with its size",
     [vip(1), vip(2, follow="10.99.0.1"), vip(3)], {"candidates": ["a", "b"]},
     {1: "a", 2: "a", 3: "b"}),
    ("no candidates",
     [vip(1, preference="a"), vip(2, follow="10.99.0.1")], {"candidates": []}, {1: None, 2: None}),
    ("every candidate drained",
     [vip(1)], {"candidates": ["a", "b"], "drained": {"a", "b"}}, {1: None}),
]


@pytest.mark.parametrize("vips,kwargs,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_assign_vips_table(vips, kwargs, expected):
    result = run(vips, **kwargs)
    assert result == {f"10.99.0.{n}": owner for n, owner in expected.items()}


def test_assign_vips_raises_on_cycle_and_unknown_follow():
    with pytest.raises(VipError, match="cycle"):
        run([vip(1, follow="10.99.0.2"), vip(2, follow="10.99.0.1")])
    with pytest.raises(VipError, match="not a configured VIP"):
        run([vip(1, follow="10.99.0.9")])
    with pytest.raises(VipError):
        run([vip(1), VipSpec("10.99.0.1/16", "eth0")])


# --------------------------------------------------------------------------- assignment properties

@st.composite
def scenarios(draw):
    count = draw(st.integers(1, 8))
    specs = []
    for i in range(count):
        follow = None
        if i and draw(st.booleans()):
            follow = f"10.99.0.{draw(st.integers(1, i))}"  # only earlier VIPs: acyclic
        preference = None if follow else draw(st.none() | st.sampled_from(NODES + ["zz"]))
        specs.append(VipSpec(f"10.99.0.{i + 1}/24", "eth0", preference=preference, follow=follow))
    specs = draw(st.permutations(specs))
    keys = [f"10.99.0.{i + 1}" for i in range(count)]
    candidates = draw(st.lists(st.sampled_from(NODES), unique=True))
    drained = draw(st.sets(st.sampled_from(NODES)))
    loads = draw(st.dictionaries(st.sampled_from(NODES), st.floats(0, 5)))
    pinned = draw(st.dictionaries(st.sampled_from(keys), st.sampled_from(NODES + ["zz"])))
    current = draw(st.dictionaries(st.sampled_from(keys), st.sampled_from(NODES + ["zz"])))
    return specs, candidates, loads, drained, pinned, current


def leader(key, specs):
    by_key = {s.key: s for s in specs}
    while by_key[key].follow:
        key = vip_key(by_key[key].follow)
    return key


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_assign_vips_properties(scenario):
    specs, candidates, loads, drained, pinned, current = scenario
    result = assign_vips(specs, candidates, loads, drained, pinned, current)
    eligible = set(candidates) - drained
    assert set(result) == {s.key for s in specs}
    for spec in specs:
        owner = result[spec.key]
        # an owner iff some candidate is eligible, and always an eligible one
        assert (owner is not None) == bool(eligible)
        if owner is not None:
            assert owner in candidates and owner not in drained
        # followers are co-located with what they follow, directly and along the chain
        if spec.follow:
            assert owner == result[vip_key(spec.follow)]
            assert owner == result[leader(spec.key, specs)]
        else:
            pin = pinned.get(spec.key)
            if pin in eligible:
                assert owner == pin
            elif spec.preference in eligible:
                assert owner == spec.preference
            elif current.get(spec.key) in eligible:
                assert owner == current[spec.key]
    # deterministic, and independent of the order in which candidates are listed
    assert assign_vips(specs, candidates, loads, drained, pinned, current) == result
    assert assign_vips(specs, list(reversed(candidates)), loads, set(drained), dict(pinned),
                       dict(current)) == result


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.lists(st.sampled_from(NODES), min_size=1, unique=True))
def test_assign_vips_balances_free_vips(count, candidates):
    result = run([vip(i) for i in range(1, count + 1)], candidates=candidates)
    per_node = [list(result.values()).count(node) for node in candidates]
    assert max(per_node) - min(per_node) <= 1


# --------------------------------------------------------------------------- validation

def test_validate_vips_accepts_good_config():
    specs = [vip(1, preference="a"), vip(2, follow="10.99.0.1/24", kind="outbound"), vip(3)]
    assert validate_vips(specs, NODES) == []


@pytest.mark.parametrize("specs,needle", [
    ([vip(1, preference="zz")], "preference 'zz' is not a configured node"),
    ([vip(1, follow="10.99.0.9")], "not a configured VIP"),
    ([vip(1, follow="10.99.0.1")], "follows itself"),
    ([vip(1, follow="10.99.0.2"), vip(2, follow="10.99.0.3"), vip(3, follow="10.99.0.1/24")],
     "follow cycle"),
    ([vip(1), VipSpec("10.99.0.1/25", "eth1")], "duplicate address"),
    ([VipSpec("10.99.0.1", "eth0")], "prefix is required"),
    ([VipSpec("10.99.0.256/24", "eth0")], "not an IPv4 or IPv6 address"),
    ([VipSpec("fd00::/64", "eth0")], "subnet-router anycast"),
    ([VipSpec("fd00::1/64", "eth0"), VipSpec("FD00::0001/128", "eth1")], "duplicate address"),
    ([VipSpec("10.99.0.0/24", "eth0")], "network address"),
    ([VipSpec("10.99.0.255/24", "eth0")], "broadcast address"),
    ([vip(1, kind="listener")], "kind 'listener'"),
    ([VipSpec("10.99.0.1/24", "")], "interface name is empty"),
    ([VipSpec("10.99.0.1/24", "eth0:1")], "does not allow"),
    ([VipSpec("10.99.0.1/24", "x" * 16)], "longer than 15"),
    ([vip(1), vip(2, follow="10.99.0.1", preference="a")], "both follow and preference"),
    ([vip(1, follow="nonsense")], "follow"),
])
def test_validate_vips_reports(specs, needle):
    errors = validate_vips(specs, NODES)
    assert any(needle in e for e in errors), errors
    assert all("\n" not in e for e in errors)


def test_validate_vips_reports_a_cycle_once():
    specs = [vip(1, follow="10.99.0.2"), vip(2, follow="10.99.0.1"), vip(3, follow="10.99.0.1")]
    errors = validate_vips(specs, NODES)
    assert [e for e in errors if "cycle" in e] == [
        "follow cycle: 10.99.0.1 -> 10.99.0.2 -> 10.99.0.1"]


def has_cycle(edges: dict[int, int]) -> bool:
    for start in edges:
        seen, node = set(), start
        while node in edges:
            if node in seen:
                return True
            seen.add(node)
            node = edges[node]
    return False


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.just(n), st.dictionaries(st.integers(1, n), st.integers(1, n)))))
def test_validate_vips_finds_cycles_exactly(drawn):
    count, edges = drawn
    specs = [vip(i, follow=f"10.99.0.{edges[i]}" if i in edges else None)
             for i in range(1, count + 1)]
    errors = validate_vips(specs, NODES)
    assert any("cycle" in e or "follows itself" in e for e in errors) == has_cycle(edges)
    if not has_cycle(edges):
        assert errors == []
        run(specs)  # assignable
    else:
        with pytest.raises(VipError):
            run(specs)


# --------------------------------------------------------------------------- owner state machine

ALL_PAIRS = list(itertools.product(State, Event))


def test_every_state_event_pair_is_defined_exactly_once():
    applied, ignored, invalid = set(TRANSITIONS), set(IGNORED), set(INVALID)
    assert applied | ignored | invalid == set(ALL_PAIRS)
    assert not applied & ignored and not applied & invalid and not ignored & invalid
    for state, event in ALL_PAIRS:
        result = step(state, event)
        assert isinstance(result.state, State)
        assert all(isinstance(a, Action) for a in result.actions)
        if result.outcome is not Outcome.APPLIED:
            assert result.state is state and result.actions == ()


# (state, event) -> (outcome, next state, actions)
FSM_CASES = [
    (State.RELEASED, Event.LEASE_GRANTED, Outcome.APPLIED, State.ACQUIRING, [Action.PLUMB]),
    (State.ACQUIRING, Event.PLUMB_DONE, Outcome.APPLIED, State.OWNED,
     [Action.GARP_BURST, Action.SCHEDULE_GARP_REPEAT, Action.REPORT_OWNED]),
    (State.OWNED, Event.OTHER_OWNER_SEEN, Outcome.APPLIED, State.OWNED,
     [Action.ALARM_TWO_OWNERS, Action.GARP_BURST]),
    (State.ACQUIRING, Event.OTHER_OWNER_SEEN, Outcome.APPLIED, State.ACQUIRING,
     [Action.ALARM_TWO_OWNERS]),
    (State.OWNED, Event.QUORUM_LOST, Outcome.APPLIED, State.FENCED,
     [Action.CANCEL_GARP_REPEAT, Action.UNPLUMB]),
    (State.ACQUIRING, Event.QUORUM_LOST, Outcome.APPLIED, State.FENCED, [Action.UNPLUMB]),
    (State.OWNED, Event.LEASE_EXPIRED, Outcome.APPLIED, State.RELEASING,
     [Action.CANCEL_GARP_REPEAT, Action.UNPLUMB]),
    (State.OWNED, Event.RELEASE_ORDERED, Outcome.APPLIED, State.RELEASING,
     [Action.CANCEL_GARP_REPEAT, Action.UNPLUMB]),
    (State.OWNED, Event.LEASE_RENEWED, Outcome.APPLIED, State.OWNED, []),
    (State.OWNED, Event.FOUND_MISSING, Outcome.APPLIED, State.ACQUIRING,
     [Action.CANCEL_GARP_REPEAT, Action.PLUMB]),
    (State.RELEASING, Event.UNPLUMB_DONE, Outcome.APPLIED, State.RELEASED, [Action.REPORT_RELEASED]),
    (State.RELEASED, Event.FOUND_PLUMBED_UNEXPECTEDLY, Outcome.APPLIED, State.RELEASING,
     [Action.UNPLUMB]),
    (State.FENCED, Event.FOUND_PLUMBED_UNEXPECTEDLY, Outcome.APPLIED, State.FENCED, [Action.UNPLUMB]),
    (State.RELEASED, Event.PLUMB_DONE, Outcome.APPLIED, State.RELEASING, [Action.UNPLUMB]),
    (State.RELEASED, Event.RELEASE_ORDERED, Outcome.APPLIED, State.RELEASED,
     [Action.REPORT_RELEASED]),
    (State.FENCED, Event.QUORUM_REGAINED, Outcome.APPLIED, State.RELEASING, [Action.UNPLUMB]),
    (State.ACQUIRING, Event.PLUMB_FAILED, Outcome.APPLIED, State.RELEASING,
     [Action.ALARM_PLUMB_FAILED, Action.UNPLUMB]),
    (State.RELEASING, Event.UNPLUMB_FAILED, Outcome.APPLIED, State.RELEASING,
     [Action.ALARM_UNPLUMB_FAILED]),
    (State.RELEASING, Event.FOUND_PLUMBED_UNEXPECTEDLY, Outcome.APPLIED, State.RELEASING,
     [Action.UNPLUMB]),
    (State.RELEASING, Event.FOUND_MISSING, Outcome.APPLIED, State.RELEASED,
     [Action.REPORT_RELEASED]),
    (State.FENCED, Event.UNPLUMB_FAILED, Outcome.APPLIED, State.FENCED,
     [Action.ALARM_UNPLUMB_FAILED]),
    (State.FENCED, Event.LEASE_GRANTED, Outcome.IGNORED, State.FENCED, []),
    (State.RELEASING, Event.LEASE_GRANTED, Outcome.IGNORED, State.RELEASING, []),
    (State.ACQUIRING, Event.LEASE_GRANTED, Outcome.IGNORED, State.ACQUIRING, []),
    (State.OWNED, Event.FOUND_PLUMBED_UNEXPECTEDLY, Outcome.IGNORED, State.OWNED, []),
    (State.RELEASED, Event.FOUND_MISSING, Outcome.IGNORED, State.RELEASED, []),
    (State.OWNED, Event.UNPLUMB_DONE, Outcome.INVALID, State.OWNED, []),
    (State.RELEASING, Event.PLUMB_DONE, Outcome.INVALID, State.RELEASING, []),
]


@pytest.mark.parametrize("state,event,outcome,next_state,actions", FSM_CASES,
                         ids=[f"{c[0].name}+{c[1].name}" for c in FSM_CASES])
def test_fsm_table(state, event, outcome, next_state, actions):
    fsm = VipOwnerFSM("10.99.0.100", state)
    assert fsm.handle(event) == actions
    assert fsm.state is next_state
    assert fsm.last_outcome is outcome
    assert fsm.invalid_events == (1 if outcome is Outcome.INVALID else 0)


def test_fsm_never_holds_without_a_lease_or_with_lost_quorum():
    for (state, event), (nxt, actions) in TRANSITIONS.items():
        if event in (Event.QUORUM_LOST, Event.LEASE_EXPIRED, Event.RELEASE_ORDERED):
            assert nxt not in (State.OWNED, State.ACQUIRING, State.HANDING_OVER), (state, event)
            assert Action.PLUMB not in actions
        if event is Event.REASSIGNED:
            # an owner keeps serving (without renewing) only if it was serving already
            assert nxt is State.HANDING_OVER if state is State.OWNED else nxt is state or Action.UNPLUMB in actions
        if Action.PLUMB in actions:
            assert state in (State.RELEASED, State.OWNED) and nxt is State.ACQUIRING
        if nxt is State.OWNED:
            assert state in (State.ACQUIRING, State.OWNED, State.HANDING_OVER)
        if nxt is State.HANDING_OVER:
            assert state in (State.OWNED, State.HANDING_OVER) and Action.PLUMB not in actions


def test_fsm_hand_over_keeps_serving_until_asked():
    fsm = VipOwnerFSM("10.99.0.100")
    fsm.handle(Event.LEASE_GRANTED)
    fsm.handle(Event.PLUMB_DONE)
    assert fsm.handle(Event.REASSIGNED) == [] and fsm.state is State.HANDING_OVER and fsm.holds
    assert fsm.handle(Event.REASSIGNED) == []                      # duplicate assignment
    assert fsm.handle(Event.RELEASE_ORDERED) == [Action.CANCEL_GARP_REPEAT, Action.UNPLUMB]
    assert not fsm.holds
    assert fsm.handle(Event.UNPLUMB_DONE) == [Action.REPORT_RELEASED]
    # the lease running out first unplumbs the same way; the assignment coming back resumes
    for event, state in ((Event.LEASE_EXPIRED, State.RELEASING), (Event.LEASE_RENEWED, State.OWNED)):
        fsm = VipOwnerFSM("10.99.0.100", State.OWNED)
        fsm.handle(Event.REASSIGNED)
        fsm.handle(event)
        assert fsm.state is state


def test_fsm_acquire_and_graceful_release():
    fsm = VipOwnerFSM("10.99.0.100")
    assert fsm.state is State.RELEASED and not fsm.holds
    assert fsm.handle(Event.LEASE_GRANTED) == [Action.PLUMB]
    assert fsm.handle(Event.PLUMB_DONE)[0] is Action.GARP_BURST
    assert fsm.holds and fsm.state is State.OWNED
    assert fsm.handle(Event.RELEASE_ORDERED) == [Action.CANCEL_GARP_REPEAT, Action.UNPLUMB]
    assert not fsm.holds
    assert fsm.handle(Event.UNPLUMB_DONE) == [Action.REPORT_RELEASED]
    assert fsm.state is State.RELEASED


def test_fsm_rejects_non_events_with_vip_error():
    with pytest.raises(VipError):
        VipOwnerFSM("x").handle("lease_granted")
    with pytest.raises(VipError):
        VipOwnerFSM("x", state="owned")
    with pytest.raises(VipError):
        step("owned", Event.PLUMB_DONE)


def test_fsm_completion_counts_only_for_the_last_operation():
    """Regression: fence, regain, re-grant and expire queue UNPLUMB, PLUMB, UNPLUMB; the first
    UNPLUMB_DONE must not report the VIP released while a PLUMB is still to run."""
    fsm = VipOwnerFSM("10.99.0.100")
    fsm.handle(Event.LEASE_GRANTED)  # PLUMB
    fsm.handle(Event.QUORUM_LOST)  # UNPLUMB
    fsm.handle(Event.QUORUM_REGAINED)  # UNPLUMB again
    assert fsm.pending_io == 3
    assert fsm.handle(Event.PLUMB_DONE) == [] and fsm.last_outcome is Outcome.IGNORED
    assert fsm.handle(Event.UNPLUMB_DONE) == [] and fsm.last_outcome is Outcome.IGNORED
    assert fsm.handle(Event.UNPLUMB_DONE) == [Action.REPORT_RELEASED]
    assert fsm.handle(Event.LEASE_GRANTED) == [Action.PLUMB]
    assert fsm.handle(Event.LEASE_EXPIRED) == [Action.UNPLUMB]
    assert fsm.handle(Event.PLUMB_DONE) == [] and fsm.state is State.RELEASING
    assert fsm.handle(Event.UNPLUMB_DONE) == [Action.REPORT_RELEASED]
    assert fsm.pending_io == 0 and fsm.invalid_events == 0


def test_fsm_ignores_observations_while_io_is_in_flight():
    fsm = VipOwnerFSM("10.99.0.100")
    fsm.handle(Event.LEASE_GRANTED)
    fsm.handle(Event.PLUMB_DONE)
    fsm.handle(Event.RELEASE_ORDERED)  # UNPLUMB in flight
    assert fsm.handle(Event.FOUND_MISSING) == [] and fsm.last_outcome is Outcome.IGNORED
    assert fsm.state is State.RELEASING
    assert fsm.handle(Event.UNPLUMB_FAILED) == [Action.ALARM_UNPLUMB_FAILED]
    assert fsm.handle(Event.FOUND_PLUMBED_UNEXPECTEDLY) == [Action.UNPLUMB]  # retried


PROTOCOL_EVENTS = [Event.LEASE_GRANTED, Event.LEASE_RENEWED, Event.LEASE_EXPIRED,
                   Event.RELEASE_ORDERED, Event.QUORUM_LOST, Event.QUORUM_REGAINED,
                   Event.OTHER_OWNER_SEEN]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(PROTOCOL_EVENTS + ["complete", "complete", "fail", "reconcile"]),
                max_size=50))
def test_fsm_with_serialised_io_never_leaves_an_unowned_address_plumbed(moves):
    """Model the caller's contract (actions in order, one VIP's I/O serialised, one completion
    per operation, reconciliation reporting what it sees) and check: a state that does not claim
    the VIP always has an UNPLUMB as its last queued operation or nothing plumbed (a failed
    UNPLUMB waits for reconciliation); releases and ownership are reported only when true; no
    event is ever invalid; and once I/O drains, the address is plumbed exactly when OWNED."""
    fsm = VipOwnerFSM("10.99.0.100")
    plumbed = False
    queue: list[Action] = []
    unplumb_failed = False

    def feed(event):
        for action in fsm.handle(event):
            if action in (Action.PLUMB, Action.UNPLUMB):
                queue.append(action)
            if action is Action.REPORT_RELEASED:
                assert not plumbed and Action.PLUMB not in queue
            if action is Action.REPORT_OWNED:
                assert plumbed and not queue
        assert fsm.last_outcome is not Outcome.INVALID, (fsm.state, event)
        assert fsm.pending_io == len(queue)

    def complete(ok):
        nonlocal plumbed, unplumb_failed
        op = queue.pop(0)
        if ok:
            plumbed = op is Action.PLUMB
        unplumb_failed = not ok and op is Action.UNPLUMB
        done = Event.PLUMB_DONE if op is Action.PLUMB else Event.UNPLUMB_DONE
        failed = Event.PLUMB_FAILED if op is Action.PLUMB else Event.UNPLUMB_FAILED
        feed(done if ok else failed)

    def reconcile():
        feed(Event.FOUND_PLUMBED_UNEXPECTEDLY if plumbed else Event.FOUND_MISSING)

    for move in moves:
        if move in ("complete", "fail"):
            if queue:
                complete(move == "complete")
        elif move == "reconcile":
            reconcile()
        else:
            feed(move)
        if not fsm.holds:
            assert ((queue and queue[-1] is Action.UNPLUMB)
                    or (not queue and (not plumbed or unplumb_failed)))
    for _ in range(20):  # let I/O succeed and reconciliation run until nothing changes
        while queue:
            complete(True)
        reconcile()
    assert not queue
    assert plumbed == (fsm.state is State.OWNED)
    assert fsm.state in (State.RELEASED, State.OWNED, State.FENCED)


# --------------------------------------------------------------------------- leases

def test_lease_valid_is_measured_from_before_the_request():
    assert lease_valid(100.0, 2.0, 101.999)
    assert not lease_valid(100.0, 2.0, 102.0)
    assert lease_valid(100.0, 2.0, 100.0)
    assert lease_remaining(100.0, 2.0, 101.5) == pytest.approx(0.5)
    assert lease_remaining(100.0, 2.0, 150.0) == 0.0
    # a drift allowance on the holder's side only ever shortens the lease
    assert lease_remaining(0.0, 10.0, 0.0, drift_ppm=1000) == pytest.approx(9.99)
    assert not lease_valid(0.0, 10.0, 9.995, drift_ppm=1000)


def test_handover_wait_formula():
    assert handover_wait(2.0, 500, 0.1) == pytest.approx(2.0 * 1.0005 + 0.1)
    assert handover_wait(1.0) == pytest.approx(1.0 + DEFAULT_MAX_DRIFT_PPM / 1e6)
    assert handover_wait(0.0, 0, 0) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.floats(0.01, 100), st.floats(0, 2000), st.floats(0.001, 1), st.floats(0, 1e6))
def test_handover_outlasts_any_holder_lease(duration, ppm, margin, start):
    """When the hander-on's clock advances up to (1 + ppm) times as much as the holder's, the
    holder's lease has run out by the time the hand-over wait is over."""
    wait = handover_wait(duration, ppm, margin)
    holder_elapsed = wait / (1 + ppm / 1e6)  # the slowest holder clock over the same span
    assert not lease_valid(start, duration, start + holder_elapsed)
    # and without a margin it ends exactly then (up to rounding)
    exact = handover_wait(duration, ppm, 0.0) / (1 + ppm / 1e6)
    assert lease_remaining(start, duration, start + exact) <= 1e-9 * max(1.0, start)


@pytest.mark.parametrize("call", [
    lambda: lease_valid(10.0, 1.0, 9.0),
    lambda: lease_valid(0.0, -1.0, 0.0),
    lambda: lease_valid(0.0, float("nan"), 0.0),
    lambda: lease_valid(0.0, 1.0, 0.5, drift_ppm=1e6),
    lambda: handover_wait(-1.0),
    lambda: handover_wait(1.0, margin=float("inf")),
    lambda: handover_wait("2"),
])
def test_lease_helpers_reject_bad_input(call):
    with pytest.raises(VipError):
        call()


# --------------------------------------------------------------------------- LeaseBook (one node's promises)

from node.vipcore import LeaseBook  # noqa: E402


def test_book_counts_current_promises_from_before_the_request():
    b = LeaseBook(quorum=2, lease=0.7)
    assert b.take_reply("v1", 10.0, True, None, 10.01) is None
    assert b.quorum_until() == 0.0                        # one promise is no majority
    b.take_reply("v2", 10.1, True, None, 10.12)
    assert b.quorum_until() == pytest.approx(10.7)        # the older of the two, from t_req
    b.take_reply("v1", 10.2, False, None, 10.21)          # a refusal drops the voter's promise
    assert b.quorum_until() == 0.0


def test_book_successor_counts_only_with_a_confirmation_asked_after_it_arrived():
    b = LeaseBook(quorum=2, lease=0.7)
    assert b.take_reply("v1", 10.0, True, "h", 10.01) == "h"
    assert b.take_reply("v2", 10.0, True, "h", 10.02) == "h"
    assert b.quorum_until() == 0.0 and b.awaiting("h")
    assert b.confirm("h", asked_at=10.015) == 1            # covers v1 only: v2 came after the request
    assert b.awaiting("h") and b.quorum_until() == 0.0
    assert b.confirm("other", asked_at=11.0) == 0
    assert b.confirm("h", asked_at=10.03) == 1
    assert b.quorum_until() == pytest.approx(10.7) and not b.awaiting("h")
    assert b.confirmed_successor(10.5) and not b.confirmed_successor(10.8)


def test_book_successor_renewal_needs_a_new_confirmation_and_the_old_entry_keeps_counting():
    b = LeaseBook(quorum=2, lease=0.7)
    for v in ("v1", "v2"):
        b.take_reply(v, 10.0, True, "h", 10.01)
    b.confirm("h", asked_at=10.02)
    b.take_reply("v1", 10.3, True, "h", 10.31)            # renewal: pending again
    assert b.awaiting("h") and b.quorum_until() == pytest.approx(10.7)
    b.confirm("h", asked_at=10.32)
    assert b.quorum_until() == pytest.approx(10.7)        # v2 still the older one
    b.take_reply("v2", 10.3, True, None, 10.31)           # a current promise replaces it
    assert b.quorum_until() == pytest.approx(11.0)
    assert b.counted["v2"] == (pytest.approx(11.0), None) and b.confirmed_successor(10.9)   # v1's


def test_book_fence_forgets_and_voids_earlier_requests():
    b = LeaseBook(quorum=2, lease=0.7, guard=0.02)
    for v in ("v1", "v2"):
        b.take_reply(v, 10.0, True, None, 10.01)
    assert b.quorum_until() == pytest.approx(10.68)
    b.fence(10.05)
    assert b.quorum_until() == 0.0
    assert b.take_reply("v3", 10.05, True, None, 10.06) is None   # asked at the fence: void
    assert b.take_reply("v3", 10.04, True, "h", 10.06) is None
    assert not b.counted and not b.pending
    b.take_reply("v1", 10.06, True, None, 10.07)
    b.take_reply("v2", 10.06, True, None, 10.07)
    assert b.quorum_until() == pytest.approx(10.74)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["v1", "v2", "v3"]), st.floats(0, 5), st.booleans(),
                          st.sampled_from([None, "h", "k"]), st.floats(0, 0.5)), max_size=20),
       st.floats(0, 6))
def test_book_never_counts_an_unconfirmed_successor_or_a_voided_reply(replies, fence_at):
    b = LeaseBook(quorum=2, lease=0.7)
    for voter, t_req, granted, after, delay in sorted(replies, key=lambda r: r[1] + r[4]):
        if t_req + delay >= fence_at > -1:
            b.fence(fence_at)
            fence_at = -2.0
        b.take_reply(voter, t_req, granted, after, t_req + delay)
    assert all(after is None for _, after in b.counted.values())    # nothing confirmed
    assert all(e - 0.7 > b.fenced_at - 1e-9 for e, _ in b.counted.values())   # asked after the fence (float sums)


# --------------------------------------------------------------------------- owners that cannot hold

from node.vipcore import HoldRecord  # noqa: E402

VIP_A = "10.99.0.100"


def hold_record() -> HoldRecord:
    return HoldRecord(struggle_after=2.0, window=60.0, lapses=2, penalty=10.0, penalty_max=120.0)


def test_hold_record_never_holding_in_time_is_a_penalty_at_once():
    r = hold_record()
    assert r.observe(VIP_A, "n1", False, 100.0) is None          # just assigned
    assert r.observe(VIP_A, "n1", False, 101.9) is None          # still within struggle_after
    assert r.observe(VIP_A, "n1", False, 102.1) == 10.0
    assert r.avoid(105.0) == {VIP_A: {"n1"}}
    assert r.avoid(112.2) == {}


def test_hold_record_losing_it_twice_within_the_window():
    r = hold_record()
    r.observe(VIP_A, "n1", False, 0.0)
    r.observe(VIP_A, "n1", True, 0.5)
    assert r.observe(VIP_A, "n1", False, 30.0) is None           # one lapse: a blip
    assert r.observe(VIP_A, "n1", True, 30.2) is None
    assert r.observe(VIP_A, "n1", False, 95.0) is None           # the first is out of the window
    r.observe(VIP_A, "n1", True, 95.1)
    assert r.observe(VIP_A, "n1", False, 96.0) == 10.0           # second within 60 s
    assert r.avoid(96.0) == {VIP_A: {"n1"}}


def test_hold_record_moves_and_unknown_reports_count_nothing():
    r = hold_record()
    r.observe(VIP_A, "n1", True, 0.0)
    assert r.observe(VIP_A, "n2", False, 1.0) is None            # a move starts afresh
    assert r.observe(VIP_A, "n2", None, 50.0) is None            # no fresh report: nothing learnt,
    assert r.observe(VIP_A, "n2", False, 51.0) is None           # and the wait does not count
    assert r.observe(VIP_A, "n2", True, 51.1) is None
    assert r.observe(VIP_A, None, None, 60.0) is None
    assert r.avoid(60.0) == {}


def test_hold_record_penalty_doubles_when_it_happens_again_soon():
    r = hold_record()
    r.observe(VIP_A, "n1", False, 0.0)
    assert r.observe(VIP_A, "n1", False, 2.0) == 10.0
    r.observe(VIP_A, "n2", True, 2.1)
    r.observe(VIP_A, "n1", False, 12.1)                           # back to n1 after the penalty
    assert r.observe(VIP_A, "n1", False, 14.2) == 20.0
    r.observe(VIP_A, "n2", True, 14.3)
    r.observe(VIP_A, "n1", False, 500.0)                          # long after: from the base again
    assert r.observe(VIP_A, "n1", False, 502.1) == 10.0


def test_assign_vips_passes_over_avoided_nodes_unless_nobody_else_or_pinned():
    vips = [VipSpec(address=f"{VIP_A}/24", interface="eth0", preference="n1")]
    assert assign_vips(vips, ["n1", "n2"], {}, set(), {}, {}, {VIP_A: {"n1"}}) == {VIP_A: "n2"}
    assert assign_vips(vips, ["n1", "n2"], {}, set(), {}, {VIP_A: "n1"}, {VIP_A: {"n1"}}) == {VIP_A: "n2"}
    assert assign_vips(vips, ["n1"], {}, set(), {}, {}, {VIP_A: {"n1"}}) == {VIP_A: "n1"}
    assert assign_vips(vips, ["n1", "n2"], {}, set(), {VIP_A: "n1"}, {}, {VIP_A: {"n1"}}) == {VIP_A: "n1"}
    follower = VipSpec(address="10.99.0.101/24", interface="eth0", follow=VIP_A)
    assert assign_vips([*vips, follower], ["n1", "n2", "n3"], {}, set(), {}, {},
                       {VIP_A: {"n1", "n2"}}) == {VIP_A: "n3", "10.99.0.101": "n3"}


def test_mixed_families_validate_and_assign():
    specs = [VipSpec("10.99.0.1/24", "eth0", preference="a"), VipSpec("fd00::1/64", "eth0", follow="10.99.0.1"),
             VipSpec("fd00::2/64", "eth0", preference="b")]
    assert validate_vips(specs, NODES) == []
    owners = run(specs)
    assert owners["fd00::1"] == owners["10.99.0.1"] == "a" and owners["fd00::2"] == "b"


def test_the_vip_service_without_cap_net_admin_refuses_to_start(tmp_path):
    """One line on stderr and a non-zero exit, before it touches the bus (root drops the
    capability with setpriv; anyone else lacks it anyway)."""
    import os
    import shutil
    import subprocess
    import sys
    (tmp_path / "cluster.toml").write_text(
        '[cluster]\nname = "nr"\nkeys = "keys"\n[nodes.n1]\naddress = "127.0.0.1"\n'
        f'data_dir = "{tmp_path / "n1"}"\n[[vip]]\naddress = "fd00::100/64"\ninterface = "lo"\n')
    argv = [sys.executable, "-m", "ecluster.cli", "service", "run", "vip", "--config",
            str(tmp_path / "cluster.toml"), "--member", "n1"]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to drop CAP_NET_ADMIN as root")
        argv = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", *argv]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs root or CAP_NET_ADMIN" in lines[0], p.stderr
    assert "vip_dry_run = true" in lines[0] and "Traceback" not in p.stderr
