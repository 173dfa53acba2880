"""logagg: every manager pulls every node's journals into plain files, each record once.

For each node and log (:func:`services.jlog.log_names`) one loop:

    read a batch (subscriber ``logagg-<this manager>``) from the node's jlog service
    -> write the new records to ``<root>/%Y/%m/%d/<log>/<node>`` and fsync
    -> record the highest seq written in the sink state and fsync
    -> checkpoint that seq at the node (sent with the next read: ``jlog.read(ack=seq)``)

(:mod:`manager.logsink` has the files, the state and why this is exactly once.) The root
is ``[managers.<m>].logs_root``, default ``<data_dir>/logs``; the day is the UTC day on
which the manager received the batch. Several managers consume independently, each under
its own subscriber name. A loop that finds nothing new sleeps until the node publishes
``jlog.written`` for that log (or 2 s pass); a loop whose node is down backs off (up to
2 s) and the other loops go on.

RPC ``status()`` -> ``{"manager", "root", "logs": {node: {log: {"written_seq", "lag_records",
"lag_bytes", "error", "records_written", "duplicates_skipped", "last_batch"}}}}`` (the lag is asked of the node).
Alarms: ``alarm.logagg.records_dropped`` when a node reports records this manager will never
see (the node's disk budget dropped them), ``alarm.logagg.journal_reset`` when a node's
journal is behind what was already aggregated, ``alarm.logagg.sink_error`` when a file
cannot be written.
"""
from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Any

from bus.client import BusError
from manager.logsink import STATE_DIR, Sink, SinkError, day_of
from node.datadir import DirLock, LockedError
from services.base import Service, rpc
from bus import roles as access
from services.jlog import WRITTEN_TOPIC, log_names, logagg_subscriber
from services.pulling import PullPolicy, ack_after_failure, ack_args, checkpoint_after, run_pull_loop

BATCH_RECORDS = 20_000
BATCH_BYTES = 8 << 20
#: a (node, log) loop (services.pulling): nothing new, sleep until jlog.written or 2 s; a
#: node down, back off from 0.1 s up to 2 s. Reads get 5 s, but 1 s at first contact and
#: after an error (doubling on timeouts): a reply sent while the node's broker link to this
#: manager is still coming up is lost, and a short timeout retries it instead of a 5 s stall.
#: A trickle (under 1,000 records) waits 50 ms, or the node's next jlog.written, so it is
#: taken in batches rather than one call per record. A bug pauses 2 s.
PULL_POLICY = PullPolicy(idle_wait=2.0, backoff_min=0.1, backoff_max=2.0, read_timeout=5.0,
                         first_read_timeout=1.0, trickle_below=BATCH_RECORDS // 20, trickle_wait=0.05,
                         bug_wait=2.0)


def check_batch(rep: Any) -> tuple[list, int, int]:
    """(records, node last_seq, dropped) from a jlog.read reply, or ValueError if malformed."""
    if not isinstance(rep, dict):
        raise ValueError("jlog.read reply is not a map")
    records, last, dropped = rep.get("records"), rep.get("last_seq"), rep.get("dropped", 0)
    if not isinstance(records, list) or not isinstance(last, int) or not isinstance(dropped, int):
        raise ValueError("jlog.read reply has the wrong shape")
    prev = -1
    try:
        for seq, data in records:
            if type(seq) is not int or type(data) is not bytes or seq <= prev:
                raise ValueError
            prev = seq
    except (TypeError, ValueError):
        raise ValueError("jlog.read reply holds a malformed record") from None
    return records, last, dropped


def journal_reset_floor(done_seq: int, node_last_seq: int, records: list) -> int | None:
    """The new dedup floor if the node's journal is behind what was aggregated, else None.

    A node whose journal restarted lower (data directory wiped) would otherwise have
    every new record dropped as a duplicate; the floor goes back to just before the
    first record the node now offers (or its last seq when it offers none).
    """
    if node_last_seq >= done_seq:
        return None
    return (records[0][0] - 1) if records else node_last_seq


class _Lane:
    """The state of one (node, log) loop, for status()."""

    def __init__(self, sink: Sink):
        self.sink = sink
        self.wake = asyncio.Event()
        self.error: str | None = None
        self.records_written = 0
        self.duplicates_skipped = 0        # records read again after a crash, already in the files
        self.last_batch: float | None = None
        self.dropped_seen = 0
        self.node_last_seq: int | None = None
        self.inflight: asyncio.Future | None = None    # the sink write in progress, if any
        self.pending_ack: int | None = None            # durable here, not yet checkpointed at the node


