"""Pacemaker + Corosync with an IPaddr2 VIP: the third failover / footprint anchor, in a
namespace lab of its own.

Usage (as root): python bench/pacemaker.py [--rounds N] [--window S] [--quick] [--json FILE]
                                          [--profiles default,tuned]

As a module: ``measure(rounds, window)`` returns the same document (see :func:`measure`);
``{"measured": False, "reason": ...}`` when it cannot run here (not root, not installed), and
``{"measured": False, "failed": True, "reason": ...}`` when the bench itself failed.

The lab (everything named ``pcm<pid>-*``, subnet 10.96.0.0/24, nothing outside it):

  pcm<pid>-sw     a bridge "br0" (the switch); one veth per namespace below is plugged into it
  pcm<pid>-n1..3  the three cluster nodes, eth0 10.96.0.11..13; on each, in a mount + UTS
                  namespace of its own (``ip netns exec NS unshare -m -u``, hostname node1..3),
                  per-node directories from the temp dir bound on /etc/corosync (corosync.conf,
                  authkey), /var/lib/corosync, /var/log/corosync, /var/lib/pacemaker and
                  /var/log/pacemaker, and fresh tmpfs on /dev/shm (libqb IPC rings) and /run
                  (corosync.pid, /run/crm, IPaddr2's /run/resource-agents): a "holder" (``sleep infinity``)
                  keeps that namespace; ``corosync -f`` and ``pacemakerd`` are started into it
                  with nsenter, as are the cluster tools (libqb IPC uses abstract unix sockets,
                  scoped by the network namespace, and /dev/shm files); tests/whoami.py answers
                  TCP 2525 with the node's name
  pcm<pid>-c      the client, 10.96.0.2, probing the VIP 10.96.0.100:2525

Cluster: Debian's packages as installed, corosync 3 knet (crypto aes256/sha256, a fresh
authkey), the three nodes in the nodelist, quorum corosync_votequorum (3 votes, quorum 2 -- the
same majority guarantee as ecluster); Pacemaker stonith-enabled=false, no-quorum-policy=stop,
resource-stickiness 0, one ocf:heartbeat:IPaddr2 primitive (ip 10.96.0.100, cidr_netmask 24,
nic eth0, monitor interval 1s timeout 20s) with a location preference node1 = 100 (like
keepalived's highest priority: it moves back when node1 returns); configured with
crm_attribute and cibadmin once the three nodes are online with a DC.

Profiles (one fresh cluster each; the effective timeouts are read back from corosync's cmap,
runtime.config.totem.*, and reported):

  default   corosync's own defaults: token 3000 ms + token_coefficient 650 ms per node beyond
            2 = 3650 ms for 3 nodes, consensus 1.2 x token = 4380 ms
  tuned     token 300 ms, token_coefficient 0 (consensus 360 ms)

Figures (the same definitions as bench/failover.py and bench/footprint.py):

  failover  per round: the client starts a TCP connection to the VIP every 10 ms (overlapping
            attempts, tests/probe.py's Prober); once node1 answers, every process in the VIP
            holder's namespace is killed by PID (SIGKILL: holder, corosync, pacemakerd and its
            children, the whoami) and its eth0 set down; failover = the first answer by another
            node (earliest answer to an attempt started after the kill) minus the kill instant
            (tests/probe_analysis). "membership" is when a survivor's corosync logged the new
            membership without the dead node, "IPaddr2 started" when the new holder's pacemaker
            logged the start's result (both s after the kill). Then the node is restored like a reboot (the VIP
            address it still had is removed, link up, fresh holder, corosync, pacemakerd):
            "restore" = seconds until it is online again, the VIP back on it (crm_mon) and the
            client answered by it; the next round kills it again. Median, p50 (nearest rank)
            and max over the rounds. "unplanned membership losses": new memberships in node2's
            corosync log (node2 is never killed) that dropped a member the bench did not kill
            (token too short for the machine's load).
  footprint one idle node of the default profile, each node over the same window (default 30 s)
            starting 5 s after the cluster settled with the VIP on node1: corosync + pacemakerd
            and all its descendants (bench/footprint.py's sample_tree / tree_cost): processes,
            PSS (sum of /proc/PID/smaps_rollup "Pss:"), CPU in % of one core ((utime + stime +
            cutime + cstime) delta / CLK_TCK / window; the 1 s IPaddr2 monitor's reaped shell
            processes count through pacemaker-execd's cutime), also by daemon.

Exit status: 0 (also when not measured: "not measured (reason)"), 1 when the bench failed
(one line why), 2 for bad arguments. Everything it starts is stopped by PID (every process in
each of its namespaces), the namespaces (and so the bridge and veths) removed, the temp dir
removed (``PCM_KEEP=1`` keeps it, with every daemon's log), also on failure, Ctrl-C and SIGTERM.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# as bench/footprint.py: the repository root first (bench/ would shadow the bus package), tests/ after it
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))


def _bench_module(name: str):
    """bench/<name>.py, loaded by path (bench/ is not a package and not put on sys.path here)
    as "bench_<name>", once."""
    import importlib.util
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod          # its dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[key]


fp = _bench_module("footprint")         # read_proc, sample_tree, tree_cost, ppid_map, machine_cpu
from probe_analysis import analyze  # noqa: E402 - tests/probe_analysis.py

PYTHON = sys.executable
TESTS = REPO / "tests"
NET = "10.96.0"
CLIENT_ADDR = f"{NET}.2"
VIP = f"{NET}.100"
CIDR = 24
PORT = 2525
NODES = ("node1", "node2", "node3")
PREFERRED = "node1"
PREFERENCE_SCORE = 100
MONITOR_INTERVAL = "1s"
MONITOR_TIMEOUT = "20s"
PROBE_INTERVAL_S = 0.01
SETTLE_EXTRA_S = 5.0
DEFAULT_WINDOW_S = 30.0
QUICK_WINDOW_S = 10.0
DEFAULT_ROUNDS = 3
START_TIMEOUT_S = 120.0
FAILOVER_TIMEOUT_S = 90.0
RESTORE_TIMEOUT_S = 120.0
PROFILES = {
    "default": {},                                          # corosync's defaults
    "tuned": {"token": 300, "token_coefficient": 0},
}
REQUIRED_TOOLS = ("corosync", "pacemakerd", "cibadmin", "crm_attribute", "crm_mon", "crm_resource",
                  "corosync-cmapctl", "ip", "nsenter", "unshare")
IPADDR2 = Path("/usr/lib/ocf/resource.d/heartbeat/IPaddr2")
# per-node directory -> where it is bound inside the node's mount namespace
BINDS = (("etc-corosync", "/etc/corosync"), ("var-lib-corosync", "/var/lib/corosync"),
         ("var-log-corosync", "/var/log/corosync"), ("var-lib-pacemaker", "/var/lib/pacemaker"),
         ("var-log-pacemaker", "/var/log/pacemaker"))
# fresh tmpfs in each node's mount namespace (as after a boot): libqb's IPC rings, and /run
# (corosync.pid, the lock corosync takes; /run/crm; IPaddr2's /run/resource-agents)
TMPFS = (("/dev/shm", "1777"), ("/run", "0755"))
RUN_DIRS = (("resource-agents", "1755", "root", "root"), ("crm", "0750", "hacluster", "haclient"),
            ("lock", "1777", "root", "root"))
PCMK_ENV = {"PCMK_logfile": "/var/log/pacemaker/pacemaker.log", "PCMK_logfacility": "none",
            "PCMK_debug": "no"}


class BenchError(Exception):
    """The bench cannot go on; a one-line message."""


# -- pure helpers ---------------------------------------------------------------------------------

def ns_names(pid: int) -> dict[str, str]:
    """The lab's namespace names for bench process ``pid``: switch, client and one per node. Pure."""
    p = f"pcm{pid}-"
    return {"switch": p + "sw", "client": p + "c", **{n: f"{p}n{i}" for i, n in enumerate(NODES, 1)}}


