"""Security of the bus, on real brokers (three members on loopback).

* A process without a member key can neither publish, call nor subscribe: raw ZeroMQ
  sockets with a foreign CURVE key, or with no CURVE at all, get nothing in and nothing out.
* Files: key secrets 0600, public keys 0644, the key directory, data, run and log
  directories 0700; supervisord runs services with umask 077.
* The envelope decoder and the broker's header decoder, fuzzed: nothing but BadMessage.
* A frame above the size limit is refused by the socket and the broker keeps serving.
* ``ecluster keys rotate`` on a running cluster: a call every 50 ms never fails, the
  keys change, and the old admin key can no longer call (new or already open connection).
"""
from __future__ import annotations

import asyncio
import shutil
import stat
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus import envelope as ch
from bus import keys as keymod
from bus import transport
from bus.broker import event_header
from bus.client import AsyncClient, BusError, SyncClient
from conftest import Procs, bus_ping, bus_status, make_cluster_file, run_cli, short_dir, wait_until

pytestmark = pytest.mark.timeout(90)

MEMBERS = ("n1", "n2", "n3")


def start_brokers(base: Path, root: Path) -> tuple:
    procs = Procs(base / "logs")
    cluster = make_cluster_file(base, n_nodes=3, data_root=root)
    for m in MEMBERS:
        procs.start(["bus", "run", "-c", cluster.path, "-m", m], name=f"broker-{m}")
    for a in MEMBERS:
        for b in MEMBERS:
            wait_until(lambda: bus_ping(cluster, a, b), timeout=20, what=f"bus.ping {a}->{b}")
    return cluster, procs


@pytest.fixture(scope="module")
def bus3(tmp_path_factory):
    base = tmp_path_factory.mktemp("sec3")
    root = short_dir()
    procs = None
    try:
        cluster, procs = start_brokers(base, root)
        yield cluster
    finally:
        if procs is not None:
            procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def stranger_pair(tmp_path: Path) -> keymod.KeyPair:
    """A key pair that is not in the cluster's key directory."""
    return keymod.create(tmp_path / "stranger-keys", "stranger")


def server_key(cluster, member: str) -> bytes:
    return keymod.load(cluster.keys_dir, member, secret=False).public


def raw_socket(ctx, kind: int, cluster, member: str, pair: keymod.KeyPair | None, port: str) -> zmq.Socket:
    """A socket to ``member``'s tcp ``port`` ("bus" or "pub"): CURVE with ``pair``, or none."""
    s = transport.make_socket(ctx, kind)
    if pair is not None:
        transport.curve_client(s, pair, server_key(cluster, member))
    m = cluster.member(member)
    s.connect(m.bus_endpoint if port == "bus" else m.pub_endpoint)
    return s


class LocalEvents:
    """Every event with ``prefix`` reaching ``member``'s local PUB (what its services see)."""

    def __init__(self, ctx, cluster, member: str, prefix: str):
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self.sock.connect(cluster.member(member).ipc_pub)
        self.got: list[str] = []

    def drain(self) -> list[str]:
        while self.sock.poll(0):
            frames = self.sock.recv_multipart()
            self.got.append(frames[0].decode())
        return self.got


def forged_event(topic: str, src: str) -> bytes:
    env = ch.event(topic, {"forged": True})
    env.src, env.sc = src, "x"
    return ch.pack(env)


# -- a process without a member key ---------------------------------------------------------

def test_no_member_key_cannot_publish(bus3, ctx, tmp_path):
    """Forged events sent to n1's tcp ports by a foreign key or without CURVE reach nobody;
    an event of a real local client of n1 does reach n2 (the path works)."""
    cluster = bus3
    seen = LocalEvents(ctx, cluster, "n2", "sec.")
    stranger = stranger_pair(tmp_path)
    senders = []
    for pair in (stranger, None):
        d = raw_socket(ctx, zmq.DEALER, cluster, "n1", pair, "bus")
        senders.append(("dealer", d))
        for port in ("bus", "pub"):
            senders.append(("pub", raw_socket(ctx, zmq.PUB, cluster, "n1", pair, port)))
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        for kind, s in senders:
            for src in ("n1", "admin", "stranger"):
                data = forged_event("sec.forged", src)
                try:
                    s.send_multipart([data] if kind == "dealer" else [b"sec.forged", data], zmq.NOBLOCK)
                except zmq.Again:       # a DEALER with no completed connection: nothing to send to
                    pass
        time.sleep(0.05)
    assert seen.drain() == [], "a forged event got through"

    async def real_publish():
        c = AsyncClient(cluster, "n1", "t:sec-pub", subscribe=False, ctx=ctx)
        c.start()
        try:
            for _ in range(40):
                await c.publish("sec.real", {"ok": True})
                await asyncio.sleep(0.05)
                if "sec.real" in seen.drain():
                    return True
            return False
        finally:
            c.close()

    assert asyncio.run(real_publish()), "a real local client's event never reached n2"
    assert "sec.forged" not in seen.drain()


