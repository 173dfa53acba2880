"""What an idle member costs: ecluster beside keepalived, measured in one run.

Usage (as root): python bench/footprint.py [--sizes 3+1,7+2] [--preset lan|fast] [--window S]
                                          [--quick] [--json FILE] [--no-keepalived]

For each cluster size ("3+1" = 3 nodes + 1 manager; default 3+1 only) a fresh cluster runs on
loopback (distinct ports on 127.0.0.1, ``vip_dry_run = true``, one VIP on "lo" preferring n1,
keys from ``ecluster keys init``, the cluster file's default security: commits through the
manager). Rows:

  cold start      every member launched at once (``ecluster node run`` / ``manager run``) until
                  every member answers election.status over the bus seeing every member alive,
                  all name the same coordinator, and the coordinator has every VIP owned and
                  held by its owner: seconds (polled every 0.1 s). Target <= 3 s.
  idle member     the configuration is bootstrapped (``eccfg bootstrap``, as on any real
                  cluster), then 5 s after it is applied everywhere an idle window (30 s,
                  ``--quick`` 10 s) starts. Per member, over the runner and supervisord and all
                  their descendants (/proc children): processes, PSS (sum of
                  /proc/PID/smaps_rollup "Pss:"), idle CPU in % of one core ((utime + stime
                  + the reaped children's cutime + cstime) delta of /proc/PID/stat over the
                  window / CLK_TCK / window * 100; "sched" is the same from the ns counters of
                  /proc/PID/task/*/schedstat, finer than a 10 ms tick). One line per member,
                  the mean per role, and the cost by supervisord program (named from the
                  cmdline: ``service run election`` -> election, ``bus run`` -> broker; a
                  program's own children count to it), mean over the members that run it,
                  sorted by CPU. Targets (per member, so the worst member is judged): idle CPU
                  <= 0.5 % with preset lan, PSS <= 100 MB.
  CLI             ``ecluster --help`` wall time and ``ecluster status -c FILE`` against the
                  running cluster, median of 5 each. Targets <= 0.1 s and <= 0.2 s.
  config commit   a file edited in the manager's live copy, then ``eccfg commit --member m1``:
                  from launching eccfg until the file (with the new content) is in every
                  member's live checkout (<data_dir>/conf), polled every 2 ms; median of 5
                  after one warm-up commit. Target <= 0.4 s.

Anchors, in the same run:

  keepalived      one instance (VRRP, advert_int 1, MASTER of one VIP) in a network namespace
                  made for it (``eclfp<pid>``, a veth pair inside it), measured exactly like a
                  member over the same idle window (it runs while ecluster idles). Installed
                  with apt-get when missing; skipped with the reason when that fails or
                  without root. Ratios: ecluster idle CPU and PSS / keepalived's.
  pacemaker       not run: reported as "not measured (reason)".

Every figure here is a ratio to its anchor or a count; absolute times on this noisy 2-core
machine move with the load, which is printed (load average, and how busy the machine was
during the idle window). Exit status 0 whether or not the targets are met; 1 when the bench
itself failed (a cluster did not come up, a command failed), 2 for bad arguments.
Everything the bench starts is stopped by PID and its namespace removed, also on failure
and on Ctrl-C / SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the repository root only, and tests/ after it: bench/ first would shadow the bus package
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))

CLK_TCK = os.sysconf("SC_CLK_TCK")
PYTHON = sys.executable
ECLUSTER = [str(Path(PYTHON).parent / "ecluster")] if (Path(PYTHON).parent / "ecluster").exists() \
    else [PYTHON, "-m", "ecluster.cli"]
ECCFG = [str(Path(PYTHON).parent / "eccfg")] if (Path(PYTHON).parent / "eccfg").exists() \
    else [PYTHON, "-c", "import sys; from ecluster.cli import eccfg_main; sys.exit(eccfg_main())"]

VIP = "192.0.2.10/24"                 # dry run: never plumbed
KA_NET = "10.97.0"                    # keepalived's lab, inside its own namespace only
KA_VIP = f"{KA_NET}.100"
SETTLE_EXTRA_S = 5.0
COLD_START_TIMEOUT_S = 180.0
POLL_S = 0.1
CLI_RUNS = 5
COMMITS = 5
COMMIT_WARMUP = 1
COMMIT_FILE = "global/footprint.toml"

TARGETS = {
    "cold_start_s": 3.0,
    "idle_cpu_pct_lan": 0.5,
    "pss_mb": 100.0,
    "help_s": 0.1,
    "status_s": 0.2,
    "commit_s": 0.4,
}


class BenchError(Exception):
    """The bench cannot go on (bad argument, a cluster that does not come up, a failed
    command); one-line message."""


# -- pure helpers ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stat:
    """The fields of /proc/PID/stat this bench uses (times in clock ticks)."""
    pid: int
    comm: str
    state: str
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int
    starttime: int


def parse_stat(text: str) -> Stat:
    """/proc/PID/stat text -> :class:`Stat`. The command name may hold spaces and ")", so
    the fields are counted from the last ")". Pure. ValueError on malformed text."""
    head, sep, tail = text.rpartition(")")
    if not sep or "(" not in head:
        raise ValueError(f"not a /proc/PID/stat line: {text[:60]!r}")
    pid_s, _, comm = head.partition("(")
    f = tail.split()
    if len(f) < 20:
        raise ValueError(f"/proc/PID/stat line too short ({len(f)} fields after the name)")
    # after the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17) ... starttime(22)
    return Stat(pid=int(pid_s), comm=comm, state=f[0], ppid=int(f[1]), utime=int(f[11]), stime=int(f[12]),
                cutime=int(f[13]), cstime=int(f[14]), starttime=int(f[19]))


def parse_pss_kb(text: str) -> int | None:
    """The "Pss:" figure (kB) of /proc/PID/smaps_rollup text (not Pss_Anon and the like);
    None when absent. Pure."""
    m = re.search(r"^Pss:\s+(\d+)\s*kB", text, re.M)
    return int(m.group(1)) if m else None


def parse_schedstat_ns(text: str) -> int:
    """Nanoseconds on CPU from /proc/PID/task/TID/schedstat text (its first field). Pure."""
    return int(text.split()[0])


def cpu_percent(ticks: float, window_s: float, clk_tck: int = CLK_TCK) -> float:
    """CPU time ``ticks`` (clock ticks) spent over ``window_s`` seconds, in % of one core. Pure."""
    if window_s <= 0:
        raise ValueError("the window must be longer than 0 s")
    return ticks / clk_tck / window_s * 100


def split_cmdline(raw: bytes | str) -> list[str]:
    """/proc/PID/cmdline (NUL-separated, NUL-terminated) -> argv. Pure."""
    if isinstance(raw, bytes):
        raw = raw.decode(errors="replace")
    args = [a for a in raw.split("\0") if a]
    if len(args) == 1 and " " in args[0]:
        args = args[0].split()       # a title set by setproctitle (node.zygote's children)
    return args


_VALUE_OPTIONS = {"--keys", "--identity", "--config", "-c", "--member", "-m", "--node", "-n", "--manager"}


def _positionals(args: list[str]) -> list[str]:
    """``args`` without options and the values of the options known to take one."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in _VALUE_OPTIONS
        else:
            out.append(a)
    return out