def node_addr(i: int) -> str:
    """Node ``i`` (1-based) -> its eth0 address. Pure."""
    return f"{NET}.{10 + i}"


def corosync_conf(nodes: list[tuple[str, int, str]], token: int | None = None,
                  token_coefficient: int | None = None, cluster_name: str = "pcmbench") -> str:
    """corosync.conf for ``nodes`` [(name, nodeid, address)]: knet with crypto (authkey in
    /etc/corosync), votequorum, logging to stderr only. ``token`` / ``token_coefficient``
    only when given (else corosync's defaults apply). Pure."""
    totem = ["version: 2", f"cluster_name: {cluster_name}", "transport: knet",
             "crypto_cipher: aes256", "crypto_hash: sha256"]
    if token is not None:
        totem.append(f"token: {int(token)}")
    if token_coefficient is not None:
        totem.append(f"token_coefficient: {int(token_coefficient)}")
    out = ["totem {", *(f"\t{x}" for x in totem), "}", "", "nodelist {"]
    for name, nodeid, addr in nodes:
        out += ["\tnode {", f"\t\tring0_addr: {addr}", f"\t\tname: {name}", f"\t\tnodeid: {nodeid}", "\t}"]
    out += ["}", "", "quorum {", "\tprovider: corosync_votequorum", "}", "",
            "logging {", "\tto_stderr: yes", "\tto_logfile: no", "\tto_syslog: no", "\ttimestamp: hires",
            "\tfileline: off", "\tdebug: off", "}", ""]
    return "\n".join(out)


def primitive_xml(vip: str = VIP, cidr: int = CIDR, nic: str = "eth0", interval: str = MONITOR_INTERVAL,
                  timeout: str = MONITOR_TIMEOUT) -> str:
    """The IPaddr2 primitive "vip" for ``cibadmin --create --scope resources``. Pure."""
    return (f'<primitive id="vip" class="ocf" provider="heartbeat" type="IPaddr2">'
            f'<instance_attributes id="vip-params">'
            f'<nvpair id="vip-ip" name="ip" value="{vip}"/>'
            f'<nvpair id="vip-cidr_netmask" name="cidr_netmask" value="{cidr}"/>'
            f'<nvpair id="vip-nic" name="nic" value="{nic}"/>'
            f'</instance_attributes><operations>'
            f'<op id="vip-monitor-{interval}" name="monitor" interval="{interval}" timeout="{timeout}"/>'
            f'</operations></primitive>')


def location_xml(node: str = PREFERRED, score: int = PREFERENCE_SCORE) -> str:
    """The location preference of "vip" for ``node``. Pure."""
    return f'<rsc_location id="vip-prefers-{node}" rsc="vip" node="{node}" score="{score}"/>'


CLUSTER_PROPERTIES = (("crm_config", "stonith-enabled", "false"), ("crm_config", "no-quorum-policy", "stop"),
                      ("rsc_defaults", "resource-stickiness", "0"))


def holder_script(node_dir: str, hostname: str) -> str:
    """The shell run in a node's fresh mount + UTS namespace: per-node tmpfs (and the /run
    directories the daemons expect) and binds, the hostname, then ``exec sleep infinity``
    (the holder of that namespace). Pure."""
    lines = ["set -e"]
    for where, mode in TMPFS:
        lines.append(f"mount -t tmpfs -o mode={mode},size=64m pcm {where}")
    for sub, mode, user, group in RUN_DIRS:
        lines.append(f"install -d -m {mode} -o {user} -g {group} /run/{sub}")
    for src, dst in BINDS:
        lines.append(f"mount --bind {shlex.quote(os.path.join(node_dir, src))} {dst}")
    lines += [f"hostname {shlex.quote(hostname)}", "exec sleep infinity"]
    return "\n".join(lines) + "\n"


def parse_cmap(text: str) -> dict[str, str | int]:
    """``corosync-cmapctl`` output ("key (u32) = 3650") -> {key: value}, integers as int. Pure."""
    out: dict[str, str | int] = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+) \((\w+)\) = ?(.*)$", line.strip())
        if not m:
            continue
        key, typ, val = m.groups()
        if typ[0] in "ui" and re.fullmatch(r"-?\d+", val):
            out[key] = int(val)
        else:
            out[key] = val
    return out


def totem_timeouts(cmap: dict) -> dict[str, int | None]:
    """The effective totem timeouts (ms) from runtime.config.totem.* cmap keys. Pure."""
    keys = ("token", "consensus", "join", "merge", "token_retransmit", "token_retransmits_before_loss_const",
            "fail_recv_const", "max_messages")
    return {k: cmap.get(f"runtime.config.totem.{k}") for k in keys}


def _bool(v: str | None) -> bool:
    return (v or "").lower() == "true"


