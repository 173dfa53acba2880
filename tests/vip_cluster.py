"""A whole ecluster running in the namespace lab: members under supervisord, whoami
listeners on every node, a probing client. Used by the VIP tests and bench/failover.

Lab members 1..N are the nodes n1..nN, then the managers m1..mM. Every member runs
``ecluster node run`` / ``ecluster manager run`` inside its own namespace; the test
process talks to members over their ipc sockets (files are shared across namespaces),
so it needs no route into the lab.

``LabCluster(..., ipv6="fd00:99::")`` builds the lab with IPv6 too: every node also runs an
IPv6 whoami listener on the same port, VIPs may be IPv6 (``"fd00:99::100/64"``) mixed with
IPv4 ones, and with ``members_over="ipv6"`` the members' bus addresses (and so every
member-to-member and CLI connection) are their IPv6 ones.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from lab import Lab, WHOAMI_SCRIPT, PROBE_SCRIPT, _kill_everything_in  # noqa: E402
from probe_analysis import analyze, parse_lines  # noqa: E402

PYTHON = sys.executable
WHOAMI_PORT = 2525
# whoami.py serves IPv4 only: this is its IPv6 twin (V6ONLY, so both share the port)
WHOAMI6 = """
import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", port))
srv.listen(128)
answer = name.encode() + b"\\n"
while True:
    conn, _ = srv.accept()
    try:
        conn.sendall(answer)
    except OSError:
        pass
    finally:
        conn.close()
