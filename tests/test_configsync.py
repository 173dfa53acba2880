"""configsync over real processes: three nodes and a manager on loopback, each with its
broker, membership, election and configsync; real git repositories; commits made with the
real CLI. The tests share one cluster and run in file order (each leaves it healthy,
except the last, which stops most of it)."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import CLI, Procs, make_cluster_file, run_cli, short_dir, wait_until
from services.configsync import (
    Position, best_position, member_state, parse_position, read_height, read_position, store_action,
    write_position,
)

pytestmark = pytest.mark.timeout(120)

SERVICES = ("membership", "election", "configsync")


# ----------------------------------------------------------------------------- pure parts

def test_store_action_rules():
    # older coordinator: never touch main
    assert store_action(term=2, stamp=3, same=False, forward=True, backward=False) == "stale"
    assert store_action(3, 3, True, False, False) == "none"
    assert store_action(4, 3, True, False, False) == "restamp"
    assert store_action(3, 3, False, True, False) == "ff"
    # a later coordinator that lacks our extra commits: they were never acknowledged
    assert store_action(4, 3, False, False, True) == "reset"
    assert store_action(4, 3, False, False, False) == "reset"
    # the same coordinator's older message
    assert store_action(3, 3, False, False, True) == "none"
    assert store_action(3, 3, False, False, False) == "diverged"


def test_best_position_prefers_later_stamp_then_height_then_self():
    p = {"a": Position(5, 2, "x"), "b": Position(3, 3, "y"), "c": Position(9, 1, "z")}
    assert best_position(p, "a") == "b"          # stamp beats height
    p = {"a": Position(5, 3, "x"), "b": Position(5, 3, "x"), "c": Position(4, 3, "w")}
    assert best_position(p, "b") == "b"          # a tie: no transfer
    assert best_position({"a": Position(), "b": Position()}, "zz") == "a"


def test_member_state_and_position_file(tmp_path):
    assert member_state(False, False, None, None) == "not bootstrapped"
    assert member_state(True, True, "a", "a") == "modified locally"
    assert member_state(True, False, "a", "b") == "behind"
    assert member_state(True, False, "a", "a") == "in sync"
    assert parse_position("7 3 " + "a" * 40) == Position(7, 3, "a" * 40)
    assert parse_position("garbage") == Position()
    assert read_height(tmp_path) == 0 and read_position(tmp_path) == Position()
    write_position(tmp_path, Position(4, 2, None))
    assert read_height(tmp_path) == 4 and read_position(tmp_path).key == (2, 4)
    # the election reads config.height as a plain integer
    from services.election import read_config_height
    assert (tmp_path / "config.height").read_text() == "4\n" and read_config_height(tmp_path) == 4


def test_repo_sync_store_rules_on_real_repositories(tmp_path):
    """The follower side of replication without a bus: init from a bundle, promises,
    fast-forward, reset of never-acknowledged commits, stale terms, recount after a crash."""
    from node.configrepo import MemberRepo
    from services.configsync import Behind, RepoSync, StaleTerm, read_promised

    def change(repo, name, text):
        (repo.conf / "global" / name).write_text(text)
        return repo.prepare_commit(f"set {name}", True, "t <t@x>")

    with MemberRepo(tmp_path / "a", "n1") as a, MemberRepo(tmp_path / "b", "n2") as b:
        sa, sb = RepoSync(a), RepoSync(b)
        root = a.bootstrap(None, "t <t@x>")
        with pytest.raises(Behind):
            sb.store(b"", root, 1)                      # no repository, no bundle
        assert sb.store(a.bundle_since(None), root, 1) == Position(1, 1, root)
        assert read_promised(b.data_dir) == 1 and read_position(b.data_dir).key == (1, 1)
        with pytest.raises(StaleTerm):
            sb.store(b"", root, 0)
        # a commit of the coordinator (term 1) reaches b as an incremental bundle
        p = change(a, "x.toml", "x = 1\n")
        sa.accept_as(1, p.bundle, p.rev, p.parent)
        assert read_position(a.data_dir) == Position(2, 1, p.rev)
        with pytest.raises(Behind):
            sb.store(b"", p.rev, 1)
        assert sb.store(p.bundle, p.rev, 1).height == 2
        assert sb.apply_committed(p.rev) == ("applied", p.rev)
        # b takes a commit that never reaches a majority (an old coordinator's, term 1)
        q = change(b, "y.toml", "y = 1\n")
        assert sb.sync_to(q.bundle, q.rev, 1)[0] == "ff" and b.head() == q.rev
        # the next coordinator (term 2) has main p: b drops q
        assert sb.sync_to(b"", p.rev, 1)[0] == "none"        # the same term's older head: ignored
        action, pos = sb.sync_to(b"", p.rev, 2)
        assert action == "reset" and b.head() == p.rev and pos == Position(2, 2, p.rev)
        assert sb.sync_to(b"", p.rev, 1)[0] == "stale"
        # a coordinator of term 3 is starting: the one of term 2 may not accept any more
        sb.promise(3)
        r = change(b, "z.toml", "z = 1\n")
        with pytest.raises(StaleTerm):
            sb.accept_as(2, r.bundle, r.rev, r.parent)
        assert b.head() == p.rev
        # a crash after main moved but before the record: recount, keep the stamp
        b._git("update-ref", "refs/heads/main", r.rev)
        assert sb.position() == Position(3, 2, r.rev) and read_position(b.data_dir) == Position(3, 2, r.rev)
        # a committed revision is applied only when held on main; hand edits block it
        assert sa.apply_committed(r.rev)[0] == "missing"
        (b.conf / "global" / "x.toml").write_text("x = 99\n")
        assert sb.apply_committed(r.rev)[0] == "modified"
        assert sb.apply_committed(r.rev, True) == ("applied", r.rev)


# ----------------------------------------------------------------------------- the cluster

class Lab:
    """Four members (n1..n3, m1), each as separate processes we can stop or kill -9."""

    def __init__(self, base: Path, n_nodes: int = 3, n_managers: int = 1):
        self.root = short_dir("eccs")
        self.cluster = make_cluster_file(base, n_nodes=n_nodes, n_managers=n_managers, data_root=self.root)
        self.cfg = str(self.cluster.path)
        self.procs = Procs(base / "logs")
        self.running: dict[str, list[subprocess.Popen]] = {}

    def start(self, *members: str) -> None:
        """Start each member's broker, then (once its socket exists) its services."""
        for m in members:
            ipc = self.cluster.member(m).run_dir / "bus.ipc"
            if ipc.exists():
                ipc.unlink()            # left by a kill -9: wait for the new broker's
            self.running[m] = [self.procs.start(["bus", "run", "-c", self.cfg, "--member", m], name=f"{m}-bus")]
        for m in members:
            wait_until(lambda: (self.cluster.member(m).run_dir / "bus.ipc").exists(), 10, what=f"{m} broker")
            for s in SERVICES:
                self.running[m].append(
                    self.procs.start(["service", "run", s, "-c", self.cfg, "--member", m], name=f"{m}-{s}"))

    def stop(self, m: str, sig: int = signal.SIGTERM) -> None:
        for p in reversed(self.running.pop(m)):
            self.procs.stop(p, sig)

    def kill(self, m: str) -> None:
        """kill -9 every process of the member at once (broker included), then reap them."""
        ps = self.running.pop(m)
        for p in ps:
            self.procs.remember_tree(p)
            os.kill(p.pid, signal.SIGKILL)
        for p in ps:
            p.wait(10)

    def call(self, m: str, method: str, timeout: float = 3.0, **args):
        from bus.client import SyncClient
        with SyncClient(self.cluster, via=m) as c:
            return c.call(m, "configsync", method, timeout=timeout, **args)

    def conf(self, m: str) -> Path:
        return self.root / m / "conf"

    def applied(self, m: str) -> str | None:
        f = self.root / m / "conf.applied"
        return f.read_text().strip() if f.exists() else None

    def coordinator(self, among: list[str] | None = None) -> str:
        """The configuration coordinator, once it has started its term (established)."""
        def find():
            for m in among or list(self.running):
                try:
                    h = self.call(m, "head", timeout=1.0)
                except Exception:  # noqa: BLE001 - not up yet
                    continue
                if h["coordinator"]:
                    return m
            return None
        return wait_until(find, 20, 0.05, what="an established configuration coordinator")

    def cli(self, *args: str, timeout: float = 40.0) -> subprocess.CompletedProcess:
        return run_cli(["config", *args, "-c", self.cfg], timeout=timeout)

    def commit(self, m: str, message: str, add_all: bool = True) -> subprocess.CompletedProcess:
        return self.cli("commit", "--member", m, "-m", message, *(["--add-all"] if add_all else []))

    def wait_all_applied(self, rev: str, members=None, timeout: float = 10.0) -> None:
        members = members or list(self.running)
        wait_until(lambda: all(self.applied(m) == rev for m in members), timeout,
                   what=f"{rev[:12]} applied on {members}: {[(m, (self.applied(m) or '')[:12]) for m in members]}")

    def close(self) -> None:
        self.procs.stop_all()
        shutil.rmtree(self.root, ignore_errors=True)


