"""The bus over real brokers: three (and a fourth, stopped) broker subprocesses on loopback.

Calls and events cross members, errors come back at once instead of hanging, a key that
is not in the key directory gets nothing, a peer that lies about its name is dropped, and
no garbage frame stops a broker. Plus unit tests of the envelope (the channel).
"""
from __future__ import annotations

import asyncio
import dataclasses
import shutil
import signal
import time

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus import envelope as ch
from bus import keys as keymod
from bus import transport
from bus.broker import event_header, restamp, route
from bus.client import STALE_SLACK_S, AsyncClient, BusError, CallTimeout, RemoteError, SyncClient, is_stale
from conftest import Procs, bus_ping, bus_status, make_cluster_file, short_dir, wait_until

pytestmark = pytest.mark.timeout(60)

MEMBERS = ("n1", "n2", "n3")


def _raw(d) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


@pytest.fixture(scope="module")
def bus3(tmp_path_factory):
    """n1..n3 brokers with a control service each; n4 configured but started only on demand."""
    base = tmp_path_factory.mktemp("bus3")
    root = short_dir()
    procs = Procs(base / "logs")
    try:
        cluster = make_cluster_file(base, n_nodes=4, data_root=root)
        for m in MEMBERS:
            procs.start(["bus", "run", "-c", cluster.path, "-m", m], name=f"broker-{m}")
        for m in MEMBERS:
            procs.start(["service", "run", "control", "-c", cluster.path, "-m", m], name=f"control-{m}")
        for src in MEMBERS:
            for dst in MEMBERS:
                wait_until(lambda: bus_ping(cluster, src, dst), timeout=20, what=f"bus.ping {src}->{dst}")
        yield cluster, procs
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


# -- calls -------------------------------------------------------------------------------------

def test_control_status_over_tcp_on_every_member(bus3):
    cluster, _ = bus3
    for m in MEMBERS:
        with SyncClient(cluster, remote=m) as c:
            rep = wait_until(lambda: c.call(m, "control", "status", timeout=1.0), timeout=10)
        assert rep["member"] == m and rep["cluster"] == cluster.name and rep["role"] == "node"


def test_call_crosses_members_through_both_brokers(bus3):
    """An AsyncClient service on n2 answers calls from n1 and n3; its errors come back typed."""
    cluster, _ = bus3

    async def scenario():
        ctx = zmq.asyncio.Context()
        svc = AsyncClient(cluster, "n2", "svc:echo", ctx=ctx, subscribe=False)

        async def on_request(env: ch.Envelope):
            if env.method == "fail":
                raise RemoteError("bad_input", "echo refuses")
            return {"args": env.body, "method": env.method, "from": env.src, "at": "n2"}

        svc.on_request = on_request
        svc.start()
        callers = {m: AsyncClient(cluster, m, f"t:caller:{m}", ctx=ctx, subscribe=False) for m in ("n1", "n3")}
        for c in callers.values():
            c.start()
        try:
            deadline = time.monotonic() + 10
            while True:       # until the service's DEALER is connected to n2's broker
                try:
                    await callers["n1"].call("n2", "echo", "hello", timeout=1.0, x=0)
                    break
                except RemoteError as e:
                    assert e.code == "no_service"
                    assert time.monotonic() < deadline, "echo service never became reachable"
                    await asyncio.sleep(0.05)
            for m, c in callers.items():
                for i in range(5):
                    rep = await c.call("n2", "echo", "hello", timeout=2.0, x=i, who=m)
                    assert rep == {"args": {"x": i, "who": m}, "method": "hello", "from": m, "at": "n2"}
            with pytest.raises(RemoteError) as err:
                await callers["n1"].call("n2", "echo", "fail", timeout=2.0)
            assert err.value.code == "bad_input" and "refuses" in err.value.message
            # large enough for the brokers to route on the header and pass the body on as bytes
            big = {"blob": b"\x00\xff" * 50_000, "rows": [[i, f"r{i}"] for i in range(2000)]}
            rep = await callers["n3"].call("n2", "echo", "big", timeout=5.0, **big)
            assert rep == {"args": big, "method": "big", "from": "n3", "at": "n2"}
        finally:
            for c in [svc, *callers.values()]:
                c.close()
            ctx.destroy(linger=0)

    run(scenario())


