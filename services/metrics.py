"""metrics: a Prometheus text endpoint on every member, ``http://<address>:<metrics_port>/metrics``.

Each scrape asks the member's own services over the bus (in parallel, a short timeout
each) and renders what they answer in the Prometheus text exposition format (0.0.4):

======================  ==========================================================
service (where)         families
======================  ==========================================================
membership (all)        ``ecluster_membership_view_number``, ``..._members{state}``
                        (alive / suspect / dead), ``..._peer_up{peer,role}``
election (all)          ``ecluster_election_term``, ``..._is_coordinator``
vip (nodes)             ``ecluster_vip_held{vip}``, ``..._state{vip,state}``,
                        ``..._lease_remaining_seconds{vip}``, ``..._events_total{event}``,
                        ``..._dry_run``
jlog (nodes)            ``ecluster_jlog_last_seq{log}``, ``..._first_seq``, ``..._bytes``,
                        ``..._alarms``, ``..._subscriber_lag_records{log,subscriber}``,
                        ``..._subscriber_lag_bytes``, ``..._subscriber_checkpoint``,
                        ``..._full_rejections_total``, ``..._records_dropped_total``
configsync (all)        ``ecluster_config_state{state}``, ``..._in_sync``, ``..._height``,
                        ``..._applied_timestamp_seconds``, ``..._applied_age_seconds``
health (nodes)          ``ecluster_check_healthy{check,kind}`` (1 healthy, 0 unhealthy,
                        -1 no result yet), ``ecluster_check_probes_total``,
                        ``ecluster_check_failures_total``, ``ecluster_check_probe_seconds``
plug-ins (where run)    whatever their ``metrics()`` RPC returns (see docs/PLUGINS.md)
======================  ==========================================================

A built-in that defines an ``rpc_metrics`` method (health, hooks) is asked like a plug-in:
its ``metrics()`` reply is a list of families in the plug-in form. Such a built-in that is
not running at all (``no_service``: not started by this member's supervisord) is left out
of the scrape, ``ecluster_service_up`` included, rather than reported down.

plus ``ecluster_rpc_forbidden_total{service}`` (calls refused by role: docs/SECURITY.md),
``ecluster_member_info{cluster,member,role}``, ``ecluster_service_up{service}`` (1 when
the service answered this scrape) and ``ecluster_scrape_duration_seconds``.

A service that does not run on this member is not asked, and one that does not answer
is ``ecluster_service_up 0`` with its families absent: a scrape never fails because of
another service. The family builders are pure functions of the services' replies.
"""
from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from bus.client import BusError, RemoteError
from services.base import Service, rpc
from bus import roles as access

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ASK_TIMEOUT = 0.8
READ_TIMEOUT = 5.0
MAX_REQUEST = 8192
#: what each built-in is asked, and which builder turns the reply into families
BUILTIN_SOURCES = (("membership", "view"), ("election", "status"), ("vip", "status"), ("jlog", "status"),
                   ("configsync", "status"))
#: configsync states as label values (Prometheus-friendly)
CONFIG_STATES = {"in sync": "in_sync", "behind": "behind", "modified locally": "modified_locally",
                 "not bootstrapped": "not_bootstrapped"}
VIP_STATES = ("released", "acquiring", "owned", "releasing", "fenced")

NOT_RUNNING = object()      # _ask's answer when the service does not run on this member
_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TYPES = ("gauge", "counter", "untyped")


class MetricsError(ValueError):
    """A metric family that cannot be rendered (bad name, label or value); one line."""


@dataclass
class Family:
    """One metric family: name, type, help and its samples ``(labels, value)``."""

    name: str
    type: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: Any, **labels: Any) -> "Family":
        self.samples.append(({k: str(v) for k, v in labels.items()}, value))
        return self


# -- rendering (pure) ------------------------------------------------------------------------