def program_name(argv: list[str]) -> str:
    """The supervisord program a process runs, from its argv: ``... node.program --keys K bus
    run ...`` (or ecluster.cli) -> "broker", ``... service run election ...`` -> "election", ``node run`` /
    ``manager run`` -> "runner", supervisord -> "supervisord"; anything else: the base name of
    its executable (keepalived, git). Pure."""
    if not argv:
        return "?"
    names = [os.path.basename(a) for a in argv[:2]]
    if "supervisord" in names or "node.zygote" in argv[:3]:
        return "supervisord"
    entry = next((e for e in ("ecluster.cli", "node.program") if e in argv), None)
    if entry:
        rest = argv[argv.index(entry) + 1:]
    elif names[0] in ("ecluster", "eccfg"):
        rest = argv[1:]
    elif len(names) > 1 and names[1] in ("ecluster", "eccfg"):
        rest = argv[2:]
    else:
        return names[0] or "?"
    words = _positionals(rest)
    if words[:2] == ["bus", "run"]:
        return "broker"
    if words[:2] == ["service", "run"] and len(words) > 2:
        return words[2]
    if len(words) >= 2 and words[0] in ("node", "manager", "member") and words[1] == "run":
        return "runner"
    return "ecluster " + " ".join(words[:2]) if words else "ecluster"


def tree_pids(root: int, ppids: dict[int, int]) -> list[int]:
    """``root`` and every descendant of it in a {pid: ppid} map (root first). Pure."""
    kids: dict[int, list[int]] = {}
    for pid, pp in ppids.items():
        kids.setdefault(pp, []).append(pid)
    out, frontier = [root], [root]
    while frontier:
        nxt = []
        for p in frontier:
            nxt += sorted(kids.get(p, []))
        out += nxt
        frontier = nxt
    return out


def attribute_programs(tree: dict[int, tuple[int, list[str]]], root: int) -> dict[int, str]:
    """{pid: program} for a process tree {pid: (ppid, argv)} rooted at ``root``: supervisord
    and the runner by their own name, each program of supervisord by its name, and a
    program's descendants (a git it runs) to that program. Pure."""
    supervisors = {pid for pid, (_, argv) in tree.items() if program_name(argv) == "supervisord"}
    out = {}
    for pid, (ppid, argv) in tree.items():
        if pid == root or pid in supervisors:
            out[pid] = program_name(argv)
            continue
        p, parent = pid, ppid
        while parent in tree and parent not in supervisors and parent != root:
            p, parent = parent, tree[parent][0]
        out[pid] = program_name(tree[p][1])
    return out


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"3+1,7+2" -> [(3, 1), (7, 2)] (nodes, managers). Pure; BenchError on bad input."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)\+(\d+)", part)
        if not m:
            raise BenchError(f"bad size {part!r}: give NODES+MANAGERS, e.g. 3+1")
        n, mg = int(m.group(1)), int(m.group(2))
        if n < 1 or mg < 1:
            raise BenchError(f"bad size {part!r}: at least 1 node and 1 manager (commits go through a manager)")
        out.append((n, mg))
    if not out:
        raise BenchError("no cluster size given")
    return out


@dataclass
class ProcSample:
    """One process at one instant: identity, CPU counters, memory."""
    pid: int
    starttime: int
    ppid: int
    argv: list[str]
    ticks: int              # utime + stime
    child_ticks: int        # cutime + cstime (reaped children)
    sched_ns: int | None    # sum over its live threads
    pss_kb: int | None


