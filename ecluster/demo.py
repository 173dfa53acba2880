"""``ecluster demo``: a whole cluster on this machine, with mail flowing through it.

Two modes, chosen by :func:`choose_mode`:

* **namespaces** (root, ``ip`` present): a network-namespace lab (:mod:`ecluster.labnet`)
  with three nodes, a manager and a client on one bridge. VIPs are real addresses on the
  nodes' ``eth0``, moved with gratuitous ARP; the SMTP plug-in listens on port 25 of the
  VIPs. The host reaches the web console through a port relay (:class:`PortRelay`), and
  the admin CLI through ``<workdir>/ecl``, which runs ``ecluster`` in the client
  namespace with the demo's cluster file.
* **loopback** (otherwise): the same cluster on 127.0.0.11-14 with ``vip_dry_run = true``
  (the VIPs 127.0.0.100/101 are recorded, not plumbed, and exist on ``lo`` anyway, so the
  SMTP plug-in can listen on port 2525 of whichever one its node holds).

With ``--mta postfix`` the nodes run Debian's Postfix (plugins/ecluster_postfix) instead of
the example SMTP plug-in, guarded by an ``smtp`` health check (namespaces mode only: each
instance also listens on 127.0.0.1:25). The per-MTA differences are :data:`MTAS`.

Either way a mail stream (:mod:`ecluster.mailsend`) goes from the client to both VIPs,
and a status table shows members, VIP owners, spool counts and the stream. Ctrl-C
(SIGINT) or SIGTERM, or the end of ``--duration``, stops everything, removes the
namespaces and the work directory. ``ecluster demo kill NODE`` / ``start NODE`` act on a
running demo (by its work directory).

The cluster description (:func:`make_plan`, :func:`cluster_text`) and the process
matching used to kill a member (:func:`member_argv_matches`) are pure functions.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

NODES = ("n1", "n2", "n3")
MANAGER = "m1"
NAMESPACES, LOOPBACK = "namespaces", "loopback"
DOMAIN = "example.com"
STATE_FILE = "demo.json"
RELAY_PORT = 7480
SENDER_RATE = 4.0
STOP_WAIT = 6.0


class DemoError(RuntimeError):
    """The demo cannot run (or a demo command cannot act); one-line message."""

    code = 1


class DemoUsageError(DemoError):
    """Options that cannot go together (exit status 2)."""

    code = 2


class DemoStop(BaseException):
    """SIGTERM: stop the demo like Ctrl-C does."""


# -- the MTAs (--mta) -----------------------------------------------------------------------

@dataclass(frozen=True)
class Mta:
    """What differs between the MTAs the demo can run on its nodes."""

    service: str                    # the plug-in (plugins/ecluster_<service>); `status` lists "listening"
    label: str
    port: int | None = None         # SMTP port on the VIPs (None: the mode's, 25 or 2525)
    workdir_mode: int = 0o700       # 0o711: Postfix's users (postfix, nobody) must pass through
    namespaces_only: bool = False   # every instance also listens on 127.0.0.1:25
    binary: str = ""                # a program it runs, from the Debian package of that name
    landed: str = "spool/*.eml"     # one file per message received, under a node's data dir
    landed_label: str = "spooled"
    reject_every: int = 10          # the sender: every Nth message to a domain that is refused


MTAS = {
    "smtp": Mta("smtp", "the SMTP plug-in"),
    # the client is in mynetworks (it may relay), so no domain is refused: nothing to send there
    "postfix": Mta("postfix", "Postfix", port=25, workdir_mode=0o711, namespaces_only=True,
                   binary="/usr/sbin/postfix", landed=f"mail/{DOMAIN}/new/*", landed_label="delivered",
                   reject_every=0),
}


def refusal(mta: Mta, mode: str, workdir: Path, installed) -> DemoError | None:
    """Why the demo cannot run ``mta`` (checked before anything starts), or None."""
    if mta.namespaces_only and mode != NAMESPACES:
        return DemoUsageError(f"--mta {mta.service} needs network namespaces (root, with `ip`, without "
                              f"--loopback): every node's {mta.label} listens on 127.0.0.1:25")
    if mta.service not in installed:
        return DemoError(f"{mta.label} plug-in is not installed: pip install -e plugins/ecluster_{mta.service} "
                         "(`make setup` does it)")
    if mta.binary and not os.path.exists(mta.binary):
        return DemoError(f"{mta.label} is not installed ({mta.binary} is missing): "
                         f"apt-get install {Path(mta.binary).name} (or `make setup`)")
    if mta.workdir_mode & 0o001:
        for parent in workdir.parents:
            if parent.exists() and not parent.stat().st_mode & 0o001:
                return DemoError(f"{mta.label}'s users cannot reach {workdir}: {parent} does not let others "
                                 f"pass (chmod o+x {parent}, or give another --dir)")
    return None


def mta_tables(plan: Plan) -> list[str]:
    """The cluster-file lines of the demo's MTA. Pure."""
    if plan.mta.service == "postfix":
        vips = ", ".join(f'"{v}"' for v in plan.vip_ips)
        return ["[services.postfix]", f'domains = ["{DOMAIN}"]', f'mynetworks = ["127.0.0.0/8", "{plan.client_net}"]',
                "", "# a Postfix that stops answering on 127.0.0.1:25 gives its VIPs away",
                "[[check]]", 'name = "mta"', 'kind = "smtp"', "port = 25", "interval = 0.5", "timeout = 2.0",
                "fall = 3", "rise = 2", f"vips = [{vips}]", ""]
    return ["[jlog]", 'logs = ["smtplog"]', "", "[services.smtp]", f"port = {plan.smtp_port}",
            'hostname = "mx.demo.test"', f'domains = ["{DOMAIN}"]', ""]


