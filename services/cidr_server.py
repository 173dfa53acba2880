"""cidr_server: on every manager, the audit windows of all nodes, stored and queried.

For each node a pull loop reads the node's ``audit`` journal through this manager's
own subscriber ``cidr-<manager>`` (``jlog.read``), decodes the windows
(:func:`node.audit.decode_window`; a bad record is counted and skipped), adds them to
the :class:`manager.cidr.store.CidrStore` at ``<data_dir>/cidr/`` and only then moves
the checkpoint (``jlog.checkpoint``). The store counts each (node, series, window
start) once, so what a crash makes the loop read again is never counted twice, and
nothing is checkpointed before it is on disk, so nothing is lost.

A loop (:mod:`services.pulling`) wakes on the node's ``jlog.written`` events, re-polls
when idle, and backs off while the node does not answer (:data:`PULL_POLICY`); one node
down never holds up the others.

RPC::

    cidr_server.query(text)  -> {"ok": true, "rows": ["10.0.0.0/24 : 12,3", ...], "result": {...}}
                                 (a malformed query: error code "bad_query", the parser's one line)
    cidr_server.status()

Store work (ingest, queries, hourly condensation and retention) runs on one thread of
its own, in order, off the event loop.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus.client import BusError
from manager.cidr.query import QueryError, parse_query
from manager.cidr.store import CidrStore, CidrStoreError, format_rows, result_to_dict
from node.audit import AuditDecodeError, Window, decode_window
from services.base import Service, ServiceError, rpc
from bus import roles as access
from services.pulling import PullPolicy, run_pull_loop

JOURNAL_LOG = "audit"
WRITTEN_TOPIC = "jlog.written"
CHECKPOINT_TIMEOUT = 5.0
#: a node's loop (services.pulling): re-poll an idle node every 5 s even without a
#: jlog.written event; back off from 0.5 s up to 10 s while it does not answer
PULL_POLICY = PullPolicy(idle_wait=5.0, backoff_min=0.5, backoff_max=10.0, read_timeout=5.0)
MAINTAIN_EVERY = 3600.0
#: a query answering more rows than this is refused (ask for a limit or a threshold)
MAX_ROWS = 200_000


def subscriber_name(manager: str) -> str:
    """The jlog subscriber a manager's cidr_server reads every node's audit log with. Pure."""
    return f"cidr-{manager}"


def decode_records(records: Any) -> tuple[list[Window], int, int | None]:
    """Decode a ``jlog.read`` batch ``[[seq, payload], ...]``. Pure.

    Returns (windows, bad, last_seq): the windows of the good records, how many
    records were not audit windows (skipped), and the highest seq seen (None: none).
    """
    windows: list[Window] = []
    bad = 0
    last: int | None = None
    if not isinstance(records, list):
        return windows, 1, None
    for item in records:
        if not isinstance(item, (list, tuple)) or len(item) != 2 or item[0].__class__ is not int:
            bad += 1
            continue
        seq, payload = item
        last = seq if last is None else max(last, seq)
        try:
            windows.append(decode_window(payload))
        except AuditDecodeError:
            bad += 1
    return windows, bad, last


@dataclass
class NodeFeed:
    """What the pull loop of one node knows (reported by ``status``)."""

    node: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    up: bool | None = None
    checkpoint: int = 0
    last_seq: int = 0
    records: int = 0
    windows_new: int = 0
    windows_repeated: int = 0
    bad_records: int = 0
    dropped: int = 0
    errors: int = 0
    last_error: str | None = None
    last_pull_at: float | None = None

    def report(self) -> dict:
        return {"up": self.up, "checkpoint": self.checkpoint, "last_seq": self.last_seq,
                "lag": max(0, self.last_seq - self.checkpoint), "records": self.records,
                "windows_new": self.windows_new, "windows_repeated": self.windows_repeated,
                "bad_records": self.bad_records, "dropped": self.dropped, "errors": self.errors,
                "last_error": self.last_error, "last_pull_at": self.last_pull_at}


class CidrServerService(Service):
    """Consumes every node's audit journal into a CIDR store; answers queries."""

    name = "cidr_server"
    roles = ("manager",)
    builtin = True
    subscriptions = (WRITTEN_TOPIC,)
    tick_interval = 30.0

    def __init__(self, cluster, member: str):
        super().__init__(cluster, member)
        self.retention_days = cluster.section("cidr_server")["retention_days"]
        self.store_path = Path(self.data_dir) / "cidr"
        self.subscriber = subscriber_name(self.member.name)
        self.store: CidrStore | None = None
        self.feeds = {name: NodeFeed(name) for name in cluster.nodes}
        self.tasks: list[asyncio.Task] = []
        # one thread: LMDB writes, queries and maintenance in order, never on the event loop
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cidr-store")
        self.last_maintain: float | None = None
        self.maintain_result: tuple[int, int] | None = None
        self.queries = 0
        self.bad_queries = 0

    async def _in_store(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- lifecycle ----------------------------------------------------------------
    async def handle_init(self) -> None:
        self.store = await self._in_store(lambda: CidrStore(self.store_path, retention_days=self.retention_days))
        await self._maintain()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._pull_loop(feed)) for feed in self.feeds.values()]

    async def handle_tick(self) -> None:
        if self.last_maintain is None or time.time() - self.last_maintain >= MAINTAIN_EVERY:
            await self._maintain()

    async def handle_event(self, topic: str, body: Any, env) -> None:
        if topic != WRITTEN_TOPIC or not isinstance(body, dict) or body.get("log") != JOURNAL_LOG:
            return
        feed = self.feeds.get(env.src)
        if feed is not None:
            seq = body.get("last_seq")
            if seq.__class__ is int and seq > feed.last_seq:
                feed.last_seq = seq
            feed.wake.set()

    async def handle_stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.store is not None:
            await self._in_store(self.store.close)
        self.executor.shutdown(wait=True)

    # -- RPC ------------------------------------------------------------------------
    @rpc(access.OPERATOR)
    async def rpc_query(self, text: str) -> dict:
        """Answer one query: its text rows (Momentum's form) and the JSON form."""
        self.queries += 1
        try:
            query = parse_query(text)
        except QueryError as e:
            self.bad_queries += 1
            raise ServiceError(str(e), "bad_query") from None
        if self.store is None:
            raise ServiceError("the CIDR store is not open yet", "not_ready")

        def run() -> dict:
            result = self.store.execute(query)
            rows = getattr(result, "rows", None)
            if rows is not None and len(rows) > MAX_ROWS:
                raise ServiceError(f"the answer has {len(rows)} rows (at most {MAX_ROWS}): "
                                   "add a limit or a threshold", "too_large")
            return {"ok": True, "rows": format_rows(result), "result": result_to_dict(result)}

        try:
            return await self._in_store(run)
        except CidrStoreError as e:
            raise ServiceError(f"cidr store: {e}", "store_error") from None

    @rpc(access.ANYONE)
    async def rpc_status(self) -> dict:
        """Per-node consumption, the store and maintenance."""
        series = await self._in_store(self.store.series_names) if self.store is not None else []
        return {"member": self.member.name, "subscriber": self.subscriber, "store": str(self.store_path),
                "retention_days": self.retention_days, "series": series,
                "last_maintain": self.last_maintain, "last_maintain_result": self.maintain_result,
                "queries": self.queries, "bad_queries": self.bad_queries,
                "nodes": {name: feed.report() for name, feed in self.feeds.items()}}

    # -- consuming --------------------------------------------------------------------
    async def _pull_loop(self, feed: NodeFeed) -> None:
        async def pull(read_timeout: float) -> int:
            got = await self._pull_once(feed, read_timeout)
            feed.up = True
            return got

        async def failed(e: BaseException, expected: bool, previous_backoff: float) -> None:
            if not expected:
                self.log.exception("pulling the audit journal of %s failed", feed.node)
                feed.last_error = f"{type(e).__name__}: {e}"
            else:
                if feed.up is not False or previous_backoff >= PULL_POLICY.backoff_max:
                    self.log.warning("audit journal of %s: %s", feed.node, e)
                feed.up = False
                feed.last_error = str(e)
            feed.errors += 1

        await run_pull_loop(feed.wake, pull, failed, PULL_POLICY, expected=(BusError,))

    async def _pull_once(self, feed: NodeFeed, read_timeout: float) -> int:
        """Read one batch, store it, checkpoint it; returns the number of records read."""
        rep = await self.call(feed.node, "jlog", "read", timeout=read_timeout,
                              log=JOURNAL_LOG, subscriber=self.subscriber)
        feed.last_pull_at = time.time()
        if not isinstance(rep, dict):
            raise ServiceError(f"jlog.read on {feed.node} answered {type(rep).__name__}, not a map")
        last_seq = rep.get("last_seq")
        if last_seq.__class__ is int:
            feed.last_seq = max(feed.last_seq, last_seq)
        dropped = rep.get("dropped") or 0
        if dropped.__class__ is int and dropped > feed.dropped:
            await self.alarm("audit_records_dropped",
                             f"{dropped} audit record(s) of {feed.node} were dropped before {self.subscriber} "
                             "read them (journal disk budget)", node=feed.node, dropped=dropped)
            feed.dropped = dropped
        records = rep.get("records") or []
        windows, bad, seq = decode_records(records)
        if bad:
            self.log.warning("%s: skipped %d record(s) that are not audit windows", feed.node, bad)
            feed.bad_records += bad
        if seq is None:
            return 0
        new, repeated, refused = await self._in_store(self._store_windows, feed.node, windows)
        feed.bad_records += refused
        feed.windows_new += new
        feed.windows_repeated += repeated
        feed.records += len(records)
        await self.call(feed.node, "jlog", "checkpoint", timeout=CHECKPOINT_TIMEOUT,
                        log=JOURNAL_LOG, subscriber=self.subscriber, seq=seq)
        feed.checkpoint = seq
        return len(records)

    def _store_windows(self, node: str, windows: list[Window]) -> tuple[int, int, int]:
        """(new, repeated or expired, refused) after adding ``windows`` (store thread)."""
        if not windows:
            return 0, 0, 0
        try:
            new = self.store.add_windows(node, windows)
            return new, len(windows) - new, 0
        except CidrStoreError as e:
            self.log.warning("%s: a batch was refused (%s); adding its windows one by one", node, e)
        new = refused = 0
        for w in windows:
            try:
                new += self.store.add_window(node, w)
            except CidrStoreError as e:
                refused += 1
                self.log.warning("%s: skipped window %s@%s: %s", node, w.series, w.start, e)
        return new, len(windows) - new - refused, refused

    async def _maintain(self) -> None:
        now = time.time()
        try:
            self.maintain_result = await self._in_store(self.store.maintain, now)
        except CidrStoreError as e:
            self.log.error("maintenance failed: %s", e)
            return
        self.last_maintain = now
        condensed, dropped = self.maintain_result
        if condensed or dropped:
            self.log.info("maintenance: %d day(s) condensed, %d record(s) past retention dropped", condensed, dropped)