def tree_cost(before: dict[int, ProcSample], after: dict[int, ProcSample], window_s: float,
              root: int, clk_tck: int = CLK_TCK) -> dict:
    """What a process tree cost over a window, from two samples of it {pid: ProcSample}:
    processes and PSS at the end; CPU over the window (a process that started in the window
    counts from 0); and the same by program. Pure."""
    def delta(a: ProcSample) -> tuple[int, int | None]:
        b = before.get(a.pid)
        if b is not None and b.starttime == a.starttime:
            sched = None if a.sched_ns is None or b.sched_ns is None else a.sched_ns - b.sched_ns
            return a.ticks + a.child_ticks - b.ticks - b.child_ticks, sched
        return a.ticks + a.child_ticks, a.sched_ns

    programs = attribute_programs({p.pid: (p.ppid, p.argv) for p in after.values()}, root)
    by_prog: dict[str, dict] = {}
    total_ticks, total_ns, ns_known = 0, 0, True
    for s in after.values():
        ticks, ns = delta(s)
        total_ticks += ticks
        if ns is None:
            ns_known = False
        else:
            total_ns += ns
        g = by_prog.setdefault(programs[s.pid], {"processes": 0, "pss_kb": 0, "ticks": 0, "ns": 0})
        g["processes"] += 1
        g["pss_kb"] += s.pss_kb or 0
        g["ticks"] += ticks
        g["ns"] += ns or 0
    started = sum(1 for s in after.values() if not (s.pid in before and before[s.pid].starttime == s.starttime))
    ended = sum(1 for s in before.values() if not (s.pid in after and after[s.pid].starttime == s.starttime))
    return {
        "processes": len(after),
        "pss_mb": round(sum(s.pss_kb or 0 for s in after.values()) / 1024, 2),
        "cpu_pct": round(cpu_percent(total_ticks, window_s, clk_tck), 3),
        "sched_cpu_pct": round(total_ns / 1e9 / window_s * 100, 3) if ns_known else None,
        "started_in_window": started, "ended_in_window": ended,
        "programs": {name: {"processes": g["processes"], "pss_mb": round(g["pss_kb"] / 1024, 2),
                            "cpu_pct": round(cpu_percent(g["ticks"], window_s, clk_tck), 3),
                            "sched_cpu_pct": round(g["ns"] / 1e9 / window_s * 100, 3)}
                     for name, g in by_prog.items()},
    }


def mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 3) if xs else None


def role_means(members: dict[str, dict]) -> dict[str, dict]:
    """{role: mean processes, PSS, CPU} over the members of each role ({name: cost + role}). Pure."""
    out = {}
    for role in ("node", "manager"):
        rows = [m for m in members.values() if m["role"] == role]
        if rows:
            out[role] = {"members": len(rows), **{k: mean([r[k] for r in rows])
                                                  for k in ("processes", "pss_mb", "cpu_pct", "sched_cpu_pct")}}
    return out


def program_breakdown(members: dict[str, dict]) -> list[dict]:
    """Per program: on how many members it runs, mean processes / PSS / CPU over those members
    and the highest CPU on one of them; most CPU first. Pure."""
    acc: dict[str, list[tuple[str, dict]]] = {}
    for name, m in members.items():
        for prog, c in m["programs"].items():
            acc.setdefault(prog, []).append((name, c))
    rows = []
    for prog, items in acc.items():
        cs = [c for _, c in items]
        top = max(items, key=lambda it: it[1]["cpu_pct"])
        rows.append({"program": prog, "members": len(items),
                     "roles": sorted({members[n]["role"] for n, _ in items}),
                     "processes": mean([c["processes"] for c in cs]), "pss_mb": mean([c["pss_mb"] for c in cs]),
                     "cpu_pct": mean([c["cpu_pct"] for c in cs]), "sched_cpu_pct": mean([c["sched_cpu_pct"] for c in cs]),
                     "max_cpu_pct": top[1]["cpu_pct"], "max_on": top[0]})
    rows.sort(key=lambda r: (-(r["cpu_pct"] or 0), -(r["sched_cpu_pct"] or 0), r["program"]))
    return rows


def start_phases(statuses: dict[str, dict | None], members: list[str]) -> dict[str, bool]:
    """Which steps of a cold start are done, from the newest election.status of each member
    (None: no answer yet). Pure. "answering": every member answers; "alive": every member
    sees every member alive; "coordinator": all name the same one and it says it leads;
    "vips": the coordinator has every VIP owned and held by its owner."""
    out = {"answering": False, "alive": False, "coordinator": False, "vips": False}
    if any(statuses.get(m) is None for m in members):
        return out
    out["answering"] = True
    out["alive"] = all(((statuses[m].get("view") or {}).get("members") or {}).get(x, {}).get("state") == "alive"
                       for m in members for x in members)
    leaders = {statuses[m].get("leader") for m in members}
    leader = next(iter(leaders)) if len(leaders) == 1 else None
    st = statuses.get(leader) if leader else None
    out["coordinator"] = st is not None and st.get("role") == "leader"
    if out["coordinator"]:
        vips = st.get("vips") or []
        out["vips"] = bool(vips) and all(v.get("owner") and v["owner"] in (v.get("holders") or []) for v in vips)
    return out


def settled(statuses: dict[str, dict | None], members: list[str]) -> str | None:
    """The coordinator's name once every step of :func:`start_phases` is done, else None. Pure."""
    if all(start_phases(statuses, members).values()):
        return statuses[members[0]].get("leader")
    return None


def keepalived_conf(interface: str, vip: str, advert_int: float = 1) -> str:
    """A one-instance keepalived configuration: VRRP MASTER of ``vip`` on ``interface``. Pure."""
    return (f"global_defs {{\n  router_id eclfp\n}}\n\n"
            f"vrrp_instance FP {{\n  state MASTER\n  interface {interface}\n  virtual_router_id 77\n"
            f"  priority 150\n  advert_int {advert_int:g}\n"
            f"  virtual_ipaddress {{\n    {vip}/24 dev {interface}\n  }}\n}}\n")


def commit_content(i: int) -> str:
    """The committed file's text for commit ``i``: a different size every time (an edit of
    the same size within one second of a checkout can be missed by git's index stat check)."""
    return f"# bench/footprint.py commit {i}\nvalue = {i}\n" + "#\n" * i


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 1)