def mta_hints(plan: Plan, ecl: str, client_ns: str | None) -> list[str]:
    """Where to look, for the demo's MTA (the smtp plug-in has none beyond the table). Pure."""
    if plan.mta.service != "postfix":
        return []
    n1 = plan.workdir / "n1"
    hints = [f"Maildirs:      {n1}/mail/{DOMAIN}/new/ (and n2, n3: one file per delivered message)",
             f"Postfix log:   {n1}/postfix/log/maillog (and n2, n3); its lines reach m1's aggregated mainlog:\n"
             f"               {ecl} logs tail -m m1 --log mainlog -f"]
    if client_ns:
        hints.append(f"send one:      ip netns exec {client_ns} swaks --server {plan.vip_ips[0]} --to you@{DOMAIN}")
    return hints


# -- the plan (pure) ------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """Everything the demo builds, decided before anything is built."""

    mode: str
    workdir: Path
    addresses: dict[str, str]                 # member -> address
    vips: list[tuple[str, str, str]]          # (address/prefix, interface, preferred node)
    smtp_port: int
    sources: list[str]                        # client source addresses of the mail stream
    console_address: str
    client_net: str                           # the client's /24, for the CIDR query
    subnet: str = ""
    mta: Mta = MTAS["smtp"]

    @property
    def cluster_path(self) -> Path:
        return self.workdir / "cluster.toml"

    @property
    def vip_ips(self) -> list[str]:
        return [v[0].split("/")[0] for v in self.vips]

    def role(self, member: str) -> str:
        return "manager" if member == MANAGER else "node"


def choose_mode(euid: int, has_ip: bool, force_loopback: bool) -> str:
    """namespaces when root with iproute2 and not told otherwise, else loopback. Pure."""
    return NAMESPACES if euid == 0 and has_ip and not force_loopback else LOOPBACK


def make_plan(mode: str, workdir: Path, subnet: str = "10.77.0", mta: str = "smtp") -> Plan:
    """The demo cluster for ``mode`` with ``mta`` on the nodes. Pure."""
    members, spec = [*NODES, MANAGER], MTAS[mta]
    if mode == NAMESPACES:
        return Plan(mode, workdir, {m: f"{subnet}.{11 + i}" for i, m in enumerate(members)},
                    [(f"{subnet}.100/24", "eth0", "n1"), (f"{subnet}.101/24", "eth0", "n2")], spec.port or 25,
                    [f"{subnet}.{50 + i}" for i in range(8)], "127.0.0.1", f"{subnet}.0/24", subnet, spec)
    return Plan(mode, workdir, {m: f"127.0.0.{11 + i}" for i, m in enumerate(members)},
                [("127.0.0.100/8", "lo", "n1"), ("127.0.0.101/8", "lo", "n2")], spec.port or 2525,
                [f"127.0.0.{50 + i}" for i in range(8)], "127.0.0.14", "127.0.0.0/24", mta=spec)


def cluster_text(plan: Plan) -> str:
    """The demo's cluster file. Pure."""
    lines = ["# written by `ecluster demo`: removed when the demo stops", "[cluster]", 'name = "demo"',
             'keys = "keys"', 'preset = "lan"', f"vip_dry_run = {'true' if plan.mode == LOOPBACK else 'false'}", "",
             "[security]", "nodes_may_commit = true   # the demo commits through n1; off by default", ""]
    for m, addr in plan.addresses.items():
        table = "managers" if plan.role(m) == "manager" else "nodes"
        lines += [f"[{table}.{m}]", f'address = "{addr}"', f'data_dir = "{m}"']
        if table == "managers":
            lines.append(f'console_address = "{plan.console_address}"')
        lines.append("")
    for address, iface, pref in plan.vips:
        lines += ["[[vip]]", f'address = "{address}"', f'interface = "{iface}"', f'preference = "{pref}"',
                  'kind = "injection"', ""]
    lines += ["[as_logger]", "log_interval = 10", "", *mta_tables(plan)]
    return "\n".join(lines)


