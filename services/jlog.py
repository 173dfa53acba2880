"""jlog: every node's durable journals, on the bus.

One :class:`node.jlog.Journal` per log under ``<data_dir>/jlog/``: the standard logs
(:data:`STANDARD_LOGS`) plus every name in the cluster file's ``[jlog].logs`` (plug-in
logs). Subscribers are declared when a log is opened, so nothing written before the first
reader is lost: ``logagg-<manager>`` for every manager on every log, and
``cidr-<manager>`` on the ``audit`` log. Settings come from ``[jlog]``: ``fsync``,
``budget_mb`` (disk budget per log), ``policy`` ("block" | "drop_oldest"), ``segment_mb``.

RPC (record payloads are msgpack bin, i.e. Python bytes; str is accepted and encoded as
UTF-8)::

    write(log, records)                       -> {"last_seq": int}
    read(log, subscriber, max_records=5000, max_bytes=4<<20, ack=None)
                                              -> {"records": [[seq, payload], ...],
                                                  "last_seq": int, "dropped": int}
                                                 (ack: checkpoint at that seq first)
    checkpoint(log, subscriber, seq)          -> {"checkpoint": seq}
    status()                                  -> {"node", "logs": {log: {"last_seq", "first_seq",
                                                  "bytes", "subscribers": {sub: {"checkpoint",
                                                  "lag_records", "lag_bytes"}}, "alarms": [...]}}}
    inspect(log) / repair(log, force=False) / subscribers(log) / remove_subscriber(log, subscriber)

``write`` answers only once the records are durable per the fsync policy (see
:mod:`node.jlog.journal`); concurrent writes to one log are merged into one
``append_batch`` (one fsync for all of them: group commit). Bad input is answered with a
typed error (:class:`services.base.ServiceError`) and never stops the service.

Events: ``jlog.written {log, last_seq}`` at most every 100 ms per log (aggregators wake
on it instead of polling fast); journal alarms become cluster alarms
(``alarm.jlog.<kind>``), once per new alarm.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from node.jlog import (
    CheckpointError,
    Journal,
    JournalError,
    JournalFull,
    SubscriberStalled,
    UnknownSubscriber,
    inspect as inspect_log,
)
from services.base import Service, ServiceError, rpc
from bus import roles as access

STANDARD_LOGS = ("mainlog", "rejectlog", "bouncelog", "paniclog", "acctlog", "audit")
AUDIT_LOG = "audit"
WRITTEN_TOPIC = "jlog.written"
WRITTEN_EVERY_S = 0.1
MIB = 1024 * 1024

# Limits on one call: keep replies well below the bus frame limit (64 MiB).
MAX_RECORD_BYTES = 4 * MIB
MAX_WRITE_RECORDS = 200_000
MAX_WRITE_BYTES = 32 * MIB
MAX_READ_RECORDS = 100_000
MAX_READ_BYTES = 32 * MIB
# Group commit: merge pending write calls up to this size into one append_batch.
GROUP_RECORDS = 50_000
GROUP_BYTES = 16 * MIB


# -- pure helpers -------------------------------------------------------------------------

def log_names(cluster) -> list[str]:
    """Every log a node keeps: the standard ones, then ``[jlog].logs`` (no duplicates)."""
    out = list(STANDARD_LOGS)
    for name in cluster.section("jlog").get("logs", []):
        if name not in out:
            out.append(name)
    return out


def logagg_subscriber(manager: str) -> str:
    """The subscriber name manager ``manager``'s log aggregator reads as."""
    return f"logagg-{manager}"


def cidr_subscriber(manager: str) -> str:
    """The subscriber name manager ``manager``'s cidr_server reads the audit log as."""
    return f"cidr-{manager}"


def declared_subscribers(cluster, log: str) -> list[str]:
    """Subscribers declared on ``log`` at open: one aggregator per manager (+ cidr on audit)."""
    subs = [logagg_subscriber(m) for m in sorted(cluster.managers)]
    if log == AUDIT_LOG:
        subs += [cidr_subscriber(m) for m in sorted(cluster.managers)]
    return subs


def journal_settings(section: dict) -> dict:
    """Journal.open keyword arguments from the ``[jlog]`` section."""
    return {"fsync": section["fsync"],
            "segment_size": max(1, int(section["segment_mb"] * MIB)),
            "disk_budget": max(1, int(section["budget_mb"] * MIB)),
            "budget_policy": section["policy"]}