def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: Any) -> str:
    """A sample value as Prometheus text; MetricsError if it is not a number. Pure."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    raise MetricsError(f"sample value {value!r:.40} is not a number")


def check_family(f: Family) -> Family:
    """``f`` if it can be rendered, else MetricsError naming the problem. Pure."""
    if not isinstance(f.name, str) or not _NAME_RE.match(f.name):
        raise MetricsError(f"bad metric name {f.name!r:.80}")
    if f.type not in _TYPES:
        raise MetricsError(f"{f.name}: type must be one of {', '.join(_TYPES)}, got {f.type!r:.20}")
    for labels, value in f.samples:
        for k in labels:
            if not isinstance(k, str) or not _LABEL_RE.match(k) or k.startswith("__"):
                raise MetricsError(f"{f.name}: bad label name {k!r:.40}")
        format_value(value)
    return f


def render(families: Iterable[Family]) -> str:
    """The exposition text of ``families`` (empty families are left out). Pure."""
    out: list[str] = []
    seen: set[str] = set()
    for f in families:
        if not f.samples or f.name in seen:
            continue
        seen.add(f.name)
        out.append(f"# HELP {f.name} {_escape_help(f.help)}")
        out.append(f"# TYPE {f.name} {f.type}")
        for labels, value in f.samples:
            lab = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
            out.append(f"{f.name}{{{lab}}} {format_value(value)}" if lab else f"{f.name} {format_value(value)}")
    return "\n".join(out) + "\n" if out else ""


def family_from_dict(d: Any) -> Family:
    """A family sent by a plug-in as ``{name, type, help, samples: [[labels, value], ...]}``. Pure."""
    if not isinstance(d, dict):
        raise MetricsError("a family must be a map")
    samples = []
    for s in d.get("samples") or []:
        if not isinstance(s, (list, tuple)) or len(s) != 2 or not isinstance(s[0], dict):
            raise MetricsError(f"{d.get('name')}: a sample must be [labels, value]")
        samples.append(({str(k): str(v) for k, v in s[0].items()}, s[1]))
    return check_family(Family(str(d.get("name")), str(d.get("type", "untyped")), str(d.get("help", "")), samples))


# -- families from the services' replies (pure) -----------------------------------------------

def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def membership_families(view: dict, me: str) -> list[Family]:
    """From ``membership.view``: view number, member counts per state, peers up."""
    members = view.get("members") if isinstance(view.get("members"), dict) else {}
    counts = {"alive": 0, "suspect": 0, "dead": 0}
    up = Family("ecluster_membership_peer_up", "gauge", "1 when this member sees the peer alive")
    for name, info in sorted(members.items()):
        if not isinstance(info, dict):
            continue
        state = info.get("state")
        if state in counts:
            counts[state] += 1
        if name != me:
            up.add(1 if state == "alive" else 0, peer=name, role=info.get("role", ""))
    fams = [Family("ecluster_membership_members", "gauge", "Members in each state, as this member sees them")]
    for state, n in counts.items():
        fams[0].add(n, state=state)
    if _num(view.get("number")):
        fams.append(Family("ecluster_membership_view_number", "gauge",
                           "Number of this member's membership view (bumps on every change)").add(view["number"]))
    fams.append(up)
    return fams


def election_families(st: dict) -> list[Family]:
    """From ``election.status``: term and whether this member is the coordinator."""
    fams = []
    if _num(st.get("term")):
        fams.append(Family("ecluster_election_term", "gauge", "Current election term").add(st["term"]))
    if "role" in st:
        fams.append(Family("ecluster_election_is_coordinator", "gauge", "1 when this member is the coordinator")
                    .add(1 if st.get("role") == "leader" else 0))
    return fams


def vip_families(st: dict) -> list[Family]:
    """From ``vip.status``: held and state per VIP, lease left, event counters, dry-run."""
    states = st.get("states") if isinstance(st.get("states"), dict) else {}
    held = set(st.get("held") or [])
    f_held = Family("ecluster_vip_held", "gauge", "1 when this node holds the VIP")
    f_state = Family("ecluster_vip_state", "gauge", "1 for the VIP's current owner-state-machine state")
    for vip, state in sorted(states.items()):
        f_held.add(1 if vip in held else 0, vip=vip)
        for s in VIP_STATES if state in VIP_STATES else (*VIP_STATES, state):
            f_state.add(1 if s == state else 0, vip=vip, state=s)
    f_count = Family("ecluster_vip_held_count", "gauge", "VIPs this node holds").add(len(held))
    f_lease = Family("ecluster_vip_lease_remaining_seconds", "gauge", "Time left on the VIP's majority of promises")
    for vip, left in sorted((st.get("lease_left") or {}).items()):
        if _num(left):
            f_lease.add(left, vip=vip)
    f_events = Family("ecluster_vip_events_total", "counter", "VIP events on this node since the service started")
    for event, n in sorted((st.get("counters") or {}).items()):
        if _num(n):
            f_events.add(n, event=event)
    fams = [f_held, f_state, f_count, f_lease, f_events]
    if "dry_run" in st:
        fams.append(Family("ecluster_vip_dry_run", "gauge", "1 when VIPs are recorded, not plumbed")
                    .add(bool(st["dry_run"])))
    return fams


def jlog_families(st: dict) -> list[Family]:
    """From ``jlog.status``: per log seqs, bytes, alarms, counters; per subscriber lag."""
    f = {name: Family(name, kind, text) for name, kind, text in (
        ("ecluster_jlog_last_seq", "gauge", "Seq of the last record written to the log"),
        ("ecluster_jlog_first_seq", "gauge", "Seq of the oldest record still on disk"),
        ("ecluster_jlog_bytes", "gauge", "Disk bytes used by the log"),
        ("ecluster_jlog_alarms", "gauge", "Active alarms of the log"),
        ("ecluster_jlog_full_rejections_total", "counter", "Writes refused because the disk budget was full"),
        ("ecluster_jlog_records_dropped_total", "counter", "Records dropped by the drop_oldest budget policy"),
        ("ecluster_jlog_subscriber_lag_records", "gauge", "Records the subscriber has not checkpointed"),
        ("ecluster_jlog_subscriber_lag_bytes", "gauge", "Bytes the subscriber has not checkpointed"),
        ("ecluster_jlog_subscriber_checkpoint", "gauge", "Seq the subscriber has checkpointed"),
    )}
    f["ecluster_jlog_available"] = Family("ecluster_jlog_available", "gauge", "1 when the log is open")
    logs = st.get("logs") if isinstance(st.get("logs"), dict) else {}
    for log, info in sorted(logs.items()):
        if not isinstance(info, dict):
            continue
        f["ecluster_jlog_available"].add(0 if "error" in info else 1, log=log)
        for key, name in (("last_seq", "ecluster_jlog_last_seq"), ("first_seq", "ecluster_jlog_first_seq"),
                          ("bytes", "ecluster_jlog_bytes")):
            if _num(info.get(key)):
                f[name].add(info[key], log=log)
        if isinstance(info.get("alarms"), list):
            f["ecluster_jlog_alarms"].add(len(info["alarms"]), log=log)
        counters = info.get("counters") or {}
        for key, name in (("full_rejections", "ecluster_jlog_full_rejections_total"),
                          ("records_dropped", "ecluster_jlog_records_dropped_total")):
            if _num(counters.get(key)):
                f[name].add(counters[key], log=log)
        for sub, s in sorted((info.get("subscribers") or {}).items()):
            if not isinstance(s, dict):
                continue
            for key, name in (("lag_records", "ecluster_jlog_subscriber_lag_records"),
                              ("lag_bytes", "ecluster_jlog_subscriber_lag_bytes"),
                              ("checkpoint", "ecluster_jlog_subscriber_checkpoint")):
                if _num(s.get(key)):
                    f[name].add(s[key], log=log, subscriber=sub)
    return list(f.values())


def config_families(st: dict, log: list | None, now: float) -> list[Family]:
    """From ``configsync.status`` (and ``log``): state, height, applied revision's age."""
    fams = []
    state = st.get("state")
    if isinstance(state, str):
        f = Family("ecluster_config_state", "gauge", "1 for this member's configuration state")
        label = CONFIG_STATES.get(state, re.sub(r"[^a-z0-9]+", "_", state.lower()))
        for s in dict.fromkeys([*CONFIG_STATES.values(), label]):
            f.add(1 if s == label else 0, state=s)
        fams.append(f)
        fams.append(Family("ecluster_config_in_sync", "gauge", "1 when the applied revision is the committed one")
                    .add(state == "in sync"))
    if _num(st.get("height")):
        fams.append(Family("ecluster_config_height", "gauge", "Commits in this member's repository").add(st["height"]))
    rev = st.get("rev")
    at = next((e.get("time") for e in (log or []) if isinstance(e, dict) and e.get("rev") == rev), None)
    if rev and _num(at):
        fams.append(Family("ecluster_config_applied_timestamp_seconds", "gauge",
                           "Commit time of the applied revision (unix seconds)").add(at))
        fams.append(Family("ecluster_config_applied_age_seconds", "gauge",
                           "Seconds since the applied revision was committed").add(round(max(0.0, now - at), 3)))
    return fams