def test_is_stale_judges_only_this_members_own_deadlines():
    env = ch.request("n2", "svc", "m", {}, deadline=100.0)
    env.src = "n2"
    assert not is_stale(env, "n2", 100.0 + STALE_SLACK_S)          # within the slack
    assert is_stale(env, "n2", 100.1 + STALE_SLACK_S)
    env.src = "n1"                                                   # a peer's clock is not ours
    assert not is_stale(env, "n2", 1e9)
    env.deadline = None
    env.src = "n2"
    assert not is_stale(env, "n2", 1e9)


def test_a_peer_with_a_skewed_wall_clock_still_gets_answers(bus3, monkeypatch):
    """A caller whose wall clock is 30 s behind sends deadlines that are already past by the
    callee's clock: the callee on another member must still answer (chaos run: a member
    1.2 s behind lost every lease promise); the same stale deadline from the callee's own
    member is dropped, since there the clocks are one."""
    cluster, _ = bus3
    real_request = ch.request

    def skewed_request(dm, ds, method, args, deadline, kind="req"):
        return real_request(dm, ds, method, args, None if deadline is None else deadline - 30.0, kind)

    async def scenario():
        ctx = zmq.asyncio.Context()
        svc = AsyncClient(cluster, "n2", "svc:skew", ctx=ctx, subscribe=False)
        svc.on_request = lambda env: {"at": "n2", "from": env.src}
        svc.start()
        remote = AsyncClient(cluster, "n1", "t:skew:n1", ctx=ctx, subscribe=False)
        local = AsyncClient(cluster, "n2", "t:skew:n2", ctx=ctx, subscribe=False)
        remote.start()
        local.start()
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    await remote.call("n2", "skew", "x", timeout=1.0)
                    break
                except RemoteError as e:
                    assert e.code == "no_service"
                    assert time.monotonic() < deadline, "service never became reachable"
                    await asyncio.sleep(0.05)
            monkeypatch.setattr(ch, "request", skewed_request)
            for _ in range(3):
                assert await remote.call("n2", "skew", "x", timeout=2.0) == {"at": "n2", "from": "n1"}
            late_before = svc.late
            with pytest.raises(CallTimeout):
                await local.call("n2", "skew", "x", timeout=0.5)
            assert svc.late == late_before + 1
        finally:
            monkeypatch.setattr(ch, "request", real_request)
            for c in (svc, remote, local):
                c.close()
            ctx.destroy(linger=0)

    run(scenario())


def test_unknown_service_is_an_error_at_once(bus3):
    cluster, _ = bus3
    with SyncClient(cluster, via="n1") as c:
        for target in ("n1", "n2"):
            t0 = time.monotonic()
            with pytest.raises(RemoteError) as err:
                c.call(target, "no-such-service", "anything", timeout=3.0)
            assert err.value.code == "no_service"
            assert time.monotonic() - t0 < 1.0, "an unknown service must not wait for the timeout"


def test_unknown_member_is_an_error_at_once(bus3):
    cluster, _ = bus3
    with SyncClient(cluster, via="n1") as c:
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as err:
            c.call("n9", "control", "status", timeout=3.0)
        assert err.value.code == "unknown_member" and "n9" in err.value.message
        assert time.monotonic() - t0 < 1.0


def test_unknown_bus_method_is_an_error(bus3):
    cluster, _ = bus3
    with SyncClient(cluster, via="n2") as c:
        with pytest.raises(RemoteError) as err:
            c.call("n1", "bus", "no_such_method", timeout=2.0)
        assert err.value.code == "unknown_method"