def member_argv(python: str, plan: Plan, member: str) -> list[str]:
    """The command that runs ``member`` (``ecluster node run`` / ``manager run``). Pure."""
    role = plan.role(member)
    return [python, "-m", "ecluster.cli", role, "run", "--config", str(plan.cluster_path), f"--{role}", member]


def inside(arg: str, workdir: Path) -> bool:
    """Whether ``arg`` is a path strictly inside ``workdir``. Pure."""
    return arg.startswith(str(workdir).rstrip("/") + "/")


def demo_argv_matches(argv: list[str], workdir: Path) -> bool:
    """Whether a process belongs to the demo in ``workdir``: an argument is a path inside
    it (the cluster file, a supervisord configuration, the sender's tag). Pure."""
    return any(inside(a, workdir) for a in argv)


def member_argv_matches(argv: list[str], workdir: Path, member: str) -> bool:
    """Whether a demo process belongs to ``member``: its runner, supervisord, programs. Pure."""
    if not demo_argv_matches(argv, workdir):
        return False
    for flag in ("--node", "--member", "--manager", "-m"):
        for i, a in enumerate(argv[:-1]):
            if a == flag and argv[i + 1] == member:
                return True
    mine = str(workdir).rstrip("/") + f"/{member}/"
    return any(a.startswith(mine) for a in argv)


def tally(results: list[dict]) -> Counter:
    """Counts of the sender's results (accepted / refused / failed, and retried). Pure."""
    c = Counter(r.get("result", "?") for r in results)
    c["retried"] = sum(1 for r in results if r.get("attempts", 1) > 1)
    return c


def what_to_try(plan: Plan, ecl: str, demo_cmd: str) -> list[tuple[str, str]]:
    """(what, command) pairs for the operator. Pure."""
    vip = plan.vip_ips[0]
    conf = plan.workdir / "n1" / "conf" / "global"
    return [
        ("see the cluster", f"{ecl} status"),
        ("see the VIPs", f"{ecl} vip list"),
        ("kill a node (its VIP moves, mail goes on)", f"{demo_cmd} kill n1"),
        ("bring it back", f"{demo_cmd} start n1"),
        ("move a VIP by hand", f"{ecl} vip move {vip} n3"),
        ("commit a config (every member applies it)", f"echo 'greeting = \"hello\"' > {conf}/demo.toml && "
                                                        f"{ecl} config commit --member n1 --add-all -m 'first commit'"),
        ("see every member apply it", f"{ecl} config status -m n1 --cluster"),
        ("run a CIDR query", f"{ecl} cidr 'show count for {plan.client_net} in connections,rejects "
                             f"cidrsize 32 order by count limit 10'"),
        ("read the journals", f"{ecl} logs status"),
    ]


# -- processes ---------------------------------------------------------------------------------

def die_with_parent() -> None:
    """In a child before exec: SIGTERM when the demo dies, even by SIGKILL (PR_SET_PDEATHSIG),
    so a killed demo does not leave its cluster running."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:  # noqa: BLE001 - best effort: the next demo cleans up anyway
        pass


def _argv_of(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return out


def matching_pids(match: Callable[[list[str]], bool]) -> list[int]:
    """PIDs whose command line satisfies ``match`` (never this process or its ancestors)."""
    skip = _ancestors()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in skip:
            argv = _argv_of(int(entry))
            if argv and match(argv):
                out.append(int(entry))
    return out


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_matching(match: Callable[[list[str]], bool], wait: float = 5.0) -> int:
    """SIGKILL every matching process until none is left; returns how many were seen."""
    seen: set[int] = set()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        pids = matching_pids(match)
        if not pids:
            break
        seen.update(pids)
        kill_pids(pids)
        time.sleep(0.05)
    return len(seen)


# -- the console relay (namespaces mode) ----------------------------------------------------------

class PortRelay:
    """127.0.0.1:<port> on the host -> (address, port) inside a namespace, in its own thread.

    Each accepted connection gets a socket made inside the namespace
    (:class:`ecluster.labnet.NsSockets`) and bytes are copied both ways.
    """

    def __init__(self, ns: str, target: tuple[str, int], port: int = RELAY_PORT):
        from ecluster.labnet import NsSockets
        self.sockets = NsSockets(ns)
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind(("127.0.0.1", port))
        except OSError:
            self.listener.bind(("127.0.0.1", 0))        # 7480 taken: any free port
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="console-relay", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._relay, sock=self.listener)
        try:
            await self._server.serve_forever()
        except asyncio.CancelledError:
            pass

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = await loop.run_in_executor(None, self.sockets.socket)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, self.target), 5)
            r2, w2 = await asyncio.open_connection(sock=sock)
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()
        await asyncio.gather(pump(reader, w2), pump(r2, writer))

    def close(self) -> None:
        def stop():
            for t in asyncio.all_tasks(self.loop):
                t.cancel()
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(stop)
        self.thread.join(timeout=3)
        self.listener.close()
        self.sockets.close()


# -- the demo ------------------------------------------------------------------------------------

@dataclass
class Stream:
    """What the mail sender reported, read from its stdout by a thread."""

    results: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self, pipe, copy_to: Path | None = None) -> None:
        """Tally the sender's lines (and keep them in ``copy_to``, ``mail.jsonl``)."""
        copy = open(copy_to, "a") if copy_to else None
        try:
            for line in pipe:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                with self.lock:
                    self.results.append(r)
                if copy:
                    copy.write(line)
                    copy.flush()
        finally:
            if copy:
                copy.close()

    def counts(self) -> Counter:
        with self.lock:
            return tally(self.results)