def parse_crm_mon(text: str) -> dict:
    """``crm_mon -1 --output-as=xml`` -> {"dc", "quorum", "online", "offline", "pending",
    "resources": {id: {"role", "active", "failed", "nodes"}}}. Pure; ValueError on bad XML."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"crm_mon output is not XML: {e}") from None
    dc = root.find("./summary/current_dc")
    out = {"dc": None, "quorum": False, "online": [], "offline": [], "pending": [], "resources": {}}
    if dc is not None and _bool(dc.get("present")):
        out["dc"] = dc.get("name")
        out["quorum"] = _bool(dc.get("with_quorum"))
    for n in root.findall("./nodes/node"):
        name = n.get("name")
        if _bool(n.get("pending")):
            out["pending"].append(name)
        elif _bool(n.get("online")):
            out["online"].append(name)
        else:
            out["offline"].append(name)
    for r in root.iter("resource"):
        out["resources"][r.get("id")] = {"role": r.get("role"), "active": _bool(r.get("active")),
                                         "failed": _bool(r.get("failed")),
                                         "nodes": [x.get("name") for x in r.findall("node")]}
    for k in ("online", "offline", "pending"):
        out[k].sort()
    return out


def placement_settled(view: dict, online: list[str], owner: str, rsc: str = "vip") -> bool:
    """True when ``view`` (:func:`parse_crm_mon`) has a DC with quorum, exactly ``online``
    online, and ``rsc`` started, not failed, on ``owner`` only. Pure."""
    r = view["resources"].get(rsc)
    return bool(view["dc"] and view["quorum"] and view["online"] == sorted(online) and not view["pending"]
                and r and r["active"] and not r["failed"] and r["role"] == "Started" and r["nodes"] == [owner])


_LOG_TS = re.compile(r"^(\w{3}) +(\d{1,2}) (\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?\b")


def parse_log_time(line: str, year: int) -> float | None:
    """The time.time() instant at the start of a corosync stderr log line ("Dec 07 16:30:01.123
    [...]", local time, ``year`` given); None when the line does not start with one. Pure
    except for the local time zone."""
    m = _LOG_TS.match(line)
    if not m:
        return None
    mon, day, hh, mm, ss, frac = m.groups()
    try:
        t = time.strptime(f"{year} {mon} {day} {hh}:{mm}:{ss}", "%Y %b %d %H:%M:%S")
    except ValueError:
        return None
    return time.mktime(t) + (int(frac.ljust(6, "0")) / 1e6 if frac else 0.0)


def membership_after(log_text: str, t0: float, left_id: int, year: int) -> float | None:
    """Seconds from ``t0`` to the first "A new membership ... Members left: ... ``left_id``"
    line of a corosync log at or after t0 (None if none). Pure (see :func:`parse_log_time`)."""
    for line in log_text.splitlines():
        if "A new membership" not in line:
            continue
        t = parse_log_time(line, year)
        if t is None or t < t0 - 0.001:
            continue
        m = re.search(r"Members left:([\d ]+)", line)
        if m and str(left_id) in m.group(1).split():
            return round(t - t0, 4)
    return None


def line_after(log_text: str, t0: float, needle: str, year: int) -> float | None:
    """Seconds from ``t0`` to the first line holding ``needle`` stamped at or after t0 in a
    corosync / pacemaker log (None if none). Pure (see :func:`parse_log_time`)."""
    for line in log_text.splitlines():
        if needle in line:
            t = parse_log_time(line, year)
            if t is not None and t >= t0 - 0.001:
                return round(t - t0, 4)
    return None


def membership_flaps(log_text: str, kills: list[tuple[float, float]], killed_id: int, year: int) -> int:
    """How many new memberships in a (never killed) node's corosync log lost a member the
    bench did not kill: anyone but ``killed_id``, or ``killed_id`` outside every (kill,
    restart) window in ``kills``. Pure (see :func:`parse_log_time`)."""
    n = 0
    for line in log_text.splitlines():
        m = re.search(r"A new membership .*Members left:([\d ]+)", line)
        if not m:
            continue
        left = {int(x) for x in m.group(1).split()}
        t = parse_log_time(line, year)
        planned = t is not None and any(a - 0.001 <= t <= b for a, b in kills)
        if left - {killed_id} or (killed_id in left and not planned):
            n += 1
    return n


#: nearest-rank percentile, the same definition as bench/failover.py's (its own)
percentile = _bench_module("failover").percentile


def summarize(values: list[float | None]) -> dict:
    """n, missing, min, median, p50 (nearest rank), max of ``values`` (seconds). Pure."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    out: dict = {"n": len(v), "missing": len(values) - len(v)}
    if v:
        out.update(min=round(min(v), 4), median=round(statistics.median(v), 4),
                   p50=round(percentile(v, 50), 4), max=round(max(v), 4))
    return out


def parse_version(text: str, pattern: str) -> str | None:
    """The first group of ``pattern`` in ``text``, else None. Pure."""
    m = re.search(pattern, text)
    return m.group(1) if m else None


def parse_probe_event(line: str) -> tuple[str, float, float] | None:
    """A probe child's "answer WHO T0 T1" stderr line -> (who, t0, t1); None otherwise. Pure."""
    f = line.split()
    if len(f) == 4 and f[0] == "answer":
        try:
            return f[1], float(f[2]), float(f[3])
        except ValueError:
            return None
    return None


def _f(v, unit: str = " s", digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}{unit}"


def format_report(doc: dict) -> str:
    """The short text report of a :func:`measure` document. Pure."""
    if not doc.get("measured") and not doc.get("failed"):
        return f"pacemaker anchor: not measured ({doc.get('reason')})"
    if "versions" not in doc:
        return f"pacemaker anchor: FAILED ({doc.get('reason')})"
    v = doc["versions"]
    lines = [f"pacemaker anchor: Corosync {v.get('corosync')} + Pacemaker {v.get('pacemaker')} "
             f"(resource-agents {v.get('resource_agents')}, libknet {v.get('libknet')}); 3 nodes in namespaces, "
             f"knet, votequorum (3 votes, quorum 2), IPaddr2 monitor {MONITOR_INTERVAL}, "
             f"stonith off, no-quorum-policy stop; {doc['meta']['cpus']} CPUs, load "
             f"{doc['meta']['loadavg_start'][0]:.1f} -> {doc['meta']['loadavg_end'][0]:.1f}"]
    if doc.get("failed"):
        lines.append(f"FAILED: {doc.get('reason')}")
    for name, prof in doc["profiles"].items():
        t = prof.get("timeouts") or {}
        asked = ", ".join(f"{k} {v}" for k, v in (prof.get("config") or {}).items()) or "corosync defaults"
        lines.append(f"== {name} ({asked}): effective token {t.get('token')} ms, consensus {t.get('consensus')} ms, "
                     f"join {t.get('join')} ms; cold start to VIP placed {_f(prof.get('start_s'), ' s', 1)}")
        if prof.get("error"):
            lines.append(f"  FAILED: {prof['error']}")
        for r in prof.get("rounds", []):
            if "error" in r:
                lines.append(f"  round {r['round']}: FAILED: {r['error']}")
                continue
            dc = " (the DC)" if r.get("dc_before") == r["killed"] else ""
            lines.append(f"  round {r['round']}: failover {_f(r['failover_s'])} "
                         f"({r['killed']}{dc} -> {r['new_owner']}; "
                         f"membership {_f(r.get('membership_s'))}, IPaddr2 started {_f(r.get('vip_started_s'))}, "
                         f"{r.get('failed_probes', 0)} failed probes); "
                         f"restore {_f(r.get('restore_s'), ' s', 1)}")
        s = prof.get("failover")
        if s and s.get("n"):
            lines.append(f"  failover over {s['n']} round(s): median {s['median']:.3f} s, p50 {s['p50']:.3f} s, "
                         f"max {s['max']:.3f} s")
        if prof.get("membership_flaps"):
            lines.append(f"  unplanned membership losses seen by node2 (a member dropped that was not killed): "
                         f"{prof['membership_flaps']}")
    fpr = doc.get("footprint")
    if fpr:
        if fpr.get("error"):
            lines.append(f"footprint: FAILED: {fpr['error']}")
        else:
            lines.append(f"footprint, idle node ({fpr['profile']} profile, {fpr['window_s']:g} s window, machine "
                         f"{fpr['machine_busy_pct_of_all_cpus']:.0f} % busy over all CPUs):")
            for node, c in fpr["nodes"].items():
                top = sorted(c["programs"].items(), key=lambda kv: -kv[1]["cpu_pct"])[:3]
                lines.append(f"  {node}{' (VIP)' if node == fpr.get('vip_on') else ''}: {c['processes']} processes, "
                             f"PSS {c['pss_mb']:.1f} MB, CPU {c['cpu_pct']:.2f} % "
                             f"(sched {_f(c['sched_cpu_pct'], ' %', 2)})"
                             f"; most CPU: " + ", ".join(f"{k} {p['cpu_pct']:.2f} %" for k, p in top))
            w = fpr["worst"]
            lines.append(f"  one node (worst): {w['processes']} processes, PSS {w['pss_mb']:.1f} MB, "
                         f"CPU {w['cpu_pct']:.2f} % of one core")
    return "\n".join(lines)


# -- processes and namespaces ---------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] pacemaker: {msg}", file=sys.stderr, flush=True)


def run_cmd(argv: list[str], timeout: float = 30, what: str | None = None, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what or ' '.join(argv[:4])} timed out after {timeout:g} s") from None
    if check and r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"{what or ' '.join(argv[:4])} failed (exit {r.returncode}): {tail[0]}")
    return r


