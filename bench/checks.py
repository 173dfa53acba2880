"""Check-triggered VIP moves: ecluster's [[check]] beside keepalived's vrrp_script, one run.

Usage (as root): python bench/checks.py [--rounds N] [--preset lan|fast] [--interval S]
                                        [--fall N] [--rise N] [--timeout S] [--json FILE]
                                        [--no-keepalived]

Both systems run in namespace labs built by tests/lab.py (3 nodes and a client; ecluster adds
one manager), one after the other, with the same check: every ``interval`` seconds connect to
127.0.0.1:2525 inside the node's namespace, unhealthy after ``fall`` failures in a row,
healthy after ``rise`` successes. The port is the lab's whoami listener (tests/whoami.py),
which the client also probes through the VIP, so "the checked service died" and "the VIP
stops answering on that node" are the same event.

* ecluster: subnet 10.98.0.0/24, ``[[check]] kind = "tcp"``; the VIP prefers n1.
* keepalived: subnet 10.97.0.0/24, ``vrrp_script`` running bench/ka_port_check.sh (bash's
  /dev/tcp connect) with the same interval/fall/rise/timeout, ``track_script`` in the
  instance; n1 has the highest priority, preempting (the default), advert_int 1.
  keepalived's script interval is whole seconds (1 at least), so the default interval is 1 s.

Per round: the client probes the VIP every 5 ms (tests/probe.py); the owner's whoami is
killed; **move** = first probe answered by another node minus the kill instant (the same
definition as bench/failover.py). Then whoami is started again and **back** = seconds until
the client is answered by n1 again (polled every 20 ms: ~0.3 s resolution); keepalived
preempts as soon as its script rises, ecluster adds ``anti_flap``.

Every process the bench starts is killed by PID and every namespace removed, also on Ctrl-C.
Needs only what the tests need (root, iproute2, keepalived); no farm tools.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from lab import PROBE_SCRIPT, WHOAMI_SCRIPT, Lab  # noqa: E402
from probe_analysis import analyze, parse_lines  # noqa: E402
from vip_cluster import LabCluster  # noqa: E402

PYTHON = sys.executable
PORT = 2525
KA_CHECK = Path(__file__).with_name("ka_port_check.sh")
ECL_SUBNET, KA_SUBNET = "10.98.0", "10.97.0"
PROBE_LEAD_S = 0.5         # the probe runs this long before the kill (its log must start before)


class BenchError(Exception):
    """One line: why the bench could not run."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def summary(values: list[float | None]) -> dict:
    """median / max / min over the rounds that produced a figure; ``missing`` counts the rest. Pure."""
    got = [v for v in values if v is not None]
    return {"rounds": len(values), "missing": len(values) - len(got),
            "median_s": round(statistics.median(got), 3) if got else None,
            "max_s": round(max(got), 3) if got else None, "min_s": round(min(got), 3) if got else None}


def keepalived_conf(i: int, vip: str, check: Path, interval: int, timeout: int, fall: int, rise: int) -> str:
    """keepalived.conf for lab node ``i`` (priority 200 - 10 i: n1 highest). Pure."""
    return f"""global_defs {{
  router_id n{i}
  script_user root
  vrrp_garp_master_delay 0
  vrrp_garp_master_repeat 3
}}
vrrp_script chk_port {{
  script "{check} {PORT}"
  interval {interval}
  timeout {timeout}
  fall {fall}
  rise {rise}
}}
vrrp_instance V1 {{
  state BACKUP
  interface eth0
  virtual_router_id 57
  priority {200 - 10 * i}
  advert_int 1
  version 3
  virtual_ipaddress {{ {vip}/24 }}
  track_script {{ chk_port }}
}}
"""


def format_table(rows: list[dict], ratio: float | None) -> str:
    head = f"{'system':<42} {'rounds':>6} {'median s':>9} {'max s':>7} {'min s':>7} {'back median s':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        m, b = r["move"], r["back"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"{r['system']:<42} {m['rounds']:>6} {fmt(m['median_s']):>9} {fmt(m['max_s']):>7} "
                     f"{fmt(m['min_s']):>7} {fmt(b['median_s']):>14}")
    if ratio is not None:
        lines.append(f"ratio ecluster / keepalived (median move): {ratio:.2f}")
    return "\n".join(lines)