class Demo:
    """Builds, shows and removes the demo cluster (see the module docstring)."""

    def __init__(self, plan: Plan, out, python: str = sys.executable):
        self.plan = plan
        self.out = out                      # a rich Console
        self.python = python
        self.lab = None
        self.runners: dict[str, subprocess.Popen] = {}
        self.sender: subprocess.Popen | None = None
        self.stream = Stream()
        self.relay: PortRelay | None = None
        self.console_url: str | None = None
        self.cluster = None
        self.lock = None
        self.started_at = time.monotonic()

    # -- building ----------------------------------------------------------------------------
    def prepare_workdir(self) -> None:
        from node.datadir import DirLock, LockedError
        wd = self.plan.workdir
        wd.parent.mkdir(parents=True, exist_ok=True)
        # the lock file lives beside the work directory (it must outlive the directory's
        # removal); it is unlinked on release, safely (DirLock re-checks the inode it locked)
        lock = DirLock(lock_path(wd), f"ecluster demo (pid {os.getpid()})", kind="demo directory",
                       unlink_on_release=True)
        try:
            lock.acquire()
        except LockedError as e:
            holder = str(e).split(" is in use by ", 1)[-1]
            raise DemoError(f"a demo already runs in {wd} ({holder}): stop it first, or give another --dir") from None
        self.lock = lock
        wd.mkdir(exist_ok=True)
        os.chmod(wd, self.plan.mta.workdir_mode)
        # leftovers of a demo that was killed: its processes first, then its files
        kill_matching(lambda argv: demo_argv_matches(argv, wd))
        for entry in wd.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def build_network(self) -> None:
        from ecluster.labnet import LabNet
        self.lab = LabNet(len(self.plan.addresses), subnet=self.plan.subnet)
        self.lab.up()
        for src in self.plan.sources:
            self.lab.add_address(self.lab.client_ns, src)

    def ns_of(self, member: str) -> str | None:
        if self.lab is None:
            return None
        return self.lab.member_ns(list(self.plan.addresses).index(member) + 1)

    def write_cluster(self) -> None:
        from bus import keys as keymod
        from ecluster.clusterfile import load_cluster
        self.plan.cluster_path.write_text(cluster_text(self.plan))
        for name in [*self.plan.addresses, keymod.ADMIN]:
            keymod.create(self.plan.workdir / "keys", name)
        self.cluster = load_cluster(self.plan.cluster_path)
        self.write_state()
        self.write_ecl()

    def write_state(self) -> None:
        from ecluster.labnet import process_start_time
        state = {"mode": self.plan.mode, "pid": os.getpid(), "started": process_start_time(os.getpid()),
                 "cluster": str(self.plan.cluster_path), "python": self.python,
                 "namespaces": {m: self.ns_of(m) for m in self.plan.addresses},
                 "client_ns": self.lab.client_ns if self.lab else None}
        (self.plan.workdir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def write_ecl(self) -> None:
        """``<workdir>/ecl``: ecluster with the demo's cluster file, where the members are reachable."""
        ecluster = Path(self.python).with_name("ecluster")
        prog = str(ecluster) if ecluster.exists() else f"{self.python} -m ecluster.cli"
        where = f"ip netns exec {self.lab.client_ns} " if self.lab else ""
        path = self.plan.workdir / "ecl"
        path.write_text("#!/bin/sh\n# ecluster for the demo cluster (written by `ecluster demo`)\n"
                        f"exec {where}env ECLUSTER_CONFIG={self.plan.cluster_path} {prog} \"$@\"\n")
        path.chmod(0o755)

    def start_member(self, member: str) -> None:
        argv = member_argv(self.python, self.plan, member)
        with open(self.plan.workdir / f"{member}.runner.log", "ab") as log:
            if self.lab is not None:
                p = self.lab.popen(self.ns_of(member), argv, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
            else:
                p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=die_with_parent)
        self.runners[member] = p

    def call(self, member: str, service: str, method: str, timeout: float = 0.5, **args) -> Any:
        """A call to ``member``'s service over its ipc socket (files are shared with the lab)."""
        from bus.client import SyncClient
        with SyncClient(self.cluster, via=member) as c:
            return c.call(member, service, method, timeout=timeout, **args)

    def try_call(self, member: str, service: str, method: str, timeout: float = 0.5, **args) -> Any:
        try:
            return self.call(member, service, method, timeout=timeout, **args)
        except Exception:  # noqa: BLE001 - "not answering" is an answer for a status view
            return None

    def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.runners.items():
                if p.poll() is not None:
                    log = self.plan.workdir / f"{name}.runner.log"
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                    raise DemoError(f"{name} exited ({p.returncode}) while waiting for {what}"
                                    + (f": {tail[0]}" if tail else ""))
            value = cond()
            if value:
                return value
            time.sleep(0.2)
        raise DemoError(f"{what}: not reached within {timeout:.0f} s (logs in {self.plan.workdir})")

    def members_alive(self) -> bool:
        view = self.try_call(MANAGER, "membership", "view")
        if not isinstance(view, dict):
            return False
        return all(i.get("state") == "alive" for i in view.get("members", {}).values()) and \
            len(view.get("members", {})) == len(self.plan.addresses)

    def vips_owned(self) -> list[dict] | None:
        for m in self.plan.addresses:
            st = self.try_call(m, "election", "status")
            if isinstance(st, dict) and st.get("role") == "leader":
                rows = st.get("vips") or []
                return rows if rows and all(r.get("state") == "owned" for r in rows) else None
        return None

    def smtp_listening(self) -> set[str]:
        """The addresses the MTA listens on (its status lists "ADDRESS" or "ADDRESS:PORT")."""
        out: set[str] = set()
        for n in NODES:
            st = self.try_call(n, self.plan.mta.service, "status")
            if isinstance(st, dict):
                out |= {str(a).rsplit(":", 1)[0] for a in st.get("listening") or []}
        return out

    def bootstrap_config(self) -> None:
        from bus.client import BusError
        text = self.plan.cluster_path.read_text()
        deadline = time.monotonic() + 40
        while True:
            try:
                self.call("n1", "configsync", "bootstrap", timeout=20, cluster_text=text, author="ecluster demo")
                return
            except BusError as e:
                if time.monotonic() > deadline:
                    raise DemoError(f"config bootstrap failed: {e}") from None
                time.sleep(0.5)

    def start_sender(self) -> None:
        argv = [self.python, "-m", "ecluster.mailsend", "--port", str(self.plan.smtp_port), "--rate",
                str(SENDER_RATE), "--domain", DOMAIN, "--reject-every", str(self.plan.mta.reject_every),
                "--tag", str(self.plan.workdir / "sender")]
        for v in self.plan.vip_ips:
            argv += ["--vip", v]
        for s in self.plan.sources:
            argv += ["--source", s]
        err = open(self.plan.workdir / "sender.err.log", "ab")
        try:
            if self.lab is not None:
                self.sender = self.lab.popen(self.lab.client_ns, argv, stdout=subprocess.PIPE, stderr=err,
                                             stdin=subprocess.DEVNULL, text=True, preexec_fn=die_with_parent)
            else:
                self.sender = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                               text=True, start_new_session=True, preexec_fn=die_with_parent)
        finally:
            err.close()
        threading.Thread(target=self.stream.read, args=(self.sender.stdout, self.plan.workdir / "mail.jsonl"),
                         name="sender-reader", daemon=True).start()

    def find_console(self) -> None:
        """The console's URL from ``ecluster console url`` (relayed to the host in namespaces mode)."""
        from services.base import registry
        if "console" not in registry():
            return
        p = subprocess.run([self.python, "-m", "ecluster.cli", "console", "url", "-c", str(self.plan.cluster_path),
                            "--manager", MANAGER], capture_output=True, text=True, timeout=30)
        url = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else None
        if url is None:
            return
        if self.lab is not None:
            m = self.cluster.member(MANAGER)
            self.relay = PortRelay(self.ns_of(MANAGER), (m.console_address, m.console_port))
            prefix = f"http://{m.console_address}:{m.console_port}"
            url = f"http://127.0.0.1:{self.relay.port}" + url[len(prefix):] if url.startswith(prefix) else url
        self.console_url = url

    # -- showing ------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        view = self.try_call(MANAGER, "membership", "view") or {}
        members = view.get("members", {}) if isinstance(view, dict) else {}
        rows = self.vips_owned_rows()
        spool = {}
        for n in NODES:
            try:
                spool[n] = sum(1 for _ in (self.plan.workdir / n).glob(self.plan.mta.landed))
            except OSError:
                spool[n] = 0
        return {"members": {m: (members.get(m) or {}).get("state", "?") for m in self.plan.addresses},
                "vips": rows, "spool": spool, "stream": self.stream.counts()}

    def vips_owned_rows(self) -> list[dict]:
        for m in self.plan.addresses:
            st = self.try_call(m, "election", "status", timeout=0.3)
            if isinstance(st, dict) and st.get("role") == "leader":
                return st.get("vips") or []
        return []

    def status_table(self, snap: dict):
        from rich.table import Table
        t = Table(title=f"ecluster demo ({self.plan.mode}), running for {time.monotonic() - self.started_at:.0f} s",
                  expand=False)
        t.add_column("member")
        t.add_column("seen by m1")
        t.add_column("VIPs held")
        t.add_column(self.plan.mta.landed_label, justify="right")
        owners: dict[str, list[str]] = {}
        for r in snap["vips"]:
            for h in r.get("holders") or []:
                owners.setdefault(h, []).append(r["address"].split("/")[0])
        colour = {"alive": "green", "suspect": "yellow", "dead": "red"}
        for m, state in snap["members"].items():
            t.add_row(m, f"[{colour.get(state, 'white')}]{state}[/]", ", ".join(owners.get(m, [])),
                      str(snap["spool"].get(m, "")) if m in NODES else "")
        s = snap["stream"]
        t.caption = (f"mail stream: {s['accepted']} accepted, {s['refused']} refused, "
                     f"{s['failed']} failed, {s['retried']} retried")
        return t

    def status_line(self, snap: dict) -> str:
        s = snap["stream"]
        owners = ", ".join(f"{r['address'].split('/')[0]}={r.get('owner')}" for r in snap["vips"])
        alive = sum(1 for v in snap["members"].values() if v == "alive")
        return (f"[{time.monotonic() - self.started_at:5.0f} s] members alive {alive}/{len(snap['members'])}; "
                f"VIPs {owners or '?'}; {self.plan.mta.landed_label} {sum(snap['spool'].values())}; "
                f"mail: {s['accepted']} accepted, {s['refused']} refused, {s['failed']} failed")

    # -- removing ----------------------------------------------------------------------------
    def teardown(self, keep: bool = False) -> list[str]:
        """Stop and remove everything; returns what could not be removed (empty: all gone)."""
        problems = []
        if self.lock is None:
            return problems        # the work directory was never ours (another demo runs there)
        if self.sender is not None and self.sender.poll() is None:
            self.sender.terminate()
            try:
                self.sender.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.sender.kill()
        if self.relay is not None:
            self.relay.close()
        for p in self.runners.values():          # graceful first: supervisord stops its programs
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_WAIT
        for p in self.runners.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if self.lab is not None:
            self.lab.down()
        kill_matching(lambda argv: demo_argv_matches(argv, self.plan.workdir))
        for p in [*self.runners.values(), *([self.sender] if self.sender else [])]:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                problems.append(f"process {p.pid} did not exit")
        left = matching_pids(lambda argv: demo_argv_matches(argv, self.plan.workdir))
        if left:
            problems.append(f"processes still running: {left}")
        if self.lock is not None:
            self.lock.release()
        if not keep:
            shutil.rmtree(self.plan.workdir, ignore_errors=True)
            if self.plan.workdir.exists():
                problems.append(f"{self.plan.workdir} could not be removed")
        return problems


