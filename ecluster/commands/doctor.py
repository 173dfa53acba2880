"""``ecluster doctor``: what this host needs to run one member, checked before it runs.

Each check is a pure judgement (``judge_*``: facts in, :class:`Finding` out) over facts
gathered at the edge (``probe_*``: /proc, sockets, the key directory, the peers' brokers),
so every verdict is testable without the host it describes. Findings print one per line;
the exit status is 1 naming the first failure, 0 when there is none (warnings do not fail).

Nothing here changes the host: ports are tried with a bind that is closed at once, the data
directory's lock is only tested (never created), no address is plumbed.
"""
from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import shutil
import socket
import stat
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Iterable

import typer

from ecluster.commands.common import ConfigOpt, JsonOpt, die, print_json

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"

#: a peer's clock further off than this fails the check: journal records, as_logger windows
#: and audit entries carry wall-clock times that the managers merge across members (leases
#: and heartbeats use durations on one clock and do not care)
CLOCK_FAIL_S = 1.0
#: ... and further than this is worth a warning (NTP keeps hosts within milliseconds)
CLOCK_WARN_S = 0.1
#: how long each peer gets to answer a ping; members that do not answer are skipped
PING_TIMEOUT_S = 0.4


@dataclass(frozen=True)
class Finding:
    check: str
    status: str      # ok | warn | FAIL | skip
    detail: str

    def line(self) -> str:
        return f"{self.status:<5} {self.check:<11} {self.detail}"


# ------------------------------------------------------------------------------ pure judgements

def judge_privileges(member, has_vips: bool, dry_run: bool, euid: int, cap_mask: int) -> Finding:
    """Can this process plumb and announce VIPs (root, or CAP_NET_ADMIN + CAP_NET_RAW)? Pure."""
    from node.vipcore import missing_vip_capabilities
    if member.role != "node" or not has_vips:
        return Finding("privileges", SKIP, f"{member.name} plumbs no VIP")
    if dry_run:
        return Finding("privileges", WARN, "vip_dry_run = true: VIPs are recorded, never plumbed")
    if euid == 0 and cap_mask == -1:
        return Finding("privileges", OK, "root")
    missing = missing_vip_capabilities(cap_mask)
    if missing:
        return Finding("privileges", FAIL, f"the vip service needs {' and '.join(missing)} (run as root, or "
                                           f"AmbientCapabilities= in the unit: conf/systemd)")
    return Finding("privileges", OK, "root" if euid == 0 else "CAP_NET_ADMIN and CAP_NET_RAW")


def judge_interface(vip: str, interface: str, flags: int | None) -> Finding:
    """A VIP's interface exists here (``flags`` not None) and is up (IFF_UP). Pure."""
    if flags is None:
        return Finding("interface", FAIL, f"vip {vip}: interface {interface} does not exist on this host")
    if not flags & 0x1:
        return Finding("interface", FAIL, f"vip {vip}: interface {interface} is down (ip link set {interface} up)")
    return Finding("interface", OK, f"vip {vip}: {interface} is up")


def judge_ipv6(interface: str, disable_ipv6: str | None, accept_dad: str | None) -> Finding:
    """An IPv6 VIP needs IPv6 on its interface; DAD is skipped per address (nodad). Pure."""
    if disable_ipv6 is None:
        return Finding("ipv6", FAIL, f"{interface}: no IPv6 on this interface (no /proc/sys/net/ipv6/conf/{interface})")
    if disable_ipv6.strip() != "0":
        return Finding("ipv6", FAIL, f"{interface}: IPv6 is disabled (sysctl net.ipv6.conf.{interface}.disable_ipv6=0)")
    dad = (accept_dad or "?").strip()
    return Finding("ipv6", OK, f"{interface}: IPv6 on, accept_dad={dad}; VIPs are added nodad (no DAD wait)")


def judge_port(label: str, address: str, port: int, err: int | None) -> Finding:
    """The outcome of binding ``address:port`` (``err`` is the errno, None when it bound). Pure."""
    where = f"{label} {port} on {address}"
    if err is None:
        return Finding("ports", OK, f"{where} is free")
    if err == errno.EADDRINUSE:
        return Finding("ports", FAIL, f"{where} is in use by another process (ss -ltnp 'sport = :{port}')")
    if err == errno.EADDRNOTAVAIL:
        return Finding("ports", FAIL, f"{where}: {address} is not an address of this host")
    if err == errno.EACCES:
        return Finding("ports", FAIL, f"{where}: a port below 1024 needs root or CAP_NET_BIND_SERVICE")
    return Finding("ports", FAIL, f"{where}: {os.strerror(err)}")