BUILDERS = {"membership": lambda r, me: membership_families(r, me), "election": lambda r, me: election_families(r),
            "vip": lambda r, me: vip_families(r), "jlog": lambda r, me: jlog_families(r)}


# -- HTTP (pure parts) -----------------------------------------------------------------------

def parse_request_line(line: bytes) -> tuple[str, str]:
    """(method, path without query) of an HTTP request line; ValueError if malformed. Pure."""
    parts = line.decode("latin-1").strip().split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("bad request line")
    return parts[0].upper(), parts[1].split("?", 1)[0]


def http_response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
                  head: bool = False) -> bytes:
    """A complete HTTP/1.1 response that closes the connection. Pure."""
    header = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
              "Connection: close\r\n\r\n").encode("latin-1")
    return header if head else header + body


def forbidden_family(replies: dict[str, Any]) -> Family:
    """``ecluster_rpc_forbidden_total{service}`` from each local service's ``ping`` (and the
    broker's ``status`` counters, as service "bus"): calls refused by role. Pure."""
    f = Family("ecluster_rpc_forbidden_total", "counter", "Calls refused because the caller's role may not make them")
    for service, r in sorted(replies.items()):
        if not isinstance(r, dict):
            continue
        n = r.get("forbidden") if service != "bus" else (r.get("counters") or {}).get("forbidden")
        if _num(n):
            f.add(n, service=service)
    return f