def committed_rev(cp: subprocess.CompletedProcess) -> str:
    m = re.search(r"committed ([0-9a-f]{12})", cp.stdout)
    assert m, (cp.returncode, cp.stdout, cp.stderr)
    return m.group(1)


def full(lab: Lab, m: str, short: str) -> str:
    for e in lab.call(m, "log", n=50):
        if e["rev"].startswith(short):
            return e["rev"]
    raise AssertionError(f"{short} not in the log of {m}")


class ReloadProbe:
    """A real Service (base class runtime) on a member that records its reloads and every
    config.* event it sees, run in a thread."""

    def __init__(self, cluster, member: str):
        from services.base import Service

        probe = self

        class Probe(Service):
            name = "reloadprobe"
            subscriptions = ("config.",)

            async def handle_init(self):
                probe.ready.set()

            async def handle_reload(self, rev):
                probe.reloads.append(rev)

            async def handle_event(self, topic, body, env):
                probe.events.append((topic, body))

        self.reloads: list[str] = []
        self.events: list[tuple[str, dict]] = []
        self.ready = threading.Event()
        self.svc = Probe(cluster, member)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self):
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.svc.run())

    def applied_by(self, rev: str) -> set[str]:
        return {b["member"] for t, b in list(self.events) if t == "config.applied" and b.get("rev") == rev}

    def close(self):
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.svc.request_stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("configsync"))
    try:
        lab.start(*lab.cluster.members)
        lab.coordinator()
        r = lab.cli("bootstrap", "--member", "n1")
        assert r.returncode == 0, r.stderr
        head = lab.call("n1", "head")["head"]
        lab.wait_all_applied(head)
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def probe(lab):
    p = ReloadProbe(lab.cluster, "n2")
    yield p
    p.close()


