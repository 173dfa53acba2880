"""postfix: a real Postfix instance on every node, behind the VIPs that node holds.

Enabled by a ``[services.postfix]`` table (:mod:`ecluster_postfix.settings`); docs/POSTFIX.md
is the operator's page. What this service owns, and what it must never do:

* **The instance.** ``<data_dir>/postfix/{etc,queue,data,log}``: main.cf and master.cf are
  written here (:mod:`ecluster_postfix.render`), never by hand. Postfix runs as
  ``postfix -c <etc> start-fg``, a child of this service in its own session; if it exits it
  is started again (back-off, ``alarm.postfix.exited``). A master left running by an
  earlier run of this service (killed -9) is adopted, not restarted: mail keeps flowing
  while this process restarts. On SIGTERM the instance is stopped with ``postfix stop``.
* **Following the VIPs** (``watch_vips``): an smtpd per held injection VIP (+ loopback),
  an smtp transport per held outbound VIP; a change is written and ``postfix reload``ed,
  which keeps sessions on addresses that stay. Addresses this host cannot bind (the
  VIP left between the report and the reload, without ``ip_nonlocal_bind``) are left out
  until the next report, so a reload never makes the master fail to bind.
* **Replicated settings.** ``postfix/main.cf.d/*.cf`` of the live configuration (global/,
  this node's directory, default/: first found wins per file name), checked before any
  commit by :mod:`ecluster_postfix.validate`; on ``config.applied`` they are re-read,
  checked with ``postfix check`` and reloaded; a failure keeps the running configuration
  and raises ``alarm.postfix.config_refused``.
* **The log.** Postfix's maillog goes into the node's journal (``log``, default mainlog),
  every line exactly once, and its ``connect from`` lines into as_logger
  (:mod:`ecluster_postfix.maillog`).
* **Refusal, not a crash loop.** Bad settings, a missing Postfix or a missing
  ``maildir_owner`` make the service answer ``status`` with ``refused`` and raise
  ``alarm.postfix.refused`` once; it does not exit (supervisord would restart it forever).

Never blocks the event loop: files and Postfix commands run in threads (``offload``) or as
asyncio subprocesses with timeouts.
"""
from __future__ import annotations

import asyncio
import json
import os
import pwd
import signal
import socket
import time
from pathlib import Path
from typing import Any

from bus.client import BusError, CallTimeout, RemoteError
from ecluster.clusterfile import ClusterFileError
from node.configrepo import search_order
from node.fsutil import atomic_write
from services.base import Service, rpc
from bus import roles as access
from services.jlog import log_names

from ecluster_postfix.maillog import (Rotation, TailState, audit_sender, connect_events, landed, split_lines)
from ecluster_postfix.render import (FragmentError, Parameter, Paths, main_cf, master_cf, parse_fragment,
                                     vmailbox)
from ecluster_postfix.settings import CONFIG_SCHEMA, Settings, check_settings

COMMAND_TIMEOUT = 30.0
TAIL_EVERY = 0.2                 # seconds between looks at the log file when it is quiet
READ_BYTES = 256 * 1024
MAX_BATCH_LINES = 2000
ROTATION_GRACE = 2.0             # a renamed log is read this long past its last growth
WRITE_TIMEOUT = 30.0
AUDIT_TIMEOUT = 10.0
RESTART_BACKOFF_MAX = 30.0
#: between the reload that adds transports and the one that uses them: the master takes a
#: SIGHUP in its next loop turn (milliseconds); daemons started meanwhile see both sets
TRANSPORT_SETTLE = 0.1


