"""Run a chaos schedule against a whole ecluster in the namespace lab and judge the history.

    python -m tests.chaos.runner --seed 42 --duration 300          # from the repo root, as root
    python -m tests.chaos.runner --schedule saved.jsonl            # replay a printed schedule

The lab: 3 nodes and 2 managers (lan preset, 2 VIPs) under supervisord in network
namespaces (tests/vip_cluster.LabCluster), with the SMTP plug-in on the nodes. The workload:
a client probing every VIP every 5 ms, mail to the SMTP plug-in on the VIPs, journal writes
on every node (log ``chaosdisk`` on the data disk, log ``chaoslog`` on a 16 MB tmpfs that the
``disk_full`` fault fills), a config commit every few seconds from a rotating member, and an
address sampler reading every node's interfaces every 10 ms.

The seed and the schedule are printed first. When the faults are over, everything is healed
and restarted, the workload stops, and the runner waits (with deadlines) for the cluster to
converge; then it collects the history and prints the verdict (tests/chaos/checker.py).
Every namespace, process (by PID), tmpfs mount and netem qdisc is removed at the end, also
on an error, Ctrl-C or SIGTERM. Exit status: 0 pass, 1 fail, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
for p in (str(REPO), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from vip_cluster import LabCluster, PYTHON, wait_for  # noqa: E402
from ecluster.labnet import pids_in_namespaces as _pids_in_namespaces  # noqa: E402

from .checker import AppliedFault, History, check, format_verdict  # noqa: E402
from .schedule import (  # noqa: E402
    DEFAULT_KINDS, FAULT_KINDS, FULL_LOG, Fault, ScheduleError, clock_targets, end_time, format_schedule,
    from_json, generate, netem_to_tbf, to_json,
)

DISK_LOG = "chaosdisk"
LOGS = (DISK_LOG, FULL_LOG)
TMPFS_SIZE = "16m"
SMTP_PORT = 25
MAIL_DOMAIN = "chaos.test"
HOOK_DIR = HERE / "clockhook"
BATCH = 20
WRITE_EVERY_S = 0.05
COMMIT_EVERY_S = 3.0
CONVERGE_S = 120.0
PAYLOAD_RE = re.compile(rb"^(n\d+):(chaos\w+):(\d{9}):")


class ChaosError(Exception):
    """The run could not be set up or driven; one-line message."""


def payload(node: str, log: str, k: int) -> bytes:
    head = f"{node}:{log}:{k:09d}:".encode()
    return head + b"x" * (100 - len(head))


# -- the cluster ---------------------------------------------------------------------------------------

class ChaosCluster(LabCluster):
    """A LabCluster with the chaos extras: journal logs (one on a tmpfs), the SMTP plug-in,
    the clock hook on the members whose clock the schedule steps."""

    def __init__(self, scratch: Path, clock_members: set[str], smtp: bool = True, **kw):
        super().__init__(**kw)
        self.scratch = scratch
        self.clock_members = clock_members
        self.smtp = smtp
        self.mounts: list[Path] = []
        self.netem: set[tuple[str, str]] = set()       # (namespace, device) with our qdisc
        self.paused: set[str] = set()
        self._has_netem: bool | None = None

    def clock_file(self, name: str) -> Path:
        return self.scratch / f"clock-{name}"

    def write_cluster(self) -> Path:
        from ecluster.clusterfile import load_cluster
        path = super().write_cluster()
        logs = [*LOGS, *(["smtplog"] if self.smtp else [])]
        extra = ["", "[jlog]", f"logs = {json.dumps(logs)}", ""]
        if self.smtp:
            extra += ["[services.smtp]", f"port = {SMTP_PORT}", 'hostname = "mx.chaos.test"',
                      f'domains = ["{MAIL_DOMAIN}"]', ""]
        path.write_text(path.read_text() + "\n".join(extra))
        self.cluster = load_cluster(path)
        # the journal that the disk_full fault fills lives on its own small tmpfs, mounted
        # before the member starts so that its mount namespace (ip netns exec) has it too
        for name in self.names:
            if name.startswith("n"):
                d = self.root / name / "jlog" / FULL_LOG
                d.mkdir(parents=True, exist_ok=True)
                subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(d)],
                               check=True, capture_output=True)
                self.mounts.append(d)
        for name in self.clock_members:
            self.clock_file(name).write_text("0\n")
        return path

    def start_member(self, name: str) -> None:
        if name not in self.clock_members:
            return super().start_member(name)
        old = {k: os.environ.get(k) for k in ("PYTHONPATH", "ECL_CHAOS_CLOCK_FILE")}
        os.environ["PYTHONPATH"] = str(HOOK_DIR)
        os.environ["ECL_CHAOS_CLOCK_FILE"] = str(self.clock_file(name))
        try:        # LabCluster.start_member passes our environment on (through supervisord)
            super().start_member(name)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def data_dir(self, name: str) -> Path:
        return self.root / name

    def close(self) -> None:
        try:
            for name in list(self.paused):
                self.cont(name)
            for ns, dev in list(self.netem):
                self.netem_off(ns, dev)
            self.lab.down()                     # every process by PID, then the namespaces
        finally:
            for d in self.mounts:
                subprocess.run(["umount", "-l", str(d)], capture_output=True)
            self.mounts.clear()
            super().close()

    # -- faults ----------------------------------------------------------------------------------------
    def has_netem(self) -> bool:
        """Whether the kernel has sch_netem (tried once, on the client's lo)."""
        if self._has_netem is None:
            ns = self.lab.client_ns
            r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                                "delay", "1ms"], capture_output=True)
            self._has_netem = r.returncode == 0
            if self._has_netem:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root"],
                               capture_output=True)
        return self._has_netem

    def netem_on(self, ns: str, dev: str, spec: str) -> str:
        """netem ``spec`` on ``dev`` in ``ns``, or its tbf stand-in; returns the qdisc used."""
        qdisc = f"netem {spec}" if self.has_netem() else netem_to_tbf(spec)
        r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                            *qdisc.split()], capture_output=True, text=True)
        if r.returncode != 0:
            raise ChaosError(f"tc {qdisc} on {dev}: {r.stderr.strip()}")
        self.netem.add((ns, dev))
        return qdisc

    def netem_off(self, ns: str, dev: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
        self.netem.discard((ns, dev))

    def stop(self, name: str) -> None:
        self.paused.add(name)
        for pid in _pids_in_namespaces([self.ns(name)]):
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass

    def cont(self, name: str) -> None:
        for pid in _pids_in_namespaces([self.ns(name)]):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.paused.discard(name)

    def supervisor(self, name: str):
        """An XML-RPC proxy to the member's supervisord (over its unix socket)."""
        import xmlrpc.client
        from supervisor.xmlrpc import SupervisorTransport
        sock = self.cluster.member(name).run_dir / "supervisor.sock"
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(
            None, None, f"unix://{sock}"))

    def program_states(self, name: str) -> dict[str, str] | None:
        try:
            return {p["name"]: p["statename"] for p in self.supervisor(name).supervisor.getAllProcessInfo()}
        except Exception:   # noqa: BLE001 - supervisord down or restarting
            return None