# -- the service -----------------------------------------------------------------------------

def metrics_sources(names: list[str], load) -> tuple[list[str], set[str]]:
    """(services asked for ``metrics()``, the built-ins among them) out of the local service
    ``names``; ``load(name)`` gives a service class. Plug-ins always; built-ins when they
    define an ``rpc_metrics`` (health, hooks), answered in the plug-in form."""
    builtin = {n for n in names if load(n).builtin and callable(getattr(load(n), "rpc_metrics", None))}
    return [n for n in names if not load(n).builtin or n in builtin], builtin


def local_metric_sources(cluster, member: str) -> list[list[str]]:
    """[the services of ``member``, those asked for metrics, the built-ins among them] (JSON)."""
    from services.base import load_service, services_for
    names = services_for(cluster, member)
    plugins, builtin = metrics_sources(names, load_service)
    return [names, plugins, sorted(builtin)]



class MetricsService(Service):
    """Serves ``/metrics`` on the member's address and ``metrics_port`` (see the module docstring)."""

    name = "metrics"
    roles = ("node", "manager")
    builtin = True
    tick_interval = 2.0

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        self.server: asyncio.base_events.Server | None = None
        self.local: list[str] = []
        self.plugins: list[str] = []              # asked for metrics(): plug-ins + builtin_sources
        self.builtin_sources: set[str] = set()    # built-ins with an rpc_metrics (health, hooks)
        self.scrapes = 0
        self._bind_error: str | None = None

    async def handle_init(self) -> None:
        from node.child import in_a_child
        try:
            # in a child: the classes loaded to find them stay out of this process
            found = await self.offload(in_a_child, "services.metrics:local_metric_sources", self.cluster, self.member.name)
        except Exception:  # noqa: BLE001 - e.g. no way to spawn: find them here
            self.log.warning("finding the metric sources in a child failed: finding them here")
            found = local_metric_sources(self.cluster, self.member.name)
        self.local, self.plugins, self.builtin_sources = list(found[0]), list(found[1]), set(found[2])
        await self._listen()

    async def handle_tick(self) -> None:
        if self.server is None:
            await self._listen()

    async def handle_stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _listen(self) -> None:
        m = self.member
        try:
            self.server = await asyncio.start_server(self._client, host=m.address, port=m.metrics_port,
                                                     reuse_address=True, limit=MAX_REQUEST)
        except OSError as e:
            why = e.strerror or str(e)
            if why != self._bind_error:          # say it once, then retry quietly every tick
                self._bind_error = why
                await self.alarm("metrics.listen_failed",
                                 f"metrics on {m.name} cannot listen on {m.address}:{m.metrics_port}: {why}")
            return
        self._bind_error = None
        self.log.info("serving /metrics on http://%s:%d/metrics", m.address, m.metrics_port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
                method, path = parse_request_line(line)
                while True:                      # headers: read and ignore
                    h = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
                    if h in (b"\r\n", b"\n", b""):
                        break
            except (ValueError, asyncio.TimeoutError, asyncio.LimitOverrunError, ConnectionError):
                writer.write(http_response("400 Bad Request", b"bad request\n"))
                return
            head = method == "HEAD"
            if method not in ("GET", "HEAD"):
                writer.write(http_response("405 Method Not Allowed", b"GET /metrics\n"))
            elif path == "/metrics":
                body = (await self.scrape()).encode("utf-8")
                writer.write(http_response("200 OK", body, CONTENT_TYPE, head))
            elif path == "/":
                writer.write(http_response("200 OK", f"ecluster {self.member.name}: see /metrics\n".encode(), head=head))
            else:
                writer.write(http_response("404 Not Found", b"not found: try /metrics\n", head=head))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _ask(self, service: str, method: str, **args) -> Any:
        try:
            return await self.call(self.member.name, service, method, timeout=ASK_TIMEOUT, **args)
        except RemoteError as e:
            return NOT_RUNNING if e.code == "no_service" else None
        except BusError:
            return None

    async def scrape(self) -> str:
        """Ask the local services and render every family they yield."""
        t0 = time.monotonic()
        self.scrapes += 1
        asked = [(s, m) for s, m in BUILTIN_SOURCES if s in self.local]
        asked += [(p, "metrics") for p in self.plugins]
        replies = await asyncio.gather(*(self._ask(s, m) for s, m in asked))
        pings = await asyncio.gather(*(self._ask(s, "ping") for s in self.local), self._ask("bus", "status"))
        answers = {}
        for (service, _), reply in zip(asked, replies):
            if reply is NOT_RUNNING:
                if service in self.builtin_sources:
                    continue               # a built-in metrics() source that is not started here
                reply = None
            answers[service] = reply
        config_log = None
        if isinstance(answers.get("configsync"), dict) and answers["configsync"].get("rev"):
            config_log = await self._ask("configsync", "log", n=50)
        m = self.member
        fams = [Family("ecluster_member_info", "gauge", "This member: cluster, name, role")
                .add(1, cluster=self.cluster.name, member=m.name, role=m.role)]
        up = Family("ecluster_service_up", "gauge", "1 when the local service answered this scrape")
        for service, reply in answers.items():
            up.add(reply is not None, service=service)
        fams.append(up)
        fams.append(forbidden_family(dict(zip([*self.local, "bus"], pings))))
        for service, reply in answers.items():
            if reply is None:
                continue
            try:
                if service in BUILDERS and isinstance(reply, dict):
                    fams += BUILDERS[service](reply, m.name)
                elif service == "configsync" and isinstance(reply, dict):
                    fams += config_families(reply, config_log if isinstance(config_log, list) else None, time.time())
                elif service in self.plugins and isinstance(reply, list):
                    fams += [family_from_dict(d) for d in reply]
            except Exception as e:  # noqa: BLE001 - one odd reply must not fail the scrape
                self.log.warning("metrics of %s left out: %s", service, e)
        fams.append(Family("ecluster_scrape_duration_seconds", "gauge", "How long this scrape took")
                    .add(round(time.monotonic() - t0, 6)))
        good = []
        for f in fams:
            try:
                good.append(check_family(f))
            except MetricsError as e:
                self.log.warning("family left out: %s", e)
        return render(good)

    @rpc(access.ANYONE)
    def rpc_status(self) -> dict:
        """Where it serves, whether it could bind, how many scrapes, which services it asks."""
        m = self.member
        host = f"[{m.address}]" if ":" in m.address else m.address
        return {"member": m.name, "url": f"http://{host}:{m.metrics_port}/metrics",
                "listening": self.server is not None, "error": self._bind_error, "scrapes": self.scrapes,
                "services": self.local}
