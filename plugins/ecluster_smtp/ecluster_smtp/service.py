"""smtp: an SMTP receiver (aiosmtpd) that listens only on the injection VIPs its node holds.

The example plug-in (docs/PLUGINS.md walks through it). Registered by this package's
``pyproject.toml``::

    [project.entry-points."ecluster.services"]
    smtp = "ecluster_smtp.service:SmtpService"

and configured, on the nodes where it should run, by a ``[services.smtp]`` table::

    [services.smtp]
    port = 25                    # on every injection VIP
    hostname = ""                # in the greeting and Received lines (default: the host name)
    max_message_size = 10485760  # bytes; bigger messages are refused (552)
    max_recipients = 100         # per message (452 past it)
    domains = []                 # recipient domains accepted; empty: any
    spool = "spool"              # <data_dir>/<spool>/, locked by this service
    log = "smtplog"              # its own journal log: list it in [jlog].logs too

How it behaves:

* **Listeners follow the VIPs.** The node's vip service publishes ``vip.status`` with the
  VIPs it holds every probe interval. For each held VIP of kind ``injection`` a listener
  is started on (VIP, port); when the VIP is no longer held it is closed and its sessions
  are ended (a session busy with a message first gets its answer). If ``vip.status``
  stays silent longer than the kernel keeps an unrefreshed VIP, every listener closes.
  A VIP address that does not exist on this host (VIP dry-run) cannot be bound: it is
  retried at the next status, so under dry-run the service listens exactly where the
  address is local (e.g. 127.0.0.100 on lo).
* **250 only when durable.** After DATA the message is written to the spool's ``tmp/``
  and fsynced, then a reception record goes to the node's ``mainlog`` journal
  (``jlog.write`` answers once durable), then the file is renamed into the spool and the
  directory fsynced. Only then is the client answered ``250``. So every message in a
  spool has its reception record, even after a kill -9 at any point. If the journal
  write fails the staged file is dropped and the client gets ``451`` (it retries,
  possibly on another node after a failover). A write that timed out may still land, and
  a commit can fail after it: then a ``withdrawn`` record for the message id follows in
  the mainlog (sent in the background until the journal takes it), so no reader takes
  the reception record for a message that was accepted.
* **Audit.** Every connection counts one ``connections`` event for the client address in
  as_logger; every refused recipient or message one ``rejects`` event. Session events go
  to the plug-in's own log. Both are sent in batches in the background; an audit batch
  carries a stable id and is resent unchanged after a timeout, so it counts once
  (:mod:`ecluster_smtp.audit`).

RPC ``status()`` (listeners, counters, spool) and ``metrics()`` (Prometheus families,
collected by the metrics service).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from bus.client import BusError, CallTimeout, RemoteError
from ecluster.clusterfile import NAME_RE, ClusterFileError
from node.vipcore import vip_key
from services.base import Service, stale_after, rpc
from bus import roles as access
from services.jlog import log_names

from ecluster_smtp.audit import AuditOutbox
from ecluster_smtp.records import reception_record, session_record, withdrawal_record
from ecluster_smtp.spool import Spool, new_message_id, spool_bytes

MAINLOG = "mainlog"
#: how long a jlog.write of a reception record may take before the client gets 451
JOURNAL_TIMEOUT = 5.0
#: background batches (audit events, session records) go out this often
FLUSH_EVERY = 0.25
#: how long a background batch may take. A batch that times out is sent again under the same
#: id (ecluster_smtp.audit), so an as_logger that counted it already drops the replay; the
#: timeout stays long because after a crash of as_logger (the only way a local call takes
#: 10 s) its ledger of ids is gone, and then the open window that held the batch should be
#: gone too, which makes counting the resent batch right (docs/CIDR.md).
FLUSH_TIMEOUT = 10.0
#: bounds of what waits for as_logger / the journal while they do not answer
MAX_PENDING_AUDIT = 100_000
MAX_PENDING_RECORDS = 50_000
SESSION_TIMEOUT = 120.0
#: a withdrawal record is tried this many times, a second apart after each failure
WITHDRAW_ATTEMPTS = 60
_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class SmtpConfigError(ClusterFileError):
    """A ``[services.smtp]`` table that cannot be used; one line naming the key."""


@dataclass(frozen=True)
class Settings:
    """The checked ``[services.smtp]`` table."""

    port: int
    hostname: str
    max_message_size: int
    max_recipients: int
    domains: frozenset[str]
    spool: str
    log: str


CONFIG_SCHEMA: dict[str, tuple] = {
    "port": (int, 25),
    "hostname": (str, ""),
    "max_message_size": (int, 10 << 20),
    "max_recipients": (int, 100),
    "domains": (list, []),
    "spool": (str, "spool"),
    "log": (str, "smtplog"),
}


def check_settings(table: dict[str, Any], journal_logs: list[str], where: str = "services.smtp") -> Settings:
    """Check the table's values (types were checked by the cluster-file parser). Pure."""
    t = {k: table.get(k, default) for k, (_, default) in CONFIG_SCHEMA.items()}
    if not 1 <= t["port"] <= 65535:
        raise SmtpConfigError(f"'{where}.port' {t['port']} out of range 1-65535")
    if t["max_message_size"] < 1024:
        raise SmtpConfigError(f"'{where}.max_message_size' must be at least 1024 bytes")
    if t["max_recipients"] < 1:
        raise SmtpConfigError(f"'{where}.max_recipients' must be at least 1")
    domains = []
    for d in t["domains"]:
        if not isinstance(d, str) or not _DOMAIN_RE.match(d.lower()):
            raise SmtpConfigError(f"'{where}.domains' entries must be domain names, got {d!r:.60}")
        domains.append(d.lower())
    spool = t["spool"]
    if not spool or "/" in spool or spool in (".", "..") or spool.startswith("."):
        raise SmtpConfigError(f"'{where}.spool' must be one directory name under the data directory, "
                              f"got {spool!r}")
    if not NAME_RE.match(t["log"]):
        raise SmtpConfigError(f"'{where}.log' must be a log name matching {NAME_RE.pattern}")
    if t["log"] not in journal_logs:
        raise SmtpConfigError(f"'{where}.log' is {t['log']!r}, which is not a journal log: "
                              f"add it to [jlog].logs")
    hostname = t["hostname"] or socket.gethostname()
    return Settings(t["port"], hostname, t["max_message_size"], t["max_recipients"], frozenset(domains),
                    spool, t["log"])


