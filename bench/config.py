"""Benchmark config sync: commit -> applied on every member, beside plain git.

1. ecluster: three nodes and a manager on loopback (broker, membership, election and
   configsync each), bootstrapped. N times: change a file in the live copy of a node that
   is not the coordinator, call ``configsync.commit`` there (what ``eccfg commit`` does,
   without the CLI's start-up), and wait until every member's ``conf.applied`` names the
   new revision.
2. Anchor, in the same run: a bare "origin" and three clones on the same disk. N times:
   change the same file in clone A, ``git commit -a`` + ``git push``, then ``git pull`` in
   clones B and C, one after the other.

Prints median and p99 of both and their ratio. Target: ecluster median <= 0.3 s.
Run: ``.venv/bin/python bench/config.py [--commits 50]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Procs, make_cluster_file, short_dir, wait_until  # noqa: E402

SERVICES = ("membership", "election", "configsync")


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def content(i: int) -> str:
    """The file of commit ``i``; its size grows with ``i`` because node/configrepo's scratch
    index misses a same-size edit made in the same second as the last checkout."""
    return f"value = {i}\n" + "#\n" * i


def bench_ecluster(n: int, work: Path) -> list[float]:
    from bus.client import SyncClient
    root = short_dir("ecbc")
    cluster = make_cluster_file(work / "cluster", n_nodes=3, n_managers=1, data_root=root)
    cfg = str(cluster.path)
    procs = Procs(work / "logs")
    try:
        for m in cluster.members:
            procs.start(["bus", "run", "-c", cfg, "--member", m], name=f"{m}-bus")
        for m in cluster.members:
            wait_until(lambda: (cluster.member(m).run_dir / "bus.ipc").exists(), 10)
            for s in SERVICES:
                procs.start(["service", "run", s, "-c", cfg, "--member", m], name=f"{m}-{s}")

        def established():
            for m in cluster.members:
                try:
                    with SyncClient(cluster, via=m) as c:
                        if c.call(m, "configsync", "head", timeout=1.0)["coordinator"]:
                            return m
                except Exception:  # noqa: BLE001 - not up yet
                    pass
            return None

        coord = wait_until(established, 30, 0.1, what="a configuration coordinator")
        applied = {m: root / m / "conf.applied" for m in cluster.members}

        def read(m):
            try:
                return applied[m].read_text().strip()
            except OSError:
                return None

        # commit from a node that is not the coordinator: the usual case, one hop more
        proposer = next(m for m in cluster.nodes if m != coord)
        times = []
        with SyncClient(cluster, via=proposer) as c:
            r = c.call(proposer, "configsync", "bootstrap", timeout=30, cluster_text=Path(cfg).read_text(), author="bench")
            wait_until(lambda: all(read(m) == r["rev"] for m in cluster.members), 10)
            target = root / proposer / "conf" / "global" / "bench.toml"
            for i in range(n + 3):              # 3 warm-up commits
                target.write_text(content(i))
                t0 = time.perf_counter()
                rev = c.call(proposer, "configsync", "commit", timeout=30, message=f"bench {i}", add_all=True,
                             author="bench <bench@x>")["rev"]
                while any(read(m) != rev for m in cluster.members):
                    if time.perf_counter() - t0 > 10:
                        raise RuntimeError(f"commit {rev[:12]} not applied everywhere within 10 s")
                    time.sleep(0.001)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
        print(f"  (commits made on {proposer}, coordinator {coord}; members {', '.join(cluster.members)})")
        return times
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bench_git(n: int, work: Path) -> list[float]:
    origin = work / "origin.git"
    git(work, "init", "-q", "--bare", "-b", "main", str(origin))
    clones = [work / c for c in ("a", "b", "c")]
    env_args = ["-c", "user.name=bench", "-c", "user.email=bench@x"]
    seed = work / "seed"
    git(work, "clone", "-q", str(origin), str(seed))
    (seed / "global").mkdir()
    (seed / "global" / "bench.toml").write_text("value = -1\n")
    git(seed, "add", "-A")
    git(seed, *env_args, "commit", "-q", "-m", "seed")
    git(seed, "push", "-q", "origin", "HEAD:main")
    for c in clones:
        git(work, "clone", "-q", "-b", "main", str(origin), str(c))
    a, b, cc = clones
    times = []
    for i in range(n + 3):
        (a / "global" / "bench.toml").write_text(content(i))
        t0 = time.perf_counter()
        git(a, *env_args, "commit", "-q", "-a", "-m", f"bench {i}")
        git(a, "push", "-q", "origin", "main")
        git(b, "pull", "-q", "--ff-only")
        git(cc, "pull", "-q", "--ff-only")
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commits", type=int, default=50)
    args = ap.parse_args()
    work = Path(short_dir("ecbench"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        print(f"config sync: commit -> applied on all members, {args.commits} commits")
        ours = bench_ecluster(args.commits, work / "ecluster")
        (work / "git").mkdir()
        anchor = bench_git(args.commits, work / "git")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mo, po = statistics.median(ours), pct(ours, 99)
    ma, pa = statistics.median(anchor), pct(anchor, 99)
    print(f"  ecluster (3 nodes + 1 manager): median {mo * 1000:7.1f} ms   p99 {po * 1000:7.1f} ms"
          f"   target median <= 300 ms: {'met' if mo <= 0.3 else 'MISSED'}")
    print(f"  git commit+push+2 pulls:        median {ma * 1000:7.1f} ms   p99 {pa * 1000:7.1f} ms")
    print(f"  ratio ecluster / git:           median {mo / ma:5.2f}x        p99 {po / pa:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
