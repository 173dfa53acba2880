"""hooks: the operator's programs run after the fact (keepalived's notify scripts), on every member.

Owns: turning this member's own news into hook runs, and running them. The cluster file's
``[hooks]`` table names the programs (argv prefixes; empty: no hook) and the timeout::

    <vip hook>    acquire|release ADDRESS/PREFIX   this node plumbed (and announced) / unplumbed a VIP
    <config hook> applied COMMIT                   configsync applied a revision here
    <member hook> alive|dead MEMBER                this member's membership view changed

Where the news comes from:

* vip: this node's ``vip.status`` (``env.src`` is us), followed with the base's VIP watch
  (``watch_vips``: a VIP counts once plumbed, state owned or handing over; the vip service
  publishes right after a plumb, which sends its gratuitous-ARP burst in the same step, and
  right after an unplumb; a silent vip service for ``stale_after`` counts as everything
  released). The plumbed set is diffed (:func:`vip_events`) against the set the hooks were
  last told, which is kept in ``<data_dir>/hooks.json`` so that a restart of this service
  neither repeats acquires nor invents releases, and tells what changed while it was down.
* config: ``config.applied`` for this member; the last revision told is kept in the same
  file (a revision applied while this service was down is told at start).
* member: this member's own ``membership.view``, diffed (:func:`member_events`); the first
  view after a start is the baseline (no hook runs for it).

Running: one queue and one runner per kind (vip, config, member): hooks of one kind run one
at a time in event order, kinds independently. A queue holds at most MAX_QUEUED runs; past
that the *oldest* waiting run is dropped (counted, ``alarm.hook_queue_full``): the newest
news is the one that describes the present. A run is an asyncio subprocess without a shell,
stdin /dev/null, in a session of its own, a clean environment (:func:`hook_env`), output
(stdout and stderr, to a temporary file, truncated) logged; at ``timeout`` its whole process group is killed
and it is reaped. A non-zero exit, a timeout or a program that cannot be started raises
``alarm.hook_failed`` {hook, event, reason}. Docs: docs/HOOKS.md.

Must never: delay plumbing, lease renewals or handovers (those happen in other processes
and nothing there waits for this one), block its event loop (it answers ``status`` while a
hook hangs), or run a hook through a shell.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from node.fsutil import atomic_write
from services.base import Service, rpc
from bus import roles as access

KINDS = ("vip", "config", "member")
MAX_QUEUED = 100                   # runs waiting per kind; past it the oldest is dropped
OUTPUT_LIMIT = 4096                # bytes of a hook's output kept (and logged)
KILL_GRACE = 1.0                   # s: at stop, SIGTERM to a running hook's group, then SIGKILL
ALARM_EVERY = 60.0                 # s: at most one queue-full alarm per kind this often
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STATE_FILE = "hooks.json"


# -- pure parts -----------------------------------------------------------------------------

@dataclass(frozen=True)
class HookEvent:
    """One hook run to do: ``kind`` (vip, config, member), ``action`` (its first argument)
    and ``subject`` (its second: a VIP as written in the cluster file, a commit, a member)."""

    kind: str
    action: str
    subject: str

    @property
    def name(self) -> str:
        """ECLUSTER_EVENT, e.g. ``vip.acquire``."""
        return f"{self.kind}.{self.action}"


def vip_events(told: Iterable[str], plumbed: Iterable[str]) -> list[tuple[str, str]]:
    """(action, bare address) to tell when the plumbed set goes from ``told`` to ``plumbed``:
    releases first, then acquires, each sorted. Pure."""
    before, after = set(told), set(plumbed)
    return [("release", a) for a in sorted(before - after)] + [("acquire", a) for a in sorted(after - before)]


def alive_members(view: Any) -> dict[str, bool] | None:
    """member -> alive? from a membership.view body; None if it is not one. Pure."""
    if not isinstance(view, dict) or not isinstance(view.get("members"), dict):
        return None
    return {str(name): isinstance(info, dict) and info.get("state") == "alive"
            for name, info in view["members"].items()}


def member_events(before: dict[str, bool] | None, after: dict[str, bool]) -> list[tuple[str, str]]:
    """(alive|dead, member) for every member whose liveness changed, sorted by member. Pure.

    ``before`` None (the first view since start) is the baseline: nothing. A member not in
    ``before`` counts as not alive (a member appearing alive is told, appearing dead is not);
    one that leaves the view counts as dead.
    """
    if before is None:
        return []
    out = []
    for name in sorted(set(before) | set(after)):
        was, now = before.get(name, False), after.get(name, False)
        if was != now:
            out.append(("alive" if now else "dead", name))
    return out


def hook_argv(prefix: Iterable[str], event: HookEvent) -> list[str]:
    """The argv of one run: the configured program and its arguments, then action, subject. Pure."""
    return [*prefix, event.action, event.subject]


def hook_env(cluster_name: str, member: str, event: HookEvent, vip: Any = None,
             path: str | None = None) -> dict[str, str]:
    """The whole environment of one run (nothing else is inherited). Pure.

    ``vip`` (an :class:`ecluster.clusterfile.Vip`) for vip events adds ECLUSTER_VIP,
    ECLUSTER_VIP_KIND and ECLUSTER_VIP_INTERFACE.
    """
    env = {"PATH": path or DEFAULT_PATH, "ECLUSTER_CLUSTER": cluster_name, "ECLUSTER_MEMBER": member,
           "ECLUSTER_EVENT": event.name}
    if vip is not None:
        env.update({"ECLUSTER_VIP": vip.address, "ECLUSTER_VIP_KIND": vip.kind,
                    "ECLUSTER_VIP_INTERFACE": vip.interface})
    return env


def failure_reason(returncode: int | None, timed_out: bool, start_error: str | None, timeout: float) -> str | None:
    """Why a run failed, or None if it did not. Pure."""
    if start_error is not None:
        return f"cannot start: {start_error}"
    if timed_out:
        return f"timed out after {timeout:g} s (process group killed)"
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode != 0:
        return f"exit status {returncode}"
    return None


def push_bounded(queue: collections.deque, item: Any, limit: int) -> Any:
    """Append ``item``; if that makes ``queue`` longer than ``limit``, drop the oldest and
    return it (else None)."""
    queue.append(item)
    if len(queue) > limit:
        return queue.popleft()
    return None


def load_state(text: str | None) -> dict:
    """The persisted {vips_told: [...] | None, config_told: rev | None} from hooks.json's
    text (None: no file); anything unreadable counts as no file. Pure."""
    out = {"vips_told": None, "config_told": None}
    if text is None:
        return out
    try:
        raw = json.loads(text)
    except ValueError:
        return out
    if isinstance(raw, dict):
        if isinstance(raw.get("vips_told"), list) and all(isinstance(a, str) for a in raw["vips_told"]):
            out["vips_told"] = sorted(raw["vips_told"])
        if isinstance(raw.get("config_told"), str):
            out["config_told"] = raw["config_told"]
    return out


# -- the runner -----------------------------------------------------------------------------

@dataclass
class RunResult:
    returncode: int | None
    timed_out: bool
    start_error: str | None
    output: bytes
    truncated: bool
    seconds: float


@dataclass
class KindState:
    """One kind's queue, runner and counters."""

    argv: tuple[str, ...]
    queue: collections.deque = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    running: tuple[HookEvent, float, int | None] | None = None      # (event, monotonic start, pid)
    last: dict | None = None
    counters: dict = field(default_factory=lambda: {"runs": 0, "ok": 0, "failed": 0, "timeouts": 0,
                                                    "not_started": 0, "dropped": 0})
    last_alarm: float = -1e9