def test_call_to_a_stopped_member_fails_within_the_timeout(bus3):
    cluster, procs = bus3
    p = procs.start(["bus", "run", "-c", cluster.path, "-m", "n4"], name="broker-n4")
    wait_until(lambda: bus_ping(cluster, "n1", "n4"), timeout=20, what="n1 reaches n4")
    assert procs.stop(p) == 0
    timeout = 1.0
    with SyncClient(cluster, via="n1") as c:
        for _ in range(3):
            t0 = time.monotonic()
            with pytest.raises(BusError) as err:
                c.call("n4", "bus", "ping", timeout=timeout)
            assert time.monotonic() - t0 < timeout + 0.5, "a call to a stopped member must not hang"
            if isinstance(err.value, RemoteError):
                assert err.value.code == "unreachable"
            else:
                assert isinstance(err.value, CallTimeout)


def test_a_reply_waits_for_the_return_link_of_a_just_started_broker(procs, tmp_path):
    """n2's broker answers a call from n1 before its own link back to n1 is connected:
    the reply waits (bounded) in n2's retry queue instead of being dropped.

    n1's broker is played by this test: a DEALER with n1's key sends the call to n2, and
    only then does a ROUTER with n1's key start listening on n1's port, so n2's link to n1
    (an IMMEDIATE DEALER, refused until then) connects only after the reply was made."""
    root = short_dir()
    try:
        cluster = make_cluster_file(tmp_path / "c", n_nodes=2, data_root=root, preset="fast")
        procs.start(["bus", "run", "-c", cluster.path, "-m", "n2"], name="broker-n2")
        wait_until(lambda: bus_ping(cluster, "n2"), timeout=20, what="n2's broker answers locally")
        n1_pair = keymod.load(cluster.keys_dir, "n1")
        ctx = zmq.Context()      # no ZAP handler here: our fake n1 lets n2's key in
        try:
            out = transport.make_socket(ctx, zmq.DEALER)
            out.setsockopt(zmq.ROUTING_ID, b"b:n1")
            transport.curve_client(out, n1_pair, keymod.load(cluster.keys_dir, "n2", secret=False).public)
            out.connect(cluster.member("n2").bus_endpoint)
            req = ch.request("n2", "bus", "ping", {}, time.time() + 10)
            req.src, req.sc = "n1", "t:caller"
            out.send(ch.pack(req))
            def reply_made():
                c = bus_status(cluster, "n2")["counters"]
                return c["unreachable"] + c.get("replies_queued", 0) >= 1
            wait_until(reply_made, timeout=5, what="n2 answered while its link to n1 was down")
            back = transport.make_socket(ctx, zmq.ROUTER)
            transport.curve_server(back, n1_pair)
            back.bind(cluster.member("n1").bus_endpoint)
            assert back.poll(3000), "the reply was dropped while n2's link to n1 came up"
            frames = back.recv_multipart()
            rep = ch.unpack(frames[-1])
            assert frames[0] == b"b:n2" and rep.kind == "rep" and rep.id == req.id
            assert (rep.dm, rep.ds, rep.body["member"]) == ("n1", "t:caller", "n2")
            counters = bus_status(cluster, "n2")["counters"]
            assert counters["replies_queued"] >= 1 and counters["replies_dropped"] == 0
        finally:
            ctx.destroy(linger=0)
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


# -- events ------------------------------------------------------------------------------------