def verdicts(doc: dict) -> list[dict]:
    """One row per target and cluster size: figure, limit, met (None when not measured). Pure."""
    out = []

    def add(size, what, value, limit, unit, applies=True):
        met = None if value is None or not applies else value <= limit
        out.append({"size": size, "target": what, "value": value, "limit": limit, "unit": unit, "met": met,
                    "note": None if applies else "no target for this preset"})

    lan = doc["meta"]["preset"] == "lan"
    for size, r in doc["sizes"].items():
        if "error" in r and "idle" not in r:
            add(size, "bench", None, None, "", True)
            out[-1]["note"] = r["error"]
            continue
        add(size, "cold start", r.get("cold_start_s"), TARGETS["cold_start_s"], "s")
        members = (r.get("idle") or {}).get("members") or {}
        if members:
            worst_cpu = max(members.items(), key=lambda kv: kv[1]["cpu_pct"])
            worst_pss = max(members.items(), key=lambda kv: kv[1]["pss_mb"])
            add(size, f"idle CPU per member (worst: {worst_cpu[0]})", worst_cpu[1]["cpu_pct"],
                TARGETS["idle_cpu_pct_lan"], "%", applies=lan)
            add(size, f"PSS per member (worst: {worst_pss[0]})", worst_pss[1]["pss_mb"], TARGETS["pss_mb"], "MB")
        cli = r.get("cli") or {}
        add(size, "ecluster --help (median)", cli.get("help_s"), TARGETS["help_s"], "s")
        add(size, "ecluster status (median)", cli.get("status_s"), TARGETS["status_s"], "s")
        add(size, "config commit to every live copy (median)", (r.get("commit") or {}).get("median_s"),
            TARGETS["commit_s"], "s")
    return out


# -- /proc I/O ------------------------------------------------------------------------------------

def _read(path: str, binary: bool = False):
    with open(path, "rb" if binary else "r") as f:
        return f.read()


def ppid_map() -> dict[int, int]:
    """{pid: ppid} of every process now."""
    out = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                out[int(e)] = parse_stat(_read(f"/proc/{e}/stat")).ppid
            except (OSError, ValueError):
                continue
    return out


def read_proc(pid: int) -> ProcSample | None:
    """One process's sample; None when it is gone (or a zombie)."""
    try:
        st = parse_stat(_read(f"/proc/{pid}/stat"))
        if st.state in ("Z", "X"):
            return None
        argv = split_cmdline(_read(f"/proc/{pid}/cmdline", binary=True)) or [st.comm]
        try:
            pss = parse_pss_kb(_read(f"/proc/{pid}/smaps_rollup"))
        except OSError:
            pss = None
        ns: int | None = 0
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    ns += parse_schedstat_ns(_read(f"/proc/{pid}/task/{tid}/schedstat"))
                except OSError:
                    pass
        except OSError:
            ns = None
    except (OSError, ValueError):
        return None
    return ProcSample(pid=pid, starttime=st.starttime, ppid=st.ppid, argv=argv, ticks=st.utime + st.stime,
                      child_ticks=st.cutime + st.cstime, sched_ns=ns, pss_kb=pss)


def sample_tree(root: int, ppids: dict[int, int] | None = None) -> dict[int, ProcSample]:
    """Every live process of the tree rooted at ``root``."""
    ppids = ppid_map() if ppids is None else ppids
    out = {}
    for pid in tree_pids(root, ppids):
        s = read_proc(pid)
        if s is not None:
            out[pid] = s
    return out


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine (/proc/stat "cpu": all but idle and iowait)."""
    f = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:]]
    total = sum(f[:8])
    return total - f[3] - f[4], total


# -- process hygiene --------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_cmd(argv: list[str], timeout: float = 60, what: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"{what or ' '.join(argv[:3])} failed (exit {r.returncode}): {tail[0]}")
    return r


def timed(argv: list[str], runs: int, what: str) -> list[float]:
    """Wall times of ``runs`` runs of ``argv`` (output discarded; a failure is an error)."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                           timeout=60)
        out.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise BenchError(f"{what} failed (exit {r.returncode}): "
                             f"{(r.stderr.decode(errors='replace').strip().splitlines() or ['no output'])[-1]}")
    return out


# -- keepalived anchor ------------------------------------------------------------------------------