# -- the workload -------------------------------------------------------------------------------------

class Workload:
    """Journal writers (one thread per node), a config committer, a mail sender, probes."""

    def __init__(self, lc: ChaosCluster, seed: int):
        self.lc = lc
        self.rng = random.Random(seed ^ 0x5EED)
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[str, list[int]] = {}
        self.maybe: dict[str, list[int]] = {}
        self.commits_acked: list[str] = []
        self.commit_errors: list[str] = []
        self.touched: set[str] = set()          # members whose live config copy we edited
        self.threads: list[threading.Thread] = []
        self.probes: dict[str, subprocess.Popen] = {}
        self.mail: subprocess.Popen | None = None
        self.mail_file: Path | None = None
        self.mail_out: bytes = b""
        self.probe_out: dict[str, bytes] = {}

    def start(self) -> None:
        for i, vip in enumerate(self.lc.vips):
            ip = vip["address"].split("/")[0]
            self.probes[ip] = self.lc.start_probe(86400, vip=ip)
        if self.lc.smtp:
            argv = [PYTHON, "-m", "ecluster.mailsend", "--port", str(SMTP_PORT), "--rate", "2",
                    "--domain", MAIL_DOMAIN, "--reject-every", "0", "--retries", "20", "--timeout", "3"]
            for vip in self.lc.vips:
                argv += ["--vip", vip["address"].split("/")[0]]
            # a file, not a pipe: nobody reads until the end, and a full pipe would stop the sender
            self.mail_file = self.lc.scratch / "mail.jsonl"
            with open(self.mail_file, "wb") as out:
                self.mail = self.lc.lab.popen(self.lc.lab.client_ns, argv, stdout=out,
                                              stderr=subprocess.DEVNULL, cwd=str(REPO))
        for node in [n for n in self.lc.names if n.startswith("n")]:
            self.threads.append(threading.Thread(target=self._writer, args=(node,), daemon=True, name=f"w-{node}"))
        self.threads.append(threading.Thread(target=self._committer, daemon=True, name="committer"))
        for t in self.threads:
            t.start()

    def stop_writes(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=60)
        if self.mail is not None and self.mail.poll() is None:
            self.mail.send_signal(signal.SIGTERM)
            try:
                self.mail.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.mail.kill()
                self.mail.wait()
        if self.mail is not None:
            self.mail_out = self.mail_file.read_bytes()

    def stop_probes(self) -> None:
        for ip, p in self.probes.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                self.probe_out[ip], _ = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                self.probe_out[ip], _ = p.communicate()

    def _writer(self, node: str) -> None:
        from bus.client import SyncClient
        k = {log: 0 for log in LOGS}
        client = None
        turn = 0
        while not self.stop_event.is_set():
            log = LOGS[turn % len(LOGS)]
            turn += 1
            ids = list(range(k[log], k[log] + BATCH))
            k[log] += BATCH
            key = f"{node}/{log}"
            ok = False
            try:
                if client is None:
                    client = SyncClient(self.lc.cluster, via=node)
                client.call(node, "jlog", "write", timeout=2.0, log=log, records=[payload(node, log, i) for i in ids])
                ok = True
            except Exception:   # noqa: BLE001 - not acknowledged: the records may or may not exist
                try:
                    client.close()
                except Exception:   # noqa: BLE001
                    pass
                client = None
            with self.lock:
                (self.acked if ok else self.maybe).setdefault(key, []).extend(ids)
            self.stop_event.wait(WRITE_EVERY_S if ok else 0.3)
        if client is not None:
            client.close()

    def _committer(self) -> None:
        n = 0
        while not self.stop_event.wait(COMMIT_EVERY_S):
            live = [m for m in self.lc.names if m in self.lc.member_procs and m not in self.lc.paused]
            if not live:
                continue
            member = live[n % len(live)]
            n += 1
            try:
                st = self.lc.call(member, "configsync", "status", timeout=3.0)
                if st.get("state") != "in sync":
                    self.lc.call(member, "configsync", "pull", timeout=10.0, theirs=True)
                conf = self.lc.data_dir(member) / "conf" / "global"
                self.touched.add(member)
                (conf / "chaos.toml").write_text(f"# written by the chaos runner\ncommit = {n}\nby = \"{member}\"\n")
                r = self.lc.call(member, "configsync", "commit", timeout=40.0, message=f"chaos {n} via {member}",
                                 add_all=True, author="chaos <chaos@lab>")
                with self.lock:
                    self.commits_acked.append(r["rev"])
            except Exception as e:  # noqa: BLE001 - refused, timed out, member gone: not acknowledged
                with self.lock:
                    self.commit_errors.append(f"{member}: {type(e).__name__}: {str(e)[:120]}")