def judge_keys(member: str, keys_dir: Path, dir_mode: int | None, secret_mode: int | None,
               secret_loads: str | None, publics: set[str], secrets: set[str],
               expected: Iterable[str]) -> list[Finding]:
    """The key directory holds ``member``'s secret, safely, and a public key for every name in
    ``expected``; holding other secrets is a warning (a stolen host is then more than this
    member). ``secret_loads``: None when the secret key parsed, else why not. Pure."""
    if dir_mode is None:
        return [Finding("keys", FAIL, f"key directory {keys_dir} does not exist "
                                      f"(ecluster keys bundle --member {member} --out DIR, copied here)")]
    out = []
    if dir_mode & 0o022:
        out.append(Finding("keys", FAIL, f"{keys_dir} is writable by group or others ({stat.filemode(dir_mode)}): "
                                         f"anyone could plant a key (chmod 700)"))
    secret = keys_dir / f"{member}.key_secret"
    if secret_mode is None:
        out.append(Finding("keys", FAIL, f"{secret} is missing: this host has no key to act as {member}"))
    elif secret_mode & 0o077:
        out.append(Finding("keys", FAIL, f"{secret} is readable by group or others ({stat.filemode(secret_mode)}): "
                                         f"chmod 600"))
    elif secret_loads is not None:
        out.append(Finding("keys", FAIL, f"{secret}: {secret_loads}"))
    missing = sorted(set(expected) - publics)
    if missing:
        out.append(Finding("keys", FAIL, f"{keys_dir} has no public key for {', '.join(missing)} "
                                         f"(their calls would be refused)"))
    others = sorted(secrets - {member})
    if others:
        out.append(Finding("keys", WARN, f"{keys_dir} also holds the secret keys of {', '.join(others)}: "
                                         f"a host should hold only its own (ecluster keys bundle)"))
    if not any(f.status == FAIL for f in out):
        out.insert(0, Finding("keys", OK, f"{keys_dir}: {member}'s secret (0600) and "
                                          f"{len(publics)} public keys"))
    return out


def judge_clock(offsets: dict[str, tuple[float, float] | None]) -> Finding:
    """Clock offsets to the peers that answered (name -> (offset s, round trip s), None when it
    did not answer). The offset is known to within half the round trip. Pure."""
    answered = {n: v for n, v in offsets.items() if v is not None}
    if not answered:
        silent = ", ".join(sorted(offsets)) or "none"
        return Finding("clock", SKIP, f"no other member answered ({silent}): nothing to compare")
    name, (off, rtt) = max(answered.items(), key=lambda kv: abs(kv[1][0]))
    # only what the round trip cannot explain counts
    worst = max(0.0, abs(off) - rtt / 2)
    detail = f"largest offset {off * 1000:+.1f} ms to {name} (±{rtt * 500:.1f} ms), {len(answered)} answered"
    if worst > CLOCK_FAIL_S:
        return Finding("clock", FAIL, f"{detail}: over {CLOCK_FAIL_S:g} s, fix NTP (chrony) on this host or {name}")
    if worst > CLOCK_WARN_S:
        return Finding("clock", WARN, f"{detail}: over {CLOCK_WARN_S * 1000:.0f} ms, is NTP running?")
    return Finding("clock", OK, detail)


def host_groups(members: dict[str, str], local: set[str]) -> dict[str, list[str]]:
    """Members grouped by the host they run on, from their bus addresses: members sharing an
    address share a host, and every member whose address is one of ``local`` (this host's
    addresses) is on this host, named "this host". Pure."""
    groups: dict[str, list[str]] = {}
    for name, address in sorted(members.items()):
        groups.setdefault("this host" if address in local else address, []).append(name)
    return groups


def judge_layout(groups: dict[str, list[str]], quorum: int) -> list[Finding]:
    """Does the cluster keep a quorum when any one host is lost? Every member votes, so a host
    running a node and a manager counts twice. Warnings, never failures: a lab on one machine is
    allowed, it is just not highly available. Pure."""
    voters = sum(len(v) for v in groups.values())
    out = []
    for host, names in sorted(groups.items()):
        left = voters - len(names)
        if left < quorum:
            out.append(Finding("layout", WARN, f"losing {host} ({', '.join(names)}) leaves {left} of {voters} votes, "
                                               f"below the quorum of {quorum}: put them on separate hosts "
                                               f"(docs/OPERATIONS.md)"))
    if not out:
        out.append(Finding("layout", OK, f"{voters} votes on {len(groups)} hosts, quorum {quorum}: "
                                         f"any one host may fail"))
    return out


def judge_tool(name: str, path: str | None, why: str) -> Finding:
    if path is None:
        return Finding("tools", FAIL, f"{name} not found ({why})")
    return Finding("tools", OK, f"{name}: {path}")


