"""A small real cluster on loopback for the delegation and console tests.

Every member is two processes: its broker (``ecluster bus run``) and one Python process
that runs the member's chosen services together in one event loop (each with its own bus
connection, exactly as under supervisord, just fewer interpreters to start on a 2-core
machine). Processes belong to a :class:`conftest.Procs`, so they are stopped by PID.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from typing import Sequence

from conftest import Procs, wait_until

RUNNER = r"""
import asyncio, logging, signal, sys
from ecluster.clusterfile import load_cluster
from services.base import load_service

async def main(path, member, names, keys):
    cluster = load_cluster(path)
    if keys:                        # this member's own bundle (ecluster --keys DIR)
        import dataclasses, pathlib
        cluster = dataclasses.replace(cluster, keys_dir=pathlib.Path(keys))
    services = [load_service(n)(cluster, member) for n in names]
    tasks = [asyncio.create_task(s.run()) for s in services]
    await asyncio.sleep(0)          # every run() has installed its own handlers: take them over
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: [s.request_stop() for s in services])
    await asyncio.gather(*tasks)

logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4] if len(sys.argv) > 4 else ""))
"""


class MiniCluster:
    """Start members with :meth:`start`; :meth:`kill` one hard; ``procs.stop_all()`` ends all."""

    def __init__(self, cluster, procs: Procs):
        self.cluster = cluster
        self.procs = procs
        self.members: dict[str, list[subprocess.Popen]] = {}

    def start(self, member: str, services: Sequence[str], keys=None) -> None:
        """Start ``member``'s broker and services; ``keys``: its own key directory (a bundle)."""
        opt = ["--keys", str(keys)] if keys else []
        broker = self.procs.start([*opt, "bus", "run", "-c", self.cluster.path, "-m", member], name=f"broker-{member}")
        svc = self.procs.start([], name=f"services-{member}",
                               argv=[sys.executable, "-c", RUNNER, str(self.cluster.path), member, ",".join(services),
                                     str(keys or "")])
        self.members[member] = [broker, svc]

    def kill(self, member: str) -> None:
        """SIGKILL every process of ``member`` (a crashed machine, as far as the bus can tell)."""
        for p in self.members[member]:
            self.procs.stop(p, sig=signal.SIGKILL)

    def services_pid(self, member: str) -> int:
        return self.members[member][1].pid

    def wait_ready(self, members: Sequence[str], service: str = "control", method: str = "version",
                   via: str | None = None, timeout: float = 20.0) -> None:
        """Until ``service.method`` answers on every one of ``members`` (asked through ``via``)."""
        from bus.client import SyncClient
        with SyncClient(self.cluster, via=via or members[0]) as c:
            for m in members:
                wait_until(lambda: c.call(m, service, method, timeout=0.5), timeout=timeout,
                           what=f"{service}.{method} on {m}")