# -- acting on a running demo (ecluster demo kill|start) ------------------------------------------

def read_state(workdir: Path) -> dict:
    """The running demo's state file; DemoError when no demo runs there."""
    from ecluster.labnet import process_start_time
    try:
        state = json.loads((workdir / STATE_FILE).read_text())
    except (OSError, ValueError):
        raise DemoError(f"no demo is running in {workdir} (start one with: ecluster demo)") from None
    if process_start_time(int(state.get("pid", 0))) != state.get("started"):
        raise DemoError(f"the demo that used {workdir} is not running any more")
    return state


def kill_member(workdir: Path, member: str) -> int:
    """kill -9 every process of ``member`` (namespaces: everything in its namespace)."""
    state = read_state(workdir)
    if member not in state["namespaces"]:
        raise DemoError(f"no member {member!r} in the demo (members: {', '.join(state['namespaces'])})")
    ns = state["namespaces"][member]
    if ns:
        from ecluster.labnet import kill_everything_in, pids_in_namespaces
        n = len(pids_in_namespaces([ns]))
        kill_everything_in([ns])
        return n
    return kill_matching(lambda argv: member_argv_matches(argv, workdir, member))


def start_member(workdir: Path, member: str) -> int:
    """Start ``member`` again (detached; the demo removes it when it stops). Returns its pid."""
    state = read_state(workdir)
    if member not in state["namespaces"]:
        raise DemoError(f"no member {member!r} in the demo (members: {', '.join(state['namespaces'])})")
    if matching_pids(lambda argv: member_argv_matches(argv, workdir, member)) and not state["namespaces"][member]:
        raise DemoError(f"{member} is running already (kill it first: ecluster demo kill {member})")
    from ecluster.clusterfile import load_cluster
    cluster = load_cluster(state["cluster"])
    plan = Plan(state["mode"], workdir, {m: cluster.member(m).address for m in state["namespaces"]}, [], 0, [],
                "", "")
    argv = member_argv(state["python"], plan, member)
    ns = state["namespaces"][member]
    if ns:
        from ecluster.labnet import pids_in_namespaces
        if pids_in_namespaces([ns]):
            raise DemoError(f"{member} is running already (kill it first: ecluster demo kill {member})")
        argv = ["ip", "netns", "exec", ns, *argv]
    with open(workdir / f"{member}.runner.log", "ab") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    return p.pid