def first_failure(findings: list[Finding]) -> Finding | None:
    return next((f for f in findings if f.status == FAIL), None)


def guess_member(members: dict[str, str], local: set[str]) -> str | None:
    """The one member whose bus address is on this host, else None. Pure."""
    here = [n for n, a in members.items() if a in local]
    return here[0] if len(here) == 1 else None


# ------------------------------------------------------------------------------ probes (the edge)

def local_addresses() -> set[str]:
    """Every address of this host (this network namespace), canonical text."""
    from pyroute2 import IPRoute
    out = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            a = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            if a:
                out.add(str(ipaddress.ip_address(a.split("%")[0])))
    return out


def interface_flags(name: str) -> int | None:
    """The interface's flags (SIOCGIFFLAGS), None when there is no such interface here."""
    SIOCGIFFLAGS = 0x8913
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("16sh22x", name.encode()[:15], 0))
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENXIO):
                return None
            raise
    return struct.unpack("16sh22x", res)[1] & 0xFFFF


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def capability_mask() -> int:
    """This process's effective capabilities; -1 for root without /proc."""
    from node.vipcore import VipError, effective_capabilities
    text = read_text("/proc/self/status")
    try:
        return effective_capabilities(text) if text is not None else -1
    except VipError:
        return -1 if os.geteuid() == 0 else 0