# ----------------------------------------------------------------------------- behaviour

def test_bootstrap_then_commit_applies_everywhere_and_reloads(lab, probe):
    for m in lab.running:
        assert (lab.conf(m) / "global" / "cluster.toml").read_text() == Path(lab.cfg).read_text()
    (lab.conf("n1") / "global" / "relay.toml").write_text('domains = ["example.org"]\n')
    r = lab.commit("n1", "relay domains")
    assert r.returncode == 0, r.stderr
    rev = full(lab, "n1", committed_rev(r))
    lab.wait_all_applied(rev)
    for m in lab.running:
        assert (lab.conf(m) / "global" / "relay.toml").read_text() == 'domains = ["example.org"]\n'
        assert read_height(lab.root / m) == 2
    # the probe service on n2 was told to reload, and saw every member announce the revision
    wait_until(lambda: rev in probe.reloads, 5, what="handle_reload on n2")
    wait_until(lambda: probe.applied_by(rev) == set(lab.cluster.members), 5, what="config.applied from all")
    assert any(t == "config.committed" and b["rev"] == rev for t, b in probe.events)


def test_concurrent_commits_one_wins_other_must_pull(lab):
    before = lab.applied("n1")
    (lab.conf("n1") / "default" / "a.toml").write_text("a = 1\n")
    (lab.conf("n2") / "default" / "b.toml").write_text("b = 2\n")
    cmds = [[*CLI, "config", "commit", "-c", lab.cfg, "--member", m, "-m", f"from {m}", "--add-all"]
            for m in ("n1", "n2")]
    ps = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate(timeout=40) for p in ps]
    codes = [p.returncode for p in ps]
    assert sorted(codes)[0] == 0 and sorted(codes)[1] != 0, (codes, outs)
    loser = ("n1", "n2")[codes.index(next(c for c in codes if c != 0))]
    err = outs[codes.index(next(c for c in codes if c != 0))][1]
    assert err.strip().splitlines() == [err.strip()] and "out of date: run eccfg pull" in err, err
    win = full(lab, "n3", committed_rev(subprocess.CompletedProcess([], 0, *outs[codes.index(0)])))
    assert lab.call("m1", "head")["head"] == win and win != before
    # the loser's live copy keeps its edit until it pulls --theirs
    others = [m for m in lab.running if m != loser]
    lab.wait_all_applied(win, others)
    wait_until(lambda: lab.call(loser, "status")["state"] == "modified locally", 5)
    r = lab.cli("pull", "--member", loser)
    assert r.returncode != 0 and "modified locally" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = lab.cli("pull", "--member", loser, "--theirs")
    assert r.returncode == 0, r.stderr
    lab.wait_all_applied(win)
    assert lab.call(loser, "status")["state"] == "in sync"