def probe(lab: Lab, ns: str, vip: str, seconds: float) -> subprocess.Popen:
    return lab.popen(ns, [PYTHON, str(PROBE_SCRIPT), vip, str(PORT), f"{seconds:.2f}", "0.005"],
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def probe_result(p: subprocess.Popen):
    out, _ = p.communicate(timeout=120)
    return analyze(parse_lines(out.decode()))


def wait_answered_by(lab: Lab, vip: str, node: str, timeout: float) -> float | None:
    """Poll the VIP from the client until ``node`` answers; the time it did, or None."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if lab.ask(lab.client_ns, vip, PORT, timeout=0.3) == node:
            return time.time()
        time.sleep(0.02)
    return None


def whoami(lab: Lab, ns: str, name: str) -> subprocess.Popen:
    return lab.popen(ns, [PYTHON, str(WHOAMI_SCRIPT), name, str(PORT)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def one_round(lab: Lab, vip: str, kill, restart, move_budget: float, back_budget: float) -> tuple[float | None, float | None]:
    """Kill the owner's (n1's) listener; (move, back) seconds, None when it did not happen."""
    p = probe(lab, lab.client_ns, vip, PROBE_LEAD_S + move_budget)
    time.sleep(PROBE_LEAD_S)
    t_kill = kill()
    res = probe_result(p)
    move = res.failover_s(t_kill, "n1")
    t_up = restart()
    t_back = wait_answered_by(lab, vip, "n1", back_budget)
    return move, None if t_back is None else t_back - t_up


def bench_ecluster(args, rounds: int) -> dict:
    vip = f"{ECL_SUBNET}.100"
    check = {"name": "mta", "kind": "tcp", "port": PORT, "address": "127.0.0.1", "interval": args.interval,
             "timeout": args.timeout, "fall": args.fall, "rise": args.rise}
    lc = LabCluster(3, 1, preset=args.preset, vips=[{"address": f"{vip}/24", "preference": "n1"}],
                    subnet=ECL_SUBNET, checks=[check])
    moves, backs = [], []
    try:
        log(f"ecluster ({args.preset}): starting 3 nodes + 1 manager")
        lc.start()
        t = lc.cluster.timing
        move_budget = args.fall * args.interval + args.timeout + 4
        back_budget = args.rise * args.interval + args.interval + t.anti_flap + 15
        for r in range(1, rounds + 1):
            lc.wait_settled(60, expect={vip: "n1"})
            if wait_answered_by(lc.lab, vip, "n1", 10) is None:
                raise BenchError("ecluster: the client never reached n1 on the VIP")
            move, back = one_round(lc.lab, vip, lambda: lc.stop_whoami("n1"), lambda: lc.start_whoami("n1"),
                                   move_budget, back_budget)
            moves.append(move)
            backs.append(back)
            log(f"  ecluster round {r}: move {move} s, back {back} s")
        return {"system": f"ecluster {args.preset} (anti_flap {t.anti_flap:g} s)",
                "move": summary(moves), "back": summary(backs), "moves": moves, "backs": backs}
    finally:
        lc.close()


def bench_keepalived(args, rounds: int) -> dict:
    if shutil.which("keepalived") is None:
        raise BenchError("keepalived is not installed (apt-get install keepalived), or use --no-keepalived")
    interval, timeout = max(1, round(args.interval)), max(1, round(args.timeout))
    vip = f"{KA_SUBNET}.100"
    work = Path(tempfile.mkdtemp(prefix="eclka", dir="/tmp"))
    lab = Lab(3, subnet=KA_SUBNET)
    listeners: dict[int, subprocess.Popen] = {}
    moves, backs = [], []
    try:
        lab.up()
        log(f"keepalived: vrrp_script every {interval} s, timeout {timeout} s, fall {args.fall}, rise {args.rise}")
        for i in lab.members:
            conf = work / f"k{i}.conf"
            conf.write_text(keepalived_conf(i, vip, KA_CHECK, interval, timeout, args.fall, args.rise))
            listeners[i] = whoami(lab, lab.member_ns(i), f"n{i}")
            with open(work / f"k{i}.log", "ab") as out:
                lab.popen(lab.member_ns(i), ["keepalived", "-n", "-l", "-D", "-f", str(conf),
                                             "-p", str(work / f"k{i}.pid"), "-r", str(work / f"v{i}.pid"),
                                             "-c", str(work / f"c{i}.pid")],
                          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        move_budget = args.fall * interval + timeout + 4
        back_budget = args.rise * interval + interval + 15

        def kill() -> float:
            t = time.time()
            lab.kill(listeners[1])
            return t

        def restart() -> float:
            t = time.time()
            listeners[1] = whoami(lab, lab.member_ns(1), "n1")
            return t

        for r in range(1, rounds + 1):
            if wait_answered_by(lab, vip, "n1", 30) is None:
                raise BenchError(f"keepalived: the client never reached n1 on the VIP (logs in {work})")
            time.sleep(1.0)       # let the script's rise count settle before the next kill
            move, back = one_round(lab, vip, kill, restart, move_budget, back_budget)
            moves.append(move)
            backs.append(back)
            log(f"  keepalived round {r}: move {move} s, back {back} s")
        return {"system": f"keepalived 2.x vrrp_script (interval {interval} s)",
                "move": summary(moves), "back": summary(backs), "moves": moves, "backs": backs}
    finally:
        lab.down()
        if os.environ.get("ECL_KEEP"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--preset", default="lan", choices=("lan", "fast"))
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between probes (keepalived: whole seconds)")
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--fall", type=int, default=2)
    ap.add_argument("--rise", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--no-keepalived", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/checks.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    if not 1 <= args.rounds <= 100 or args.interval <= 0 or args.timeout <= 0 or args.fall < 1 or args.rise < 1:
        print("bench/checks.py: rounds 1..100, interval/timeout > 0, fall/rise >= 1", file=sys.stderr)
        return 2
    from anchors import terminate_on_sigterm   # bench/ is this script's directory
    terminate_on_sigterm()
    rows = []
    try:
        rows.append(bench_ecluster(args, args.rounds))
        if not args.no_keepalived:
            rows.append(bench_keepalived(args, args.rounds))
    except BenchError as e:
        print(f"bench/checks.py: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a lab that would not come up or settle: one line
        print(f"bench/checks.py: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(ECL_KEEP=1 keeps the data dirs and logs)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/checks.py: interrupted (everything started was stopped)", file=sys.stderr)
        return 130
    e, k = rows[0]["move"]["median_s"], rows[-1]["move"]["median_s"] if len(rows) > 1 else None
    ratio = e / k if e is not None and k else None
    print()
    print(f"check: tcp 127.0.0.1:{PORT}, interval {args.interval:g} s, timeout {args.timeout:g} s, "
          f"fall {args.fall}, rise {args.rise}; move = kill of the owner's listener -> first answer by "
          "another node (client probe every 5 ms); back = listener restarted -> n1 answers again")
    print(format_table(rows, ratio))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                         "rows": rows, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