def try_bind(address: str, port: int) -> int | None:
    """Bind and close at once, as the broker's listener would (SO_REUSEADDR); the errno or None."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as e:
            return e.errno
    return None


def running_holder(data_dir: Path) -> tuple[int | None, str] | None:
    """(pid, what) of the process holding the member's data-directory lock, None if nobody does.
    Tests the lock with a shared, non-blocking flock on a read-only descriptor: creates nothing."""
    from node.datadir import LOCK_NAME, describe_holder
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        raise
    finally:
        os.close(fd)        # drops the shared lock if it was taken
    return None


def ping_offsets(cluster, me: str) -> dict[str, tuple[float, float] | None]:
    """(clock offset, round trip) to every other member, asked over tcp with ``me``'s key."""
    import zmq

    from bus.client import BusError, SyncClient
    out: dict[str, tuple[float, float] | None] = {}
    ctx = zmq.Context()
    try:
        for name in sorted(cluster.members):
            if name == me:
                continue
            try:
                with SyncClient(cluster, remote=name, key=me, ctx=ctx) as c:
                    t0 = time.time()
                    r = c.call(name, "bus", "ping", timeout=PING_TIMEOUT_S)
                    t1 = time.time()
                remote = float(r["time"])
                out[name] = (remote - (t0 + t1) / 2, t1 - t0)
            except (BusError, KeyError, TypeError, ValueError, OSError):
                out[name] = None
    finally:
        ctx.destroy(linger=0)
    return out


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def examine(cluster, name: str, probe_clock: bool = True) -> list[Finding]:
    """Every finding for member ``name`` of ``cluster`` on this host."""
    from bus import keys as keymod
    member = cluster.member(name)
    addresses = {n: m.address for n, m in cluster.members.items()}
    try:
        local = local_addresses()
    except Exception as e:          # no netlink (a sandbox): layout and guessing lose their "this host"
        local = set()
        findings = [Finding("host", WARN, f"cannot list this host's addresses: {e}")]
    else:
        findings = []
    findings.insert(0, Finding("config", OK, f"{cluster.path}: cluster {cluster.name!r}, {_count(cluster.nodes, 'node')} + "
                                             f"{_count(cluster.managers, 'manager')}, quorum {cluster.quorum}"))
    findings.append(Finding("member", OK, f"{name} ({member.role}) at {member.address}, data in {member.data_dir}"))

    # ports: free, unless this member already runs here (then they are its own)
    holder = running_holder(member.data_dir)
    ports = [("bus_port", member.bus_port), ("pub_port", member.pub_port), ("metrics_port", member.metrics_port)]
    if member.role == "manager":
        ports.append(("console_port", member.console_port))
    if local and member.address not in local:
        findings.append(Finding("address", FAIL, f"{member.address} ({name}'s bus address) is not an address of "
                                                 f"this host: is this {name}'s host?"))
    elif holder is not None:
        pid, what = holder
        findings.append(Finding("ports", OK, f"{what} runs here" + (f" (pid {pid})" if pid else "") +
                                f": {', '.join(str(p) for _, p in ports)} are its own"))
    else:
        for label, port in ports:
            addr = member.console_address if label == "console_port" else member.address
            findings.append(judge_port(label, addr, port, try_bind(addr, port)))

    # keys
    kd = cluster.keys_dir
    dir_mode = kd.stat().st_mode if kd.is_dir() else None
    secret = kd / f"{name}.key_secret"
    secret_mode = secret.stat().st_mode if dir_mode is not None and secret.exists() else None
    loads = None
    publics: set[str] = set()
    secrets: set[str] = set()
    if dir_mode is not None:
        try:
            keymod.load(kd, name)
        except (keymod.KeyError_, OSError, ValueError) as e:
            loads = str(e).splitlines()[0] if str(e) else type(e).__name__
        publics = set(keymod.public_keys(kd).values())
        secrets = set(keymod.secrets_in(kd))
    findings += judge_keys(name, kd, dir_mode, secret_mode, loads, publics, secrets,
                           [*cluster.members, keymod.ADMIN])

    # VIPs: privileges, interfaces, IPv6
    vips = cluster.vips if member.role == "node" else []
    findings.append(judge_privileges(member, bool(vips), cluster.vip_dry_run, os.geteuid(), capability_mask()))
    if vips and not cluster.vip_dry_run:
        for iface in sorted({v.interface for v in vips}):
            addrs = ", ".join(v.address for v in vips if v.interface == iface)
            findings.append(judge_interface(addrs, iface, interface_flags(iface)))
        for iface in sorted({v.interface for v in vips if ":" in v.address}):
            base = f"/proc/sys/net/ipv6/conf/{iface}"
            findings.append(judge_ipv6(iface, read_text(f"{base}/disable_ipv6"), read_text(f"{base}/accept_dad")))
    if member.role == "node" and "postfix" in cluster.services:
        v = (read_text("/proc/sys/net/ipv4/ip_nonlocal_bind") or "?").strip()
        findings.append(Finding("sysctl", OK if v == "1" else WARN,
                                f"net.ipv4.ip_nonlocal_bind = {v}" + ("" if v == "1" else
                                ": Postfix cannot bind a VIP this host does not hold yet "
                                "(conf/sysctl.d/60-ecluster.conf)")))

    # tools the runner and services exec
    from node.supervisor import SupervisorError, find_supervisord
    try:
        sup = find_supervisord()
    except SupervisorError:
        sup = None
    findings.append(judge_tool("supervisord", sup, "the node runner supervises every service with it"))
    findings.append(judge_tool("git", shutil.which("git"), "config sync keeps the configuration in git"))
    if member.role == "node" and "postfix" in cluster.services:
        pf = shutil.which("postfix") or next((p for p in ("/usr/sbin/postfix",) if os.path.exists(p)), None)
        findings.append(judge_tool("postfix", pf, "the postfix plug-in runs it (apt install postfix)"))

    # clock, with this member's own key (skipped when that key is not usable)
    if probe_clock and loads is None and secret_mode is not None:
        findings.append(judge_clock(ping_offsets(cluster, name)))
    elif probe_clock:
        findings.append(Finding("clock", SKIP, f"no usable key for {name}: peers not asked"))

    findings += judge_layout(host_groups(addresses, local), cluster.quorum)
    return findings


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(config: ConfigOpt = None,
               member: Annotated[str | None, typer.Option(
                   "--member", "-m", metavar="NAME",
                   help="The member this host runs (default: the one whose address is on this host).")] = None,
               no_clock: Annotated[bool, typer.Option("--no-clock", help="Do not ask the peers for their time.")] = False,
               as_json: JsonOpt = False):
        """Check what this host needs to run a member: privileges for VIPs, the VIP interfaces,
        free ports, the key bundle and its modes, clocks against reachable peers, supervisord and
        git, IPv6 on v6 VIP interfaces, and whether the layout of members on hosts survives the
        loss of one host. One line per check; exit 1 naming the first failure.

        Example: ecluster doctor -c /etc/ecluster/cluster.toml --member n1
        """
        from ecluster.commands.common import load
        cluster = load(config)
        name = member
        if name is None:
            try:
                local = local_addresses()
            except Exception:
                local = set()
            name = guess_member({n: m.address for n, m in cluster.members.items()}, local)
            if name is None:
                die("give --member NAME: no single member of the cluster has its address on this host", 2)
        if name not in cluster.members:
            die(f"{name!r} is not a member of cluster {cluster.name!r} (members: {', '.join(sorted(cluster.members))})", 2)
        findings = examine(cluster, name, probe_clock=not no_clock)
        if as_json:
            print_json([asdict(f) for f in findings])
        else:
            for f in findings:
                typer.echo(f.line())
        bad = first_failure(findings)
        if bad is not None:
            die(f"doctor: {bad.check}: {bad.detail}")