async def run_hook(argv: list[str], env: dict[str, str], timeout: float, cwd: str | None,
                   on_start=None) -> RunResult:
    """Run one hook to its end or its timeout (then SIGKILL to its process group), reaped.

    Output goes to an unlinked temporary file, not a pipe: a child the hook leaves running
    in the background would hold a pipe open (and asyncio waits for its pipes before it
    reports the exit); the file is read, first OUTPUT_LIMIT bytes, once the hook is over.
    """
    t0 = time.monotonic()
    with tempfile.TemporaryFile(prefix="ecluster-hook-") as out:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=cwd,
                start_new_session=True)
        except (OSError, ValueError) as e:
            return RunResult(None, False, str(e) or type(e).__name__, b"", False, time.monotonic() - t0)
        if on_start is not None:
            on_start(proc.pid)
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            timed_out = True
            kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        except asyncio.CancelledError:          # the service stops: do not leave the hook behind
            kill_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_GRACE)
            except asyncio.TimeoutError:
                kill_group(proc.pid, signal.SIGKILL)
            raise
        seconds = time.monotonic() - t0
        size = os.fstat(out.fileno()).st_size
        output = os.pread(out.fileno(), OUTPUT_LIMIT, 0)
    return RunResult(proc.returncode, timed_out, None, output, size > OUTPUT_LIMIT, seconds)


