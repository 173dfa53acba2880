"""The VIP-watch API of services.base (``watch_vips``, ``held_vips``, ``handle_vips``,
``ask_held_vips``): pure parts, then a two-node loopback cluster over the real bus.

The cluster runs with ``vip_dry_run = true`` (addresses recorded, not plumbed). Next to
each node's vip service runs a small watching service, this file run as a script
(``python tests/test_vipwatch.py CLUSTER MEMBER``): it keeps every ``handle_vips`` call
and answers them over RPC.
"""
from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

if __name__ != "__main__":
    import pytest

    from bus.client import SyncClient
    from conftest import PYTHON, Procs, make_cluster_file, short_dir, wait_until

from ecluster.clusterfile import Cluster, Hooks, Vip
from ecluster.timing import preset
from bus import roles as access
from services.base import Service, held_by_kind, no_vips, rpc, stale_after, vip_kernel_lifetime, vip_kinds

VIP_A, VIP_B, VIP_OUT = "127.0.0.100", "127.0.0.101", "127.0.0.102"
KINDS = {VIP_A: "injection", VIP_B: "injection", VIP_OUT: "outbound"}
WATCHER = "vipwatch_test"


class WatcherService(Service):
    """Follows this node's VIPs; every handle_vips call is kept for the test."""

    name = WATCHER
    roles = ("node",)
    watch_vips = True

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        self.calls: list[dict] = []

    async def handle_vips(self, held):
        self.calls.append({"held": {k: list(v) for k, v in held.items()}, "at": time.monotonic()})

    @rpc(access.ANYONE)
    def rpc_watched(self) -> dict:
        return {"held_vips": {k: list(v) for k, v in self.held_vips.items()}, "calls": self.calls,
                "now": time.monotonic()}

    @rpc(access.ANYONE)
    async def rpc_ask(self) -> dict:
        return {k: list(v) for k, v in (await self.ask_held_vips()).items()}


# -- pure parts ---------------------------------------------------------------------------------

def test_held_by_kind_counts_only_plumbed_vips_and_sorts_by_kind():
    states = {VIP_A: "owned", VIP_B: "acquiring", VIP_OUT: "handing_over", "192.0.2.9": "owned"}
    assert held_by_kind([VIP_A, VIP_B, VIP_OUT], states, KINDS) == {"injection": (VIP_A,), "outbound": (VIP_OUT,)}


def test_held_by_kind_without_states_takes_held_and_ignores_junk():
    assert held_by_kind([VIP_B, f"{VIP_A}/8", 7, "not a vip"], None, KINDS) == {
        "injection": (VIP_A, VIP_B), "outbound": ()}
    assert held_by_kind(None, None, KINDS) == {"injection": (), "outbound": ()}
    assert held_by_kind("x", "y", {}) == no_vips({}) == {"injection": (), "outbound": ()}


def test_stale_after_is_the_kernel_lifetime_plus_a_probe_interval():
    for name in ("lan", "fast"):
        t = preset(name)
        assert stale_after(t) == vip_kernel_lifetime(t) + t.probe_interval
        assert vip_kernel_lifetime(t) >= 2 and vip_kernel_lifetime(t) >= 2 * t.lease


def test_the_smtp_plugin_and_the_vip_service_use_the_shared_figures(make_cluster):
    from ecluster_smtp import service as smtp
    from services.vip import VipService

    assert smtp.stale_after is stale_after
    cluster = make_cluster(1, extra=f'[[vip]]\naddress = "{VIP_A}/8"\ninterface = "lo"\n')
    # the staleness rule holds only while the vip service plumbs with this lifetime
    assert VipService(cluster, "n1").kernel_lifetime == vip_kernel_lifetime(cluster.timing)


def test_vip_kinds_maps_bare_addresses():
    cluster = Cluster(path=Path("/x"), name="t", keys_dir=Path("/x"), timing=preset("lan"), nodes={}, managers={},
                      vips=[Vip(f"{VIP_A}/8", "lo"), Vip(f"{VIP_OUT}/8", "lo", kind="outbound")])
    assert vip_kinds(cluster) == {VIP_A: "injection", VIP_OUT: "outbound"}


# -- over the bus -------------------------------------------------------------------------------