@pytest.mark.parametrize("curve", [True, False], ids=["foreign-key", "no-curve"])
def test_no_member_key_cannot_call(bus3, ctx, tmp_path, curve):
    cluster = bus3
    d = raw_socket(ctx, zmq.DEALER, cluster, "n1", stranger_pair(tmp_path) if curve else None, "bus")
    d.setsockopt(zmq.SNDTIMEO, 1000)    # a DEALER waits for a completed connection: none comes
    for target in MEMBERS:
        env = ch.request(target, "bus", "ping", {}, time.time() + 5)
        try:
            d.send(ch.pack(env))
        except zmq.Again:
            pass
    assert not d.poll(1000), "a call without a member key was answered"
    # the same path with the admin key: answered (the refusal above is the key's)
    with SyncClient(cluster, remote="n1") as c:
        assert c.call("n2", "bus", "ping", timeout=2.0)["member"] == "n2"


@pytest.mark.parametrize("curve", [True, False], ids=["foreign-key", "no-curve"])
def test_no_member_key_cannot_subscribe(bus3, ctx, tmp_path, curve):
    """A SUB on n1's cluster PUB gets nothing without a key, while the admin key's SUB gets
    the events published meanwhile (by a local client of n1: an idle broker sends nothing)."""
    cluster = bus3
    bad = raw_socket(ctx, zmq.SUB, cluster, "n1", stranger_pair(tmp_path) if curve else None, "pub")
    good = raw_socket(ctx, zmq.SUB, cluster, "n1", keymod.load(cluster.keys_dir, keymod.ADMIN), "pub")
    for s in (bad, good):
        s.setsockopt(zmq.SUBSCRIBE, b"")
    counts = {"good": 0, "bad": 0}
    local = ctx.socket(zmq.DEALER)
    local.setsockopt(zmq.LINGER, 0)
    local.connect(cluster.member("n1").ipc_router)

    def drain():
        local.send_multipart([b"test.pubcheck", ch.pack_event("test.pubcheck", {}, "n1")])
        for name, s in (("good", good), ("bad", bad)):
            while s.poll(0):
                s.recv_multipart()
                counts[name] += 1
        return counts["good"] >= 4

    wait_until(drain, timeout=10, what="the admin key's SUB receives the cluster PUB")
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        drain()
        time.sleep(0.02)
    assert counts["bad"] == 0, "a SUB without a member key received events"


# -- files ------------------------------------------------------------------------------------

def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_key_and_data_directories_are_private(bus3):
    cluster = bus3
    d = cluster.keys_dir
    assert mode(d) == 0o700
    secrets = sorted(d.glob("*.key_secret"))
    publics = sorted(d.glob("*.key"))
    assert len(secrets) == len(MEMBERS) + 1 and len(publics) == len(MEMBERS) + 1
    for p in secrets:
        assert mode(p) == 0o600, f"{p.name} is {oct(mode(p))}"
    for p in publics:
        assert mode(p) & 0o022 == 0, f"{p.name} is writable by others"
    for name in MEMBERS:
        m = cluster.member(name)
        for sub in (m.data_dir, m.run_dir, m.data_dir / "log"):
            assert mode(sub) == 0o700, f"{sub} is {oct(mode(sub))}"
        for sock in m.run_dir.glob("*.ipc"):
            assert sock.is_socket()


def test_staged_keys_are_private_and_services_get_umask_077(tmp_path):
    """Rotation files are made like the first ones; supervisord runs every service with
    umask 077, so what services write is 0600."""
    d = tmp_path / "keys"
    keymod.create(d, "n1")
    staged = keymod.stage(d, "n1")
    assert mode(d / "n1.next.key_secret") == 0o600 and mode(d / "n1.next.key") == 0o644
    assert keymod.promote(d, "n1").public == staged.public
    assert mode(d / "n1.key_secret") == 0o600 and mode(d / "n1.old.key") == 0o644
    assert sorted(p.name for p in d.iterdir()) == ["n1.key", "n1.key_secret", "n1.old.key"]
    assert set(keymod.public_keys(d).values()) == {"n1"} and len(keymod.public_keys(d)) == 2
    assert keymod.retire(d, "n1") and len(keymod.public_keys(d)) == 1

    from node.supervisor import supervisor_conf
    cluster = make_cluster_file(tmp_path / "c", n_nodes=1)
    conf = supervisor_conf(cluster, "n1")
    assert "umask=077" in conf and "chmod=0700" in conf