def test_events_reach_every_member_in_order_single_and_batched(bus3):
    cluster, _ = bus3

    async def scenario():
        ctx = zmq.asyncio.Context()
        got: dict[str, list] = {m: [] for m in MEMBERS}
        batch_calls: list[int] = []
        subs = []
        for m in MEMBERS:
            c = AsyncClient(cluster, m, f"t:sub:{m}", ctx=ctx)
            c.subscribe("test.ev.")

            async def on_event(topic, body, env, m=m):
                got[m].append((topic, body, env.src))

            async def on_batch(topic, bodies, env, m=m):
                # the last member takes batches whole: one call per publish_many
                batch_calls.append(len(bodies))
                got[m].extend((topic, body, env.src) for body in bodies)

            c.on_event = on_event
            if m == MEMBERS[-1]:
                c.on_batch = on_batch
            c.start()
            subs.append(c)
        pub = AsyncClient(cluster, "n1", "t:pub", ctx=ctx, subscribe=False)
        try:
            # subscriptions propagate asynchronously: publish probes until everyone hears one
            deadline = time.monotonic() + 10
            i = 0
            while not all(any(t == "test.ev.probe" for t, _, _ in got[m]) for m in MEMBERS):
                assert time.monotonic() < deadline, f"probes never arrived: { {m: len(v) for m, v in got.items()} }"
                await pub.publish("test.ev.probe", {"i": i})
                i += 1
                await asyncio.sleep(0.05)
            for n in range(50):
                await pub.publish("test.ev.seq", {"n": n})
            await pub.publish_many("test.ev.batch", [{"b": b} for b in range(100)])
            await pub.publish("test.other", {"never": True})      # not subscribed
            deadline = time.monotonic() + 10
            while not all(sum(t == "test.ev.batch" for t, _, _ in got[m]) == 100 for m in MEMBERS):
                assert time.monotonic() < deadline, "batched events did not all arrive"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)       # a straggler or a duplicate would show up here
            for m in MEMBERS:
                seq = [b["n"] for t, b, _ in got[m] if t == "test.ev.seq"]
                batch = [b["b"] for t, b, _ in got[m] if t == "test.ev.batch"]
                assert seq == list(range(50)), f"{m} got {seq}"
                assert batch == list(range(100)), f"{m} batch out of order or incomplete"
                assert {src for _, _, src in got[m]} == {"n1"}
                assert not any(t == "test.other" for t, _, _ in got[m])
            assert batch_calls == [100], "a batch handler gets the whole batch in one call"
        finally:
            for c in [pub, *subs]:
                c.close()
            ctx.destroy(linger=0)

    run(scenario())


# -- trust ---------------------------------------------------------------------------------------

def _stranger_cluster(cluster, tmp_path):
    """The cluster as seen by someone holding a key pair that is NOT in the key directory."""
    other = tmp_path / "stranger-keys"
    other.mkdir()
    for m in cluster.members:
        shutil.copy(cluster.keys_dir / f"{m}.key", other / f"{m}.key")
    keymod.create(other, "stranger")
    return dataclasses.replace(cluster, keys_dir=other)


def test_foreign_key_cannot_call(bus3, tmp_path):
    cluster, _ = bus3
    stranger = _stranger_cluster(cluster, tmp_path)
    with SyncClient(stranger, remote="n1", key="stranger") as c:
        with pytest.raises(CallTimeout):
            c.call("n1", "bus", "ping", timeout=1.0)
    # the admin key, same path, same moment: answered (so the refusal above is the key's)
    with SyncClient(cluster, remote="n1") as c:
        assert c.call("n1", "bus", "ping", timeout=2.0)["member"] == "n1"


def test_foreign_key_cannot_subscribe_to_the_cluster_pub(bus3, tmp_path):
    cluster, _ = bus3
    stranger = _stranger_cluster(cluster, tmp_path)
    n1 = cluster.member("n1")
    server = keymod.load(cluster.keys_dir, "n1", secret=False).public
    ctx = zmq.Context()
    try:
        def sub(keys_dir, name):
            s = transport.make_socket(ctx, zmq.SUB)
            transport.curve_client(s, keymod.load(keys_dir, name), server)
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.connect(n1.pub_endpoint)
            return s

        good, bad = sub(cluster.keys_dir, keymod.ADMIN), sub(stranger.keys_dir, "stranger")
        counts = {"good": 0, "bad": 0}
        # an idle broker publishes nothing (libzmq pings the links): a local client publishes
        local = transport.make_socket(ctx, zmq.DEALER)
        local.connect(n1.ipc_router)

        def drain():
            local.send_multipart([b"test.pubcheck", ch.pack_event("test.pubcheck", {}, "n1")])
            for key, s in (("good", good), ("bad", bad)):
                while s.poll(0):
                    s.recv_multipart()
                    counts[key] += 1
            return counts["good"] >= 3

        wait_until(drain, timeout=10, what="the admin key receives the cluster PUB")
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            drain()
            time.sleep(0.02)
        assert counts["bad"] == 0, "a key outside the key directory received events"
    finally:
        ctx.destroy(linger=0)