def wanted_listeners(held: Any, injection: set[str]) -> set[str]:
    """The VIPs to listen on: those held here that are injection VIPs. Pure."""
    if not isinstance(held, list):
        return set()
    out = set()
    for v in held:
        if isinstance(v, str):
            try:
                key = vip_key(v)
            except Exception:  # noqa: BLE001 - a malformed entry is not a VIP we know
                continue
            if key in injection:
                out.add(key)
    return out


def listener_changes(current: set[str], wanted: set[str]) -> tuple[list[str], list[str]]:
    """(to start, to stop), each sorted. Pure."""
    return sorted(wanted - current), sorted(current - wanted)


def recipient_refusal(address: str, domains: frozenset[str], count: int, max_recipients: int) -> str | None:
    """The SMTP reply refusing one more recipient, or None to accept it. Pure."""
    if count >= max_recipients:
        return "452 4.5.3 Too many recipients"
    if domains:
        domain = address.rpartition("@")[2].lower().rstrip(".")
        if domain not in domains:
            return f"550 5.7.1 <{address}>: relay access denied (domain not accepted here)"
    return None


def client_address(peer: Any) -> str | None:
    """The client's IP from a transport's peername, without an IPv6 zone. Pure."""
    if not isinstance(peer, (tuple, list)) or not peer or not isinstance(peer[0], str):
        return None
    return peer[0].split("%", 1)[0]


def refused_for_good(e: Exception) -> bool:
    """Whether a failed call will fail the same way when retried (bad input, unknown log). Pure."""
    return isinstance(e, RemoteError) and e.code in ("bad_event", "bad_batch", "bad_records", "bad_arguments",
                                                     "unknown_log")