if __name__ != "__main__":
    pytestmark_bus = pytest.mark.timeout(120)
    NODES = ("n1", "n2")
    SERVICES = ("membership", "election", "vip")

    class WatchLab:
        def __init__(self, cluster, procs: Procs):
            self.cluster = cluster
            self.procs = procs
            self.vip_proc: dict[str, object] = {}

        def call(self, member: str, service: str, method: str, timeout: float = 2.0, **args):
            with SyncClient(self.cluster, via=member) as c:
                return c.call(member, service, method, timeout=timeout, **args)

        def watched(self, node: str) -> dict:
            return self.call(node, WATCHER, "watched", timeout=1.0)

        def held(self, node: str) -> dict:
            return self.watched(node)["held_vips"]

        def start_vip(self, node: str):
            self.vip_proc[node] = self.procs.start(["service", "run", "vip", "-c", self.cluster.path, "-m", node],
                                                   name=f"vip-{node}")

    @pytest.fixture(scope="module")
    def lab(tmp_path_factory):
        base = tmp_path_factory.mktemp("vipwatch")
        root = short_dir()
        procs = Procs(base / "logs")
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
address = "{VIP_OUT}/8"
interface = "lo"
preference = "n1"
kind = "outbound"
"""
        try:
            cluster = make_cluster_file(base / "c", 2, 0, extra=extra, data_root=root)
            lab = WatchLab(cluster, procs)
            for n in NODES:
                procs.start(["bus", "run", "-c", cluster.path, "-m", n], name=f"bus-{n}")
                for s in SERVICES:
                    if s == "vip":
                        lab.start_vip(n)
                    else:
                        procs.start(["service", "run", s, "-c", cluster.path, "-m", n], name=f"{s}-{n}")
                procs.start([], name=f"watch-{n}", argv=[PYTHON, __file__, str(cluster.path), n])
            wait_until(lambda: lab.held("n1") == {"injection": [VIP_A], "outbound": [VIP_OUT]}, timeout=40,
                       what="n1 watches its VIPs")
            wait_until(lambda: lab.held("n2") == {"injection": [VIP_B], "outbound": []}, timeout=20,
                       what="n2 watches its VIP")
            yield lab
        finally:
            procs.stop_all()
            import shutil
            shutil.rmtree(root, ignore_errors=True)

    @pytestmark_bus
    def test_only_this_nodes_reports_count_and_only_changes_are_told(lab):
        first = lab.watched("n1")
        calls = len(first["calls"])
        # the empty mapping before the first report is not a change: never told
        assert calls >= 1 and first["calls"][-1]["held"] == first["held_vips"]
        assert all(a["held"] != b["held"] for a, b in zip(first["calls"], first["calls"][1:]))
        # many probe intervals of unchanged vip.status (n2's included): no new call
        t0 = time.monotonic()
        wait_until(lambda: time.monotonic() - t0 > 10 * lab.cluster.timing.probe_interval, timeout=5,
                   what="ten probe intervals")
        again = lab.watched("n1")
        assert len(again["calls"]) == calls
        assert again["held_vips"] == {"injection": [VIP_A], "outbound": [VIP_OUT]}
        assert lab.call("n1", WATCHER, "ask") == {"injection": [VIP_A], "outbound": [VIP_OUT]}

    @pytestmark_bus
    def test_a_move_is_told_on_both_nodes(lab):
        # a node's own key may not move VIPs (bus.roles): the coordinator's own call may
        leader = lab.call("n1", "election", "status")["leader"]
        lab.call(leader, "election", "move", vip=VIP_A, node="n2")
        try:
            wait_until(lambda: lab.held("n1") == {"injection": [], "outbound": [VIP_OUT]}, timeout=10,
                       what="n1 no longer holds the VIP")
            wait_until(lambda: lab.held("n2") == {"injection": [VIP_A, VIP_B], "outbound": []}, timeout=10,
                       what="n2 holds the VIP")
            calls = lab.watched("n2")["calls"]
            # each call is a change: no two consecutive calls tell the same mapping
            assert all(a["held"] != b["held"] for a, b in zip(calls, calls[1:]))
        finally:
            lab.call(lab.call("n1", "election", "status")["leader"], "election", "unpin", vip=VIP_A)
        wait_until(lambda: lab.held("n1") == {"injection": [VIP_A], "outbound": [VIP_OUT]}, timeout=20,
                   what="the VIP back on n1")

    @pytestmark_bus
    def test_a_silent_vip_service_counts_as_everything_released(lab):
        before = len(lab.watched("n1")["calls"])
        p = lab.vip_proc["n1"]
        killed_at = time.monotonic()
        lab.procs.stop(p, sig=signal.SIGKILL)     # no release published: only silence tells
        limit = stale_after(lab.cluster.timing)
        wait_until(lambda: lab.held("n1") == {"injection": [], "outbound": []}, timeout=limit + 5,
                   what="n1's watcher gives up on its silent vip service")
        w = lab.watched("n1")
        told = w["calls"][before:]
        assert told and told[-1]["held"] == {"injection": [], "outbound": []}
        # not before the kernel could have dropped the addresses (the last report came at most a
        # probe interval or so before the kill; clocks: both monotonic on this host)
        assert told[0]["at"] - killed_at >= limit - 3 * lab.cluster.timing.probe_interval - 0.3
        lab.start_vip("n1")
        wait_until(lambda: lab.held("n1") == {"injection": [VIP_A], "outbound": [VIP_OUT]}, timeout=30,
                   what="n1 holds its VIPs again after the vip service restarts")


def _main(argv: list[str]) -> None:
    import logging

    from ecluster.clusterfile import load_cluster

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cluster = load_cluster(argv[1])
    asyncio.run(WatcherService(cluster, argv[2]).run())


if __name__ == "__main__":
    _main(sys.argv)