def check_records(records: Any) -> list[bytes]:
    """The payload list of a write call, or ServiceError("bad_records") saying what is wrong."""
    if not isinstance(records, list):
        raise ServiceError(f"records must be a list of bytes, got {type(records).__name__}", "bad_records")
    if len(records) > MAX_WRITE_RECORDS:
        raise ServiceError(f"too many records in one write ({len(records)} > {MAX_WRITE_RECORDS})", "bad_records")
    out: list[bytes] = []
    total = 0
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            rec = rec.encode("utf-8", "surrogateescape")
        elif not isinstance(rec, bytes):
            raise ServiceError(f"record {i} must be bytes or str, got {type(rec).__name__}", "bad_records")
        if len(rec) > MAX_RECORD_BYTES:
            raise ServiceError(f"record {i} is {len(rec)} bytes, more than {MAX_RECORD_BYTES}", "bad_records")
        total += len(rec)
        out.append(rec)
    if total > MAX_WRITE_BYTES:
        raise ServiceError(f"write of {total} bytes exceeds {MAX_WRITE_BYTES} per call", "bad_records")
    return out


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """An int argument in [low, high], else ServiceError("bad_arguments")."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ServiceError(f"{name} must be an integer, got {type(value).__name__}", "bad_arguments")
    if value < low or (high is not None and value > high):
        raise ServiceError(f"{name} must be between {low} and {high}, got {value}" if high is not None
                           else f"{name} must be at least {low}, got {value}", "bad_arguments")
    return value


def check_name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ServiceError(f"{what} must be a non-empty string, got {type(value).__name__}", "bad_arguments")
    return value


def group_requests(sizes: list[tuple[int, int]], max_records: int, max_bytes: int) -> int:
    """How many leading pending writes (records, bytes) to merge into one append (at least 1)."""
    n = recs = nbytes = 0
    for r, b in sizes:
        if n and (recs + r > max_records or nbytes + b > max_bytes):
            break
        n, recs, nbytes = n + 1, recs + r, nbytes + b
    return max(1, n)


def error_code(exc: JournalError) -> str:
    """The typed-error code for a journal exception."""
    if isinstance(exc, JournalFull):
        return "journal_full"
    if isinstance(exc, UnknownSubscriber):
        return "unknown_subscriber"
    if isinstance(exc, SubscriberStalled):
        return "subscriber_stalled"
    if isinstance(exc, CheckpointError):
        return "bad_checkpoint"
    return "journal_error"


def alarm_id(log: str, alarm: dict) -> tuple:
    """What makes an alarm "new": raised again after a clear gets a new ``since``."""
    return (log, alarm.get("kind"), alarm.get("subscriber"), alarm.get("since"))


# -- the service -----------------------------------------------------------------------------

class _Pending:
    __slots__ = ("records", "nbytes", "future")

    def __init__(self, records: list[bytes], future: asyncio.Future):
        self.records = records
        self.nbytes = sum(map(len, records))
        self.future = future


class JlogService(Service):
    """The node's journals and their bus endpoint (see the module docstring)."""

    name = "jlog"
    roles = ("node",)
    builtin = True
    tick_interval = 1.0

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        self.root = self.data_dir / "jlog"
        self.logs = log_names(cluster)
        self.journals: dict[str, Journal] = {}
        self.broken: dict[str, str] = {}          # log -> why it could not be opened
        self._queues: dict[str, list[_Pending]] = {}
        self._writers: dict[str, asyncio.Task] = {}
        self._written_last: dict[str, float] = {}   # log -> monotonic time of the last event
        self._written_timer: dict[str, asyncio.TimerHandle] = {}
        self._alarms_seen: set[tuple] = set()
        self._published_broken: set[str] = set()
        self._ready = asyncio.Event()           # set once every log was opened (or failed to)

    # -- lifecycle ------------------------------------------------------------------------
    async def handle_init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for log in self.logs:
            await self._open(log)
        self._ready.set()
        await self._check_alarms()

    async def handle_call(self, method: str, args: dict, env) -> Any:
        # Calls can arrive while handle_init still opens the logs: they wait for it.
        await self._ready.wait()
        return await super().handle_call(method, args, env)

    async def _open(self, log: str) -> None:
        settings = journal_settings(self.cluster.section("jlog"))
        subs = declared_subscribers(self.cluster, log)
        try:
            j = await self.offload(lambda: Journal.open(self.root, log, subs, **settings))
        except JournalError as e:
            self.broken[log] = str(e)
            self.log.error("log %s cannot be opened: %s", log, e)
            return
        self.broken.pop(log, None)
        self._published_broken.discard(log)
        self.journals[log] = j
        st = await self.offload(j.stats)
        if st["torn_bytes"]:
            self.log.warning("log %s: recovery cut %d torn bytes", log, st["torn_bytes"])

    async def handle_tick(self) -> None:
        for log in list(self.broken):       # e.g. still locked by a dying predecessor: retry
            await self._open(log)
        await self._check_alarms()

    async def handle_stop(self) -> None:
        for t in self._written_timer.values():
            t.cancel()
        for log, j in self.journals.items():
            try:
                await self.offload(j.close)
            except JournalError as e:
                self.log.error("closing log %s: %s", log, e)

    # -- helpers ----------------------------------------------------------------------------
    def journal(self, log: Any) -> Journal:
        check_name("log", log)
        j = self.journals.get(log)
        if j is not None:
            return j
        if log in self.broken:
            raise ServiceError(f"log {log!r} is unavailable on {self.member.name}: {self.broken[log]}",
                               "log_unavailable")
        raise ServiceError(f"unknown log {log!r} on {self.member.name} (logs: {', '.join(self.logs)})",
                           "unknown_log")

    async def _run(self, fn, *args):
        """Run a blocking journal call off the event loop; journal errors become typed errors."""
        try:
            return await self.offload(fn, *args)
        except JournalError as e:
            raise ServiceError(str(e), error_code(e)) from None

    async def _check_alarms(self) -> None:
        for log, why in list(self.broken.items()):
            if log not in self._published_broken:
                self._published_broken.add(log)
                await self.alarm("jlog.log_unavailable", f"log {log!r} on {self.member.name} cannot be opened: {why}",
                                 log=log)

        def collect() -> dict[str, list[dict]]:
            out = {}
            for log, j in list(self.journals.items()):
                try:
                    out[log] = j.alarms()
                except JournalError:
                    continue
            return out

        # off the loop: the journal lock may be held by a long read
        for log, alarms in (await self.offload(collect)).items():
            for a in alarms:
                key = alarm_id(log, a)
                if key in self._alarms_seen:
                    continue
                self._alarms_seen.add(key)
                who = f" (subscriber {a['subscriber']})" if a.get("subscriber") else ""
                await self.alarm(f"jlog.{a['kind']}", f"log {log!r} on {self.member.name}{who}: {a.get('message', '')}",
                                 log=log, subscriber=a.get("subscriber"), count=a.get("count"))

    def _note_written(self, log: str) -> None:
        """Publish jlog.written for ``log`` now, or at most 100 ms after the previous one."""
        if log in self._written_timer:
            return
        loop = asyncio.get_running_loop()
        wait = self._written_last.get(log, -1e9) + WRITTEN_EVERY_S - time.monotonic()
        self._written_timer[log] = loop.call_later(max(0.0, wait), self._fire_written, log)

    def _fire_written(self, log: str) -> None:
        self._written_timer.pop(log, None)
        self._written_last[log] = time.monotonic()
        j = self.journals.get(log)
        if j is not None:
            asyncio.get_running_loop().create_task(self.publish(WRITTEN_TOPIC, {"log": log, "last_seq": j.last_seq}))

    async def _writer(self, log: str, j: Journal) -> None:
        """Drain the log's pending writes: merged appends, one sync each (group commit)."""
        queue = self._queues[log]
        try:
            while queue:
                n = group_requests([(len(p.records), p.nbytes) for p in queue], GROUP_RECORDS, GROUP_BYTES)
                group, queue[:n] = queue[:n], []
                merged = group[0].records if n == 1 else [r for p in group for r in p.records]
                try:
                    last = await self.offload(j.append_batch, merged)
                except Exception as e:  # noqa: BLE001 - every caller of the group gets the error
                    err = ServiceError(str(e), error_code(e) if isinstance(e, JournalError) else "internal")
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(err)
                    if isinstance(e, JournalError):
                        await self._check_alarms()
                    continue
                # Seqs within one append_batch are consecutive: hand each caller its own last seq.
                end = last
                for p in reversed(group):
                    if not p.future.done():
                        p.future.set_result(end)
                    end -= len(p.records)
                self._note_written(log)
        finally:
            self._writers.pop(log, None)

    # -- RPC ----------------------------------------------------------------------------------
    @rpc(access.LOCAL_ONLY)
    async def rpc_write(self, log: str, records: list) -> dict:
        """Append ``records`` to ``log``; answers once they are durable per the fsync policy."""
        j = self.journal(log)
        payloads = check_records(records)
        if not payloads:
            return {"last_seq": j.last_seq}
        fut = asyncio.get_running_loop().create_future()
        self._queues.setdefault(log, []).append(_Pending(payloads, fut))
        if log not in self._writers:
            self._writers[log] = asyncio.get_running_loop().create_task(self._writer(log, j))
        return {"last_seq": await fut}

    @rpc(access.OPERATOR)
    async def rpc_read(self, log: str, subscriber: str, max_records: int = 5000, max_bytes: int = 4 << 20,
                       ack: int | None = None) -> dict:
        """Records after ``subscriber``'s checkpoint (at least once until it checkpoints).

        ``ack`` (optional): first checkpoint at that seq, exactly as ``checkpoint`` would,
        then read; a reader that loops saves one round trip per batch this way.
        """
        j = self.journal(log)
        check_name("subscriber", subscriber)
        max_records = check_int("max_records", max_records, 1, MAX_READ_RECORDS)
        max_bytes = check_int("max_bytes", max_bytes, 1, MAX_READ_BYTES)
        if ack is not None:
            check_int("ack", ack, 0)

        def ack_and_read():
            if ack is not None:
                j.checkpoint(subscriber, ack)
            return j.read(subscriber, max_records, max_bytes)

        batch = await self._run(ack_and_read)
        # (seq, payload) tuples travel as msgpack arrays: no per-record copy into lists
        return {"records": list(batch), "last_seq": j.last_seq,
                "dropped": batch.dropped}

    @rpc(access.OPERATOR)
    async def rpc_checkpoint(self, log: str, subscriber: str, seq: int) -> dict:
        """Acknowledge every record up to ``seq`` for ``subscriber``."""
        j = self.journal(log)
        check_name("subscriber", subscriber)
        check_int("seq", seq, 0)
        await self._run(j.checkpoint, subscriber, seq)
        return {"checkpoint": seq}

    @rpc(access.ANYONE)
    async def rpc_status(self) -> dict:
        """Every log: seqs, disk bytes, subscribers with checkpoint and lag, active alarms."""
        def collect() -> dict:
            logs: dict[str, Any] = {}
            for log in self.logs:
                j = self.journals.get(log)
                if j is None:
                    logs[log] = {"error": self.broken.get(log, "not open")}
                    continue
                try:
                    st = j.stats()
                    alarms = j.alarms()
                except JournalError as e:
                    logs[log] = {"error": str(e)}
                    continue
                logs[log] = {
                    "last_seq": st["last_seq"], "first_seq": st["first_seq"], "bytes": st["disk_bytes"],
                    "segments": st["segments"], "fsync": st["fsync"], "disk_budget": st["disk_budget"],
                    "budget_policy": st["budget_policy"],
                    "counters": {k: st[k] for k in ("full_rejections", "records_dropped", "segments_dropped",
                                                    "torn_bytes", "torn_bytes_total")},
                    "subscribers": {sub: {k: v[k] for k in ("checkpoint", "lag_records", "lag_bytes",
                                                             "stalled", "dropped")}
                                    for sub, v in st["subscribers"].items()},
                    "alarms": alarms,
                }
            return logs

        return {"node": self.member.name, "logs": await self.offload(collect)}

    @rpc(access.OPERATOR)
    async def rpc_inspect(self, log: str) -> dict:
        """Segments, seqs, subscribers, alarms, torn bytes and counters of ``log``."""
        self.journal(log)
        return await self._run(inspect_log, self.root, log)

    @rpc(access.ADMIN_ONLY)
    async def rpc_repair(self, log: str, force: bool = False) -> dict:
        """What recovery could not settle; with ``force`` fix it (see Journal.repair)."""
        j = self.journal(log)
        if not isinstance(force, bool):
            raise ServiceError("force must be true or false", "bad_arguments")
        out = await self._run(j.repair, force)
        await self._check_alarms()
        return out

    @rpc(access.OPERATOR)
    async def rpc_subscribers(self, log: str) -> dict:
        """The declared subscribers of ``log`` with checkpoint and lag."""
        j = self.journal(log)

        def collect() -> dict:
            out = {}
            for sub in j.subscribers():
                records, nbytes = j.lag(sub)
                out[sub] = {"checkpoint": j.get_checkpoint(sub), "lag_records": records, "lag_bytes": nbytes}
            return out

        return {"log": log, "subscribers": await self._run(collect)}

    @rpc(access.ADMIN_ONLY)
    async def rpc_remove_subscriber(self, log: str, subscriber: str) -> dict:
        """Forget a subscriber; a declared one (logagg-/cidr-<manager>) comes back at the next start."""
        j = self.journal(log)
        check_name("subscriber", subscriber)
        await self._run(j.remove_subscriber, subscriber)
        return {"log": log, "removed": subscriber,
                "redeclared_at_restart": subscriber in declared_subscribers(self.cluster, log)}