# -- the SMTP side ------------------------------------------------------------------------

class Receiver:
    """aiosmtpd handler: refuses recipients by policy, makes accepted messages durable."""

    def __init__(self, service: "SmtpService"):
        self.service = service

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        refusal = recipient_refusal(address, self.service.settings.domains, len(envelope.rcpt_tos),
                                    self.service.settings.max_recipients)
        if refusal is not None:
            self.service.note_reject(server, "rcpt", refusal, rcpt=address)
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        return await self.service.receive(server, session, envelope)


class Session(SMTP):
    """One client connection on one VIP (aiosmtpd's protocol, with our bookkeeping)."""

    def __init__(self, service: "SmtpService", vip: str, **kw):
        super().__init__(service.receiver, **kw)
        self.service = service
        self.vip = vip
        self.busy = False           # making a message durable: answer before closing
        self.closing = False        # the VIP went away: close after the current answer

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.service.session_opened(self)

    def connection_lost(self, exc) -> None:
        self.service.session_closed(self)
        super().connection_lost(exc)

    async def push(self, status) -> None:
        await super().push(status)
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else str(status)
        if text.startswith("552"):             # size refused by aiosmtpd itself
            self.service.note_reject(self, "size", text)

    def end(self) -> None:
        """Close now, or right after the answer being prepared."""
        if self.transport is None:
            return
        if self.busy:
            self.closing = True
        else:
            self.transport.close()


# -- the service --------------------------------------------------------------------------