def kill_group(pid: int, sig: int) -> None:
    """Signal the process group a hook leads (its own session: start_new_session)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- the service ----------------------------------------------------------------------------

class HooksService(Service):
    """Runs [hooks] programs after VIP, configuration and membership changes (module docstring)."""

    name = "hooks"
    roles = ("node", "manager")
    builtin = True
    watch_vips = True
    subscriptions = ("vip.status", "membership.view")

    @classmethod
    def runs_on(cls, cluster, member: str) -> bool:
        """Only where a hook is configured: a member without hooks saves the process (and
        its wake-ups) altogether."""
        h = cluster.hooks
        return super().runs_on(cluster, member) and bool(h.vip or h.config or h.member)

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        hooks = cluster.hooks
        self.timeout = float(hooks.timeout)
        self.kinds = {"vip": KindState(tuple(hooks.vip)), "config": KindState(tuple(hooks.config)),
                      "member": KindState(tuple(hooks.member))}
        self.specs = {v.ip: v for v in cluster.vips}
        self.state_path = Path(self.data_dir) / STATE_FILE
        self.vips_known: set[str] | None = None      # plumbed set the queued events lead to
        self.vips_told: set[str] = set()             # ... and the one the finished runs led to (persisted)
        self.config_known: str | None = None
        self.config_told: str | None = None
        self.first_start = True                      # no state file: the first report is told as it is
        self.alive: dict[str, bool] | None = None
        self.runners: list[asyncio.Task] = []

    # -- lifecycle ------------------------------------------------------------------------
    async def handle_init(self) -> None:
        text = await self.offload(self._read_state)
        state = load_state(text)
        self.first_start = text is None
        told = state["vips_told"]
        self.vips_told = set(told or ())
        self.vips_known = set(self.vips_told)
        self.config_told = self.config_known = state["config_told"]
        loop = asyncio.get_running_loop()
        self.runners = [loop.create_task(self._runner(kind)) for kind in KINDS]
        self.log.info("hooks: %s; timeout %g s; VIPs last told %s",
                      ", ".join(f"{k}={' '.join(s.argv) or '-'}" for k, s in self.kinds.items()),
                      self.timeout, sorted(self.vips_told) or "none")
        loop.create_task(self._config_at_start())

    async def handle_stop(self) -> None:
        for task in self.runners:
            task.cancel()
        if self.runners:
            await asyncio.wait(self.runners, timeout=KILL_GRACE + 1)

    def _read_state(self) -> str | None:
        try:
            return self.state_path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            self.log.error("cannot read %s: %s (starting from nothing told)", self.state_path, e)
            return None

    async def _save_state(self) -> None:
        data = json.dumps({"vips_told": sorted(self.vips_told), "config_told": self.config_told})
        try:
            await self.offload(atomic_write, self.state_path, data)
        except OSError as e:
            self.log.error("cannot write %s: %s", self.state_path, e)

    # -- news -----------------------------------------------------------------------------
    async def handle_event(self, topic: str, body: Any, env) -> None:
        if env.src != self.member.name:
            return
        if topic == "vip.status":
            # the base has just taken this report into held_vips; the first one after a start
            # is diffed against what was told before (handle_vips is called only on changes)
            self._vips_now(self.held_vips)
        elif topic == "membership.view":
            alive = alive_members(body)
            if alive is None:
                return
            for action, name in member_events(self.alive, alive):
                self._enqueue(HookEvent("member", action, name))
            self.alive = alive

    async def handle_vips(self, held: dict[str, tuple[str, ...]]) -> None:
        self._vips_now(held)           # also the stale rule's "everything released"

    def _vips_now(self, held: dict[str, tuple[str, ...]]) -> None:
        plumbed = {a for addresses in held.values() for a in addresses}
        if self.vips_known is None:                 # before handle_init read the state file
            return
        for action, address in vip_events(self.vips_known, plumbed):
            self._enqueue(HookEvent("vip", action, self.specs[address].address if address in self.specs else address))
        self.vips_known = plumbed

    async def handle_reload(self, rev: str) -> None:
        self._config_applied(rev)

    def _config_applied(self, rev: str) -> None:
        # before handle_init has read what was told, _config_at_start asks configsync instead
        if not rev or rev == self.config_known or self.vips_known is None:
            return
        self.config_known = rev
        self._enqueue(HookEvent("config", "applied", rev))

    async def _config_at_start(self) -> None:
        """A revision applied while this service was down is told now (a first start ever
        takes the current revision as the baseline)."""
        try:
            st = await self.call(self.member.name, "configsync", "status", timeout=5.0)
        except Exception as e:  # noqa: BLE001 - configsync not up: its config.applied will tell
            self.log.debug("configsync status not available: %s", e)
            return
        rev = st.get("rev") if isinstance(st, dict) else None
        if not isinstance(rev, str) or not rev:
            return
        if self.config_known is None and self.first_start:
            self.config_known = self.config_told = rev
            await self._save_state()
        else:
            self._config_applied(rev)

    # -- queues and runs ------------------------------------------------------------------
    def _enqueue(self, event: HookEvent) -> None:
        ks = self.kinds[event.kind]
        dropped = push_bounded(ks.queue, event, MAX_QUEUED)
        ks.wake.set()
        if dropped is not None:
            ks.counters["dropped"] += 1
            self.log.warning("%s hook queue full (%d): dropped %s %s", event.kind, MAX_QUEUED,
                             dropped.action, dropped.subject)
            self._finished(dropped)
            now = time.monotonic()
            if now - ks.last_alarm >= ALARM_EVERY:
                ks.last_alarm = now
                asyncio.get_running_loop().create_task(self.alarm(
                    "hook_queue_full", f"{event.kind} hooks fall behind: {MAX_QUEUED} runs waiting, oldest dropped",
                    hook=event.kind, dropped=ks.counters["dropped"]))

    async def _runner(self, kind: str) -> None:
        ks = self.kinds[kind]
        while True:
            while not ks.queue:
                ks.wake.clear()
                await ks.wake.wait()
            event = ks.queue.popleft()
            if ks.argv:
                try:
                    await self._run(ks, event)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.log.exception("%s hook %s failed to run", kind, event.name)
            self._finished(event)
            if kind in ("vip", "config"):
                await self._save_state()

    def _finished(self, event: HookEvent) -> None:
        """A run is over (or was dropped): what the hooks were told moves on."""
        if event.kind == "vip":
            address = event.subject.split("/", 1)[0]
            if event.action == "acquire":
                self.vips_told.add(address)
            else:
                self.vips_told.discard(address)
        elif event.kind == "config":
            self.config_told = event.subject

    async def _run(self, ks: KindState, event: HookEvent) -> None:
        argv = hook_argv(ks.argv, event)
        vip = self.specs.get(event.subject.split("/", 1)[0]) if event.kind == "vip" else None
        env = hook_env(self.cluster.name, self.member.name, event, vip, os.environ.get("PATH"))
        started = time.monotonic()

        def on_start(pid: int) -> None:
            ks.running = (event, started, pid)

        ks.running = (event, started, None)
        try:
            cwd = str(self.data_dir) if Path(self.data_dir).is_dir() else None
            result = await run_hook(argv, env, self.timeout, cwd, on_start)
        finally:
            ks.running = None
        ks.counters["runs"] += 1
        reason = failure_reason(result.returncode, result.timed_out, result.start_error, self.timeout)
        output = result.output.decode("utf-8", "replace").rstrip()
        if result.truncated:
            output += " [output truncated]"
        ks.last = {"event": event.name, "subject": event.subject, "at": time.time(),
                   "seconds": round(result.seconds, 3), "returncode": result.returncode,
                   "result": "ok" if reason is None else "failed", "reason": reason, "output": output[-512:]}
        if output:
            self.log.info("%s hook %s %s output: %s", event.kind, event.action, event.subject, output)
        if reason is None:
            ks.counters["ok"] += 1
            self.log.info("%s hook %s %s: ok (%.3f s)", event.kind, event.action, event.subject, result.seconds)
            return
        ks.counters["failed"] += 1
        if result.timed_out:
            ks.counters["timeouts"] += 1
        if result.start_error is not None:
            ks.counters["not_started"] += 1
        await self.alarm("hook_failed", f"{event.kind} hook {' '.join(argv)}: {reason}",
                         hook=event.kind, event=event.name, subject=event.subject, reason=reason)

    # -- RPC ------------------------------------------------------------------------------
    @rpc(access.ANYONE)
    def rpc_status(self) -> dict:
        """Per kind: the hook, queue length, the run in progress, the last run, counters."""
        now = time.monotonic()
        kinds = {}
        for kind, ks in self.kinds.items():
            running = None
            if ks.running is not None:
                ev, started, pid = ks.running
                running = {"event": ev.name, "subject": ev.subject, "for": round(now - started, 3), "pid": pid}
            kinds[kind] = {"argv": list(ks.argv), "queued": len(ks.queue),
                           "waiting": [f"{e.action} {e.subject}" for e in list(ks.queue)[:10]],
                           "running": running, "last": ks.last, "counters": dict(ks.counters)}
        return {"member": self.member.name, "timeout": self.timeout, "max_queued": MAX_QUEUED, "kinds": kinds,
                "vips_told": sorted(self.vips_told), "vips_known": sorted(self.vips_known or ()),
                "config_told": self.config_told}

    @rpc(access.ANYONE)
    def rpc_metrics(self) -> list[dict]:
        """Prometheus families for the metrics service (the plug-in shape: services/metrics.py)."""
        def fam(name, kind, text, samples):
            return {"name": name, "type": kind, "help": text, "samples": samples}

        me = self.member.name
        runs, dropped, queued, running, last_ok = [], [], [], [], []
        for kind, ks in self.kinds.items():
            labels = {"member": me, "hook": kind}
            c = ks.counters
            runs += [[{**labels, "result": "ok"}, c["ok"]],
                     [{**labels, "result": "failed"}, c["failed"] - c["timeouts"] - c["not_started"]],
                     [{**labels, "result": "timeout"}, c["timeouts"]],
                     [{**labels, "result": "not_started"}, c["not_started"]]]
            dropped.append([labels, c["dropped"]])
            queued.append([labels, len(ks.queue)])
            running.append([labels, 1 if ks.running is not None else 0])
            if ks.last is not None:
                last_ok.append([labels, 1 if ks.last["result"] == "ok" else 0])
        return [
            fam("ecluster_hooks_runs_total", "counter", "Hook runs by result", runs),
            fam("ecluster_hooks_dropped_total", "counter", "Hook runs dropped from a full queue", dropped),
            fam("ecluster_hooks_queued", "gauge", "Hook runs waiting", queued),
            fam("ecluster_hooks_running", "gauge", "1 while a hook of that kind runs", running),
            fam("ecluster_hooks_last_ok", "gauge", "1 when the last run of that kind succeeded", last_ok),
        ]