# -- running ------------------------------------------------------------------------------------

def run(duration: float | None, workdir: Path, force_loopback: bool = False, keep: bool = False,
        out=None, mta: str = "smtp") -> int:
    """The whole demo: build, show until Ctrl-C/SIGTERM/duration, remove. Returns the exit status."""
    from rich.console import Console
    from services.base import registry
    out = out or Console()
    mode = choose_mode(os.geteuid(), shutil.which("ip") is not None, force_loopback)
    error = refusal(MTAS[mta], mode, workdir.resolve(), registry())
    if error is not None:
        raise error
    plan = make_plan(mode, workdir.resolve(), mta=mta)
    demo = Demo(plan, out)
    global _OWNER_PID
    _OWNER_PID = os.getpid()
    old_term = signal.signal(signal.SIGTERM, _raise_stop)
    status = 0
    error: DemoError | None = None
    try:
        try:
            _build(demo, out)
            _show(demo, out, duration)
        except (KeyboardInterrupt, DemoStop):
            out.print("\n[bold]stopping[/] (Ctrl-C / SIGTERM)")
        except DemoError as e:
            error = e                   # reported (one line) after the clean-up
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not cut the clean-up short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if demo.lock is not None:                      # else nothing was built
                # a failed set-up keeps its logs (the next demo in that directory removes them)
                status = _clean_up(demo, out, workdir, keep or error is not None)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if error is not None:
        raise error
    return status


