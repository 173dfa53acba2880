"""health: the ``[[check]]`` probes of one node (keepalived's track_script, Pacemaker's monitor).

Runs on every node, one process of its own, so that no probe can ever delay a heartbeat or a
lease renewal (membership, election and vip are other processes). Every check runs on its
own interval as an asyncio task; a probe never blocks the loop and never outlives its
timeout:

* ``tcp``: connect to address:port;
* ``smtp``: connect and read a line starting with ``220``, then send ``QUIT`` and close;
* ``command``: run argv (no shell, stdin /dev/null, output captured and truncated) in a
  session of its own; exit 0 is healthy. Past the timeout its whole process group is
  killed (SIGKILL) and reaped.

A probe past its timeout has failed. The rise/fall counting is
:class:`node.health.CheckState` (pure); which VIPs that fails, :func:`node.health.guarded_vips`.

Publishes ``health.status`` {node, time, seq, checks: {name: {state, fails, rises, since,
last_error, took}}, failing, unknown} at once when a check changes state, otherwise every
``report_refresh`` as a heartbeat (the coordinator counts a report fresh for ``report_fresh``,
:mod:`ecluster.timing`).
The first report waits until every check has its first result (or its first timeout has
passed), so a starting node does not announce "unknown" for checks about to answer.
Raises ``alarm.check_failed`` when a check turns unhealthy; logs its recovery.
RPC ``status()``: the same body plus probe counters.

With no ``[[check]]`` configured the service does not run at all (``runs_on``): a node
without checks is judged by membership alone.

It must never plumb, release or move anything itself: the coordinator decides (docs/CHECKS.md).
"""
from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections import deque
from typing import Any

from node.health import UNHEALTHY, UNKNOWN, CheckState, guarded_vips
from node.vipcore import vip_key
from services.base import Service, rpc
from bus import roles as access

OUTPUT_MAX = 4096          # bytes of a command's output kept (the rest is read and dropped)
QUIT_WAIT = 0.2            # s: at most this long to say QUIT to an SMTP server


async def probe_tcp(address: str, port: int) -> None:
    """Connect and close; raises OSError when nothing listens."""
    _, writer = await asyncio.open_connection(address, port)
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), QUIT_WAIT)
    except (OSError, asyncio.TimeoutError):
        pass


async def probe_smtp(address: str, port: int) -> None:
    """Connect, read the greeting: healthy when its first line starts with 220."""
    reader, writer = await asyncio.open_connection(address, port)
    try:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed before the greeting")
        if not line.startswith(b"220"):
            raise ConnectionError(f"greeting {line[:60].decode('latin-1').strip()!r} is not 220")
        try:
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(writer.drain(), QUIT_WAIT)
        except (OSError, asyncio.TimeoutError):
            pass
    finally:
        writer.close()


async def _read_capped(stream: asyncio.StreamReader, into: bytearray) -> None:
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        if len(into) < OUTPUT_MAX:
            into += chunk[:OUTPUT_MAX - len(into)]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def probe_command(argv: tuple[str, ...], timeout: float) -> str:
    """Run ``argv``; return its (truncated) output when it exits 0, raise otherwise.

    Past ``timeout`` (for the program and its output to end) the process group is killed
    and reaped, and asyncio.TimeoutError raised.
    """
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT,
                                                    start_new_session=True)
    except OSError as e:
        raise OSError(f"cannot run {argv[0]}: {e.strerror or e}") from None
    output = bytearray()

    async def to_the_end() -> None:
        await _read_capped(proc.stdout, output)   # EOF: the program and its children closed it
        await proc.wait()

    try:
        await asyncio.wait_for(to_the_end(), timeout)
    except BaseException:
        # timed out or cancelled: the whole group goes, and the leader is reaped (no zombie)
        _kill_group(proc.pid)
        try:
            await asyncio.shield(proc.wait())
        except asyncio.CancelledError:
            pass
        raise
    # leftovers of the program in its group (it exited, they did not) must not pile up;
    # the group id cannot be reused while any member lives, so this hits only them
    _kill_group(proc.pid)
    text = output.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}" + (f": {text.splitlines()[-1][:120]}" if text else ""))
    return text