def poll(cond, timeout: float, what: str, interval: float = 0.2):
    """Call ``cond`` until it returns something true (returned); BenchError after ``timeout``
    seconds. BenchError from ``cond`` goes through; other exceptions mean "not yet"."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = cond()
            if v:
                return v
        except BenchError:
            raise
        except Exception as e:  # noqa: BLE001 - not yet
            last = e
        if time.monotonic() >= deadline:
            raise BenchError(f"{what} not reached within {timeout:g} s" + (f" (last: {last})" if last else ""))
        time.sleep(interval)


def netns_inode(ns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return None


def netns_pids(ns: str) -> list[int]:
    """Every process whose network namespace is ``ns`` (what ``ip netns pids`` prints)."""
    ino = netns_inode(ns)
    if ino is None:
        return []
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                if os.stat(f"/proc/{e}/ns/net").st_ino == ino:
                    out.append(int(e))
            except OSError:
                continue
    return out


_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37


def _subreaper(on: bool | None = None) -> bool:
    """Get (and with ``on`` set) this process's child-subreaper flag: orphans of the daemons
    (pacemakerd's children once it is killed) become our children, so we reap them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        cur = ctypes.c_int(0)
        libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(cur), 0, 0, 0)
        if on is not None:
            libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
        return bool(cur.value)
    except (OSError, AttributeError):
        return False


def _uptime_ticks() -> int:
    """Now, in clock ticks after boot (the unit of /proc/PID/stat's starttime)."""
    return int(float(fp._read("/proc/uptime").split()[0]) * fp.CLK_TCK) - 1