def _clean_up(demo: Demo, out, workdir: Path, keep: bool) -> int:
    with out.status("removing every process, namespace and file of the demo ..."):
        t0 = time.monotonic()
        final = demo.stream.counts()
        problems = demo.teardown(keep)
    if problems:
        out.print("[red]clean-up incomplete:[/] " + "; ".join(problems))
        return 1
    kept = f" (kept {workdir})" if keep else ""
    out.print(f"[green]removed everything[/] in {time.monotonic() - t0:.1f} s{kept}; mail: {final['accepted']} "
              f"accepted, {final['refused']} refused, {final['failed']} failed")
    return 0


_OWNER_PID = os.getpid()


def _raise_stop(signum, frame):
    if os.getpid() != _OWNER_PID:
        # a forked helper (pyroute2 forks to enter namespaces) must just die, not unwind
        # through the demo's clean-up code it inherited
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise DemoStop()


def _build(demo: Demo, out) -> None:
    plan = demo.plan
    if plan.mode == LOOPBACK:
        why = "not root" if os.geteuid() != 0 else "asked for" if shutil.which("ip") else "no `ip` command"
        out.print(f"[yellow]loopback mode ({why}):[/] members on 127.0.0.11-14, VIP plumbing in DRY-RUN "
                  "(VIPs are recorded, not plumbed; 127.0.0.100/101 exist on lo anyway)")
    else:
        out.print("[bold]namespace mode:[/] a network-namespace lab, real VIPs with gratuitous ARP")
    steps: list[tuple[str, Callable[[], Any]]] = [("preparing " + str(plan.workdir), demo.prepare_workdir)]
    if plan.mode == NAMESPACES:
        steps.append(("building the network lab (3 nodes, 1 manager, 1 client)", demo.build_network))
    steps += [
        ("writing the cluster file and CURVE keys", demo.write_cluster),
        ("starting n1, n2, n3 and m1 (supervisord, broker, services)",
         lambda: [demo.start_member(m) for m in plan.addresses]),
        ("waiting for every member to see every other alive",
         lambda: demo.wait(demo.members_alive, 90, "membership")),
        ("waiting for the election to place both VIPs", lambda: demo.wait(demo.vips_owned, 60, "VIP owners")),
        (f"waiting for {plan.mta.label} to listen on the VIPs",
         lambda: demo.wait(lambda: demo.smtp_listening() >= set(plan.vip_ips), 60, "SMTP listeners")),
        ("bootstrapping the configuration repository", demo.bootstrap_config),
        ("starting the mail stream from the client", demo.start_sender),
        ("finding the web console", demo.find_console),
    ]
    _steps(out, steps)