class LogAggService(Service):
    """The manager side of log aggregation (see the module docstring)."""

    name = "logagg"
    roles = ("manager",)
    builtin = True
    subscriptions = (WRITTEN_TOPIC,)

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        self.root = Path(self.member.logs_root or self.data_dir / "logs")
        self.subscriber = logagg_subscriber(self.member.name)
        self.logs = log_names(cluster)
        self.lanes: dict[tuple[str, str], _Lane] = {}
        self._tasks: list[asyncio.Task] = []
        self._lock: DirLock | None = None

    async def handle_init(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._start()))

    async def _start(self) -> None:
        (self.root / STATE_DIR).mkdir(parents=True, exist_ok=True)
        # One writer per root: a predecessor still dying (or a second manager pointed at the
        # same root by mistake) must not append to the same files.
        lock = DirLock(self.root / STATE_DIR / "LOCK", f"logagg of {self.member.name}", kind="log root")
        while True:
            try:
                await self.offload(lock.acquire)
                break
            except LockedError as e:
                self.log.warning("%s; waiting", e)
                await asyncio.sleep(0.5)
        self._lock = lock
        for node in sorted(self.cluster.nodes):
            for log in self.logs:
                try:
                    sink = await self.offload(Sink(self.root, node, log).open)
                except (SinkError, OSError) as e:
                    await self.alarm("logagg.sink_error", f"{node}/{log}: cannot open the sink: {e}",
                                     node=node, log=log)
                    continue
                for note in sink.notes:
                    self.log.warning("%s/%s: %s", node, log, note)
                if sink.recovered_bytes:
                    self.log.warning("%s/%s: cut %d uncommitted bytes from %s", node, log,
                                     sink.recovered_bytes, sink.state.path)
                lane = _Lane(sink)
                self.lanes[(node, log)] = lane
                self._tasks.append(asyncio.get_running_loop().create_task(self._pump(node, log, lane)))

    async def handle_event(self, topic: str, body: Any, env) -> None:
        if topic == WRITTEN_TOPIC and isinstance(body, dict):
            lane = self.lanes.get((env.src, body.get("log")))
            if lane is not None:
                if isinstance(body.get("last_seq"), int):
                    lane.node_last_seq = body["last_seq"]
                lane.wake.set()

    async def handle_stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        for lane in self.lanes.values():
            if lane.inflight is not None:
                try:
                    await lane.inflight
                except Exception:  # noqa: BLE001 - reported by the loop; closing anyway
                    pass
            lane.sink.close()
        if self._lock is not None:
            self._lock.release()

    async def _pump(self, node: str, log: str, lane: _Lane) -> None:
        """Read, write, fsync, checkpoint: forever, for one node's log.

        The checkpoint of a batch rides on the next read (``ack``), which saves a round
        trip per batch; it is sent only after the batch is durable here.
        """
        async def failed(e: BaseException, expected: bool, previous_backoff: float) -> None:
            if not expected:
                self.log.exception("%s/%s: unexpected error", node, log)
                lane.error = f"{type(e).__name__}: {e}"
                return
            lane.pending_ack = ack_after_failure(lane.pending_ack, e)
            if isinstance(e, SinkError) and lane.error != str(e):
                await self.alarm("logagg.sink_error", f"{node}/{log}: {e}", node=node, log=log)
            lane.error = str(e)

        await run_pull_loop(lane.wake, functools.partial(self._pull_batch, node, log, lane), failed, PULL_POLICY,
                            expected=(BusError, ValueError, SinkError, OSError))

    async def _pull_batch(self, node: str, log: str, lane: _Lane, read_timeout: float) -> int:
        """Read one batch, write and fsync it, record it in the sink state; returns the
        number of records read. Its checkpoint is left in ``lane.pending_ack``."""
        sink = lane.sink
        rep = await self.call(node, "jlog", "read", timeout=read_timeout, log=log,
                              subscriber=self.subscriber, max_records=BATCH_RECORDS, max_bytes=BATCH_BYTES,
                              **ack_args(lane.pending_ack))
        lane.pending_ack = None                  # delivered: the node applied it before reading
        records, last_seq, dropped = check_batch(rep)
        lane.node_last_seq = last_seq
        if dropped != lane.dropped_seen:
            if dropped > lane.dropped_seen:
                await self.alarm("logagg.records_dropped",
                                 f"{node}/{log}: {dropped} records were dropped by the node's disk budget "
                                 f"before {self.subscriber} read them", node=node, log=log, count=dropped)
            lane.dropped_seen = dropped
        floor = journal_reset_floor(sink.state.seq, last_seq, records)
        if floor is not None:
            await self.alarm("logagg.journal_reset",
                             f"{node}/{log}: the node's journal ends at seq {last_seq}, before the "
                             f"{sink.state.seq} already aggregated; continuing after seq {floor}",
                             node=node, log=log)
            await self.offload(sink.reset_seq, floor)
        if records:
            # shielded: a stop must not close the sink under a write in progress
            lane.inflight = asyncio.ensure_future(self.offload(sink.append, records, day_of()))
            written = await asyncio.shield(lane.inflight)
            lane.records_written += written
            lane.duplicates_skipped += len(records) - written
            lane.last_batch = time.time()
        lane.pending_ack = checkpoint_after(records)     # durable here: the next read checkpoints it
        lane.error = None
        return len(records)

    @rpc(access.ANYONE)
    async def rpc_status(self) -> dict:
        """Per node and log: seq written, lag at the node (records, bytes), last error."""
        async def node_status(node: str) -> tuple[str, Any]:
            try:
                return node, await self.call(node, "jlog", "status", timeout=1.5)
            except BusError as e:
                return node, e

        answers = dict(await asyncio.gather(*(node_status(n) for n in sorted(self.cluster.nodes))))
        out: dict[str, dict] = {}
        for (node, log), lane in sorted(self.lanes.items()):
            ans = answers.get(node)
            sub = None
            node_error = None
            if isinstance(ans, Exception):
                node_error = str(ans)
            elif isinstance(ans, dict):
                sub = ((ans.get("logs") or {}).get(log) or {}).get("subscribers", {}).get(self.subscriber)
            out.setdefault(node, {})[log] = {
                "written_seq": lane.sink.state.seq,
                "file": lane.sink.state.path,
                "lag_records": sub["lag_records"] if sub else None,
                "lag_bytes": sub["lag_bytes"] if sub else None,
                "node_last_seq": lane.node_last_seq,
                "records_written": lane.records_written,
                "duplicates_skipped": lane.duplicates_skipped,
                "last_batch": lane.last_batch,
                "error": lane.error or node_error,
            }
        return {"manager": self.member.name, "subscriber": self.subscriber, "root": str(self.root), "logs": out}