# -- applying faults ----------------------------------------------------------------------------------

class FaultDriver:
    """Applies and undoes the schedule's faults on a ChaosCluster; records what happened."""

    def __init__(self, lc: ChaosCluster, log=print):
        self.lc = lc
        self.log = log
        self.applied: list[AppliedFault] = []
        self.undo: dict[int, callable] = {}

    def index(self, name: str) -> int:
        return self.lc.index(name)

    def apply(self, k: int, f: Fault) -> str:
        lc, lab = self.lc, self.lc.lab
        kind, target = f.fault, f.target
        if kind == "kill":
            lc.kill_member(target, link_down=True)
            self.undo[k] = lambda: lc.revive_member(target)
        elif kind == "service_kill":
            member, prog = target.split(":")
            if member not in lc.member_procs:
                return "member not running: skipped"
            try:
                info = lc.supervisor(member).supervisor.getProcessInfo(prog)
            except OSError as e:
                return f"supervisord not reachable ({e.strerror or e}): skipped"
            if not info.get("pid"):
                return f"{prog} not running ({info.get('statename')}): skipped"
            os.kill(info["pid"], signal.SIGKILL)
            return f"pid {info['pid']}"
        elif kind == "link_down":
            lab.link_down(self.index(target))
            self.undo[k] = lambda: lab.link_up(self.index(target))
        elif kind in ("partition", "no_quorum"):
            if kind == "no_quorum":
                lab.isolate_all()
            else:
                lab.partition([[self.index(m) for m in g.split(",")] for g in target.split("|")])
            self.undo[k] = lab.heal
        elif kind == "netem":
            i = self.index(target)
            pairs = [(lc.ns(target), "eth0"), (lab.hub_ns, f"vm{i}")]
            self.undo[k] = lambda: [lc.netem_off(ns, dev) for ns, dev in pairs]
            used = [lc.netem_on(ns, dev, f.arg) for ns, dev in pairs]
            return "" if used[0].startswith("netem") else f"no netem in this kernel: {used[0]}"
        elif kind == "disk_full":
            filler = lc.data_dir(target) / "jlog" / f.arg / ".chaos-filler"
            written = 0
            # unbuffered, big writes then smaller ones, until not one byte fits
            with open(filler, "wb", buffering=0) as fh:
                for size in (1 << 20, 65536, 4096, 512, 1):
                    try:
                        while True:
                            n = fh.write(b"\0" * size)
                            if not n:
                                break
                            written += n
                    except OSError:
                        pass
            self.undo[k] = lambda: filler.unlink(missing_ok=True)
            return f"filled {written >> 10} KiB"
        elif kind == "clock_jump":
            if target not in lc.clock_members:
                return "no clock hook on this member: skipped"
            lc.clock_file(target).write_text(f"{float(f.arg)}\n")
            self.undo[k] = lambda: lc.clock_file(target).write_text("0\n")
        elif kind == "pause":
            lc.stop(target)
            self.undo[k] = lambda: lc.cont(target)
        else:
            raise ChaosError(f"unknown fault {kind!r}")
        return ""

    def run(self, schedule: list[Fault], t0: float, stop: threading.Event) -> None:
        """Apply every fault at t0 + f.t and undo it at t0 + f.end (wall clock)."""
        events = []
        for k, f in enumerate(schedule):
            heapq.heappush(events, (f.t, 1, k))             # starts after ends at the same instant
            if f.duration > 0:
                heapq.heappush(events, (f.end, 0, k))
        records: dict[int, AppliedFault] = {}
        try:
            while events and not stop.is_set():
                at, is_start, k = events[0]
                wait = t0 + at - time.time()
                if wait > 0:
                    stop.wait(min(wait, 0.5))
                    continue
                heapq.heappop(events)
                f = schedule[k]
                if is_start:
                    try:
                        note = self.apply(k, f)
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        note = f"apply failed: {type(e).__name__}: {e}"
                    now = time.time()
                    records[k] = AppliedFault(f.t, f.fault, f.target, f.duration, f.arg, now, now, note)
                    self.applied.append(records[k])
                    self.log(f"  {now - t0:7.2f} +{f.fault:<12} {f.target:<22} {f.arg} {note}".rstrip())
                else:
                    self._undo(k, records.get(k), t0)
        finally:
            for k in list(self.undo):       # interrupted: undo what is still in force
                self._undo(k, records.get(k), t0)

    def _undo(self, k: int, rec: AppliedFault | None, t0: float) -> None:
        fn = self.undo.pop(k, None)
        note = ""
        if fn is not None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                note = f"undo failed: {type(e).__name__}: {e}"
        if rec is not None:
            rec.end = time.time()
            if note:
                rec.note = (rec.note + "; " + note).strip("; ")
            if fn is not None:
                self.log(f"  {rec.end - t0:7.2f} -{rec.fault:<12} {rec.target:<22} {note}".rstrip())