def _steps(out, steps: list[tuple[str, Callable[[], Any]]]) -> None:
    """Run the set-up steps with progress: a spinner on a terminal, one line each otherwise."""
    if out.is_terminal:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=out, transient=False) as progress:
            overall = progress.add_task("set-up", total=len(steps))
            for text, fn in steps:
                progress.update(overall, description=text)
                fn()
                progress.console.print(f"[green]✓[/] {text}")
                progress.advance(overall)
            progress.update(overall, description="ready")
        return
    for text, fn in steps:
        t0 = time.monotonic()
        out.print(f"... {text}", highlight=False)
        fn()
        out.print(f"    done in {time.monotonic() - t0:.1f} s", highlight=False)


def _show(demo: Demo, out, duration: float | None) -> None:
    from rich.live import Live
    plan = demo.plan
    ecl = str(plan.workdir / "ecl")
    default_dir = default_workdir()
    exe = "ecluster" if shutil.which("ecluster") else str(Path(demo.python).with_name("ecluster"))
    demo_cmd = f"{exe} demo" + ("" if plan.workdir == default_dir else f" --dir {plan.workdir}")
    lines = []
    if demo.console_url:
        lines.append(f"web console:   [bold]{demo.console_url}[/]"
                     + ("   (relayed from the host to m1's namespace)" if demo.relay else ""))
    else:
        m = plan.addresses[MANAGER]
        lines.append(f"web console:   not installed; the manager m1 is at {m}")
    n1 = demo.cluster.member("n1")
    if plan.mode == NAMESPACES:
        url = f"http://{n1.address}:{n1.metrics_port}/metrics"
        lines.append(f"metrics:       {url} (one per member), inside the lab:\n"
                     f"               ip netns exec {demo.lab.client_ns} python3 -c "
                     f"\"import urllib.request as u; print(u.urlopen('{url}').read().decode())\"")
    else:
        lines.append(f"metrics:       http://{n1.address}:{n1.metrics_port}/metrics (one per member)")
    lines.append(f"cluster file:  {plan.cluster_path}")
    lines.append(f"admin CLI:     {ecl} <command>   (ecluster with the demo's cluster file"
                 + (", run in the client namespace)" if plan.mode == NAMESPACES else ")"))
    every = plan.mta.reject_every
    lines.append(f"mail:          {SENDER_RATE:g} messages/s to {', '.join(plan.vip_ips)} port {plan.smtp_port}, "
                 + (f"1 in {every} to a refused domain" if every else f"all to {DOMAIN}"))
    lines += mta_hints(plan, ecl, demo.lab.client_ns if demo.lab else None)
    lines.append("")
    lines.append("[bold]what to try[/] (in another terminal):")
    for what, cmd in what_to_try(plan, ecl, demo_cmd):
        lines.append(f"  {what}:\n    [cyan]{cmd}[/]")
    lines.append("")
    lines.append("Ctrl-C stops the demo and removes everything"
                 + (f" (or it stops by itself after {duration:g} s)" if duration else "") + ".")
    out.rule("[bold]ecluster demo is running[/]")
    for line in lines:                  # not wrapped: the commands stay copy-pastable
        out.print(line, soft_wrap=True, highlight=False)
    out.rule()
    demo.started_at = time.monotonic()
    end = time.monotonic() + duration if duration else None
    if out.is_terminal:
        with Live(demo.status_table(demo.snapshot()), console=out, refresh_per_second=2) as live:
            while end is None or time.monotonic() < end:
                time.sleep(1.0)
                live.update(demo.status_table(demo.snapshot()))
        return
    next_line = 0.0
    while end is None or time.monotonic() < end:
        if time.monotonic() >= next_line:
            out.print(demo.status_line(demo.snapshot()), highlight=False)
            next_line = time.monotonic() + 5
        time.sleep(0.5)


def lock_path(workdir: Path) -> Path:
    """The demo's lock, beside its work directory (``/tmp/ecluster-demo-0.lock``). Pure."""
    return workdir.with_name(workdir.name + ".lock")


def default_workdir() -> Path:
    """Where the demo lives unless told otherwise: short (unix socket paths), one per user."""
    return Path(f"/tmp/ecluster-demo-{os.getuid()}")