class Procs:
    """Every subprocess this bench started (Popen) and how it is stopped: by PID, and every
    process found in one of the bench's namespaces, SIGKILLed and reaped."""

    def __init__(self):
        self.popens: dict[int, subprocess.Popen] = {}

    def start(self, argv: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
        """Start ``argv`` (its own session, output to ``log_path``) and remember it."""
        with open(log_path, "ab") as out:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)
        self.popens[p.pid] = p
        return p

    def kill_pids(self, pids: list[int], timeout: float = 10) -> None:
        """SIGKILL ``pids`` (all at once) and reap them: our Popens by Popen.wait, orphans that
        were reparented to us by waitpid; wait until each is gone."""
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.reap(pids, timeout)

    def reap(self, pids: list[int], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        left = set(pids)
        while left and time.monotonic() < deadline:
            for pid in list(left):
                p = self.popens.get(pid)
                if p is not None:
                    if p.poll() is not None:
                        left.discard(pid)
                        self.popens.pop(pid, None)
                    continue
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                    if done:
                        left.discard(pid)
                except ChildProcessError:
                    # not (yet) ours: a killed daemon's child is reparented to us (the subreaper)
                    # once its parent is reaped; until then, wait until it is gone
                    if not os.path.exists(f"/proc/{pid}"):
                        left.discard(pid)
            if left:
                time.sleep(0.02)
        self.forget_dead()

    def reap_orphans(self, since_ticks: int, settle: float = 1.0) -> int:
        """Reap zombie children of this process that started at or after ``since_ticks`` (clock
        ticks after boot) and are none of our Popens: orphans of the lab's daemons reparented to
        us (the subreaper) after the kill sweep, e.g. a resource agent's subshell that exited
        between two scans. Waits ``settle`` s for late ones. How many were reaped."""
        me, n = os.getpid(), 0
        deadline = time.monotonic() + settle
        while True:
            for e in os.listdir("/proc"):
                if not e.isdigit() or int(e) in self.popens:
                    continue
                try:
                    st = fp.parse_stat(fp._read(f"/proc/{e}/stat"))
                except (OSError, ValueError):
                    continue
                if st.ppid == me and st.state == "Z" and st.starttime >= since_ticks:
                    try:
                        os.waitpid(st.pid, os.WNOHANG)
                        n += 1
                    except ChildProcessError:
                        pass
            if time.monotonic() >= deadline:
                return n
            time.sleep(0.1)

    def forget_dead(self) -> None:
        for pid, p in list(self.popens.items()):
            if p.poll() is not None:
                del self.popens[pid]

    def stop_all(self) -> None:
        for pid, p in list(self.popens.items()):
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
        for p in list(self.popens.values()):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.popens.clear()


# -- the lab --------------------------------------------------------------------------------------

@dataclass
class Node:
    name: str
    nodeid: int
    addr: str
    ns: str
    dir: Path
    holder: subprocess.Popen | None = None
    corosync: subprocess.Popen | None = None
    pacemakerd: subprocess.Popen | None = None
    whoami: subprocess.Popen | None = None
    starts: int = 0
    extra: dict = field(default_factory=dict)

    def enter(self) -> list[str]:
        """argv prefix running a command in this node's network, mount and UTS namespaces."""
        if self.holder is None:
            raise BenchError(f"{self.name} is not running")
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-u", "-n", "--"]


class Lab:
    """The bridge, node and client namespaces (:func:`ns_names`); :meth:`down` removes them
    after every process in them is killed."""

    def __init__(self, procs: Procs):
        self.procs = procs
        self.names = ns_names(os.getpid())
        self.made: list[str] = []

    def ip(self, *args: str) -> None:
        run_cmd(["ip", *args], timeout=20, what="ip " + " ".join(args[:5]))

    def up(self) -> None:
        sw = self.names["switch"]
        for ns in [sw, self.names["client"], *(self.names[n] for n in NODES)]:
            if netns_inode(ns) is not None:
                raise BenchError(f"namespace {ns} exists already")
        self.ip("netns", "add", sw)
        self.made.append(sw)
        self.ip("-n", sw, "link", "set", "lo", "up")
        self.ip("-n", sw, "link", "add", "br0", "type", "bridge")
        self.ip("-n", sw, "link", "set", "br0", "up")
        ports = [("client", CLIENT_ADDR, "vc")] + [(n, node_addr(i), f"v{i}") for i, n in enumerate(NODES, 1)]
        for key, addr, port in ports:
            ns = self.names[key]
            self.ip("netns", "add", ns)
            self.made.append(ns)
            self.ip("-n", ns, "link", "set", "lo", "up")
            self.ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.ip("-n", sw, "link", "set", port, "master", "br0", "up")
            self.ip("-n", ns, "addr", "add", f"{addr}/{CIDR}", "dev", "eth0")
            self.ip("-n", ns, "link", "set", "eth0", "up")

    def kill_ns(self, ns: str, timeout: float = 10) -> None:
        """SIGKILL every process in ``ns`` (until none is left) and reap them."""
        deadline = time.monotonic() + timeout
        while True:
            pids = netns_pids(ns)
            if not pids:
                return
            self.procs.kill_pids(pids, timeout=max(0.5, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                left = netns_pids(ns)
                if left:
                    raise BenchError(f"processes {left} in {ns} survived SIGKILL")
                return

    def down(self) -> None:
        errors = []
        for ns in reversed(self.made):
            try:
                self.kill_ns(ns)
            except BenchError as e:
                errors.append(str(e))
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.made = [ns for ns in self.made if netns_inode(ns) is not None]
        if errors or self.made:
            raise BenchError("; ".join(errors) or f"namespaces left: {self.made}")


class Probe:
    """The client's probe of VIP:PORT (tests/probe.py's Prober, one attempt every
    PROBE_INTERVAL_S) in the client namespace; its stderr says when the answering node
    changes; :meth:`stop` returns every attempt."""

    SNIPPET = r"""
import json, signal, sys, threading
sys.path.insert(0, sys.argv[1])
import probe
p = probe.Prober(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
stop = threading.Event()
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda *_: stop.set())
def watch():
    seen, last = 0, None
    while not stop.is_set():
        recs = p.records
        n = len(recs)
        for r in recs[seen:n]:
            if r.who is not None and r.who != last:
                last = r.who
                print("answer %s %.6f %.6f" % (r.who, r.t0, r.t1), file=sys.stderr, flush=True)
        seen = n
        stop.wait(0.01)
threading.Thread(target=watch, daemon=True).start()
recs = p.run(float(sys.argv[5]), stop)
stop.set()
for r in recs:
    sys.stdout.write(json.dumps({"t0": round(r.t0, 6), "t1": round(r.t1, 6), "who": r.who, "err": r.err}) + "\n")
sys.stdout.flush()
"""

    def __init__(self, procs: Procs, client_ns: str, out: Path, limit_s: float):
        self.out = out
        self.events: list[tuple[str, float, float]] = []
        self._f = open(out, "wb")
        argv = ["ip", "netns", "exec", client_ns, PYTHON, "-c", self.SNIPPET, str(TESTS), VIP, str(PORT),
                str(PROBE_INTERVAL_S), str(limit_s)]
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._f, stderr=subprocess.PIPE,
                                  start_new_session=True)
        procs.popens[self.p.pid] = self.p
        self.procs = procs
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stderr is not None
        for raw in self.p.stderr:
            ev = parse_probe_event(raw.decode(errors="replace"))
            if ev:
                self.events.append(ev)

    def wait_answer(self, timeout: float, who=None, other_than=None, after: float = 0.0) -> tuple[str, float, float]:
        """The first answer-change event (by ``who`` / not by ``other_than``, attempt started
        at or after ``after``)."""
        def found():
            if self.p.poll() is not None:
                raise BenchError(f"the probe exited with {self.p.returncode}")
            for ev in self.events:
                if ev[1] >= after and (who is None or ev[0] == who) and (other_than is None or ev[0] != other_than):
                    return ev
            return None
        what = f"an answer from {who}" if who else f"an answer from a node other than {other_than}"
        return poll(found, timeout, what, interval=0.01)

    def stop(self) -> list[dict]:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(timeout=5)
        self.procs.popens.pop(self.p.pid, None)
        self._reader.join(timeout=5)
        self._f.close()
        recs = []
        for line in self.out.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
        return recs


class PacemakerCluster:
    """Three nodes of one profile in :class:`Lab`'s namespaces."""

    def __init__(self, lab: Lab, procs: Procs, work: Path, profile: str):
        self.lab, self.procs, self.profile = lab, procs, profile
        self.work = work / profile
        self.config = dict(PROFILES[profile])
        self.nodes = {n: Node(n, i, node_addr(i), lab.names[n], self.work / n) for i, n in enumerate(NODES, 1)}
        self.kills: list[tuple[float, float]] = []       # (kill, restart) instants of node1
        self.write_configs()

    def write_configs(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        conf = corosync_conf([(n.name, n.nodeid, n.addr) for n in self.nodes.values()], **self.config)
        key = os.urandom(256)
        for n in self.nodes.values():
            for sub, dst in BINDS:
                d = n.dir / sub
                d.mkdir(parents=True, exist_ok=True)
                st = os.stat(dst)
                os.chown(d, st.st_uid, st.st_gid)
                os.chmod(d, st.st_mode & 0o7777)
            for sub in ("cib", "pengine", "cores", "blackbox"):
                d = n.dir / "var-lib-pacemaker" / sub
                d.mkdir(exist_ok=True)
                st = os.stat(f"/var/lib/pacemaker/{sub}") if os.path.isdir(f"/var/lib/pacemaker/{sub}") else None
                if st is not None:
                    os.chown(d, st.st_uid, st.st_gid)
                    os.chmod(d, st.st_mode & 0o7777)
            (n.dir / "etc-corosync" / "corosync.conf").write_text(conf)
            kf = n.dir / "etc-corosync" / "authkey"
            kf.write_bytes(key)
            os.chmod(kf, 0o400)
            (n.dir / "etc-corosync" / "uidgid.d").mkdir(exist_ok=True)
            (n.dir / "logs").mkdir(exist_ok=True)

    # -- one node

    def start_node(self, name: str) -> None:
        """Holder (mount + UTS namespace), whoami, corosync (until its cmap answers), pacemakerd."""
        n = self.nodes[name]
        n.starts += 1
        logs = n.dir / "logs"
        n.holder = self.procs.start(["ip", "netns", "exec", n.ns, "unshare", "-m", "-u", "--propagation", "private",
                                     "sh", "-c", holder_script(str(n.dir), n.name)], logs / f"holder.{n.starts}.log")

        def held():
            if n.holder.poll() is not None:
                raise BenchError(f"{name}: the mount namespace setup failed (exit {n.holder.returncode}): "
                                 f"{_tail(logs / f'holder.{n.starts}.log')}")
            return fp._read(f"/proc/{n.holder.pid}/comm").strip() == "sleep"
        poll(held, 20, f"{name}'s namespace holder", interval=0.02)
        n.whoami = self.procs.start(["ip", "netns", "exec", n.ns, PYTHON, str(TESTS / "whoami.py"), n.name, str(PORT)],
                                    logs / f"whoami.{n.starts}.log")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        n.corosync = self.procs.start([*n.enter(), "corosync", "-f"], logs / f"corosync.{n.starts}.log", env=env)

        def corosync_up():
            if n.corosync.poll() is not None:
                raise BenchError(f"{name}: corosync exited with {n.corosync.returncode}: "
                                 f"{_tail(logs / f'corosync.{n.starts}.log')}")
            r = run_cmd([*n.enter(), "corosync-cmapctl", "runtime.config.totem"], timeout=10, check=False, env=env)
            return parse_cmap(r.stdout) if r.returncode == 0 and "runtime.config.totem.token" in r.stdout else None
        n.extra["cmap"] = poll(corosync_up, 30, f"{name}'s corosync answering", interval=0.1)
        n.pacemakerd = self.procs.start([*n.enter(), "pacemakerd"], logs / f"pacemakerd.{n.starts}.log",
                                        env={**env, **PCMK_ENV})

    def kill_node(self, name: str) -> float:
        """SIGKILL every process in the node's namespace, then its link down: the kill instant."""
        n = self.nodes[name]
        pids = netns_pids(n.ns)
        t = time.time()
        self.procs.kill_pids(pids, timeout=10)
        self.lab.ip("-n", n.ns, "link", "set", "eth0", "down")
        self.lab.kill_ns(n.ns)          # anything forked between the scan and the kill
        n.holder = n.corosync = n.pacemakerd = n.whoami = None
        return t

    def revive_network(self, name: str) -> None:
        """As after a reboot: the VIP it still had is gone, eth0 up again."""
        n = self.nodes[name]
        subprocess.run(["ip", "-n", n.ns, "addr", "del", f"{VIP}/{CIDR}", "dev", "eth0"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.lab.ip("-n", n.ns, "link", "set", "eth0", "up")

    # -- the cluster

    def tool(self, via: str, argv: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return run_cmd([*self.nodes[via].enter(), *argv], timeout=timeout, check=check, what=f"{argv[0]} on {via}",
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})

    def view(self, via: str) -> dict:
        r = self.tool(via, ["crm_mon", "-1", "--output-as=xml"], timeout=20, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"crm_mon exit {r.returncode}")
        return parse_crm_mon(r.stdout)

    def check_alive(self, names) -> None:
        for x in names:
            n = self.nodes[x]
            for what, p in (("corosync", n.corosync), ("pacemakerd", n.pacemakerd)):
                if p is None or p.poll() is not None:
                    raise BenchError(f"{x}: {what} is not running (exit {None if p is None else p.returncode}); "
                                     f"see {n.dir / 'logs'}")

    def wait_online(self, via: str, online: list[str], timeout: float) -> dict:
        def ok():
            self.check_alive(online)
            v = self.view(via)
            return v if v["dc"] and v["quorum"] and v["online"] == sorted(online) and not v["pending"] else None
        return poll(ok, timeout, f"{', '.join(online)} online with a quorate DC (seen from {via})", interval=0.5)

    def wait_placed(self, via: str, online: list[str], owner: str, timeout: float) -> dict:
        def ok():
            self.check_alive(online)
            v = self.view(via)
            return v if placement_settled(v, online, owner) else None
        return poll(ok, timeout, f"VIP started on {owner} only, {', '.join(online)} online", interval=0.25)

    def configure(self, via: str) -> None:
        for typ, name, value in CLUSTER_PROPERTIES:
            self.tool(via, ["crm_attribute", "--type", typ, "--name", name, "--update", value])
        self.tool(via, ["cibadmin", "--create", "--scope", "resources", "--xml-text", primitive_xml()])
        self.tool(via, ["cibadmin", "--create", "--scope", "constraints", "--xml-text", location_xml()])

    def client_sees(self, who: str, timeout: float) -> None:
        code = ("import socket,sys\ns=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=0.5)\n"
                "print(s.recv(64).decode().strip())")

        def ok():
            r = run_cmd(["ip", "netns", "exec", self.lab.names["client"], PYTHON, "-c", code, VIP, str(PORT)],
                        timeout=10, check=False)
            return r.returncode == 0 and r.stdout.strip() == who
        poll(ok, timeout, f"the client answered by {who} on the VIP", interval=0.2)

    def start(self) -> float:
        """Every node, then configure; seconds from the first launch until the VIP answers on node1."""
        t0 = time.monotonic()
        for x in NODES:
            self.start_node(x)
        self.wait_online(PREFERRED, list(NODES), START_TIMEOUT_S)
        self.configure(PREFERRED)
        self.wait_placed(PREFERRED, list(NODES), PREFERRED, 60)
        self.client_sees(PREFERRED, 30)
        return round(time.monotonic() - t0, 2)

    def timeouts(self) -> dict:
        cmap = self.nodes[PREFERRED].extra.get("cmap") or {}
        try:
            r = self.tool(PREFERRED, ["corosync-cmapctl", "runtime.config.totem"], timeout=10)
            cmap = parse_cmap(r.stdout)
        except BenchError:
            pass
        return totem_timeouts(cmap)

    def flaps(self) -> int | None:
        """Unplanned membership losses seen by node2 (never killed) so far (:func:`membership_flaps`)."""
        n = self.nodes["node2"]
        logs = sorted((n.dir / "logs").glob("corosync.*.log"))
        if not logs:
            return None
        year = time.localtime().tm_year
        return sum(membership_flaps(p.read_text(errors="replace"), self.kills, self.nodes[PREFERRED].nodeid, year)
                   for p in logs)

    def failover_round(self, k: int) -> dict:
        owner = PREFERRED
        probe = Probe(self.procs, self.lab.names["client"], self.work / f"probe.{k}.jsonl",
                      FAILOVER_TIMEOUT_S + RESTORE_TIMEOUT_S + 60)
        try:
            probe.wait_answer(10, who=owner)
            survivors = [x for x in NODES if x != owner]
            dc = self.view(survivors[0])["dc"]
            t_kill = self.kill_node(owner)
            new = probe.wait_answer(FAILOVER_TIMEOUT_S, other_than=owner, after=t_kill)
            self.wait_placed(survivors[0], survivors, new[0], 30)
            t_restart = time.time()
            self.revive_network(owner)
            self.start_node(owner)
            probe.wait_answer(RESTORE_TIMEOUT_S, who=owner, after=t_restart)
            self.wait_placed(survivors[0], list(NODES), owner, RESTORE_TIMEOUT_S)
            restore_s = time.time() - t_restart
        finally:
            records = probe.stop()
        a = analyze(records)
        fo = a.failover_s(t_kill, owner)
        first = a.first_answer_by_other(t_kill, owner)
        year = time.localtime(t_kill).tm_year
        self.kills.append((t_kill, t_restart))
        surv_log = self.nodes[survivors[0]].dir / "logs" / f"corosync.{self.nodes[survivors[0]].starts}.log"
        membership = membership_after(surv_log.read_text(errors="replace"), t_kill, self.nodes[owner].nodeid, year) \
            if surv_log.exists() else None
        started = None
        if first is not None:
            plog = self.nodes[first.who].dir / "var-log-pacemaker" / "pacemaker.log"
            if plog.exists():
                started = line_after(plog.read_text(errors="replace"), t_kill,
                                     f"Result of start operation for vip on {first.who}: ok", year)
        gap = a.longest_gap(t_restart, records[-1]["t1"]) if records else None
        return {"round": k, "killed": owner, "dc_before": dc, "new_owner": first.who if first else None,
                "failover_s": None if fo is None else round(fo, 4), "membership_s": membership,
                "vip_started_s": started,
                "failed_probes": sum(1 for r in records if r["who"] is None and r["t0"] >= t_kill
                                     and (first is None or r["t0"] <= first.t1)),
                "restore_s": round(restore_s, 2),
                "failback_gap_s": round(gap.length, 4) if gap else None}


def _tail(path: Path, n: int = 300) -> str:
    try:
        return repr(path.read_text(errors="replace")[-n:].strip())
    except OSError:
        return "(no log)"


# -- footprint ------------------------------------------------------------------------------------

def node_sample(n: Node, ppids: dict[int, int]) -> dict:
    """corosync's and pacemakerd's process trees of node ``n`` (one dict {pid: ProcSample})."""
    out = {}
    for p in (n.corosync, n.pacemakerd):
        if p is not None:
            out.update(fp.sample_tree(p.pid, ppids))
    return out


def measure_footprint(cl: PacemakerCluster, window: float) -> dict:
    cl.check_alive(NODES)
    before_m = fp.machine_cpu()
    ppids = fp.ppid_map()
    before = {x: node_sample(cl.nodes[x], ppids) for x in NODES}
    t0 = time.monotonic()
    time.sleep(window)      # the idle window itself (what is measured), not a synchronisation
    ppids = fp.ppid_map()
    after = {x: node_sample(cl.nodes[x], ppids) for x in NODES}
    elapsed = time.monotonic() - t0
    after_m = fp.machine_cpu()
    cl.check_alive(NODES)
    nodes = {x: fp.tree_cost(before[x], after[x], elapsed, cl.nodes[x].pacemakerd.pid) for x in NODES}
    worst = max(nodes.values(), key=lambda c: c["cpu_pct"])
    busy = (after_m[0] - before_m[0]) / max(1, after_m[1] - before_m[1]) * 100
    return {"profile": cl.profile, "window_s": round(elapsed, 2), "vip_on": PREFERRED, "nodes": nodes,
            "worst": {k: worst[k] for k in ("processes", "pss_mb", "cpu_pct", "sched_cpu_pct")},
            "mean": {k: round(statistics.fmean(c[k] for c in nodes.values()), 3)
                     for k in ("processes", "pss_mb", "cpu_pct")},
            "machine_busy_pct_of_all_cpus": round(busy, 1)}


# -- preconditions, versions ----------------------------------------------------------------------

def unavailable() -> str | None:
    """Why the anchor cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return (f"{', '.join(missing)} not installed "
                f"(apt-get install pacemaker corosync resource-agents)")
    if not IPADDR2.exists():
        return f"resource-agents not installed (no {IPADDR2})"
    for _, dst in BINDS:
        if not os.path.isdir(dst):
            return f"{dst} is missing (pacemaker / corosync packages incomplete)"
    for where, _ in TMPFS:
        if not os.path.isdir(where):
            return f"{where} is missing"
    return None


def versions() -> dict:
    def out(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return r.stdout + r.stderr
        except (OSError, subprocess.TimeoutExpired):
            return ""

    def deb(pkg):
        return out(["dpkg-query", "-W", "-f=${Version}", pkg]).strip() or None
    return {"corosync": parse_version(out(["corosync", "-v"]), r"version '([^']+)'"),
            "pacemaker": parse_version(out(["pacemakerd", "--version"]), r"Pacemaker (\S+)"),
            "resource_agents": deb("resource-agents"), "libknet": deb("libknet1"), "libqb": deb("libqb100"),
            "packages": {p: deb(p) for p in ("corosync", "pacemaker", "resource-agents")}}


# -- the whole measurement ------------------------------------------------------------------------

def measure(rounds: int = DEFAULT_ROUNDS, window: float = DEFAULT_WINDOW_S,
            profiles: tuple[str, ...] | list[str] = ("default", "tuned")) -> dict:
    """Run the anchor: per profile a fresh 3-node cluster, ``rounds`` failover rounds (0: none);
    the footprint of the idle nodes over ``window`` seconds on the first profile (0: none).

    Returns {"measured": True, "versions", "meta", "profiles": {name: {"config", "timeouts",
    "start_s", "rounds", "failover": summary}}, "footprint": {...}}; {"measured": False,
    "reason"} when it cannot run here; {"measured": False, "failed": True, "reason", ...} when
    it failed. KeyboardInterrupt goes through after the cleanup."""
    why = unavailable()
    if why:
        return {"measured": False, "reason": why}
    bad = [p for p in profiles if p not in PROFILES]
    if bad:
        return {"measured": False, "failed": True, "reason": f"unknown profile(s) {', '.join(bad)}"}
    doc: dict = {"measured": True, "versions": versions(),
                 "meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
                          "loadavg_start": os.getloadavg(), "rounds": rounds, "window_s": window,
                          "vip": f"{VIP}/{CIDR}", "probe_interval_s": PROBE_INTERVAL_S,
                          "monitor_interval": MONITOR_INTERVAL, "preference": f"{PREFERRED}={PREFERENCE_SCORE}",
                          "properties": {n: v for _, n, v in CLUSTER_PROPERTIES}},
                 "profiles": {}, "footprint": None}
    since_ticks = _uptime_ticks()
    was_subreaper = _subreaper(True)
    work = Path(tempfile.mkdtemp(prefix=f"pcm{os.getpid()}-"))
    os.chmod(work, 0o755)
    procs = Procs()
    lab = Lab(procs)
    failure = None
    try:
        lab.up()
        for i, name in enumerate(profiles):
            prof: dict = {"config": PROFILES[name], "rounds": []}
            doc["profiles"][name] = prof
            cl = PacemakerCluster(lab, procs, work, name)
            try:
                log(f"{name}: starting 3 nodes")
                prof["start_s"] = cl.start()
                prof["timeouts"] = cl.timeouts()
                log(f"{name}: up in {prof['start_s']} s, timeouts {prof['timeouts']}")
                if i == 0 and window > 0:
                    cl.wait_placed(PREFERRED, list(NODES), PREFERRED, 30)
                    time.sleep(SETTLE_EXTRA_S)     # settle margin, as bench/footprint.py
                    log(f"{name}: idle window {window:g} s")
                    doc["footprint"] = measure_footprint(cl, window)
                for k in range(1, rounds + 1):
                    log(f"{name}: failover round {k}")
                    try:
                        prof["rounds"].append(cl.failover_round(k))
                        log(f"{name}: round {k}: {prof['rounds'][-1]}")
                    except BenchError as e:
                        prof["rounds"].append({"round": k, "error": str(e)})
                        raise
            except BenchError as e:
                prof["error"] = str(e)
                failure = failure or f"{name}: {e}"
                log(f"{name} failed: {e}")
            finally:
                for x in NODES:
                    lab.kill_ns(cl.nodes[x].ns)
                prof["membership_flaps"] = cl.flaps()
                prof["failover"] = summarize([r.get("failover_s") for r in prof["rounds"] if "error" not in r])
            if failure:
                break
    except BenchError as e:
        failure = failure or str(e)
    finally:
        try:
            lab.down()
        except BenchError as e:
            failure = failure or f"cleanup: {e}"
        procs.stop_all()
        procs.reap_orphans(since_ticks)
        _subreaper(was_subreaper)
        if os.environ.get("PCM_KEEP"):
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    doc["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["meta"]["loadavg_end"] = os.getloadavg()
    if failure:
        doc.update(measured=False, failed=True, reason=failure)
    return doc


def parse_args(argv: list[str]) -> argparse.Namespace:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise BenchError(message)
    ap = Parser(description="Pacemaker + Corosync IPaddr2 failover / footprint anchor (run as root)")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"failover rounds per profile ({DEFAULT_ROUNDS}; --quick 1)")
    ap.add_argument("--window", type=float, default=None,
                    help=f"idle window for the footprint, s ({DEFAULT_WINDOW_S:g}; --quick {QUICK_WINDOW_S:g})")
    ap.add_argument("--quick", action="store_true", help="1 round, the default profile only, a 10 s window")
    ap.add_argument("--profiles", default=None, help="comma-separated, of: " + ", ".join(PROFILES)
                    + " (default: all; --quick: default)")
    ap.add_argument("--json", metavar="FILE", help="write the document as JSON to FILE")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else DEFAULT_ROUNDS
    if args.window is None:
        args.window = QUICK_WINDOW_S if args.quick else DEFAULT_WINDOW_S
    if args.rounds < 0:
        raise BenchError("--rounds must be 0 or more")
    if args.window < 0 or not math.isfinite(args.window):
        raise BenchError("--window must be 0 or more seconds")
    if args.profiles is None:
        args.profiles = ["default"] if args.quick else list(PROFILES)
    else:
        args.profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
        bad = [p for p in args.profiles if p not in PROFILES]
        if bad or not args.profiles:
            raise BenchError(f"unknown profile(s) {', '.join(bad) or '(none)'} (known: {', '.join(PROFILES)})")
    return args


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except BenchError as e:
        print(f"pacemaker: {e}", file=sys.stderr)
        return 2
    try:
        _bench_module("anchors").terminate_on_sigterm()   # SIGTERM unwinds like Ctrl-C
    except ImportError:         # bench/anchors.py needs pyzmq / msgpack (the venv): the same, here
        def unwind(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        signal.signal(signal.SIGTERM, unwind)
    try:
        doc = measure(args.rounds, args.window, args.profiles)
    except KeyboardInterrupt:
        print("pacemaker: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    print(format_report(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if doc.get("failed"):
        print(f"pacemaker: bench failed: {doc['reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