class PostfixService(Service):
    """One Postfix instance per node, following the VIPs (see the module docstring)."""

    name = "postfix"
    roles = ("node",)
    builtin = False
    watch_vips = True
    tick_interval = 1.0
    config_schema = CONFIG_SCHEMA

    @classmethod
    def check_config(cls, cluster) -> None:
        """Called by the cluster-file parser: a bad value is an error naming the key."""
        if "smtp" in cluster.services:
            # both write the mainlog (the log reader's exactly-once needs to be its only
            # writer) and both want port 25 of the injection VIPs
            raise ClusterFileError("'services.postfix' and 'services.smtp' cannot run on the same nodes: "
                                   "choose one MTA")
        for member in cluster.nodes:
            check_settings(cluster.services.get("postfix", {}), member=member, cluster=cluster.name,
                           journal_logs=log_names(cluster))
            break

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        self.refused: str | None = None
        try:
            self.settings: Settings | None = check_settings(self.config, member=member, cluster=cluster.name,
                                                           journal_logs=log_names(cluster))
        except ClusterFileError as e:
            self.settings = None
            self.refused = f"{cluster.path}: {e}"
        self.paths = Paths(self.data_dir / "postfix")
        self.state_path = self.paths.root / "maillog.state"
        self.state = TailState()
        self.proc: asyncio.subprocess.Process | None = None
        self.adopted_pid: int | None = None
        self.fragments: list[Parameter] = []
        self.fragment_error: str | None = None
        self.written: tuple[str, str] = ("", "")
        self.written_outbound: tuple[str, ...] = ()
        self.vips_dirty = False
        self.apply_task: asyncio.Task | None = None
        self.reload_lock = asyncio.Lock()
        self.tail_fd: int | None = None
        self.tail_ino = 0
        self.rotation: Rotation | None = None
        self.restarts = 0
        self.next_start = 0.0
        self.stopping = False
        self.uid = self.gid = -1
        self.outbound_configured = any(v.kind == "outbound" for v in cluster.vips)
        self.counters = {"reloads": 0, "reload_failures": 0, "lines": 0, "batches": 0, "connections": 0,
                         "rotations": 0, "restarts": 0, "config_refused": 0, "lines_lost_alarms": 0,
                         "audit_duplicates": 0}
        self.last_applied_rev = ""

    # -- set-up -------------------------------------------------------------------
    async def handle_init(self) -> None:
        if self.refused is None:
            self.refused = self._missing_parts()
        if self.refused:
            self.log.error("refusing to run: %s", self.refused)
            await self.alarm("postfix.refused", f"postfix on {self.member.name}: {self.refused}")
            return
        await self.offload(self._prepare_dirs)
        await self.offload(self._allow_nonlocal_bind)
        self.fragments, self.fragment_error = await self.offload(self._load_fragments)
        if self.fragment_error:
            await self.alarm("postfix.config_refused", self.fragment_error)
            self.fragments = []
        self.state = await self.offload(self._load_state)
        await self.ask_held_vips()
        await self._write_config(reload=False)
        ok, out = await self._postfix("check")
        if not ok:
            self.log.error("postfix check failed: %s", out)
        await self._start_or_adopt()
        self.loop = asyncio.get_running_loop()
        self.tail_task = self.loop.create_task(self._tail_loop())

    def _missing_parts(self) -> str | None:
        s = self.settings
        for path in (s.postfix, str(Path(s.postfix).parent / "postconf"), "/usr/lib/postfix/sbin/master"):
            if not os.path.exists(path):
                return f"Postfix is not installed ({path} is missing): apt-get install postfix"
        try:
            pw = pwd.getpwnam(s.maildir_owner)
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
        except KeyError:
            return f"'services.postfix.maildir_owner' names user {s.maildir_owner!r}, which does not exist on this host"
        if os.geteuid() != 0:
            return "Postfix must be started as root (it drops privileges itself)"
        return self._unreachable()

    def _unreachable(self) -> str | None:
        """Postfix's daemons run as user postfix and deliver as maildir_owner: every directory
        above its own must let them pass (search, not read). The data directory itself is
        given o+x here; a parent that does not allow it is named, not changed."""
        try:
            mode = self.data_dir.stat().st_mode
            if not mode & 0o001:
                os.chmod(self.data_dir, (mode & 0o7777) | 0o001)
        except FileNotFoundError:
            pass
        for parent in self.data_dir.resolve().parents:
            try:
                if not parent.stat().st_mode & 0o001:
                    return (f"Postfix's user cannot reach {self.data_dir}: {parent} does not let others pass "
                            f"(chmod o+x {parent})")
            except OSError as e:
                return f"cannot check {parent}: {e}"
        return None

    def _allow_nonlocal_bind(self) -> None:
        """A reload that races a VIP leaving this host would make Postfix's master fail to bind
        the address and exit, dropping every connection: with ``ip_nonlocal_bind`` a socket
        may be bound to an address not (or no longer) on the host. keepalived's docs ask for
        the same; conf/sysctl.d/ships it. ``nonlocal_bind = false`` leaves the host alone."""
        if not self.settings.nonlocal_bind:
            return
        knob = Path("/proc/sys/net/ipv4/ip_nonlocal_bind")
        try:
            if knob.read_text().strip() != "1":
                knob.write_text("1\n")
                self.log.warning("set net.ipv4.ip_nonlocal_bind = 1 (Postfix binds VIPs that may leave during a reload)")
        except OSError as e:
            self.log.error("cannot set net.ipv4.ip_nonlocal_bind: %s (a reload racing a VIP move may stop Postfix)", e)

    def _prepare_dirs(self) -> None:
        p = self.paths
        for d in (p.root, p.etc, p.queue, p.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        p.data.mkdir(parents=True, exist_ok=True)
        os.chown(p.data, pwd.getpwnam("postfix").pw_uid, -1)
        mail = self.data_dir / self.settings.mail
        mail.mkdir(parents=True, exist_ok=True)
        os.chown(mail, self.uid, self.gid)

    def _load_fragments(self) -> tuple[list[Parameter], str | None]:
        """The fragments of the live configuration, resolved for this node. A bad one (it
        passed validation elsewhere, or was written by hand) refuses them all: half a
        configuration is worse than the last whole one."""
        conf = self.data_dir / "conf"
        by_name: dict[str, Path] = {}
        for d in reversed(search_order(self.member.name)):   # first found wins: fill last-wins from the end
            folder = conf / d / "postfix" / "main.cf.d"
            if folder.is_dir():
                for f in folder.glob("*.cf"):
                    by_name[f.name] = f
        out: list[Parameter] = []
        for name in sorted(by_name):
            f = by_name[name]
            rel = str(f.relative_to(conf))
            try:
                out += parse_fragment(rel, f.read_text())
            except (OSError, UnicodeDecodeError) as e:
                return [], f"{rel}: cannot read: {e}"
            except FragmentError as e:
                return [], str(e)
        return out, None

    # -- the configuration files ----------------------------------------------------
    def _bindable(self, addresses: tuple[str, ...]) -> tuple[str, ...]:
        """The addresses this host can bind now (held VIPs are plumbed; one that left since
        its report is left out until the next)."""
        out = []
        for a in addresses:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((a, 0))
                out.append(a)
            except OSError:
                self.log.info("%s not on this host (yet): not listening on it", a)
            finally:
                s.close()
        return tuple(out)

    def render(self) -> tuple[str, str, tuple[str, ...]]:
        """(main.cf, master.cf, the outbound addresses they send from)."""
        held = self.held_vips
        injection = self._bindable(held.get("injection", ()))
        outbound = self._bindable(held.get("outbound", ()))
        main = main_cf(self.settings, self.paths, uid=self.uid, gid=self.gid, held_outbound=outbound,
                       outbound_configured=self.outbound_configured, fragments=self.fragments)
        master = master_cf(self.settings, held_injection=injection, held_outbound=outbound)
        return main, master, outbound

    async def _write_config(self, reload: bool = True) -> bool:
        """Write main.cf/master.cf if they changed and reload; serialised, so the last write
        always reaches Postfix. Returns False when Postfix refused it (old files back).

        A transport must exist in the running master before main.cf names it, and must stay
        until main.cf no longer does (a queue manager started in between would defer mail to
        a transport the master does not run): so a change of outbound addresses is two
        reloads, the first with the transports of both the old and the new set."""
        async with self.reload_lock:
            main, master, outbound = await self.offload(self.render)
            if (main, master) == self.written:
                return True
            before, before_out = self.written, self.written_outbound
            running = reload and self._running()
            if running and before != ("", "") and set(outbound) != set(before_out):
                both = master_cf(self.settings, held_injection=self._listening_now(master),
                                 held_outbound=tuple(sorted(set(outbound) | set(before_out))))
                await self.offload(self._write_files, before[0], both)
                ok, out = await self._reload()
                if not ok:
                    self.log.error("postfix reload (transports first) failed: %s", out)
                else:
                    self.log.info("reloaded with the transports of both address sets")
                await asyncio.sleep(TRANSPORT_SETTLE)
            await self.offload(self._write_files, main, master)
            self.written, self.written_outbound = (main, master), outbound
            if not running:
                return True
            ok, out = await self._reload()
            if ok:
                self.counters["reloads"] += 1
                self.log.info("reloaded: listening on %s", ", ".join(self._listening_now(master)) or "no VIP")
                if set(outbound) - set(before_out):
                    # mail deferred for want of an address goes now; in the background, since
                    # postqueue may take a second on a busy host and the next VIP change waits
                    asyncio.get_running_loop().create_task(self._postfix("flush"))
                return True
            self.counters["reload_failures"] += 1
            self.log.error("postfix reload failed: %s", out)
            if before != ("", ""):
                await self.offload(self._write_files, *before)
                self.written, self.written_outbound = before, before_out
            return False

    def _listening_now(self, master: str) -> tuple[str, ...]:
        port = f":{self.settings.port}"
        return tuple(a[:-len(port)] for a in _listen_lines(master)
                     if a.endswith(port) and not a.startswith("127.0.0.1:"))

    def _write_files(self, main: str, master: str) -> None:
        atomic_write(self.paths.etc / "vmailbox", vmailbox(self.settings))
        atomic_write(self.paths.etc / "master.cf", master)
        atomic_write(self.paths.etc / "main.cf", main)

    async def handle_vips(self, held: dict[str, tuple[str, ...]]) -> None:
        """Must not block (events wait behind it): the rewrite and reloads run in a task that
        takes the latest set when it finishes the one before."""
        if self.refused or not hasattr(self, "tail_task"):
            return
        self.log.info("VIPs held now: %s", held)
        self.vips_dirty = True
        if self.apply_task is None or self.apply_task.done():
            self.apply_task = asyncio.get_running_loop().create_task(self._apply_vips())

    async def _apply_vips(self) -> None:
        while self.vips_dirty and not self.stopping:
            self.vips_dirty = False
            try:
                await self._write_config()
            except Exception:  # noqa: BLE001 - the next change tries again
                self.log.exception("applying the VIPs to Postfix failed")

    async def handle_reload(self, rev: str) -> None:
        if self.refused or not hasattr(self, "tail_task"):
            return
        fragments, error = await self.offload(self._load_fragments)
        if error:
            self.counters["config_refused"] += 1
            await self.alarm("postfix.config_refused", f"{rev[:12]}: {error}: running configuration kept", rev=rev)
            return
        old = self.fragments
        self.fragments = fragments
        # postfix check over the new files before the running instance sees them
        main, master, _ = await self.offload(self.render)
        ok, out = await self._check_candidate(main, master)
        if not ok:
            self.fragments = old
            self.counters["config_refused"] += 1
            await self.alarm("postfix.config_refused", f"{rev[:12]}: postfix check: {out}: running configuration kept",
                             rev=rev)
            return
        if await self._write_config():
            self.last_applied_rev = rev
            self.log.info("configuration %s applied", rev[:12])
        else:
            self.fragments = old

    async def _check_candidate(self, main: str, master: str) -> tuple[bool, str]:
        """``postfix check`` of candidate files in a scratch copy of etc/ (same queue)."""
        scratch = self.paths.root / "etc.check"

        def write() -> None:
            scratch.mkdir(exist_ok=True)
            atomic_write(scratch / "master.cf", master)
            atomic_write(scratch / "vmailbox", vmailbox(self.settings))
            atomic_write(scratch / "main.cf", main.replace(f"config_directory = {self.paths.etc}",
                                                           f"config_directory = {scratch}"))
        await self.offload(write)
        return await self._postfix("check", etc=scratch)

    # -- the Postfix process -----------------------------------------------------------
    async def _postfix(self, *args: str, etc: Path | None = None) -> tuple[bool, str]:
        argv = [self.settings.postfix, "-c", str(etc or self.paths.etc), *args]
        try:
            p = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                     stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                     start_new_session=True)
        except OSError as e:
            return False, str(e)
        try:
            out, _ = await asyncio.wait_for(p.communicate(), COMMAND_TIMEOUT)
        except asyncio.TimeoutError:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await p.wait()
            return False, f"postfix {' '.join(args)} timed out after {COMMAND_TIMEOUT:.0f} s"
        text = out.decode("utf-8", "replace").strip()
        if p.returncode != 0 and not text:
            text = await self.offload(self._last_log_line)
        return p.returncode == 0, text[-500:]

    async def _reload(self) -> tuple[bool, str]:
        """What ``postfix reload`` does once its checks pass: SIGHUP to the master, which
        re-reads main.cf and master.cf. The files are ours and were checked before they were
        written, and the script's checks cost 0.3-1 s on a busy host: a VIP that moved here
        would wait that long for its listener. Without a master pid, the script."""
        pid = await self.offload(self._master_pid)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGHUP)
                return True, ""
            except OSError as e:
                self.log.warning("SIGHUP to the master (pid %d) failed: %s", pid, e)
        return await self._postfix("reload")

    def _last_log_line(self) -> str:
        try:
            with open(self.paths.maillog, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if "fatal" in ln]
            return lines[-1] if lines else "failed (see the maillog)"
        except OSError:
            return "failed"

    def _master_pid(self) -> int | None:
        try:
            pid = int((self.paths.queue / "pid" / "master.pid").read_text().split()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    def _running(self) -> bool:
        if self.proc is not None and self.proc.returncode is None:
            return True
        return self.adopted_pid is not None and self._master_pid() == self.adopted_pid

    async def _start_or_adopt(self) -> None:
        pid = await self.offload(self._master_pid)
        if pid is not None:
            ok, _ = await self._postfix("status")
            if ok:
                self.adopted_pid = pid
                self.log.info("adopting the running Postfix master (pid %d)", pid)
                self.written = ("", "")          # make sure it runs what we just wrote
                await self._reload()
                return
        await self._start()

    async def _start(self) -> None:
        argv = [self.settings.postfix, "-c", str(self.paths.etc), "start-fg"]
        log = open(self.paths.log_dir / "start-fg.log", "ab")
        try:
            # its own session: the service's process group may be signalled without it
            self.proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                                                             stderr=log, start_new_session=True)
        except OSError as e:
            self.log.error("cannot start Postfix: %s", e)
            self.proc = None
        finally:
            log.close()
        self.adopted_pid = None
        self.started_at = time.monotonic()
        if self.proc is not None:
            self.log.info("Postfix started (pid %d)", self.proc.pid)

    async def handle_tick(self) -> None:
        if self.refused or self.stopping or not hasattr(self, "tail_task"):
            return
        try:
            mode = self.data_dir.stat().st_mode
            if not mode & 0o001:
                os.chmod(self.data_dir, (mode & 0o7777) | 0o001)
                self.log.warning("%s had lost its o+x (Postfix's user must pass through it): given back",
                                 self.data_dir)
        except OSError:
            pass
        if self._running():
            if self.restarts and time.monotonic() - getattr(self, "started_at", 0) > 60:
                self.restarts = 0
            return
        now = time.monotonic()
        if now < self.next_start:
            return
        rc = self.proc.returncode if self.proc is not None else None
        self.restarts += 1
        self.counters["restarts"] += 1
        self.next_start = now + min(RESTART_BACKOFF_MAX, 2 ** min(self.restarts, 5))
        await self.alarm("postfix.exited", f"Postfix on {self.member.name} is not running (exit {rc}): starting it again",
                         code=rc)
        self.proc = None
        await self._postfix("check")
        await self._start_or_adopt()

    async def handle_stop(self) -> None:
        self.stopping = True
        task = getattr(self, "tail_task", None)
        if task is not None:
            task.cancel()
        if self.refused or self.settings is None:
            return
        if self._running():
            await self._postfix("stop")
            if self.proc is not None:
                try:
                    await asyncio.wait_for(self.proc.wait(), 5.0)
                except asyncio.TimeoutError:
                    try:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    # -- the log: maillog -> journal + as_logger, exactly once --------------------------------
    def _load_state(self) -> TailState:
        try:
            return TailState.from_json(json.loads(self.state_path.read_text()))
        except (OSError, ValueError):
            return TailState()

    def _save_state(self) -> None:
        atomic_write(self.state_path, json.dumps(self.state.to_json()), mode=0o600)

    async def _journal_seq(self) -> int:
        """The journal's last sequence number of our log; asks until jlog answers."""
        delay = 0.1
        while True:
            try:
                st = await self.call(None, "jlog", "status", timeout=5.0)
                return int(st["logs"][self.settings.log]["last_seq"])
            except (BusError, CallTimeout, RemoteError, KeyError, TypeError, ValueError) as e:
                self.log.debug("jlog status not available: %s", e)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    def _find_by_ino(self, ino: int) -> Path | None:
        try:
            for f in self.paths.log_dir.iterdir():
                if f.name.startswith("maillog") and f.stat().st_ino == ino:
                    return f
        except OSError:
            pass
        return None

    def _read_lines(self, ino: int, start: int, end: int | None = None,
                    max_lines: int = MAX_BATCH_LINES) -> list[tuple[int, bytes]]:
        path = self._find_by_ino(ino)
        if path is None:
            return []
        with open(path, "rb") as f:
            f.seek(start)
            buf = f.read((end - start) if end is not None else READ_BYTES)
        lines, _ = split_lines(buf, start)
        return lines[:max_lines]

    async def _recover(self) -> None:
        """Settle a batch that was in flight when this service last stopped."""
        st = self.state
        if st.pending:
            p = st.pending
            last = await self._journal_seq()
            lines = await self.offload(self._read_lines, p["ino"], p["start"], p["end"], 10 ** 9)
            k = landed(last, st.seq, min(p.get("lines", len(lines)), len(lines)))
            end = lines[k][0] if k < len(lines) else p["end"]
            self.log.info("recovered a batch in flight: %d of %d lines were journalled", k, len(lines))
            st.ino, st.offset, st.pending = p["ino"], end, None
            st.seq = (st.seq or 0) + k
            st.audit = {"ino": p["ino"], "start": p["start"], "end": end} if k else None
            await self.offload(self._save_state)
        if st.audit:
            a = st.audit
            lines = await self.offload(self._read_lines, a["ino"], a["start"], a["end"], 10 ** 9)
            await self._count(a["ino"], a["start"], [ln for _, ln in lines])
            st.audit = None
            await self.offload(self._save_state)

    async def _tail_loop(self) -> None:
        try:
            await self._recover()
        except Exception:  # noqa: BLE001 - keep tailing from the saved position
            self.log.exception("recovery of the log position failed")
        while not self.stopping:
            try:
                batch = await self.offload(self._next_batch)
                if batch is None:
                    await self._maybe_rotate()
                    await asyncio.sleep(TAIL_EVERY)
                    continue
                await self._ship(*batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bad moment must not stop the log for good
                self.log.exception("log tail step failed")
                await asyncio.sleep(1.0)

    def _next_batch(self) -> tuple[int, int, int, list[bytes]] | None:
        """The next lines to ship (ino, start, end, lines), handling rotation; None when quiet."""
        st = self.state
        try:
            cur = os.stat(self.paths.maillog)
        except FileNotFoundError:
            cur = None
        if st.ino == 0:
            if cur is None:
                return None
            st.ino, st.offset = cur.st_ino, 0
        src = self._find_by_ino(st.ino)
        if src is None:
            # the file we were reading is gone (removed by hand, or rotated while we were down
            # and then deleted): what was left of it is lost; say so once and start the new one
            if cur is not None:
                self.counters["lines_lost_alarms"] += 1
                self.log.error("log file inode %d disappeared at offset %d: continuing with the new file",
                               st.ino, st.offset)
                st.lost_lines_alarms += 1
                st.ino, st.offset = cur.st_ino, 0
                self._save_state()
            return None
        size = src.stat().st_size
        if size < st.offset:
            self.log.error("%s shrank below our offset (truncated): reading it from the start", src)
            st.offset = 0
        if size > st.offset:
            with open(src, "rb") as f:
                f.seek(st.offset)
                buf = f.read(READ_BYTES)
            lines, end = split_lines(buf, st.offset)
            if len(lines) > MAX_BATCH_LINES:
                end = lines[MAX_BATCH_LINES][0]      # (a cut piece of a long line has no newline after it)
                lines = lines[:MAX_BATCH_LINES]
            if lines:
                if self.rotation:
                    self.rotation.quiet_since = time.monotonic()
                return st.ino, st.offset, end, [ln for _, ln in lines]
        # quiet: is the file we read an old one (renamed)? then finish it and move on
        if cur is not None and cur.st_ino != st.ino:
            now = time.monotonic()
            if self.rotation is None or self.rotation.ino != st.ino:
                self.rotation = Rotation(st.ino, now, now)
                return None
            if now - self.rotation.quiet_since >= ROTATION_GRACE:
                try:
                    src.unlink()
                except OSError:
                    pass
                self.counters["rotations"] += 1
                st.ino, st.offset = cur.st_ino, 0
                self.rotation = None
                self._save_state()
        return None

    async def _maybe_rotate(self) -> None:
        if self.rotation is not None:
            return
        try:
            size = os.stat(self.paths.maillog).st_size
        except OSError:
            return
        if size > self.settings.maillog_rotate_bytes and self._running():
            ok, out = await self._postfix("logrotate")
            if not ok:
                self.log.error("postfix logrotate failed: %s", out)

    async def _ship(self, ino: int, start: int, end: int, lines: list[bytes]) -> None:
        st = self.state
        st.seq = await self._journal_seq()
        st.pending = {"ino": ino, "start": start, "end": end, "lines": len(lines)}
        await self.offload(self._save_state)
        delay = 0.2
        while True:
            try:
                r = await self.call(None, "jlog", "write", timeout=WRITE_TIMEOUT, log=self.settings.log,
                                    records=lines)
                last = int(r["last_seq"])
                k = len(lines)
                break
            except (BusError, CallTimeout, RemoteError, KeyError, TypeError, ValueError) as e:
                # it may have landed (a lost answer): the journal's count says how much of it
                last = await self._journal_seq()
                k = landed(last, st.seq, len(lines))
                if k == len(lines):
                    break
                if k:
                    # where line k starts (a cut piece of a long line has no newline after it)
                    rest = await self.offload(self._read_lines, ino, start, end, k + 1)
                    lines = lines[:k]
                    end = rest[k][0] if len(rest) > k else start + sum(len(ln) + 1 for ln in lines)
                    break
                self.log.warning("journal write failed (%s): retrying", e)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                st.seq = await self._journal_seq()
        st.offset, st.seq, st.pending = end, last, None
        st.audit = {"ino": ino, "start": start, "end": end}
        await self.offload(self._save_state)
        self.counters["lines"] += len(lines)
        self.counters["batches"] += 1
        await self._count(ino, start, lines)
        st.audit = None

    async def _count(self, ino: int, start: int, lines: list[bytes]) -> None:
        """as_logger counts the batch's connections once: the id is (file, start offset)."""
        events = connect_events(lines)
        if not events:
            return
        batch = [audit_sender(self.member.name, ino), start]
        delay, since = 0.2, time.monotonic()
        while not self.stopping:
            try:
                r = await self.call(None, "as_logger", "add_batch", timeout=AUDIT_TIMEOUT, events=events, batch=batch)
                if isinstance(r, dict) and r.get("duplicate"):
                    self.counters["audit_duplicates"] += 1
                else:
                    self.counters["connections"] += sum(e[2] for e in events)
                return
            except RemoteError as e:
                if e.code in ("bad_event", "bad_batch", "bad_arguments"):
                    self.log.error("as_logger refused a batch for good: %s", e)
                    return
                why = e
            except (BusError, CallTimeout) as e:
                why = e
            if time.monotonic() - since > 30:
                await self.alarm("postfix.audit_stuck", f"as_logger has not taken connection counts for 30 s: {why}")
                since = time.monotonic()
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    # -- RPC ---------------------------------------------------------------------------
    @rpc(access.ANYONE)
    def rpc_status(self) -> dict:
        st = self.state
        return {"node": self.member.name, "refused": self.refused, "running": self._running() if self.settings else False,
                "pid": (self.proc.pid if self.proc and self.proc.returncode is None else self.adopted_pid),
                "held": self.held_vips, "listening": _listen_lines(self.written[1]),
                "sending_from": list(self.written_outbound),
                "fragments": [f"{p.file}:{p.line} {p.name}" for p in self.fragments],
                "applied_rev": self.last_applied_rev, "counters": self.counters,
                "log": {"ino": st.ino, "offset": st.offset, "seq": st.seq, "pending": st.pending}}

    @rpc(access.ANYONE)
    def rpc_metrics(self) -> list[dict]:
        c = self.counters
        labels = {"member": self.member.name}
        return [
            {"name": "ecluster_postfix_running", "type": "gauge", "help": "1 while this node's Postfix master runs",
             "samples": [[labels, 1 if self.settings and self._running() else 0]]},
            {"name": "ecluster_postfix_log_lines_total", "type": "counter",
             "help": "Postfix log lines written to the journal", "samples": [[labels, c["lines"]]]},
            {"name": "ecluster_postfix_connections_total", "type": "counter",
             "help": "SMTP connections counted in as_logger", "samples": [[labels, c["connections"]]]},
            {"name": "ecluster_postfix_reloads_total", "type": "counter", "help": "postfix reloads (VIP or config change)",
             "samples": [[labels, c["reloads"]]]},
            {"name": "ecluster_postfix_restarts_total", "type": "counter", "help": "times Postfix had to be started again",
             "samples": [[labels, c["restarts"]]]},
        ]


def _listen_lines(master: str) -> list[str]:
    return [ln.split()[0] for ln in master.splitlines() if " inet " in ln]