def test_peer_key_with_spoofed_src_is_dropped(bus3):
    cluster, _ = bus3
    before = bus_status(cluster, "n1")["counters"]["spoofed"]
    ctx = zmq.Context()
    try:
        d = transport.make_socket(ctx, zmq.DEALER)
        transport.curve_client(d, keymod.load(cluster.keys_dir, "n2"),
                               keymod.load(cluster.keys_dir, "n1", secret=False).public)
        d.connect(cluster.member("n1").bus_endpoint)
        env = ch.request("n1", "bus", "ping", {}, time.time() + 5)
        env.src, env.sc = "n3", "x"           # n2's key, claiming to be n3
        d.send(ch.pack(env))
        wait_until(lambda: bus_status(cluster, "n1")["counters"]["spoofed"] >= before + 1, timeout=10,
                   what="spoofed counter goes up")
        assert not d.poll(200), "a spoofed request must not be answered"
    finally:
        ctx.destroy(linger=0)


# -- garbage ---------------------------------------------------------------------------------------

def _valid_envelopes():
    names = st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=8)
    # fixed ids and deadlines: hypothesis needs the same bytes for the same draws
    req = st.builds(lambda dm, ds, m, x: ch.pack(ch.Envelope(kind="req", id="7", dm=dm, ds=ds, method=m,
                                                             body={"x": x}, deadline=1e10)),
                    names, names, names, st.integers(-2**63, 2**63 - 1))
    pub = st.builds(lambda t, b: ch.pack(ch.Envelope(kind="pub", id="8", topic=t, body=b)),
                    names, st.lists(st.integers(-2**63, 2**63 - 1), max_size=5))
    return st.one_of(req, pub)


@st.composite
def _truncated(draw):
    data = draw(_valid_envelopes())
    return data[: draw(st.integers(0, len(data) - 1))]


_frame = st.one_of(st.binary(max_size=200), _truncated())
_message = st.one_of(_frame.map(lambda f: [f]), st.lists(_frame, min_size=2, max_size=4))


def _expect_malformed_tcp(frames: list[bytes]) -> bool:
    if len(frames) != 1:
        return True
    try:
        ch.unpack(frames[0])
    except ch.BadMessage:
        return True
    return False


def _expect_malformed_ipc(frames: list[bytes]) -> bool:
    if len(frames) == 2:
        return False          # [topic, envelope]: the local event fast path forwards without decoding
    return _expect_malformed_tcp(frames)


@pytest.mark.parametrize("path", ["tcp", "ipc"])
def test_garbage_frames_leave_the_broker_serving(bus3, path):
    cluster, _ = bus3
    target = "n3"
    m = cluster.member(target)
    before = bus_status(cluster, target)["counters"]["malformed"]
    ctx = zmq.Context()
    sent: list[list[bytes]] = []
    try:
        d = transport.make_socket(ctx, zmq.DEALER)
        if path == "tcp":
            transport.curve_client(d, keymod.load(cluster.keys_dir, keymod.ADMIN),
                                   keymod.load(cluster.keys_dir, target, secret=False).public)
            d.connect(m.bus_endpoint)
        else:
            d.connect(m.ipc_router)

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(_message)
        def send(frames):
            d.send_multipart(frames)
            sent.append(frames)

        send()
        expect = _expect_malformed_tcp if path == "tcp" else _expect_malformed_ipc
        n_bad = sum(expect(f) for f in sent)
        assert n_bad > 50, "the strategy should mostly produce garbage"
        wait_until(lambda: bus_status(cluster, target)["counters"]["malformed"] >= before + n_bad,
                   timeout=10, what=f"{n_bad} malformed frames counted")
        after = bus_status(cluster, target)["counters"]["malformed"]
        assert after - before <= len(sent)
        for src in MEMBERS:          # still routing, both ways
            assert bus_ping(cluster, src, target, timeout=2.0)["member"] == target
            assert bus_ping(cluster, target, src, timeout=2.0)["member"] == src
    finally:
        ctx.destroy(linger=0)