def test_invalid_toml_rejected_with_file_and_line_nothing_applied(lab):
    revs = {m: lab.applied(m) for m in lab.running}
    heads = {m: lab.call(m, "head")["head"] for m in lab.running}
    (lab.conf("n3") / "global" / "bad.toml").write_text("ok = 1\nx = = 2\n")
    r = lab.commit("n3", "broken")
    assert r.returncode != 0
    assert re.search(r"global/bad\.toml:2: invalid TOML", r.stderr), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (lab.conf("n3") / "global" / "bad.toml").unlink()
    # the coordinator validates too: hand it a broken proposal directly
    coord = lab.coordinator()
    from node.configrepo import MemberRepo
    scratch = short_dir("ecbad")
    try:
        with MemberRepo(scratch, "n3") as tmp:
            tmp.clone_from_bundle(lab.call(coord, "bundle_since", base=None))
            parent = tmp.head()
            files = {"default/x.json": b'{"a": 1,\n "b": }\n'}
            tree = tmp._write_tree(files)
            bad = tmp._commit_tree(tree, [parent], "bad json", "t <t@x>")
            tmp._git("update-ref", "refs/heads/bad", bad)
            bundle = tmp._git("bundle", "create", "-q", "-", "refs/heads/bad", f"^{parent}", binary=True)
        from bus.client import RemoteError
        with pytest.raises(RemoteError) as ei:
            lab.call(coord, "propose", timeout=10, bundle=bytes(bundle), rev=bad, parent=parent)
        assert ei.value.code == "invalid" and "default/x.json:2: invalid JSON" in ei.value.message
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert {m: lab.applied(m) for m in lab.running} == revs
    assert {m: lab.call(m, "head")["head"] for m in lab.running} == heads


def test_stopped_node_catches_up_on_start(lab):
    lab.stop("n3")
    revs = []
    for i in range(3):
        (lab.conf("n1") / "n3" / f"late{i}.toml").write_text(f"n = {i}\n")
        r = lab.commit("n1", f"late {i}")
        assert r.returncode == 0, r.stderr
        revs.append(full(lab, "n1", committed_rev(r)))
    lab.wait_all_applied(revs[-1])
    assert lab.applied("n3") != revs[-1]
    lab.start("n3")
    lab.wait_all_applied(revs[-1], ["n3"], timeout=15)
    assert sorted(p.name for p in (lab.conf("n3") / "n3").glob("late*.toml")) == [f"late{i}.toml" for i in range(3)]
    assert lab.call("n3", "status")["state"] == "in sync"