# -- collecting the history ---------------------------------------------------------------------------

def sink_records(lc: ChaosCluster, manager: str) -> dict[str, list[int]]:
    """"node/log" -> record ids of our logs in manager's aggregated files, in file order."""
    from manager.logsink import aggregated_files, read_records
    m = lc.cluster.member(manager)
    root = Path(m.logs_root or m.data_dir / "logs")
    out: dict[str, list[int]] = {}
    if not root.exists():
        return out
    for _day, log, node, path in aggregated_files(root):
        if log not in LOGS:
            continue
        ids = out.setdefault(f"{node}/{log}", [])
        for record in read_records(path):        # decoded: the file's escaping undone
            mm = PAYLOAD_RE.match(record)
            if mm:
                ids.append(int(mm.group(3)))
    return out


def config_revs(lc: ChaosCluster, member: str) -> list[str] | None:
    repo = lc.data_dir(member) / "config.git"
    r = subprocess.run(["git", "-C", str(repo), "rev-list", "main"], capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else None


def applied_rev(lc: ChaosCluster, member: str) -> str | None:
    f = lc.data_dir(member) / "conf.applied"
    return f.read_text().strip() or None if f.exists() else None


def spooled(lc: ChaosCluster, node: str) -> list[str]:
    d = lc.data_dir(node) / "spool"
    return sorted(p.stem for p in d.glob("*.eml")) if d.is_dir() else []


def head(lc: ChaosCluster) -> str | None:
    """The configuration coordinator's head (None while there is no established coordinator)."""
    for m in lc.names:
        try:
            h = lc.call(m, "configsync", "head", timeout=2.0)
            if h.get("coordinator") and (h.get("committed") or h.get("head")):
                return h.get("committed") or h["head"]
        except Exception:   # noqa: BLE001
            continue
    return None


def converge(lc: ChaosCluster, work: Workload, log=print) -> dict[str, bool]:
    """After the faults: wait (deadlines) for programs, config, aggregation and VIPs to settle."""
    done: dict[str, bool] = {}
    deadline = time.monotonic() + CONVERGE_S

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    def step(name, cond, timeout):
        t = time.monotonic()
        try:
            wait_for(cond, timeout, interval=0.5, what=name)
            done[name] = True
        except AssertionError:
            done[name] = False
        log(f"  converge: {name}: {'yes' if done[name] else 'NO'} after {time.monotonic() - t:.1f} s")

    step("every program RUNNING", lambda: all(
        (s := lc.program_states(m)) and all(v == "RUNNING" for v in s.values()) for m in lc.names), left())
    def config_applied():
        h = head(lc)
        if not h:
            return False
        behind = [m for m in lc.names if applied_rev(lc, m) != h]
        for m in behind:
            # our own edit, left in the live copy by a commit that failed, blocks applying (by
            # design: hand edits are never overwritten); we are the only editor: discard it
            if m in work.touched:
                try:
                    if lc.call(m, "configsync", "status", timeout=3.0).get("state") == "modified locally":
                        lc.call(m, "configsync", "pull", timeout=10.0, theirs=True)
                        log(f"  converge: discarded the runner's uncommitted edit on {m}")
                except Exception:   # noqa: BLE001 - not up yet: next round
                    pass
        return not behind
    step("config applied everywhere", config_applied, left())

    def complete():
        for mgr in [m for m in lc.names if m.startswith("m")]:
            got = sink_records(lc, mgr)
            for key, ids in work.acked.items():
                if not set(ids) <= set(got.get(key, ())):
                    return False
        return True
    step("aggregation complete", complete, left())
    step("VIPs settled", lambda: lc.wait_settled(timeout=5), left())
    return done


def collect(lc: ChaosCluster, work: Workload, driver: FaultDriver, sampler, phase, seed) -> History:
    from probe_analysis import parse_lines
    vips = [v["address"].split("/")[0] for v in lc.vips]
    with sampler._lock:
        reads = list(sampler.reads)
    names = {lc.index(n): n for n in lc.names}
    probes = {ip: [(a.t0, a.t1, a.who) for a in parse_lines(out.decode())] for ip, out in work.probe_out.items()}
    accepted = []
    for line in work.mail_out.decode(errors="replace").splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("result") == "accepted" and d.get("id"):
            accepted.append(d["id"])
    h = head(lc)
    return History(
        vips=vips, members=list(lc.names),
        reads=[(t, names[i], tuple(sorted(held))) for t, i, held in reads],
        arp_doubles=[(t, v, [names.get(i, f"mac?{i}") for i in ms]) for t, v, ms in sampler.arp_double_holders()],
        probes=probes, faults=driver.applied,
        journal_acked={k: sorted(v) for k, v in work.acked.items()},
        journal_maybe={k: sorted(v) for k, v in work.maybe.items()},
        sinks={m: sink_records(lc, m) for m in lc.names if m.startswith("m")},
        commits_acked=list(work.commits_acked),
        member_revs={m: config_revs(lc, m) for m in lc.names},
        applied={m: applied_rev(lc, m) for m in lc.names},
        final_head=h,
        process_states={m: s for m in lc.names if (s := lc.program_states(m)) is not None},
        mail_accepted=accepted,
        mail_spooled={n: spooled(lc, n) for n in lc.names if n.startswith("n")},
        phase=phase, probe_end=max((a[1] for att in probes.values() for a in att), default=phase[1]),
        seed=seed,
    )


# -- the run ------------------------------------------------------------------------------------------

def run(schedule: list[Fault], seed: int, smtp: bool = True, history_out: Path | None = None, log=print):
    """Run ``schedule`` against a fresh lab; return (verdict, history). Needs root."""
    if os.geteuid() != 0:
        raise ChaosError("needs root (network namespaces, tmpfs mounts, tc)")
    scratch = Path(__import__("tempfile").mkdtemp(prefix="eclchaos", dir="/tmp"))
    lc = ChaosCluster(scratch, clock_targets(schedule), smtp=smtp, n_nodes=3, n_managers=2, preset="lan",
                      vips=[{"address": "10.99.0.100/24", "preference": "n1"},
                            {"address": "10.99.0.101/24", "preference": "n2"}])
    stop = threading.Event()
    work = None
    try:
        t = time.monotonic()
        lc.start()
        log(f"cluster up in {time.monotonic() - t:.1f} s: {lc.root}")
        wait_for(lambda: lc.call("n1", "configsync", "bootstrap", timeout=20.0,
                                 cluster_text=lc.path.read_text(), author="chaos <chaos@lab>"), 60,
                 interval=1.0, what="config bootstrap")
        wait_for(lambda: (h := head(lc)) and all(applied_rev(lc, m) == h for m in lc.names), 60,
                 interval=0.5, what="bootstrap applied everywhere")
        if smtp:
            wait_for(lambda: all(lc.call(n, "smtp", "status", timeout=1.0) for n in ("n1", "n2", "n3")), 60,
                     interval=0.5, what="smtp plug-in answers")
        sampler = lc.lab.start_sampler([v["address"].split("/")[0] for v in lc.vips])
        work = Workload(lc, seed)
        work.start()
        driver = FaultDriver(lc, log)
        time.sleep(2.0)             # the workload is running before the first fault (pacing, not sync)
        t0 = time.time()
        log(f"faults start (t = 0 at {t0:.3f})")
        driver.run(schedule, t0, stop)
        t_end = time.time()
        log(f"faults over after {t_end - t0:.1f} s; converging")
        # whatever is still down comes back (a fault whose undo failed, say)
        lc.lab.heal()
        for name in lc.names:
            if name not in lc.member_procs:
                lc.revive_member(name)
        work.stop_writes()
        converge(lc, work, log)
        time.sleep(END_PROBE_S)      # the probes see the settled VIPs for a while (pacing)
        work.stop_probes()
        sampler.stop()
        history = collect(lc, work, driver, sampler, (t0, t_end), seed)
        if history_out is not None:
            history_out.write_text(json.dumps(dataclasses.asdict(history)))
        if work.commit_errors:
            log(f"{len(work.commit_errors)} commits not acknowledged, e.g.: " + " | ".join(work.commit_errors[:3]))
        verdict = check(history)
        return verdict, history
    finally:
        stop.set()
        if work is not None:
            work.stop_event.set()
            for p in [*work.probes.values(), work.mail]:
                if p is not None and p.poll() is None:
                    p.kill()
        if os.environ.get("ECL_KEEP"):
            log(f"kept {lc.root} (lab torn down)")
        lc.close()
        import shutil
        shutil.rmtree(scratch, ignore_errors=True)


END_PROBE_S = 4.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos.runner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=None, help="schedule seed (default: random, printed)")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of faults (default 120)")
    ap.add_argument("--faults", default=",".join(DEFAULT_KINDS),
                    help=f"comma-separated fault kinds (known: {', '.join(FAULT_KINDS)})")
    ap.add_argument("--schedule", type=Path, default=None, help="replay this schedule (JSON lines) instead")
    ap.add_argument("--no-smtp", action="store_true", help="no SMTP plug-in, no mail")
    ap.add_argument("--history", type=Path, default=None, help="write the recorded history here (JSON)")
    ap.add_argument("--dry-run", action="store_true", help="print the schedule and stop")
    ap.add_argument("--check", type=Path, default=None, metavar="HISTORY",
                    help="judge a history written by --history again, and stop (no lab)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.check is not None:
        try:
            history = History.from_dict(json.loads(args.check.read_text()))
        except (OSError, ValueError, TypeError) as e:
            print(f"chaos: cannot read history {args.check}: {e}", file=sys.stderr)
            return 2
        verdict = check(history)
        print(format_verdict(verdict, history.seed))
        return 0 if verdict.passed else 1
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    try:
        if args.schedule is not None:
            schedule = from_json(args.schedule.read_text())
        else:
            schedule = generate(seed, args.duration, kinds=[k.strip() for k in args.faults.split(",") if k.strip()])
    except (ScheduleError, OSError) as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 2
    print(f"seed {seed}; {len(schedule)} faults over {end_time(schedule):.1f} s; replay with: "
          f"python -m tests.chaos.runner --seed {seed} --duration {args.duration:g}"
          + (f" --faults {args.faults}" if args.faults != ",".join(DEFAULT_KINDS) else ""))
    print(format_schedule(schedule))
    print("# schedule as JSON lines (for --schedule):")
    print(to_json(schedule))
    sys.stdout.flush()
    if args.dry_run:
        return 0

    main_pid = os.getpid()

    def on_term(signum, _frame):
        # pyroute2 forks helpers (netns creation) that inherit this handler and are ended
        # with SIGTERM: a fork must just exit, never run our clean-up of the parent's lab
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    try:
        verdict, _ = run(schedule, seed, smtp=not args.no_smtp, history_out=args.history,
                         log=lambda s: print(s, flush=True))
    except ChaosError as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"chaos: interrupted ({e or 'Ctrl-C'}); lab cleaned up (seed {seed})", file=sys.stderr)
        return 130
    print(format_verdict(verdict, seed))
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