# -- routing (pure) and the envelope ----------------------------------------------------------------

def test_route_decisions():
    peers = {"n2", "n3"}
    assert route(ch.request("n1", "control", "status", {}, None), "n1", peers).target == "svc:control"
    assert route(ch.request("n1", "bus", "ping", {}, None), "n1", peers).to == "self"
    assert route(ch.request("n2", "control", "status", {}, None), "n1", peers).target == "n2"
    r = route(ch.request("n7", "control", "status", {}, None), "n1", peers)
    assert r.to == "error" and r.error["code"] == "unknown_member"
    rep = ch.Envelope(kind="rep", id="1", dm="n1", ds="x:abcd")
    assert (route(rep, "n1", peers).to, route(rep, "n1", peers).target) == ("external", "abcd")
    assert route(ch.Envelope(kind="rep", id="1", dm="n3", ds="c"), "n1", peers).target == "n3"


_bodies = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(body=_bodies, args=st.dictionaries(st.text(max_size=8), _bodies, max_size=4))
def test_envelope_round_trip(body, args):
    ev = ch.event("a.topic", body)
    ev.src, ev.sc = "n1", "svc:x"
    back = ch.unpack(ch.pack(ev))
    assert (back.kind, back.topic, back.src, back.sc, back.id) == ("pub", "a.topic", "n1", "svc:x", ev.id)
    assert back.body == body
    req = ch.request("n2", "svc", "meth", args, 123.5)
    back = ch.unpack(ch.pack(req))
    assert (back.kind, back.dm, back.ds, back.method, back.body, back.deadline) == ("req", "n2", "svc", "meth", args, 123.5)
    rep = ch.reply_to(back, error={"code": "c", "message": "m"})
    assert ch.unpack(ch.pack(rep)).error == {"code": "c", "message": "m"}


@settings(max_examples=100, deadline=None)
@given(body=_bodies, batch=st.booleans())
def test_event_header_matches_a_full_unpack(body, batch):
    ev = ch.event("t.x", [body] if batch else body, batch=batch)
    ev.src, ev.sc = "n2", "svc:y"
    data = ch.pack(ev)
    head = event_header(data)
    full = ch.unpack(data)
    assert (head["v"], head["k"], head["src"], head["t"], head["id"]) == (1, full.kind, full.src, full.topic, full.id)
    assert "b" not in head and head.get("n", False) == full.batch


@pytest.mark.parametrize("data", [b"", b"\xc1", _raw([1, 2]), _raw({"v": 1, "k": "pub"}) + b"\x00",
                                  _raw({"v": 1, "k": "pub", "b": [1, 2, 3]})[:-1]])
def test_event_header_refuses_garbage(data):
    with pytest.raises(ch.BadMessage):
        event_header(data)


def test_envelope_ids_are_unique():
    ids = {ch.new_id() for _ in range(10000)}
    assert len(ids) == 10000


GOOD_REQ = {"v": 1, "k": "req", "id": "1", "src": "n1", "sc": "c", "dm": "n2", "ds": "s", "m": "x", "b": {}}


@pytest.mark.parametrize("data, why", [
    (_raw([1, 2]), "not a map"),
    (_raw({**GOOD_REQ, "v": 2}), "version"),
    (_raw({**GOOD_REQ, "k": "boom"}), "kind"),
    (_raw({k: v for k, v in GOOD_REQ.items() if k != "id"}), "'id'"),
    (_raw({k: v for k, v in GOOD_REQ.items() if k != "dm"}), "'dm'"),
    (_raw({**GOOD_REQ, "b": [1]}), "arguments"),
    (_raw({**GOOD_REQ, "b": {1: 2}}), "undecodable"),          # strict_map_key
    (_raw({**GOOD_REQ, "dl": "soon"}), "deadline"),
    (_raw({**GOOD_REQ, "ds": "s" * 200}), "at most"),
    (_raw({"v": 1, "k": "pub", "id": "1", "t": "x", "n": True, "b": 5}), "batched"),
    (_raw({"v": 1, "k": "rep", "id": "1", "dm": "a", "ds": "b", "e": {"code": 1}}), "error reply"),
    (_raw(GOOD_REQ)[:-3], "undecodable"),
    (b"", "undecodable"),
    (b"\xc1", "undecodable"),
    (_raw(GOOD_REQ) + b"\x00", "undecodable"),                  # trailing bytes
])
def test_envelope_shape_errors(data, why):
    with pytest.raises(ch.BadMessage) as err:
        ch.unpack(data)
    assert why in str(err.value)
    assert "\n" not in str(err.value)