@pytest.mark.parametrize("when", ["proposed", "accepted"])
def test_kill_coordinator_during_commit_all_or_nothing(lab, when):
    """kill -9 the coordinator's whole member once the proposal exists on the proposer, or
    once the coordinator has moved its main (stores on their way): the commit is then either
    acknowledged and everywhere, or reported failed and nowhere."""
    coord = lab.coordinator()
    proposer = next(m for m in ("n1", "n2", "n3") if m != coord)
    before = lab.applied(proposer)
    (lab.conf(proposer) / "global" / f"during-kill-{when}.toml").write_text("k = 1\n")
    p = subprocess.Popen([*CLI, "config", "commit", "-c", lab.cfg, "--member", proposer, "-m", f"during kill {when}",
                          "--add-all"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if when == "proposed":
        mark = lab.root / proposer / "config.git" / "refs" / "proposals"
        reached = lambda: any(mark.glob("*"))  # noqa: E731
    else:
        main = lab.root / coord / "config.git" / "refs" / "heads" / "main"
        reached = lambda: main.read_text().strip() != before  # noqa: E731
    wait_until(lambda: reached() or p.poll() is not None, 20, 0.002, what=f"the commit {when}")
    lab.kill(coord)
    out, err = p.communicate(timeout=40)
    print(f"kill -9 {coord} during a commit from {proposer}: exit {p.returncode}: {(out or err).strip()}")
    survivors = list(lab.running)
    new = lab.coordinator(survivors)
    assert new != coord
    if p.returncode == 0:
        rev = full(lab, proposer, committed_rev(subprocess.CompletedProcess([], 0, out, err)))
        lab.wait_all_applied(rev, survivors)
        expect = rev
    else:
        assert len(err.strip().splitlines()) == 1, err
        lab.wait_all_applied(before, survivors)
        for m in survivors:
            assert not any(e["subject"] == f"during kill {when}" for e in lab.call(m, "log", n=20)), m
        expect = before
        lab.cli("pull", "--member", proposer, "--theirs")
    lab.start(coord)
    lab.wait_all_applied(expect, timeout=15)
    assert (lab.conf(coord) / "global" / f"during-kill-{when}.toml").exists() == (p.returncode == 0)
    wait_until(lambda: len({lab.call(m, "head")["head"] for m in lab.running}) == 1, 10, what="the same head everywhere")


def test_status_cluster_shows_every_member_and_unreachable(lab):
    def all_in_sync():
        rep = lab.call("n1", "cluster_status", timeout=5)
        assert {r["member"] for r in rep["members"]} == set(lab.cluster.members)
        return all(r["state"] == "in sync" for r in rep["members"])
    # a member restarted by the previous test may still be connecting to its peers
    wait_until(all_in_sync, 10, what="every member in sync")
    lab.stop("n2")
    rep = lab.call("n1", "cluster_status", timeout=5)
    assert {r["member"]: r["state"] for r in rep["members"]}["n2"] == "unreachable"
    lab.start("n2")


def test_minority_cannot_commit(lab):
    alone = "n1"
    before = lab.applied(alone)
    for m in [m for m in list(lab.running) if m != alone]:
        lab.stop(m)
    wait_until(lambda: lab.call(alone, "status")["coordinator"] is None, 10, what="n1 sees no coordinator")
    (lab.conf(alone) / "global" / "minority.toml").write_text("m = 1\n")
    t0 = time.monotonic()
    r = lab.commit(alone, "from the minority")
    assert r.returncode != 0 and time.monotonic() - t0 < 15
    assert "no coordinator" in r.stderr and "minority cannot commit" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert lab.applied(alone) == before
    assert not any(e["subject"] == "from the minority" for e in lab.call(alone, "log", n=20))