class KeepalivedAnchor:
    """One keepalived (VRRP MASTER, advert_int 1) in a namespace of its own, with a veth pair
    inside it. :meth:`close` stops it by PID and removes the namespace."""

    def __init__(self, work: Path):
        self.work = work
        self.ns = f"eclfp{os.getpid()}"
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, int] = {}      # pid -> starttime, for the kill by PID
        self.ns_made = False

    def _ip(self, *args: str) -> None:
        run_cmd(["ip", *args], timeout=20, what="ip " + " ".join(args[:4]))

    def start(self) -> None:
        self._ip("netns", "add", self.ns)
        self.ns_made = True
        self._ip("-n", self.ns, "link", "set", "lo", "up")
        self._ip("-n", self.ns, "link", "add", "ka0", "type", "veth", "peer", "name", "ka1")
        self._ip("-n", self.ns, "addr", "add", f"{KA_NET}.1/24", "dev", "ka0")
        self._ip("-n", self.ns, "link", "set", "ka0", "up")
        self._ip("-n", self.ns, "link", "set", "ka1", "up")
        conf = self.work / "keepalived.conf"
        conf.write_text(keepalived_conf("ka0", KA_VIP, 1))
        argv = ["ip", "netns", "exec", self.ns, "keepalived", "--dont-fork", "--log-console", "--no-syslog",
                "-f", str(conf), "-p", str(self.work / "ka.pid"), "-r", str(self.work / "ka_vrrp.pid"),
                "-c", str(self.work / "ka_checkers.pid"), "-b", str(self.work / "ka_bfd.pid")]
        with open(self.work / "keepalived.log", "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"keepalived exited with {self.proc.returncode}: "
                                 f"{(self.work / 'keepalived.log').read_text(errors='replace')[-300:]!r}")
            r = subprocess.run(["ip", "-n", self.ns, "-o", "addr", "show", "dev", "ka0"], capture_output=True, text=True)
            if f" {KA_VIP}/" in r.stdout:
                self.remember()
                return
            time.sleep(0.1)
        raise BenchError("keepalived did not become MASTER (VIP on ka0) within 20 s")

    def remember(self) -> None:
        if self.proc is not None:
            for pid, s in sample_tree(self.proc.pid).items():
                self.seen.setdefault(pid, s.starttime)

    def sample(self) -> dict[int, ProcSample]:
        assert self.proc is not None
        s = sample_tree(self.proc.pid)
        for pid, p in s.items():
            self.seen.setdefault(pid, p.starttime)
        return s

    def close(self) -> None:
        if self.proc is not None:
            self.remember()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            _kill_leftovers(self.seen)
        if self.ns_made:
            subprocess.run(["ip", "netns", "del", self.ns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.ns_made = False


def _kill_leftovers(seen: dict[int, int]) -> None:
    """SIGKILL every remembered PID that is still the same process (same start time)."""
    for pid, start in seen.items():
        s = read_proc(pid)
        if s is not None and s.starttime == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def ensure_keepalived() -> str | None:
    """None when keepalived can run, else why not (apt-get install tried once when missing)."""
    if os.geteuid() != 0:
        return "needs root (a network namespace)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    if shutil.which("keepalived"):
        return None
    if shutil.which("apt-get") is None:
        return "keepalived is not installed and there is no apt-get"
    log("installing keepalived (apt-get install -y keepalived)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "keepalived"], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "keepalived"], env=env, capture_output=True, text=True)
    if r.returncode != 0 or not shutil.which("keepalived"):
        return f"apt-get install keepalived failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def pacemaker_reason() -> str:
    missing = [t for t in ("corosync", "pacemakerd") if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (this bench does not install pacemaker)"
    return "corosync and pacemakerd are installed, but this bench does not run them yet"


# -- one ecluster cluster ---------------------------------------------------------------------------

class StatusPoller(threading.Thread):
    """Asks one member's election.status over its ipc socket every POLL_S; keeps the newest
    answer with the instant it arrived."""

    def __init__(self, cluster, member: str):
        super().__init__(daemon=True, name=f"poll-{member}")
        self.cluster, self.member = cluster, member
        self.latest: tuple[float, dict] | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        from bus.client import SyncClient
        c = SyncClient(self.cluster, via=self.member)
        try:
            while not self.halt.is_set():
                try:
                    st = c.call(self.member, "election", "status", timeout=0.5)
                    self.latest = (time.perf_counter(), st)
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                self.halt.wait(POLL_S)
        finally:
            c.close()


class ClusterRun:
    """A loopback cluster of ``n`` nodes and ``m`` managers run with ``ecluster node run`` /
    ``manager run``, one runner per member; :meth:`close` stops all by PID."""

    def __init__(self, n: int, m: int, preset: str, work: Path):
        from conftest import Procs, cluster_text, free_ports, short_dir
        self.size = f"{n}+{m}"
        self.work = work
        self.root = short_dir("eclfp")          # data dirs: short paths for the unix sockets
        names = [f"n{i}" for i in range(1, n + 1)] + [f"m{i}" for i in range(1, m + 1)]
        ports = free_ports(4 * len(names))
        spec = [(nm, "127.0.0.1", tuple(ports[4 * i:4 * i + 4])) for i, nm in enumerate(names)]
        extra = f'\n[[vip]]\naddress = "{VIP}"\ninterface = "lo"\npreference = "n1"\n'
        # the default security (nodes may not commit): the commit goes through a manager
        text = cluster_text("footprint", spec[:n], spec[n:], self.root, preset=preset, extra=extra,
                            nodes_may_commit=False)
        work.mkdir(parents=True, exist_ok=True)
        self.path = work / "cluster.toml"
        self.path.write_text(text)
        try:
            run_cmd([*ECLUSTER, "keys", "init", "-c", str(self.path)], what="ecluster keys init")
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        from ecluster.clusterfile import load_cluster
        self.cluster = load_cluster(self.path)
        self.members = list(self.cluster.members)
        self.manager = next(x for x in self.members if self.cluster.member(x).role == "manager")
        self.procs = Procs(work / "logs")
        self.runners: dict[str, subprocess.Popen] = {}

    def role(self, name: str) -> str:
        return self.cluster.member(name).role

    def data_dir(self, name: str) -> Path:
        return Path(self.cluster.member(name).data_dir)

    def cold_start(self) -> tuple[float, str, dict[str, float]]:
        """Launch every member at once; seconds until :func:`settled`, the coordinator, and
        when each step of :func:`start_phases` was first seen done (s after the launch)."""
        pollers = [StatusPoller(self.cluster, x) for x in self.members]
        t0 = time.perf_counter()
        for x in self.members:
            role = self.role(x)
            self.runners[x] = self.procs.start([role, "run", "-c", str(self.path), f"--{role}", x], name=x)
        for p in pollers:
            p.start()
        try:
            deadline = t0 + COLD_START_TIMEOUT_S
            phases: dict[str, float] = {}
            while True:
                snap = {p.member: p.latest for p in pollers}
                if all(v is not None for v in snap.values()):
                    statuses = {k: v[1] for k, v in snap.items()}
                    at = round(max(v[0] for v in snap.values()) - t0, 3)
                    for step, done in start_phases(statuses, self.members).items():
                        if done:
                            phases.setdefault(step, at)
                    leader = settled(statuses, self.members)
                    if leader:
                        return at, leader, phases
                dead = [x for x, p in self.runners.items() if p.poll() is not None]
                if dead:
                    raise BenchError(f"runner of {', '.join(dead)} exited during the cold start "
                                     f"(see {self.work / 'logs'})")
                if time.perf_counter() > deadline:
                    raise BenchError(f"cluster {self.size} not settled within {COLD_START_TIMEOUT_S:.0f} s")
                time.sleep(0.02)
        finally:
            for p in pollers:
                p.halt.set()
            for p in pollers:
                p.join(timeout=5)
            self.remember()

    def remember(self) -> None:
        for p in self.runners.values():
            self.procs.remember_tree(p)

    def applied(self, name: str) -> str | None:
        try:
            return (self.data_dir(name) / "conf.applied").read_text().strip() or None
        except OSError:
            return None

    def bootstrap(self) -> float:
        """``eccfg bootstrap`` through the manager; seconds until applied on every member."""
        t0 = time.perf_counter()
        run_cmd([*ECCFG, "bootstrap", "-c", str(self.path), "-m", self.manager], timeout=60, what="eccfg bootstrap")
        deadline = time.monotonic() + 30
        while True:
            revs = {self.applied(x) for x in self.members}
            if len(revs) == 1 and None not in revs:
                return round(time.perf_counter() - t0, 3)
            if time.monotonic() > deadline:
                raise BenchError(f"the bootstrap was not applied on every member within 30 s ({revs})")
            time.sleep(0.05)

    def sample(self) -> dict[str, dict[int, ProcSample]]:
        ppids = ppid_map()
        return {x: sample_tree(p.pid, ppids) for x, p in self.runners.items()}

    def cli_times(self) -> dict:
        helps = timed([*ECLUSTER, "--help"], CLI_RUNS, "ecluster --help")
        stats = timed([*ECLUSTER, "status", "-c", str(self.path)], CLI_RUNS, "ecluster status")
        return {"help_s": round(statistics.median(helps), 4), "help_runs_s": [round(x, 4) for x in helps],
                "status_s": round(statistics.median(stats), 4), "status_runs_s": [round(x, 4) for x in stats]}

    def commits(self, n: int, warmup: int) -> dict:
        """``eccfg commit`` of an edit in the manager's live copy, from launch until the file
        is in every member's live checkout; ``warmup`` first commits not counted."""
        live = self.data_dir(self.manager) / "conf"
        targets = [self.data_dir(x) / "conf" / COMMIT_FILE for x in self.members]
        times, cli_exit = [], []
        for i in range(warmup + n):
            want = commit_content(i)
            (live / COMMIT_FILE).parent.mkdir(parents=True, exist_ok=True)
            (live / COMMIT_FILE).write_text(want)
            t0 = time.perf_counter()
            p = subprocess.Popen([*ECCFG, "commit", "-c", str(self.path), "--member", self.manager,
                                  "-m", f"footprint {i}", "--add-all"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            done_at = exit_at = None
            try:
                while done_at is None or exit_at is None:
                    now = time.perf_counter()
                    if exit_at is None and p.poll() is not None:
                        exit_at = now
                        if p.returncode != 0:
                            err = p.stderr.read().decode(errors="replace").strip().splitlines() or ["no output"]
                            raise BenchError(f"eccfg commit {i} failed (exit {p.returncode}): {err[-1]}")
                    if done_at is None and all(_text(t) == want for t in targets):
                        done_at = now
                    if now - t0 > 30:
                        raise BenchError(f"commit {i} not in every live copy within 30 s")
                    time.sleep(0.002)
            finally:
                if p.poll() is None:
                    p.kill()
                p.wait()
                p.stderr.close()
            if i >= warmup:
                times.append(done_at - t0)
                cli_exit.append(exit_at - t0)
        return {"member": self.manager, "members": len(self.members),
                "median_s": round(statistics.median(times), 4), "runs_s": [round(x, 4) for x in times],
                "eccfg_exit_median_s": round(statistics.median(cli_exit), 4), "warmup": warmup}

    def close(self) -> None:
        """SIGTERM every runner at once (each stops its supervisord and programs), wait, then
        SIGKILL by PID whatever remembered process is left."""
        try:
            self.remember()
        except Exception:  # noqa: BLE001 - best effort: the runners are stopped below anyway
            pass
        for p in self.runners.values():
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for p in self.runners.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.procs.stop_all()
        shutil.rmtree(self.root, ignore_errors=True)


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def bench_size(n: int, m: int, args, ka: KeepalivedAnchor | None, work: Path) -> dict:
    """Every row for one cluster size."""
    size = f"{n}+{m}"
    res: dict = {"nodes": n, "managers": m}
    log(f"cluster {size}: cold start")
    cr = None
    try:
        cr = ClusterRun(n, m, args.preset, work / size)
        res["cold_start_s"], res["coordinator"], res["cold_start_phases_s"] = cr.cold_start()
        # every process of the members started after the launch: their CPU so far is the start's
        started = cr.sample()
        res["cold_start_cpu_s"] = round(sum(p.ticks + p.child_ticks for t in started.values()
                                            for p in t.values()) / CLK_TCK, 2)
        log(f"  settled after {res['cold_start_s']} s (coordinator {res['coordinator']})")
        res["bootstrap_s"] = cr.bootstrap()
        log(f"  configuration bootstrapped and applied everywhere after {res['bootstrap_s']} s; "
            f"idle window of {args.window:g} s in {SETTLE_EXTRA_S:g} s")
        time.sleep(SETTLE_EXTRA_S)
        load0 = os.getloadavg()[0]
        busy0 = machine_cpu()
        before = cr.sample()
        ka_before = ka.sample() if ka else None
        t0 = time.perf_counter()
        time.sleep(args.window)
        after = cr.sample()
        ka_after = ka.sample() if ka else None
        window = time.perf_counter() - t0
        busy1 = machine_cpu()
        cr.remember()         # every PID seen, for the kill by PID at the end
        members = {}
        for x in cr.members:
            c = tree_cost(before[x], after[x], window, cr.runners[x].pid)
            c["role"] = cr.role(x)
            members[x] = c
        idle = {"window_s": round(window, 2), "loadavg_1m": [load0, os.getloadavg()[0]],
                "machine_busy_pct_of_all_cpus": round(100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 1),
                "members": members, "roles": role_means(members), "programs": program_breakdown(members)}
        if ka is not None:
            kc = tree_cost(ka_before, ka_after, window, ka.proc.pid)
            idle["keepalived"] = kc
        res["idle"] = idle
        log(f"  idle window done ({window:.1f} s, machine {idle['machine_busy_pct_of_all_cpus']} % busy); CLI timings")
        res["cli"] = cr.cli_times()
        log(f"  config commits ({COMMIT_WARMUP} warm-up + {COMMITS})")
        res["commit"] = cr.commits(COMMITS, COMMIT_WARMUP)
    except BenchError as e:
        log(f"  cluster {size} failed: {e}")
        res["error"] = str(e)
    finally:
        if cr is not None:
            log(f"  stopping cluster {size}")
            cr.close()
    return res


# -- report -----------------------------------------------------------------------------------------

def _n(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _usage_row(label: str, role: str, c: dict, procs: str = ">6", sched_digits: int = 2) -> str:
    """One line of the idle table: processes, PSS, CPU by ticks and by schedstat. Pure."""
    return (f"  {label:<22}{role:<9}{c['processes']:{procs}}{c['pss_mb']:>9.1f}{c['cpu_pct']:>8.2f}"
            f"{_n(c['sched_cpu_pct'], sched_digits):>9}")


def format_report(doc: dict) -> str:
    meta = doc["meta"]
    lines = [f"footprint: idle ecluster members beside keepalived (preset {meta['preset']}, idle window "
             f"{meta['window_s']:g} s, {meta['cpus']} CPUs, load average {meta['loadavg_start'][0]:.1f} at start, "
             f"{meta['loadavg_end'][0]:.1f} at the end)", ""]
    ka_reason = doc["keepalived"].get("skipped")
    for size, r in doc["sizes"].items():
        lines.append(f"== {r['nodes']} node{'s' * (r['nodes'] != 1)} + {r['managers']} "
                     f"manager{'s' * (r['managers'] != 1)} ==")
        if r.get("error"):
            lines.append(f"  FAILED: {r['error']}")
        if "cold_start_s" in r:
            lines.append(f"cold start (launch all -> all alive, VIP placed): {r['cold_start_s']:.2f} s "
                         f"(coordinator {r['coordinator']})")
            ph = r.get("cold_start_phases_s") or {}
            if r.get("cold_start_cpu_s") is not None:
                lines.append(f"  CPU used by all members' processes until then: {r['cold_start_cpu_s']:.1f} s "
                             f"({100 * r['cold_start_cpu_s'] / (r['cold_start_s'] * doc['meta']['cpus']):.0f} % "
                             f"of the {doc['meta']['cpus']} CPUs over the cold start)")
            lines.append("  first seen: " + ", ".join(f"{k} {v:.2f} s" for k, v in ph.items())
                         + f"; then eccfg bootstrap applied everywhere in {r.get('bootstrap_s', '-')} s")
        idle = r.get("idle")
        if idle:
            lines.append(f"idle, {idle['window_s']:g} s window ({SETTLE_EXTRA_S:g} s after settling; machine "
                         f"{idle['machine_busy_pct_of_all_cpus']:.0f} % busy over all CPUs, load "
                         f"{idle['loadavg_1m'][0]:.1f} -> {idle['loadavg_1m'][1]:.1f}):")
            lines.append(f"  {'member':<22}{'role':<9}{'procs':>6}{'PSS MB':>9}{'CPU %':>8}{'sched %':>9}")
            for name, c in idle["members"].items():
                extra = ""
                if c["started_in_window"] or c["ended_in_window"]:
                    extra = f"   ({c['started_in_window']} started, {c['ended_in_window']} ended in the window)"
                lines.append(_usage_row(name, c["role"], c) + extra)
            for role, c in idle["roles"].items():
                lines.append(_usage_row(f"mean {role} ({c['members']})", role, c, procs=">6.1f"))
            k = idle.get("keepalived")
            if k:
                lines.append(_usage_row("keepalived (anchor)", "-", k, sched_digits=3))
            lines.append("  by program (mean over the members running it, most CPU first):")
            lines.append(f"    {'program':<14}{'members':>8}{'procs':>6}{'PSS MB':>9}{'CPU %':>8}{'sched %':>9}"
                         f"{'max CPU %':>11}  on")
            for p in idle["programs"]:
                lines.append(f"    {p['program']:<14}{p['members']:>8}{p['processes']:>6.1f}{p['pss_mb']:>9.1f}"
                             f"{p['cpu_pct']:>8.2f}{_n(p['sched_cpu_pct']):>9}{p['max_cpu_pct']:>11.2f}  {p['max_on']}")
        cli = r.get("cli")
        if cli:
            lines.append(f"CLI: ecluster --help {cli['help_s']:.3f} s, ecluster status {cli['status_s']:.3f} s "
                         f"(medians of {CLI_RUNS})")
        cm = r.get("commit")
        if cm:
            lines.append(f"config commit (eccfg commit --member {cm['member']} -> file in all {cm['members']} live copies): "
                         f"median {cm['median_s']:.3f} s of {len(cm['runs_s'])} (runs {', '.join(f'{x:.3f}' for x in cm['runs_s'])}; "
                         f"eccfg itself exits after {cm['eccfg_exit_median_s']:.3f} s median)")
        for rr in doc["ratios"].get(size, []):
            cpu = (f">= x{_n(rr['cpu_ratio'], 1)} by ticks (keepalived: under 1 tick in the window)"
                   if rr.get("note") else f"x{_n(rr['cpu_ratio'], 1)} by ticks")
            lines.append(f"ecluster {rr['role']} (mean) / keepalived: idle CPU x{_n(rr['sched_ratio'], 1)} by "
                         f"schedstat, {cpu}; PSS x{_n(rr['pss_ratio'], 1)}; processes "
                         f"{rr['processes'][0]:g} vs {rr['processes'][1]}")
        lines.append("")
    if ka_reason:
        lines.append(f"keepalived anchor: not measured ({ka_reason})")
    lines.append(f"pacemaker anchor: not measured ({doc['pacemaker']['reason']})")
    lines.append("")
    lines.append("targets:")
    for t in doc["targets"]:
        mark = {True: "met    ", False: "NOT MET", None: "n/a    "}[t["met"]]
        val = "-" if t["value"] is None else f"{t['value']:g} {t['unit']}"
        lim = "" if t["limit"] is None else f"target <= {t['limit']:g} {t['unit']}"
        note = f"  ({t['note']})" if t.get("note") else ""
        lines.append(f"  {mark} {t['size']:<5} {t['target']:<46} {val:>12}   {lim}{note}")
    return "\n".join(lines)


def anchor_ratios(doc: dict) -> dict[str, list[dict]]:
    """Per size and role: mean member / keepalived instance (CPU by ticks and by sched, PSS). Pure."""
    out = {}
    for size, r in doc["sizes"].items():
        idle = r.get("idle") or {}
        k = idle.get("keepalived")
        if not k:
            continue
        rows = []
        for role, c in idle["roles"].items():
            note = None
            cpu = ratio(c["cpu_pct"], k["cpu_pct"])
            if not k["cpu_pct"]:
                # under one tick over the window: the tick ratio is only a lower bound
                floor = cpu_percent(1, idle["window_s"])
                cpu = ratio(c["cpu_pct"], floor)
                note = f"keepalived used < 1 tick over the window; CPU ratio is a lower bound (>= x{_n(cpu, 1)})"
            rows.append({"role": role, "cpu_ratio": cpu, "sched_ratio": ratio(c["sched_cpu_pct"], k["sched_cpu_pct"]),
                         "pss_ratio": ratio(c["pss_mb"], k["pss_mb"]), "processes": [c["processes"], k["processes"]],
                         "note": note})
        out[size] = rows
    return out


# -- main -------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="3+1", help="cluster sizes NODES+MANAGERS, comma-separated (default 3+1)")
    ap.add_argument("--preset", choices=("lan", "fast"), default="lan", help="timing preset (default lan)")
    ap.add_argument("--window", type=float, default=None, help="idle window in s (default 30, --quick 10)")
    ap.add_argument("--quick", action="store_true", help="a 10 s idle window")
    ap.add_argument("--json", metavar="FILE", help="write every figure as JSON to FILE")
    ap.add_argument("--no-keepalived", action="store_true", help="skip the keepalived anchor")
    args = ap.parse_args(argv)
    args.sizes = parse_sizes(args.sizes)
    if args.window is None:
        args.window = 10.0 if args.quick else 30.0
    if args.window < 1:
        raise BenchError("--window must be at least 1 s")
    return args


def run(args: argparse.Namespace) -> dict:
    doc: dict = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "preset": args.preset,
                          "window_s": args.window, "cpus": os.cpu_count(), "clk_tck": CLK_TCK,
                          "kernel": platform.release(), "python": platform.python_version(),
                          "targets": TARGETS, "loadavg_start": os.getloadavg()},
                 "sizes": {}, "keepalived": {}, "pacemaker": {"reason": pacemaker_reason()}}
    work = Path(tempfile.mkdtemp(prefix="eclfp-work-"))
    ka = None
    try:
        reason = "skipped (--no-keepalived)" if args.no_keepalived else ensure_keepalived()
        if reason is None:
            ka = KeepalivedAnchor(work)
            try:
                log(f"keepalived anchor: starting in namespace {ka.ns}")
                ka.start()
                doc["keepalived"]["version"] = subprocess.run(["keepalived", "--version"], capture_output=True,
                                                              text=True).stderr.splitlines()[:1]
            except BenchError as e:
                reason = str(e)
                ka.close()
                ka = None
        if reason:
            doc["keepalived"]["skipped"] = reason
            log(f"keepalived anchor: not measured ({reason})")
        for n, m in args.sizes:
            doc["sizes"][f"{n}+{m}"] = bench_size(n, m, args, ka, work)
    finally:
        if ka is not None:
            ka.close()
        shutil.rmtree(work, ignore_errors=True)
    doc["ratios"] = anchor_ratios(doc)
    doc["targets"] = verdicts(doc)
    doc["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["meta"]["loadavg_end"] = os.getloadavg()
    return doc


def main(argv: list[str]) -> int:
    from anchors import bench_main   # bench/ is this script's directory
    return bench_main("footprint", argv, parse_args, run, format_report, BenchError,
                      exit_code=lambda doc: 1 if any("error" in r for r in doc["sizes"].values()) else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