"""


def wait_for(cond, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - not yet
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s" + (f" (last error {last!r})" if last else ""))
        time.sleep(interval)


class LabCluster:
    """Build with ``LabCluster(n_nodes, n_managers, preset, vips)`` then ``start()``; ``close()`` always."""

    def __init__(self, n_nodes: int = 3, n_managers: int = 1, preset: str = "lan",
                 vips: list[dict] | None = None, subnet: str = "10.99.0", checks: list[dict] | None = None,
                 extra: str = "", ipv6: str | None = None, members_over: str = "ipv4"):
        if members_over not in ("ipv4", "ipv6") or (members_over == "ipv6" and ipv6 is None):
            raise ValueError("members_over is 'ipv4', or 'ipv6' with an ipv6 lab prefix")
        self.n_nodes, self.n_managers = n_nodes, n_managers
        self.names = [f"n{i}" for i in range(1, n_nodes + 1)] + [f"m{i}" for i in range(1, n_managers + 1)]
        self.lab = Lab(len(self.names), subnet=subnet, ipv6=ipv6)
        self.members_over = members_over
        self.vips = vips or [{"address": f"{subnet}.100/24", "preference": "n1"}]
        self.preset = preset
        # [[check]] tables, key -> value as TOML wants it (docs/CHECKS.md); none by default
        self.checks = checks or []
        # more cluster-file text, appended as it is (e.g. a [hooks] table)
        self.extra = extra
        self.root = Path(tempfile.mkdtemp(prefix="eclv", dir="/tmp"))
        self.member_procs: dict[str, subprocess.Popen] = {}
        self.cluster = None

    # -- set-up -----------------------------------------------------------------------
    def index(self, name: str) -> int:
        return self.names.index(name) + 1

    def ns(self, name: str) -> str:
        return self.lab.member_ns(self.index(name))

    def vip_ip(self, k: int = 0) -> str:
        return self.vips[k]["address"].split("/")[0]

    def member_address(self, name: str) -> str:
        """The address member ``name``'s bus listens on (its IPv6 one with members_over="ipv6")."""
        i = self.index(name)
        return self.lab.member_address6(i) if self.members_over == "ipv6" else self.lab.member_address(i)

    def start_whoami(self, name: str) -> float:
        """Start node ``name``'s whoami listener(s) (IPv4, plus IPv6 in an IPv6 lab); returns the time."""
        t = time.time()
        self.lab.popen(self.ns(name), [PYTHON, str(WHOAMI_SCRIPT), name, str(WHOAMI_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.lab.ipv6:
            self.lab.popen(self.ns(name), [PYTHON, "-c", WHOAMI6, name, str(WHOAMI_PORT)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return t

    def write_cluster(self) -> Path:
        from bus import keys as keymod
        from ecluster.clusterfile import load_cluster
        lines = ["[cluster]", 'name = "lab"', 'keys = "keys"', f'preset = "{self.preset}"', "",
                 "[security]", "nodes_may_commit = true", ""]      # the labs commit through nodes
        for name in self.names:
            table = "nodes" if name.startswith("n") else "managers"
            lines += [f"[{table}.{name}]", f'address = "{self.member_address(name)}"',
                      f'data_dir = "{self.root / name}"', ""]
        for v in self.vips:
            lines.append("[[vip]]")
            lines.append(f'address = "{v["address"]}"')
            lines.append(f'interface = "{v.get("interface", "eth0")}"')
            for k in ("preference", "follow", "kind"):
                if v.get(k):
                    lines.append(f'{k} = "{v[k]}"')
            lines.append("")
        for c in self.checks:
            lines.append("[[check]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in c.items()]   # JSON scalars/lists are TOML
            lines.append("")
        if self.extra:
            lines += ["", self.extra]
        path = self.root / "cluster.toml"
        path.write_text("\n".join(lines))
        for n in [*self.names, keymod.ADMIN]:
            keymod.create(self.root / "keys", n)
        self.cluster = load_cluster(path)
        self.path = path
        return path

    def start(self, prepare=None) -> "LabCluster":
        """Bring the lab up, call ``prepare(self)`` (e.g. to add interfaces), start every member."""
        try:
            self.lab.up()
            self.write_cluster()
            if prepare is not None:
                prepare(self)
            for name in self.names:
                if name.startswith("n"):
                    self.start_whoami(name)
            for name in self.names:
                self.start_member(name)
            self.wait_settled(timeout=120)     # ~40 Python processes start on 2 cores
        except BaseException:
            self.close()
            raise
        return self

    def start_member(self, name: str) -> None:
        role = "node" if name.startswith("n") else "manager"
        log = open(self.root / f"{name}.runner.log", "ab")
        argv = [PYTHON, "-m", "ecluster.cli", role, "run", "--config", str(self.path), f"--{role}", name]
        self.member_procs[name] = self.lab.popen(self.ns(name), argv, stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL)
        log.close()

    def kill_member(self, name: str, link_down: bool = False) -> float:
        """kill -9 every process in the member's namespace (and down its link); returns the time."""
        t = time.time()
        _kill_everything_in([self.ns(name)])
        if link_down:
            self.lab.link_down(self.index(name))
        p = self.member_procs.pop(name, None)
        if p is not None:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return t

    def revive_member(self, name: str) -> float:
        # kill -9 + link down stands for a machine dying; a machine that comes back has a fresh
        # network configuration, so the addresses its dead processes left are gone first
        for v in self.vips:
            ip, prefix = v["address"].split("/")
            if self.lab.holds(self.index(name), ip):
                try:
                    self.lab.del_address(self.index(name), ip, int(prefix))
                except Exception:   # noqa: BLE001 - the kernel's own lifetime removed it meanwhile
                    pass
        self.lab.link_up(self.index(name))
        t = time.time()
        if name.startswith("n") and not self.whoami_procs(name):
            self.start_whoami(name)
        self.start_member(name)
        return t

    def whoami_procs(self, name: str) -> list[subprocess.Popen]:
        """The live whoami listeners of node ``name`` (started by this lab)."""
        return [p for p in self.lab.processes(self.ns(name))
                if p.poll() is None and ("whoami" in " ".join(map(str, p.args)) or WHOAMI6 in p.args)]

    def stop_whoami(self, name: str) -> float:
        """Kill node ``name``'s whoami listener (its port stops answering); returns the time."""
        t = time.time()
        for p in self.whoami_procs(name):
            self.lab.kill(p)
            p.wait(timeout=5)
        return t

    def close(self) -> None:
        try:
            self.lab.down()
        finally:
            if os.environ.get("ECL_KEEP"):
                print(f"kept {self.root}")
            else:
                shutil.rmtree(self.root, ignore_errors=True)

    # -- asking the cluster -------------------------------------------------------------
    def call(self, via: str, service: str, method: str, timeout: float = 1.0, target: str | None = None, **args):
        from bus.client import SyncClient
        with SyncClient(self.cluster, via=via) as c:
            return c.call(target or via, service, method, timeout=timeout, **args)

    def live(self) -> list[str]:
        return [n for n in self.names if n in self.member_procs]

    def election_status(self, via: str | None = None) -> dict:
        last = None
        for name in ([via] if via else self.live()):
            try:
                return self.call(name, "election", "status", timeout=0.5)
            except Exception as e:  # noqa: BLE001
                last = e
        raise AssertionError(f"no election status: {last}")

    def leader_status(self) -> dict:
        """The election status of the current coordinator (polls until there is exactly one)."""
        def one():
            leaders = []
            for name in self.live():
                try:
                    st = self.call(name, "election", "status", timeout=0.5)
                except Exception:  # noqa: BLE001
                    continue
                if st["role"] == "leader":
                    leaders.append(st)
            if not leaders:
                return None
            # a deposed coordinator cut off in a minority may still think it leads for a
            # moment; the coordinator is the one of the highest term (one per term)
            top = max(s["term"] for s in leaders)
            best = [s for s in leaders if s["term"] == top]
            return best[0] if len(best) == 1 else None
        return wait_for(one, 20, what="a coordinator")

    def vip_rows(self) -> list[dict]:
        return self.leader_status()["vips"]

    def holders(self) -> dict[str, list[str]]:
        """Who has each VIP plumbed, read from the namespaces (the ground truth)."""
        out = {}
        for v in self.vips:
            ip = v["address"].split("/")[0]
            ifname = v.get("interface", "eth0")
            out[ip] = [n for n in self.names if n.startswith("n") and self.lab.holds(self.index(n), ip, ifname)]
        return out

    def wait_settled(self, timeout: float = 20, expect: dict[str, str] | None = None) -> dict:
        """Until every VIP is owned (by ``expect[ip]`` when given) with one holder."""
        def ok():
            rows = self.vip_rows()
            if not all(r["state"] == "owned" for r in rows):
                return None
            if expect:
                for r in rows:
                    ip = r["address"].split("/")[0]
                    if ip in expect and r["owner"] != expect[ip]:
                        return None
            h = self.holders()
            for r in rows:
                if h[r["address"].split("/")[0]] != [r["owner"]]:
                    return None
            return rows
        return wait_for(ok, timeout, interval=0.05, what=f"VIPs settled {expect or ''}")

    # -- the client's view ----------------------------------------------------------------
    def start_probe(self, duration: float, vip: str | None = None, interval: float = 0.005) -> subprocess.Popen:
        return self.lab.popen(self.lab.client_ns, [PYTHON, str(PROBE_SCRIPT), vip or self.vip_ip(), str(WHOAMI_PORT),
                                                   str(duration), str(interval)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    @staticmethod
    def probe_result(p: subprocess.Popen, timeout: float = 60):
        out, _ = p.communicate(timeout=timeout)
        return analyze(parse_lines(out.decode()))

    def arp_double_holders(self) -> list[tuple[float, str, list[str]]]:
        """(t, vip, node names) of every ARP round from the client answered by two nodes, over
        every sampler started with ``self.lab.start_sampler`` (ARP is on by default); these are
        also part of that sampler's ``double_holder_instants()``."""
        return [(t, v, [self.names[i - 1] if 0 < i <= len(self.names) else "?" for i in h])
                for t, v, h in self.lab.arp_double_holders()]

    def ask_vip(self, vip: str | None = None) -> str | None:
        return self.lab.ask(self.lab.client_ns, vip or self.vip_ip(), WHOAMI_PORT, timeout=0.3)
