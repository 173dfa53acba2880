"""The bus across network namespaces: brokers at 10.99.0.11-13, partition and heal.

The test process reaches each broker through its ipc socket (unix sockets live in the
file system, not in a network namespace), so it can act as a local client of any member
while the brokers talk to each other over the lab's bridge.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time

import pytest
import zmq.asyncio

from bus.client import AsyncClient, BusError, SyncClient
from conftest import bus_ping, make_cluster_file, short_dir, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(90),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]


@pytest.fixture
def lab_bus(tmp_path):
    from lab import Lab
    root = short_dir()
    try:
        with Lab(3) as lab:
            cluster = make_cluster_file(tmp_path, n_nodes=3, data_root=root,
                                        addresses=[lab.member_address(i) for i in lab.members])
            logs = tmp_path / "logs"
            logs.mkdir()
            for i in lab.members:
                with open(logs / f"broker-n{i}.log", "wb") as out:
                    lab.popen(lab.member_ns(i), [sys.executable, "-m", "ecluster.cli", "bus", "run",
                                                 "-c", cluster.path, "-m", f"n{i}"],
                              stdout=out, stderr=subprocess.STDOUT)
            for a in ("n1", "n2", "n3"):
                for b in ("n1", "n2", "n3"):
                    wait_until(lambda: bus_ping(cluster, a, b), timeout=20, what=f"{a} reaches {b}")
            yield lab, cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


def events_reach(cluster, publisher: str, subscribers: list[str], timeout: float = 10.0) -> dict[str, int]:
    """Publish probes on ``publisher`` until every subscriber got one; return counts per member."""

    async def scenario():
        ctx = zmq.asyncio.Context()
        got = {m: 0 for m in subscribers}
        clients = []
        try:
            for m in subscribers:
                c = AsyncClient(cluster, m, f"t:labsub:{m}", ctx=ctx)
                c.subscribe("lab.")

                async def on_event(topic, body, env, m=m):
                    if env.src == publisher and body.get("from") == publisher:
                        got[m] += 1

                c.on_event = on_event
                c.start()
                clients.append(c)
            pub = AsyncClient(cluster, publisher, "t:labpub", ctx=ctx, subscribe=False)
            clients.append(pub)
            deadline = time.monotonic() + timeout
            while not all(got.values()) and time.monotonic() < deadline:
                await pub.publish_many("lab.probe", [{"from": publisher}] * 3)
                await asyncio.sleep(0.05)
            return got
        finally:
            for c in clients:
                c.close()
            ctx.destroy(linger=0)

    return asyncio.run(scenario())


def test_calls_and_events_cross_namespaces_and_survive_a_partition(lab_bus):
    lab, cluster = lab_bus
    # calls, both ways, between every pair: already waited for; events from n1 reach n2 and n3
    got = events_reach(cluster, "n1", ["n1", "n2", "n3"])
    assert all(got.values()), got
    with SyncClient(cluster, via="n3") as c:
        assert c.call("n1", "bus", "status", timeout=2.0)["member"] == "n1"

    lab.partition([[1], [2, 3]])
    timeout = 1.0
    with SyncClient(cluster, via="n1") as c:
        t0 = time.monotonic()
        with pytest.raises(BusError):
            c.call("n2", "bus", "ping", timeout=timeout)
        assert time.monotonic() - t0 < timeout + 0.5, "a call across the partition must not hang"
    assert bus_ping(cluster, "n2", "n3", timeout=2.0)["member"] == "n3"
    assert bus_ping(cluster, "n3", "n2", timeout=2.0)["member"] == "n2"
    got = events_reach(cluster, "n2", ["n3"], timeout=5)
    assert got["n3"], "events inside the majority side still flow"

    lab.heal()
    wait_until(lambda: bus_ping(cluster, "n1", "n2"), timeout=15, what="n1 reaches n2 after heal")
    wait_until(lambda: bus_ping(cluster, "n2", "n1"), timeout=15, what="n2 reaches n1 after heal")
    got = events_reach(cluster, "n1", ["n2", "n3"])
    assert all(got.values()), got