def test_envelope_size_limits():
    with pytest.raises(ch.BadMessage, match="exceeds"):
        ch.unpack_raw(b"\x00" * (ch.MAX_FRAME + 1))
    big_str = _raw({**GOOD_REQ, "b": {"s": "x" * (ch.MAX_STR + 1)}})
    with pytest.raises(ch.BadMessage, match="undecodable"):
        ch.unpack(big_str)
    ok = _raw({**GOOD_REQ, "b": {"s": "x" * 1000}})
    assert ch.unpack(ok).body == {"s": "x" * 1000}
    with pytest.raises(ch.BadMessage, match="cannot encode"):
        ch.pack(ch.event("t", object()))


@pytest.mark.parametrize("bad, why", [
    ({**GOOD_REQ, "b": ["x" * 600]}, "arguments"),
    ({"v": 1, "k": "pub", "id": "1", "t": "x", "n": True, "b": {"x": "y" * 600}}, "batched"),
    ({**GOOD_REQ, "v": 2, "b": {"x": "y" * 600}}, "version"),
    ({**GOOD_REQ, "dm": 5, "b": {"x": "y" * 600}}, "'dm'"),
])
def test_checked_header_refuses_what_unpack_refuses(bad, why):
    data = _raw(bad)
    assert len(data) > 512
    for decode in (ch.unpack, ch.checked_header):
        with pytest.raises(ch.BadMessage, match=why):
            decode(data)


@settings(max_examples=100, deadline=None)
@given(args=st.dictionaries(st.text(max_size=8), _bodies, max_size=4))
def test_checked_header_matches_a_full_unpack(args):
    req = ch.request("n2", "svc", "meth", args, 123.5)
    req.src, req.sc = "n1", "cli:1"
    data = ch.pack(req)
    head, full = ch.checked_header(data), ch.unpack(data)
    assert (head["k"], head["id"], head["src"], head["sc"], head["dm"], head["ds"], head["m"], head["dl"]) == (
        full.kind, full.id, full.src, full.sc, full.dm, full.ds, full.method, full.deadline)
    assert "b" not in head


def test_restamp_sets_only_the_origin():
    req = ch.request("n2", "svc", "meth", {"a": [1, 2]}, 9.5)
    req.src, req.sc = "n3", "liar"
    back = ch.unpack(restamp(ch.pack(req), "n1", "cli:7"))
    assert (back.src, back.sc, back.dm, back.ds, back.method, back.body, back.id) == (
        "n1", "cli:7", "n2", "svc", "meth", {"a": [1, 2]}, req.id)


def _f(a, b=1, *, c, d=2, **kw): pass
def _g(a, /, b): pass
def _h(x, *args): pass
def _k(a, /, **kw): pass
def _m(a=1, /, b=2): pass


@pytest.mark.parametrize("fn", [_f, _g, _h, _k, _m])
def test_param_shape_agrees_with_signature_bind(fn):
    import inspect
    from services.base import ParamShape
    shape = ParamShape.of(fn)
    names = ["a", "b", "c", "d", "x", "args", "kw", "zz"]
    for n in range(0, 2 ** len(names), 3):
        args = {k: 1 for i, k in enumerate(names) if n >> i & 1}
        try:
            inspect.signature(fn).bind(**args)
            binds = True
        except TypeError:
            binds = False
        assert shape.fits(args) == binds, (fn.__name__, args)