class SmtpService(Service):
    """Receives mail on the injection VIPs this node holds (see the module docstring)."""

    name = "smtp"
    roles = ("node",)
    builtin = False
    subscriptions = ("vip.status",)
    tick_interval = FLUSH_EVERY
    config_schema = CONFIG_SCHEMA

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        self.settings = check_settings(self.config, log_names(cluster))
        self.injection = {vip_key(v.address) for v in cluster.vips if v.kind == "injection"}
        self.spool = Spool(Path(self.data_dir) / self.settings.spool, f"smtp service of {self.member.name}")
        self.receiver = Receiver(self)
        self.listeners: dict[str, asyncio.base_events.Server] = {}
        self.sessions: set[Session] = set()
        self.held: list[str] = []
        self.last_status = 0.0                 # monotonic time of our node's last vip.status
        self.stale_after = stale_after(cluster.timing)
        self.dry_run = False
        self._apply_lock = asyncio.Lock()
        self._bind_noted: dict[str, int] = {}  # vip -> errno last logged (log a failure once)
        self.audit = AuditOutbox(self.member.name, MAX_PENDING_AUDIT)
        self.pending_records: list[bytes] = []
        self._flush_task: asyncio.Task | None = None   # the background flush (a reference keeps it alive)
        self.counters = {"connections": 0, "accepted": 0, "rejected": 0, "temp_failures": 0,
                         "bytes_accepted": 0, "listener_starts": 0, "listener_stops": 0,
                         "audit_dropped": 0, "audit_resent": 0, "records_dropped": 0, "withdrawn": 0}
        self.spooled = 0
        self._withdrawals: set[asyncio.Task] = set()

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self) -> None:
        # The spool lock comes before the bus: a second process must refuse before it
        # registers as this member's smtp service and takes the calls meant for the first.
        removed = self.spool.open()                   # LockedError: another process has it
        if removed:
            self.log.warning("removed %d unfinished spool file(s) left by a crash", removed)
        try:
            await super().run()
        finally:
            self.spool.close()

    async def handle_init(self) -> None:
        logging.getLogger("mail.log").setLevel(logging.WARNING)   # aiosmtpd logs every peer at INFO
        self.spooled = len(await self.offload(self.spool.ids))
        self.log.info("spool %s (%d messages), port %d, injection VIPs %s", self.spool.directory,
                      self.spooled, self.settings.port, ", ".join(sorted(self.injection)) or "none")
        try:   # do not wait a probe interval for the first status
            st = await self.call(self.member.name, "vip", "status", timeout=1.0)
            if isinstance(st, dict):
                await self._follow(st.get("held"), bool(st.get("dry_run")))
        except BusError:
            pass

    async def handle_stop(self) -> None:
        for vip in list(self.listeners):
            self._stop_listener(vip)
        if self._flush_task is not None and not self._flush_task.done():
            await asyncio.wait([self._flush_task], timeout=1.0)     # its batch is not in pending
        await self._flush(timeout=1.0)

    async def handle_event(self, topic: str, body: Any, env) -> None:
        if topic == "vip.status" and env.src == self.member.name and isinstance(body, dict):
            await self._follow(body.get("held"), bool(body.get("dry_run")))

    async def handle_tick(self) -> None:
        if self.listeners and time.monotonic() - self.last_status > self.stale_after:
            self.log.warning("no vip.status for %.1f s: closing every listener", self.stale_after)
            for vip in list(self.listeners):
                self._stop_listener(vip)
        if (self._flush_task is None or self._flush_task.done()) and (self.audit.waiting() or self.pending_records):
            self._flush_task = asyncio.get_running_loop().create_task(self._flush(timeout=FLUSH_TIMEOUT))

    # -- listeners ------------------------------------------------------------------------
    async def _follow(self, held: Any, dry_run: bool) -> None:
        self.last_status = time.monotonic()
        self.held = list(held) if isinstance(held, list) else []
        self.dry_run = dry_run
        async with self._apply_lock:
            start, stop = listener_changes(set(self.listeners), wanted_listeners(held, self.injection))
            for vip in stop:
                self._stop_listener(vip)
            for vip in start:
                await self._start_listener(vip)

    async def _start_listener(self, vip: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: self._session(vip), host=vip, port=self.settings.port,
                                              reuse_address=True)
        except OSError as e:
            # EADDRNOTAVAIL: the address is not here (dry-run); EADDRINUSE: the previous
            # holder on this host has not closed yet. Both: try again at the next status.
            if self._bind_noted.get(vip) != e.errno:
                self._bind_noted[vip] = e.errno
                level = logging.INFO if e.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE) else logging.ERROR
                self.log.log(level, "cannot listen on %s:%d yet: %s", vip, self.settings.port, e.strerror)
                if level == logging.ERROR:
                    await self.alarm("smtp.listen_failed", f"smtp on {self.member.name} cannot listen on "
                                     f"{vip}:{self.settings.port}: {e.strerror}", vip=vip)
            return
        self._bind_noted.pop(vip, None)
        self.listeners[vip] = server
        self.counters["listener_starts"] += 1
        self.log.info("listening on %s:%d", vip, self.settings.port)

    def _stop_listener(self, vip: str) -> None:
        server = self.listeners.pop(vip, None)
        if server is None:
            return
        server.close()
        for s in [s for s in self.sessions if s.vip == vip]:
            s.end()
        self.counters["listener_stops"] += 1
        self.log.info("stopped listening on %s:%d", vip, self.settings.port)

    def _session(self, vip: str) -> Session:
        return Session(self, vip, hostname=self.settings.hostname, data_size_limit=self.settings.max_message_size,
                       timeout=SESSION_TIMEOUT, loop=asyncio.get_running_loop(), ident="ecluster-smtp")

    # -- session events -------------------------------------------------------------------
    def session_opened(self, s: Session) -> None:
        self.sessions.add(s)
        self.counters["connections"] += 1
        peer = client_address(s.session.peer)
        if peer:
            self._audit("connections", peer)
        self._record("connect", vip=s.vip, peer=peer)
        if s.vip not in self.listeners:    # accepted just as the VIP went away
            s.end()

    def session_closed(self, s: Session) -> None:
        if s in self.sessions:
            self.sessions.discard(s)
            self._record("disconnect", vip=s.vip, peer=client_address(s.session.peer))

    def note_reject(self, s: Session, stage: str, reply: str, **fields) -> None:
        self.counters["rejected"] += 1
        peer = client_address(s.session.peer) if s.session else None
        if peer:
            self._audit("rejects", peer)
        self._record("reject", vip=s.vip, peer=peer, stage=stage, reply=reply[:200], **fields)

    def _audit(self, series: str, address: str) -> None:
        if not self.audit.add(series, address):
            self.counters["audit_dropped"] += 1

    def _record(self, event: str, **fields) -> None:
        if len(self.pending_records) >= MAX_PENDING_RECORDS:
            self.counters["records_dropped"] += 1
            return
        self.pending_records.append(session_record(event, node=self.member.name, at=time.time(), **fields))

    async def _flush(self, timeout: float) -> None:
        """Send the pending audit events and session records; kept for the next tick when
        the receiver is not there, dropped (counted) when it refuses them for good."""
        call = self.audit.next_call()
        if call is not None:
            events, batch_id = call
            try:
                await self.call(None, "as_logger", "add_batch", timeout=timeout, events=events, batch=batch_id)
            except BusError as e:
                if refused_for_good(e):
                    dropped = self.audit.refused(batch_id[1])
                    self.counters["audit_dropped"] += dropped
                    self.log.error("as_logger refused %d audit events: %s", dropped, e)
                else:
                    self.counters["audit_resent"] += 1      # the same batch, same id, next tick
            else:
                self.audit.answered(batch_id[1])
        if self.pending_records:
            records, self.pending_records = self.pending_records, []
            try:
                await self.call(None, "jlog", "write", timeout=timeout, log=self.settings.log, records=records)
            except BusError as e:
                if refused_for_good(e):
                    self.counters["records_dropped"] += len(records)
                    self.log.error("the journal refused %d session records: %s", len(records), e)
                else:
                    self.pending_records[:0] = records

    # -- a message ----------------------------------------------------------------------------
    async def receive(self, s: Session, session, envelope) -> str:
        """Spool, journal, then 250 (see the module docstring); 451 if either fails."""
        s.busy = True
        try:
            return await self._receive(s, session, envelope)
        finally:
            s.busy = False
            if s.closing and s.transport is not None:
                # the answer is written right after we return; close() sends it first
                asyncio.get_running_loop().call_soon(s.transport.close)

    async def _receive(self, s: Session, session, envelope) -> str:
        now = time.time()
        msg_id = new_message_id(self.member.name)
        peer = client_address(session.peer) or "unknown"
        message = envelope.original_content or b""
        data = spool_bytes(msg_id, envelope.mail_from or "", envelope.rcpt_tos, peer, session.host_name or "",
                           s.vip, self.settings.hostname, message, now)
        # staged (durable in tmp/), journalled, then committed: a crash at any point leaves
        # either nothing in the spool or a message whose reception record is journalled, and
        # the window in which a committed message's 250 can still be lost is one rename
        try:
            await self.offload(self.spool.stage, msg_id, data)
        except OSError as e:
            self.log.error("cannot spool a message: %s", e)
            self.counters["temp_failures"] += 1
            self.note_reject(s, "data", "451 spool write failed")
            return "451 4.3.0 Cannot store the message now; try again later"
        record = reception_record(msg_id=msg_id, node=self.member.name, vip=s.vip, port=self.settings.port,
                                  peer=peer, helo=session.host_name or "", mail_from=envelope.mail_from or "",
                                  rcpts=envelope.rcpt_tos, size=len(message),
                                  spool=str(self.spool.path(msg_id).relative_to(self.data_dir)), at=now)
        try:
            await self.call(None, "jlog", "write", timeout=JOURNAL_TIMEOUT, log=MAINLOG, records=[record])
        except BusError as e:
            # not durable as a whole: drop the staged file so a retry is not a duplicate
            self.log.error("reception record of %s not journalled (%s): dropping it", msg_id, e)
            await self._discard(msg_id)
            if isinstance(e, CallTimeout):       # it may still land: void it
                self._withdraw_soon(msg_id, "journal write timed out")
            self.counters["temp_failures"] += 1
            self.note_reject(s, "data", "451 journal write failed")
            return "451 4.3.0 Cannot journal the message now; try again later"
        try:
            await self.offload(self.spool.commit, msg_id)
        except OSError as e:
            # journalled but not spooled: the record names a file that does not exist; the
            # client retries, so nothing is lost
            self.log.error("cannot commit %s to the spool after journalling it: %s", msg_id, e)
            await self._discard(msg_id)
            self._withdraw_soon(msg_id, "spool commit failed")
            self.counters["temp_failures"] += 1
            self.note_reject(s, "data", "451 spool commit failed")
            return "451 4.3.0 Cannot store the message now; try again later"
        self.counters["accepted"] += 1
        self.counters["bytes_accepted"] += len(message)
        self.spooled += 1
        self._record("accept", vip=s.vip, peer=peer, id=msg_id, size=len(message), rcpts=len(envelope.rcpt_tos))
        return f"250 2.0.0 OK queued as {msg_id}"

    def _withdraw_soon(self, msg_id: str, reason: str) -> None:
        """Journal, in the background, that the reception record of ``msg_id`` is void."""
        task = asyncio.get_running_loop().create_task(self._withdraw(msg_id, reason))
        self._withdrawals.add(task)                   # strong ref: the loop keeps weak ones
        task.add_done_callback(self._withdrawals.discard)

    async def _withdraw(self, msg_id: str, reason: str) -> None:
        record = withdrawal_record(msg_id=msg_id, node=self.member.name, reason=reason, at=time.time())
        last: Exception | None = None
        for _ in range(WITHDRAW_ATTEMPTS):
            try:
                # queued behind the reception write if that one is still on its way
                await self.call(None, "jlog", "write", timeout=JOURNAL_TIMEOUT, log=MAINLOG, records=[record])
                self.counters["withdrawn"] += 1
                return
            except BusError as e:
                last = e
                await asyncio.sleep(1.0)
        self.log.error("withdrawal of %s not journalled after %d attempts: %s", msg_id, WITHDRAW_ATTEMPTS, last)

    async def _discard(self, msg_id: str) -> None:
        try:
            await self.offload(self.spool.discard, msg_id)
        except OSError as e:
            self.log.error("cannot drop the staged %s: %s", msg_id, e)

    # -- RPC ----------------------------------------------------------------------------------
    @rpc(access.ANYONE)
    def rpc_status(self) -> dict:
        """Listeners, VIPs held, counters, the spool."""
        return {"member": self.member.name, "port": self.settings.port, "hostname": self.settings.hostname,
                "listening": sorted(self.listeners), "held": self.held, "injection": sorted(self.injection),
                "dry_run": self.dry_run, "sessions": len(self.sessions), "spool": str(self.spool.directory),
                "spooled": self.spooled, "log": self.settings.log, "counters": dict(self.counters),
                "pending_audit": self.audit.waiting(), "pending_records": len(self.pending_records)}

    @rpc(access.ANYONE)
    def rpc_metrics(self) -> list[dict]:
        """Prometheus families for the metrics service (see services/metrics.py)."""
        c = self.counters
        member = {"member": self.member.name}

        def fam(name, kind, text, samples):
            return {"name": name, "type": kind, "help": text, "samples": samples}

        return [
            fam("ecluster_smtp_listening", "gauge", "1 for each VIP the SMTP plug-in listens on",
                [[{**member, "vip": v}, 1] for v in sorted(self.listeners)]),
            fam("ecluster_smtp_sessions", "gauge", "Open SMTP sessions", [[member, len(self.sessions)]]),
            fam("ecluster_smtp_connections_total", "counter", "SMTP connections accepted",
                [[member, c["connections"]]]),
            fam("ecluster_smtp_messages_accepted_total", "counter", "Messages answered 250 (spooled and journalled)",
                [[member, c["accepted"]]]),
            fam("ecluster_smtp_rejects_total", "counter", "Recipients or messages refused",
                [[member, c["rejected"]]]),
            fam("ecluster_smtp_spooled_messages", "gauge", "Messages in the spool", [[member, self.spooled]]),
        ]