async def run_probe(check) -> tuple[bool, str | None, float]:
    """One probe of ``check`` (an ecluster.clusterfile.Check): (healthy, error, seconds)."""
    t0 = time.monotonic()
    try:
        if check.kind == "command":
            await probe_command(check.command, check.timeout)
        else:
            fn = probe_smtp if check.kind == "smtp" else probe_tcp
            await asyncio.wait_for(fn(check.address, check.port), check.timeout)
        return True, None, time.monotonic() - t0
    except asyncio.TimeoutError:
        return False, f"no answer within {check.timeout:g} s", time.monotonic() - t0
    except (OSError, ConnectionError, RuntimeError, ValueError) as e:
        # asyncio words a refused connect "Connect call failed (...)": say what errno says
        why = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
        return False, why or type(e).__name__, time.monotonic() - t0


def max_in_flight(interval: float, timeout: float) -> int:
    """How many probes of one check may be under way at once: enough that a probe starts
    every interval while each may take its whole timeout. Pure."""
    return max(1, math.ceil(timeout / interval)) + 1


class HealthService(Service):
    """Runs the node's checks and reports them (see the module docstring)."""

    name = "health"
    roles = ("node",)
    builtin = True

    @classmethod
    def runs_on(cls, cluster, member: str) -> bool:
        """Only on nodes of a cluster with ``[[check]]`` tables: without checks a node is
        judged by membership alone, and the process would only cost memory and wake-ups."""
        return super().runs_on(cluster, member) and bool(cluster.checks)

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        self.checks = tuple(cluster.checks)
        self.vip_keys = [vip_key(v.address) for v in cluster.vips]
        self.states = {c.name: CheckState(fall=c.fall, rise=c.rise) for c in self.checks}
        self.seq = 0
        self.published_at = 0.0                  # monotonic, of the last health.status
        self.heartbeat = cluster.timing.report_refresh
        self.tasks: list[asyncio.Task] = []
        self.wake = asyncio.Event()              # a state changed: publish now
        self.first_round_by = 0.0                # monotonic: first report at the latest

    # -- life cycle -----------------------------------------------------------------
    async def handle_init(self) -> None:
        if not self.checks:
            self.log.info("no [[check]] configured: nothing to probe")
            return
        loop = asyncio.get_running_loop()
        self.first_round_by = time.monotonic() + max(c.timeout for c in self.checks) + 0.5
        for c in self.checks:
            self.tasks.append(loop.create_task(self._check_loop(c), name=f"check:{c.name}"))
        self.tasks.append(loop.create_task(self._publish_loop(), name="health:publish"))
        self.log.info("running %d checks: %s", len(self.checks),
                      ", ".join(f"{c.name} ({c.kind}, every {c.interval:g} s)" for c in self.checks))

    async def handle_stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        # cancelled command probes kill and reap their process groups before they end
        await asyncio.gather(*self.tasks, return_exceptions=True)

    # -- probing --------------------------------------------------------------------
    async def _check_loop(self, check) -> None:
        """A probe starts every ``interval`` whether or not the one before has answered
        (at most :func:`max_in_flight` at a time), and results count in start order. So a
        service that hangs is unhealthy ``fall x interval + timeout`` after it stopped at
        the latest, as the budget of docs/CHECKS.md says, not ``fall x timeout``."""
        state = self.states[check.name]
        in_flight: deque[asyncio.Task] = deque()
        cap = max_in_flight(check.interval, check.timeout)
        next_at = time.monotonic()
        try:
            while True:
                if len(in_flight) >= cap:          # never more than the cap: wait for the oldest
                    await asyncio.wait({in_flight[0]})
                    await self._take_results(check, state, in_flight)
                in_flight.append(asyncio.ensure_future(self._probe(check)))
                next_at = max(next_at + check.interval, time.monotonic())   # start to start, no bursts
                while (delay := next_at - time.monotonic()) > 0:
                    if in_flight:
                        await asyncio.wait({in_flight[0]}, timeout=delay)
                        await self._take_results(check, state, in_flight)
                    else:
                        await asyncio.sleep(delay)
        finally:
            for task in in_flight:
                task.cancel()

    @staticmethod
    async def _probe(check) -> tuple[bool, str | None, float]:
        try:
            return await run_probe(check)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug in a probe is a failed probe, not a dead loop
            return False, f"probe error: {e!r}"[:200], 0.0

    async def _take_results(self, check, state: CheckState, in_flight: deque) -> None:
        while in_flight and in_flight[0].done():
            ok, error, took = in_flight.popleft().result()
            new = state.record(ok, time.time(), error, took)
            if new is not None:
                try:
                    await self._changed(check, new, state)
                except Exception:  # noqa: BLE001 - an alarm that cannot go out must not stop the check
                    self.log.exception("check %s: telling the change failed", check.name)

    async def _changed(self, check, new: str, state: CheckState) -> None:
        self.wake.set()
        guarded = [k for k in self.vip_keys if check.guards(k)]
        if new == UNHEALTHY:
            await self.alarm("check_failed", f"check {check.name} on {self.member.name} failed "
                             f"{state.fails} time(s): {state.last_error}; VIPs {', '.join(guarded) or 'none'} "
                             "leave this node", check=check.name, vips=guarded, error=state.last_error)
        elif state.probes > 1:
            self.log.warning("check %s healthy again (%d good probes in a row)", check.name, state.rises)
        else:
            self.log.info("check %s: healthy", check.name)

    # -- reporting ------------------------------------------------------------------
    def _first_round_done(self) -> bool:
        return all(s.state != UNKNOWN for s in self.states.values()) or time.monotonic() >= self.first_round_by

    async def _publish_loop(self) -> None:
        while True:
            if self._first_round_done():
                due = self.published_at + self.heartbeat - time.monotonic()
                if self.wake.is_set() or due <= 0:
                    self.wake.clear()
                    try:
                        await self._publish()
                    except Exception:  # noqa: BLE001 - try again at the next heartbeat
                        self.log.exception("publishing health.status failed")
                    continue
                timeout = due
            else:
                # the first report carries every first result at once: a change now is in it
                self.wake.clear()
                timeout = max(0.0, self.first_round_by - time.monotonic())
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def report(self) -> dict:
        states = {name: s.state for name, s in self.states.items()}
        failing, unknown = guarded_vips(self.checks, states, self.vip_keys)
        return {"node": self.member.name, "time": time.time(), "seq": self.seq,
                "checks": {name: s.report() for name, s in self.states.items()},
                "failing": failing, "unknown": unknown}

    async def _publish(self) -> None:
        self.seq += 1
        self.published_at = time.monotonic()
        await self.publish("health.status", self.report())

    @rpc(access.ANYONE)
    def rpc_status(self) -> dict:
        out = self.report()
        out["configured"] = [{"name": c.name, "kind": c.kind, "interval": c.interval, "timeout": c.timeout,
                              "fall": c.fall, "rise": c.rise, "vips": list(c.vips) or None,
                              "probes": self.states[c.name].probes, "failures": self.states[c.name].failures}
                             for c in self.checks]
        return out

    @rpc(access.ANYONE)
    def rpc_metrics(self) -> list[dict[str, Any]]:
        """Families for services/metrics.py: state and probe counters per check."""
        healthy = {"name": "ecluster_check_healthy", "type": "gauge",
                   "help": "1 when the check is healthy, 0 when unhealthy, -1 with no result yet", "samples": []}
        probes = {"name": "ecluster_check_probes_total", "type": "counter",
                  "help": "Probes run since the health service started", "samples": []}
        failures = {"name": "ecluster_check_failures_total", "type": "counter",
                    "help": "Failed probes since the health service started", "samples": []}
        took = {"name": "ecluster_check_probe_seconds", "type": "gauge",
                "help": "How long the last probe took", "samples": []}
        for c in self.checks:
            s = self.states[c.name]
            labels = {"check": c.name, "kind": c.kind}
            healthy["samples"].append([labels, {"healthy": 1, "unhealthy": 0}.get(s.state, -1)])
            probes["samples"].append([labels, s.probes])
            failures["samples"].append([labels, s.failures])
            if s.took is not None:
                took["samples"].append([labels, round(s.took, 6)])
        return [healthy, probes, failures, took]