# -- decoders and size limits -------------------------------------------------------------------

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4),
    max_leaves=12)
# maps shaped like envelopes, with wrong values in the right places
_envelope_like = st.dictionaries(
    st.sampled_from(["v", "k", "id", "src", "sc", "dm", "ds", "m", "t", "b", "n", "e", "dl", "zz"]),
    st.one_of(st.just(1), st.sampled_from(list(ch.KINDS)), _values), max_size=10)


def decode_all(data: bytes) -> None:
    """Both decoders; anything but BadMessage propagates (and fails the test)."""
    for decode in (ch.unpack, event_header):
        try:
            decode(data)
        except ch.BadMessage as e:
            assert "\n" not in str(e)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.binary(max_size=300))
def test_decoders_fuzz_random_bytes(data):
    decode_all(data)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.one_of(_values, _envelope_like))
def test_decoders_fuzz_random_msgpack(obj):
    try:
        data = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    decode_all(data)
    decode_all(data[: len(data) // 2])


@pytest.mark.parametrize("path", ["ipc", "tcp"])
def test_frame_above_the_size_limit_is_refused_and_the_broker_keeps_serving(bus3, ctx, path):
    cluster = bus3
    target = "n3"
    before = bus_status(cluster, target)["counters"]["routed"]
    big = ch.request(target, "bus", "ping", {"pad": b"x" * (ch.MAX_FRAME + 16)}, time.time() + 10)
    data = msgpack.packb(big.to_wire(), use_bin_type=True)
    assert len(data) > ch.MAX_FRAME
    if path == "ipc":
        d = transport.make_socket(ctx, zmq.DEALER)
        d.connect(cluster.member(target).ipc_router)
    else:
        d = raw_socket(ctx, zmq.DEALER, cluster, target, keymod.load(cluster.keys_dir, keymod.ADMIN), "bus")
    d.setsockopt(zmq.MAXMSGSIZE, -1)        # our side would refuse it too: let it out
    d.send(data)
    del data, big
    assert not d.poll(1500), "an oversized request was answered"
    for src in MEMBERS:
        assert bus_ping(cluster, src, target, timeout=2.0)["member"] == target
    routed = bus_status(cluster, target)["counters"]["routed"]
    # only our pings (and their status calls) were routed, never the big one
    assert routed - before <= 2 * len(MEMBERS) + 2


# -- key rotation -----------------------------------------------------------------------------

class CallPoller(threading.Thread):
    """A cross-member call every 50 ms, from local clients of each member in turn."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        pairs = [(a, b) for a in MEMBERS for b in MEMBERS if a != b]
        clients = {a: SyncClient(self.cluster, via=a) for a in MEMBERS}
        try:
            i = 0
            while not self.stop.is_set():
                a, b = pairs[i % len(pairs)]
                i += 1
                try:
                    assert clients[a].call(b, "bus", "ping", timeout=2.0)["member"] == b
                    self.ok += 1
                except BusError as e:
                    self.failures.append(f"{a}->{b}: {e}")
                self.stop.wait(0.05)
        finally:
            for c in clients.values():
                c.close()


def test_keys_rotate_without_downtime_and_the_old_admin_key_is_refused(tmp_path, ctx):
    base, root = tmp_path / "rot", short_dir()
    procs = None
    poller = None
    try:
        cluster, procs = start_brokers(base, root)
        before = {n: keymod.load(cluster.keys_dir, n, secret=False).public for n in [*MEMBERS, keymod.ADMIN]}
        old_admin = tmp_path / "old-admin"
        old_admin.mkdir()
        shutil.copy(cluster.keys_dir / "admin.key_secret", old_admin / "admin.key_secret")
        old_pair = keymod.load(old_admin, keymod.ADMIN)
        # a connection opened with the old admin key before the rotation
        held = raw_socket(ctx, zmq.DEALER, cluster, "n2", old_pair, "bus")
        held.send(ch.pack(ch.request("n2", "bus", "ping", {}, time.time() + 5)))
        assert held.poll(5000) and ch.unpack(held.recv()).body["member"] == "n2"

        poller = CallPoller(cluster)
        poller.start()
        wait_until(lambda: poller.ok >= 6, timeout=10, what="calls flow before the rotation")
        at_start = poller.ok
        r = run_cli(["keys", "rotate", "-c", cluster.path], timeout=60)
        assert r.returncode == 0, r.stderr
        assert "rotated: n1, n2, n3, admin" in r.stdout
        at_end = poller.ok
        assert at_end - at_start >= 5, "the calls did not overlap the rotation"
        wait_until(lambda: poller.ok >= at_end + 6, timeout=10, what="calls flow after the rotation")
        poller.stop.set()
        poller.join(5)
        assert poller.failures == [], f"calls failed during the rotation: {poller.failures[:5]}"

        after = {n: keymod.load(cluster.keys_dir, n, secret=False).public for n in before}
        assert all(after[n] != before[n] for n in before), "a key was not replaced"
        assert sorted(p.name for p in cluster.keys_dir.glob("*.key")) == sorted(f"{n}.key" for n in before)
        for m in MEMBERS:        # the new admin key, fresh connections to every member
            with SyncClient(cluster, remote=m) as c:
                assert c.call(m, "bus", "ping", timeout=3.0)["member"] == m
            assert bus_status(cluster, m)["peers"] and all(
                p["connected"] for p in bus_status(cluster, m)["peers"].values())

        # the old admin key: a new connection gets nothing ...
        for m in MEMBERS:
            d = transport.make_socket(ctx, zmq.DEALER)
            transport.curve_client(d, old_pair, after[m])
            d.connect(cluster.member(m).bus_endpoint)
            d.send(ch.pack(ch.request(m, "bus", "ping", {}, time.time() + 5)))
            assert not d.poll(1000), f"the old admin key was answered by {m}"
        # ... and the connection it held before is gone with its answers
        held.send(ch.pack(ch.request("n2", "bus", "ping", {}, time.time() + 5)))
        assert not held.poll(1000), "a connection of the old admin key is still served"
    finally:
        if poller is not None:
            poller.stop.set()
        if procs is not None:
            procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def test_keys_rotate_one_member_and_bad_member(bus3, ctx):
    """--member n2 changes n2's key only; --member admin cuts a connection the old admin
    key still holds (no broker rebinds then: the broker refuses its messages itself)."""
    cluster = bus3
    r = run_cli(["keys", "rotate", "-c", cluster.path, "--member", "n9"])
    assert r.returncode == 1 and "unknown member 'n9'" in r.stderr and len(r.stderr.splitlines()) == 1
    before = keymod.load(cluster.keys_dir, "n2", secret=False).public
    admin = keymod.load(cluster.keys_dir, keymod.ADMIN, secret=False).public
    r = run_cli(["keys", "rotate", "-c", cluster.path, "--member", "n2"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert keymod.load(cluster.keys_dir, "n2", secret=False).public != before
    assert keymod.load(cluster.keys_dir, keymod.ADMIN, secret=False).public == admin
    for a in MEMBERS:
        for b in MEMBERS:
            assert bus_ping(cluster, a, b, timeout=3.0)["member"] == b
    with SyncClient(cluster, remote="n2") as c:
        assert c.call("n1", "bus", "ping", timeout=3.0)["member"] == "n1"

    held = raw_socket(ctx, zmq.DEALER, cluster, "n1", keymod.load(cluster.keys_dir, keymod.ADMIN), "bus")
    held.send(ch.pack(ch.request("n3", "bus", "ping", {}, time.time() + 5)))
    assert held.poll(5000) and ch.unpack(held.recv()).body["member"] == "n3"
    refused = bus_status(cluster, "n1")["counters"]["refused"]
    r = run_cli(["keys", "rotate", "-c", cluster.path, "--member", "admin"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert keymod.load(cluster.keys_dir, keymod.ADMIN, secret=False).public != admin
    held.send(ch.pack(ch.request("n3", "bus", "ping", {}, time.time() + 5)))
    assert not held.poll(1000), "the old admin key's open connection is still served"
    assert bus_status(cluster, "n1")["counters"]["refused"] >= refused + 1
    with SyncClient(cluster, remote="n1") as c:     # the new admin key
        assert c.call("n3", "bus", "ping", timeout=3.0)["member"] == "n3"


def test_user_ids_with_hash_in_the_key_id():
    """Z85 has '#': the name is before the first one, the key id is all after it."""
    assert transport.user_name("n1#a#b#c12345") == "n1"
    assert transport.user_key_id("n1#a#b#c12345") == "a#b#c12345"
    assert transport.key_id(b"a#b#c12345xyz") == "a#b#c12345"
