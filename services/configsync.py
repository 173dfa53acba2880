"""configsync (ecconfigd): the cluster's configuration repository, replicated and applied.

Every member runs it over its own copy of the repository (:class:`node.configrepo.MemberRepo`
on ``<data_dir>``). The election's coordinator orders commits; docs/CONFIG.md gives the
protocol and the argument why an acknowledged commit is never lost. In short:

* A commit is prepared on the member whose live ``conf`` was edited and forwarded to the
  coordinator (``propose``). The coordinator takes proposals one at a time, refuses one
  whose parent is not its head (``out_of_date``), validates it (``invalid``), moves its own
  ``main``, and asks every other member to ``store`` it. It answers the proposer only once a
  majority of the configured voters (itself included) hold it durably, then publishes
  ``config.committed {rev, term, height}``. Members apply only committed revisions.
* Positions: each member records, durably, ``(stamp, height)`` of its ``main`` in
  ``<data_dir>/config.position`` (``stamp`` = the coordinator term whose history ``main`` is
  a prefix of; the height alone also in ``config.height``, for the election) and the
  highest term it has promised in ``<data_dir>/config.promised``. A member refuses a
  ``store`` from a term older than its promise.
* A new coordinator first collects the positions of a majority (each of them promises its
  term), adopts the most advanced ``main`` (highest ``(stamp, height)``), stamps it with its
  term and replicates it to a majority before it takes any proposal (Viewstamped
  Replication's view change). Only then is that ``main`` committed.
* Catch-up (zguide Clone): on start, on a ``config.committed`` it cannot apply, and every
  few seconds a member compares its head with the coordinator's and fetches a bundle of
  what it lacks (everything when it has no repository or has diverged).

RPC (any member): status() · cluster_status() · commit(message, add_all, author) ·
    revert(rev, author) · bootstrap(cluster_text, author) · pull(theirs) · log(n) · diff(rev) ·
    show(node, rev) · head() · snapshot(base) · bundle_since(base) · store(bundle, rev, term) ·
    position(term)
RPC (coordinator): propose(bundle, rev, parent, proposer) · bootstrap_repo(cluster_text, author) ·
    outcome(rev)
Events out: config.committed {rev, term, height} · config.applied {member, rev}
Events in:  election.assignment {term, leader, ...} · config.committed
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus.client import BusError, CallTimeout, RemoteError
from node.configrepo import (
    BadBundle, ConfigRepoError, MemberRepo, ModifiedLocally, NotBootstrapped, NothingToCommit, OutOfDate,
    Proposal, ValidationFailed, check_node_name,
)
from node.fsutil import atomic_write
from services.base import Service, ServiceError, rpc
from bus import roles as access

POSITION_FILE = "config.position"      # "<height> <stamp> <head>": what this module decides by
HEIGHT_FILE = "config.height"          # "<height>" alone: read by the election's up-to-date vote rule
PROMISE_FILE = "config.promised"

IN_SYNC, BEHIND, MODIFIED, NOT_BOOTSTRAPPED, UNREACHABLE = (
    "in sync", "behind", "modified locally", "not bootstrapped", "unreachable")

COMMIT_TIMEOUT = 5.0        # coordinator: how long to wait for a majority of stores
CATCH_UP_EVERY = 3.0        # member: how often to compare heads with the coordinator
RESOLVE_TIMEOUT = 15.0      # proposer: how long to try to learn the outcome after losing the coordinator
# errors of a propose call that prove the coordinator did not take the proposal
UNDELIVERED = frozenset({"unreachable", "no_service", "not_coordinator", "not_ready"})


# ----------------------------------------------------------------------------- positions on disk

def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


@dataclass(frozen=True)
class Position:
    """Where a member's ``main`` stands: ``height`` commits, a prefix of the history of the
    coordinator of term ``stamp``; ``head`` is ``main`` (None: no repository)."""

    height: int = 0
    stamp: int = 0
    head: str | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.stamp, self.height)

    def as_dict(self) -> dict:
        return {"height": self.height, "stamp": self.stamp, "head": self.head}


def parse_position(text: str) -> Position:
    """``"<height> <stamp> <head>"`` (the content of config.position) -> Position. Pure."""
    parts = text.split()
    try:
        height = int(parts[0]) if parts else 0
        stamp = int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return Position()
    head = parts[2] if len(parts) > 2 and parts[2] != "-" else None
    return Position(height=max(0, height), stamp=max(0, stamp), head=head)


def read_position(data_dir: Path | str) -> Position:
    """The position recorded in ``<data_dir>/config.position`` (zeros when absent)."""
    try:
        return parse_position(Path(data_dir, POSITION_FILE).read_text())
    except OSError:
        return Position()


def read_height(data_dir: Path | str) -> int:
    """The number of commits on this member's ``main`` as last recorded durably
    (``<data_dir>/config.height``, 0 when none).

    For the election's up-to-date rule; ``read_position(d).key`` = (stamp, height) is the
    complete order (Raft compares the last entry's term first, then the length)."""
    try:
        return max(0, int(Path(data_dir, HEIGHT_FILE).read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return 0


def write_position(data_dir: Path | str, pos: Position) -> None:
    """Record ``pos`` atomically and durably: config.position, then config.height."""
    _write_atomic(Path(data_dir, POSITION_FILE), f"{pos.height} {pos.stamp} {pos.head or '-'}\n")
    _write_atomic(Path(data_dir, HEIGHT_FILE), f"{pos.height}\n")


def read_promised(data_dir: Path | str) -> int:
    """The highest coordinator term this member has promised (``config.promised``), 0 if none."""
    try:
        return max(0, int(Path(data_dir, PROMISE_FILE).read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return 0


def write_promised(data_dir: Path | str, term: int) -> None:
    _write_atomic(Path(data_dir, PROMISE_FILE), f"{term}\n")


# ----------------------------------------------------------------------------- pure decisions

def store_action(term: int, stamp: int, same: bool, forward: bool, backward: bool) -> str:
    """What to do with ``main`` when the coordinator of ``term`` says its head is ``rev``.

    ``stamp`` is our position's stamp; ``same``: main == rev; ``forward``: main is an
    ancestor of rev; ``backward``: rev is an ancestor of main. Returns one of "stale" (an
    older coordinator: leave everything), "none", "restamp", "ff", "reset" (our extra
    commits came from an older term and never reached a majority), "diverged" (cannot
    happen within one term's linear history). Pure.
    """
    if term < stamp:
        return "stale"
    if same:
        return "restamp" if term > stamp else "none"
    if forward:
        return "ff"
    if term > stamp:
        return "reset"
    return "none" if backward else "diverged"


def best_position(positions: dict[str, Position], me: str) -> str:
    """The member whose ``main`` a new coordinator adopts: highest (stamp, height); ties
    prefer ``me`` (no transfer), then the first name. Pure."""
    return max(sorted(positions), key=lambda n: (positions[n].key, n == me, [-ord(c) for c in n]))


def member_state(bootstrapped: bool, locally_modified: bool, applied: str | None, committed: str | None) -> str:
    """One word for a member's configuration: see the module docstring. Pure."""
    if not bootstrapped or applied is None:
        return NOT_BOOTSTRAPPED
    if locally_modified:
        return MODIFIED
    if committed is not None and applied != committed:
        return BEHIND
    return IN_SYNC


def validation_message(e: ValidationFailed) -> str:
    """Every problem on one line: ``validation failed: f:3: reason; g:1: reason``. Pure."""
    return "validation failed: " + "; ".join(str(x) for x in e.errors) if e.errors else str(e)


def repo_error(e: ConfigRepoError) -> ServiceError:
    """The typed bus error for a repository exception."""
    if isinstance(e, ValidationFailed):
        return ServiceError(validation_message(e), "invalid")
    if isinstance(e, OutOfDate):
        return ServiceError(str(e), "out_of_date")
    if isinstance(e, NothingToCommit):
        return ServiceError(str(e), "nothing_to_commit")
    if isinstance(e, NotBootstrapped):
        return ServiceError(str(e), "not_bootstrapped")
    if isinstance(e, ModifiedLocally):
        return ServiceError(str(e), "modified_locally")
    if isinstance(e, BadBundle):
        return ServiceError(str(e), "bad_bundle")
    return ServiceError(str(e).splitlines()[0] if str(e) else type(e).__name__, "repo_error")


class Behind(ConfigRepoError):
    """A store needs commits this member does not have: send a bundle from its head."""


class StaleTerm(ConfigRepoError):
    """A coordinator of an older term than this member has promised."""


# ----------------------------------------------------------------------------- git side (threads)

class RepoSync:
    """The replication steps on one member's repository; every method blocks (run it with
    ``offload``) and is called with the service's git lock held, one at a time.

    Moving ``main`` to an arbitrary head and initialising from a bundle use MemberRepo's
    internal steps (fetch, compare-and-swap of the ref) under its lock."""

    def __init__(self, repo: MemberRepo):
        self.repo = repo
        self.data_dir = repo.data_dir

    # -- positions
    def _current(self) -> tuple[Position, bool]:
        """(position, whether the record is up to date). A crash may have moved ``main``
        after the last record: then keep the stamp and recount."""
        pos = read_position(self.data_dir)
        head = self.repo._main_or_none()
        if head == pos.head:
            return pos, True
        return Position(height=self._height(head), stamp=pos.stamp, head=head), False

    def position(self) -> Position:
        """The recorded position, corrected to the repository and recorded again if needed
        (also when a crash came between the two files)."""
        pos, fresh = self._current()
        if not fresh or read_height(self.data_dir) != pos.height:
            write_position(self.data_dir, pos)
        return pos

    def _height(self, head: str | None) -> int:
        if head is None:
            return 0
        return int(str(self.repo._git("rev-list", "--count", head)).strip())

    def restamp(self, term: int) -> Position:
        """Record that ``main`` is now the history of the coordinator of ``term`` (ours)."""
        pos, fresh = self._current()
        if pos.stamp != term or not fresh:
            pos = Position(height=pos.height, stamp=term, head=pos.head)
            write_position(self.data_dir, pos)
        return pos

    def accept_as(self, term: int, bundle: bytes, rev: str, parent: str) -> Position:
        """Coordinator of ``term``: take a proposal into ``main`` (MemberRepo.accept) and
        stamp it, unless this member has promised a later term (we are deposed)."""
        promised = read_promised(self.data_dir)
        if promised > term:
            raise StaleTerm(f"a coordinator of term {promised} is starting: this one (term {term}) is deposed")
        self.repo.accept(bundle, rev, parent)
        return self.restamp(term)

    def snapshot(self, base: str | None) -> dict:
        """``main`` from ``base`` with the position it has, read in one step (so the stamp
        describes exactly the history in the bundle)."""
        pos = self.position()
        bundle = self.repo.bundle_since(base) if pos.head else b""
        return {**pos.as_dict(), "bundle": bundle}

    def bundle_of_main(self, base: str | None) -> tuple[bytes, str]:
        """(bundle of ``main`` from ``base``, the head it carries)."""
        return self.repo.bundle_since(base), self.repo.head()

    def promise(self, term: int) -> int:
        """Promise ``term``: refuse (StaleTerm) when a later term was promised already."""
        promised = read_promised(self.data_dir)
        if term < promised:
            raise StaleTerm(f"term {term} is older than the promised term {promised}")
        if term > promised:
            write_promised(self.data_dir, term)
        return term

    # -- moving main
    def sync_to(self, bundle: bytes | None, rev: str, term: int) -> tuple[str, Position]:
        """Make ``main`` the head ``rev`` of the coordinator of ``term`` (see
        :func:`store_action`); returns (action, new position). Behind when the objects are
        missing and ``bundle`` cannot supply them."""
        repo = self.repo
        bundle = bytes(bundle or b"")
        with repo._locked():
            pos = self.position()
            if not repo.bootstrapped:
                if not bundle:
                    raise Behind(f"no repository here: need a full bundle up to {rev[:12]}")
                repo._init_bare()
                self._fetch(bundle, rev)
                repo._set_main(rev, None)
                action = "init"
            else:
                main = repo.head()
                same = main == rev
                if not same and not repo.has(rev):
                    if not bundle:
                        raise Behind(f"missing {rev[:12]}")
                    self._fetch(bundle, rev)
                forward = not same and repo._is_ancestor(main, rev)
                backward = not same and not forward and repo._is_ancestor(rev, main)
                action = store_action(term, pos.stamp, same, forward, backward)
                if action == "diverged":
                    raise ConfigRepoError(f"term {term}: {rev[:12]} and main {main[:12]} diverged")
                if action in ("ff", "reset"):
                    repo._set_main(rev, main)
            if action == "stale":
                return action, pos
            head = repo.head()
            new = Position(height=self._height(head), stamp=max(term, pos.stamp), head=head)
            write_position(self.data_dir, new)
            return action, new

    def _fetch(self, bundle: bytes, rev: str) -> None:
        try:
            self.repo._fetch_bundle(bundle, rev)
        except OutOfDate:
            raise Behind(f"bundle for {rev[:12]} needs commits this member lacks") from None

    def store(self, bundle: bytes | None, rev: str, term: int) -> Position:
        """Follower side of a coordinator's store: promise, then move ``main``."""
        self.promise(term)
        action, pos = self.sync_to(bundle, rev, term)
        if action == "stale":
            raise StaleTerm(f"term {term} is older than this member's history (stamp {pos.stamp})")
        return pos

    def bootstrap_fresh(self, cluster_text: str, author: str, term: int) -> Position:
        """Create the initial commit in a scratch repository and take it in as a bundle, so
        nothing is applied before a majority holds it."""
        scratch = Path(tempfile.mkdtemp(prefix=".bootstrap-", dir=self.data_dir))
        try:
            with MemberRepo(scratch, self.repo.member) as tmp:
                rev = tmp.bootstrap(cluster_text, author)
                bundle = tmp.bundle_since(None)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return self.sync_to(bundle, rev, term)[1]

    # -- applying
    def apply_committed(self, rev: str, theirs: bool = False) -> tuple[str, str | None]:
        """Apply committed ``rev`` if this member holds it on ``main``. Returns (status,
        applied rev): "applied", "same", "missing", "modified"."""
        repo = self.repo
        if not repo.bootstrapped or not repo.has(rev) or not repo._is_ancestor(rev, repo.head()):
            return "missing", self.applied()
        try:
            result = repo.apply(rev, theirs=theirs)
        except ModifiedLocally:
            return "modified", self.applied()
        return ("applied" if result.changed else "same"), result.rev

    def applied(self) -> str | None:
        try:
            return self.repo.applied_rev()
        except ConfigRepoError:
            return None

    def local_status(self) -> dict:
        if not self.repo.bootstrapped:
            return {"bootstrapped": False, "rev": None, "head": None, "modified": [], "untracked": []}
        try:
            st = self.repo.status()
        except NotBootstrapped:         # a repository but no live copy yet
            return {"bootstrapped": True, "rev": None, "head": self.repo.head(), "modified": [], "untracked": []}
        return {"bootstrapped": True, **st}

    def outcome(self, rev: str, committed: str | None) -> str:
        repo = self.repo
        if not repo.bootstrapped or not repo.has(rev):
            return "absent"
        if committed and repo._is_ancestor(rev, committed):
            return "committed"
        return "pending" if repo._is_ancestor(rev, repo.head()) else "absent"


# ----------------------------------------------------------------------------- the service

class ConfigSyncService(Service):
    """ecconfigd: replicate and apply the configuration repository (module docstring)."""

    name = "configsync"
    builtin = True
    subscriptions = ("election.assignment", "config.committed")
    tick_interval = 1.0
    #: [services.configsync] commit_timeout: seconds the coordinator waits for a majority of stores
    config_schema = {"commit_timeout": ((int, float), COMMIT_TIMEOUT)}

    def __init__(self, cluster, member):
        super().__init__(cluster, member)
        t = cluster.timing
        self.repo = MemberRepo(self.data_dir, self.member.name)
        self.sync = RepoSync(self.repo)
        self.git_lock = asyncio.Lock()          # one git operation at a time (GitPython is not thread-safe)
        self.propose_lock = asyncio.Lock()      # coordinator: one proposal (or term start) at a time
        self.commit_timeout = float(self.config.get("commit_timeout", COMMIT_TIMEOUT))
        self.coord_stale_after = max(1.0, t.leader_timeout)      # assignments come every report_refresh
        # the coordinator as the election announces it
        self.coordinator: str | None = None
        self.coord_term = 0
        self.coord_heard = 0.0
        self.coord_changed = asyncio.Event()
        # coordinator duties
        self.established_term = 0
        self._establishing: asyncio.Task | None = None
        self.inflight: set[str] = set()
        # what is known committed, and applied here
        self.committed: str | None = None
        self.committed_height = 0
        self.applied: str | None = None
        self.modified = False
        self._apply_event = asyncio.Event()
        self._catching_up = False
        self._catch_up_again = False
        self._last_catch_up = 0.0
        self._bg: set[asyncio.Task] = set()

    # -- plumbing -------------------------------------------------------------------
    async def git(self, fn, *args):
        """Run blocking repository work in a thread, one at a time."""
        async with self.git_lock:
            work = asyncio.ensure_future(self.offload(fn, *args))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # the thread cannot be stopped: keep the lock until it is done
                await asyncio.wait({work})
                raise

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    def is_coordinator(self) -> bool:
        return self.coordinator_now() == self.member.name

    def coordinator_now(self) -> str | None:
        """The coordinator, if one was heard recently."""
        if self.coordinator and time.monotonic() - self.coord_heard < self.coord_stale_after:
            return self.coordinator
        return None

    # -- life cycle -----------------------------------------------------------------
    async def handle_init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pos = await self.git(self.sync.position)
        self.applied = await self.git(self.sync.applied)
        self.log.info("configsync up: main %s (height %d, stamp %d), applied %s",
                      (pos.head or "none")[:12], pos.height, pos.stamp, (self.applied or "none")[:12])
        self._spawn(self._catch_up())

    async def handle_stop(self) -> None:
        for t in list(self._bg):
            t.cancel()
        await self.git(self.repo.close)         # after any git work still running in a thread

    async def handle_tick(self) -> None:
        if self.is_coordinator():
            self._ensure_established()
        elif time.monotonic() - self._last_catch_up >= CATCH_UP_EVERY:
            self._spawn(self._catch_up())
        if self.committed and self.committed != self.applied:
            self._spawn(self._apply_committed())

    async def handle_event(self, topic: str, body: Any, env) -> None:
        if not isinstance(body, dict):
            return
        if topic == "election.assignment":
            term, leader = body.get("term"), body.get("leader")
            if not isinstance(term, int) or leader != env.src or leader not in self.cluster.members:
                return
            if term >= self.coord_term:
                changed = (leader, term) != (self.coordinator, self.coord_term)
                self.coordinator, self.coord_term, self.coord_heard = leader, term, time.monotonic()
                if changed:
                    self.coord_changed.set()
                    self.coord_changed = asyncio.Event()
                    if leader == self.member.name:
                        self._ensure_established()
                    else:
                        self._spawn(self._catch_up())
        elif topic == "config.committed":
            rev, height = body.get("rev"), body.get("height")
            if isinstance(rev, str) and isinstance(height, int):
                self._note_committed(rev, height)
                self._spawn(self._apply_or_catch_up())

    def _note_committed(self, rev: str | None, height: int | None) -> bool:
        """Remember the newest committed revision (committed revisions form one chain)."""
        if not rev or not isinstance(height, int):
            return False
        if self.committed is None or height > self.committed_height:
            self.committed, self.committed_height = rev, height
            return True
        return False

    # -- applying -------------------------------------------------------------------
    async def _apply_committed(self, theirs: bool = False) -> str:
        """Apply the newest committed revision held here; publish config.applied on a change."""
        target = self.committed
        if target is None:
            return "missing"
        status, applied = await self.git(self.sync.apply_committed, target, theirs)
        self.modified = status == "modified"
        if status == "applied" or (status == "same" and applied != self.applied):
            self.applied = applied
            self.log.info("applied %s", applied[:12])
            self._apply_event.set()
            self._apply_event = asyncio.Event()
            await self.publish("config.applied", {"member": self.member.name, "rev": applied})
        elif status == "same":
            self.applied = applied
        return status

    async def _apply_or_catch_up(self) -> None:
        if await self._apply_committed() == "missing" and not self.is_coordinator():
            await self._catch_up()

    async def _wait_applied(self, rev: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.applied != rev:
            left = deadline - time.monotonic()
            if left <= 0 or self.modified:
                return self.applied == rev
            try:
                await asyncio.wait_for(self._apply_event.wait(), left)
            except asyncio.TimeoutError:
                pass
        return True

    # -- catch-up (Clone pattern) -----------------------------------------------------
    async def _catch_up(self) -> None:
        """Fetch what the coordinator has and we lack, then apply the committed revision.
        A request while one runs makes that one go round again (it may have asked too early)."""
        if self._catching_up:
            self._catch_up_again = True
            return
        self._catching_up = True
        try:
            while True:
                self._catch_up_again = False
                await self._catch_up_once()
                if not self._catch_up_again:
                    return
        finally:
            self._catching_up = False

    async def _catch_up_once(self) -> None:
        self._last_catch_up = time.monotonic()
        coord = self.coordinator_now()
        if coord is None or coord == self.member.name:
            return
        try:
            h = await self.call(coord, "configsync", "head", timeout=2.0)
        except BusError:
            return
        self._note_committed(h.get("committed"), h.get("committed_height"))
        pos = await self.git(self.sync.position)
        theirs = h.get("head")
        if theirs and theirs != pos.head and int(h.get("stamp", 0)) >= pos.stamp:
            try:
                snap = await self.call(coord, "configsync", "snapshot", timeout=10.0, base=pos.head)
                if snap.get("head"):
                    action, new = await self.git(self.sync.sync_to, snap["bundle"], snap["head"], int(snap["stamp"]))
                    if action not in ("none", "stale"):
                        self.log.info("caught up from %s: %s to %s (height %d)", coord, action,
                                      snap["head"][:12], new.height)
            except (BusError, ConfigRepoError, KeyError, TypeError, ValueError) as e:
                self.log.warning("catch-up from %s failed: %s", coord, e)
        await self._apply_committed()

    # -- coordinator: starting a term -----------------------------------------------
    def _ensure_established(self) -> None:
        if self.established_term == self.coord_term or (self._establishing and not self._establishing.done()):
            return
        self._establishing = self._spawn(self._establish(self.coord_term))

    async def _establish(self, term: int) -> None:
        """Become the coordinator of ``term`` for configuration: collect a majority's
        positions, adopt the most advanced main, replicate it to a majority, commit it."""
        async with self.propose_lock:
            while self.is_coordinator() and self.coord_term == term and self.established_term != term:
                try:
                    if await self._establish_once(term):
                        return
                except StaleTerm as e:
                    self.log.warning("term %d: %s; not taking commits", term, e)
                    return
                except (BusError, ConfigRepoError) as e:
                    self.log.warning("term %d: starting failed: %s; retrying", term, e)
                await asyncio.sleep(0.3)

    async def _establish_once(self, term: int) -> bool:
        me = self.member.name
        await self.git(self.sync.promise, term)
        positions = {me: await self.git(self.sync.position)}

        async def ask(m: str) -> None:
            try:
                r = await self.call(m, "configsync", "position", timeout=1.0, term=term)
            except RemoteError as e:
                if e.code == "stale_term":
                    raise StaleTerm(f"{m} promised a later term") from None
                return
            except CallTimeout:
                return
            try:
                positions[m] = Position(height=int(r["height"]), stamp=int(r["stamp"]), head=r.get("head"))
            except (KeyError, TypeError, ValueError):
                self.log.warning("term %d: %s answered a malformed position: %r", term, m, r)

        await asyncio.gather(*(ask(m) for m in self.cluster.voters if m != me))
        if len(positions) < self.cluster.quorum:
            self.log.info("term %d: %d of %d positions, need %d", term, len(positions),
                          len(self.cluster.voters), self.cluster.quorum)
            return False
        best = best_position(positions, me)
        if best != me and positions[best].head != positions[me].head:
            b = positions[best]
            bundle = await self.call(best, "configsync", "bundle_since", timeout=10.0, base=positions[me].head)
            # it promised our term, so its main cannot have moved since it answered
            await self.git(self.sync.sync_to, bundle, b.head, b.stamp)
            self.log.info("term %d: adopted main %s of %s (height %d)", term, b.head[:12], best, b.height)
        pos = await self.git(self.sync.restamp, term)
        if pos.head is not None and not await self._replicate(pos.head, None, term):
            return False
        self.established_term = term
        self.log.info("term %d: configuration coordinator, main %s (height %d)", term,
                      (pos.head or "none")[:12], pos.height)
        if pos.head is not None:
            await self._commit_point(pos.head, pos.height, term)
        return True

    # -- coordinator: replication -----------------------------------------------------
    async def _store_on(self, member: str, rev: str, bundle: bytes | None, term: int) -> bool:
        """Ask ``member`` to store ``rev``; when it lacks the base, send what it lacks."""
        timeout = self.commit_timeout
        try:
            try:
                await self.call(member, "configsync", "store", timeout=timeout, bundle=bundle or b"", rev=rev, term=term)
                return True
            except RemoteError as e:
                if e.code != "behind":
                    raise
            # it lacks the base: send main from its head (main may have moved on by now: a
            # straggler then takes the newer head, which contains rev)
            h = await self.call(member, "configsync", "head", timeout=timeout)
            full, head = await self.git(self.sync.bundle_of_main, h.get("head"))
            await self.call(member, "configsync", "store", timeout=timeout, bundle=full, rev=head, term=term)
            return True
        except (BusError, ConfigRepoError) as e:
            self.log.info("store of %s on %s: %s", rev[:12], member, e)
            return False

    async def _replicate(self, rev: str, bundle: bytes | None, term: int) -> bool:
        """Store ``rev`` on every other member; True once a majority (us included) hold it.
        Stores still running after that go on in the background for the stragglers."""
        others = [m for m in self.cluster.voters if m != self.member.name]
        need = self.cluster.quorum - 1
        if need <= 0:
            return True
        done = asyncio.Event()
        acks = finished = 0

        async def one(m: str) -> None:
            nonlocal acks, finished
            ok = await self._store_on(m, rev, bundle, term)
            acks += ok
            finished += 1
            if acks >= need or finished == len(others):
                done.set()

        for m in others:
            self._spawn(one(m))
        try:
            await asyncio.wait_for(done.wait(), self.commit_timeout)
        except asyncio.TimeoutError:
            pass
        return acks >= need

    async def _commit_point(self, rev: str, height: int, term: int) -> None:
        """``rev`` is held by a majority: announce it and apply it here."""
        self._note_committed(rev, height)
        await self.publish("config.committed", {"rev": rev, "term": term, "height": height})
        self._spawn(self._apply_committed())

    def _require_coordinator(self) -> int:
        if not self.is_coordinator():
            c = self.coordinator_now()
            raise ServiceError(f"not the coordinator (the coordinator is {c or 'unknown'})", "not_coordinator")
        if self.established_term != self.coord_term:
            raise ServiceError("the coordinator is still starting its term; try again", "not_ready")
        return self.coord_term

    async def _wait_established(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.is_coordinator() and self.established_term != self.coord_term and time.monotonic() < deadline:
            self._ensure_established()
            task = self._establishing
            try:
                await asyncio.wait_for(asyncio.shield(task), max(0.01, deadline - time.monotonic()))
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - checked again by the caller
                pass
            if self.established_term != self.coord_term:
                await asyncio.sleep(0.1)        # that attempt gave up: do not spin

    # -- coordinator RPC ----------------------------------------------------------------
    @rpc(access.rule(access.MANAGER, access.SELF, switch="nodes_may_commit"))
    async def rpc_propose(self, bundle: bytes, rev: str, parent: str, proposer: str = "") -> dict:
        """Order, validate and replicate one proposal; answers once a majority holds it."""
        if not isinstance(bundle, (bytes, bytearray)) or not isinstance(rev, str) or not isinstance(parent, str):
            raise ServiceError("propose needs bundle (bytes), rev and parent", "bad_arguments")
        self.inflight.add(rev)
        try:
            await self._wait_established(self.commit_timeout)
            async with self.propose_lock:
                term = self._require_coordinator()
                try:
                    pos = await self.git(self.sync.accept_as, term, bytes(bundle), rev, parent)
                except OutOfDate:
                    raise ServiceError("out of date: run eccfg pull", "out_of_date") from None
                except StaleTerm as e:
                    raise ServiceError(str(e), "not_coordinator") from None
                except ConfigRepoError as e:
                    raise repo_error(e) from None
                if not await self._replicate(rev, bytes(bundle), term):
                    raise ServiceError(
                        f"no majority holds {rev[:12]} after {self.commit_timeout:g}s: not acknowledged "
                        "(it takes effect only if a majority returns; see eccfg status --cluster)", "no_quorum")
                await self._commit_point(rev, pos.height, term)
                self.log.info("committed %s (height %d, term %d) from %s", rev[:12], pos.height, term, proposer or "?")
                return {"rev": rev, "term": term, "height": pos.height}
        finally:
            self.inflight.discard(rev)

    @rpc(access.rule(access.MANAGER, access.SELF, switch="nodes_may_commit"))
    async def rpc_bootstrap_repo(self, cluster_text: str, author: str = "") -> dict:
        """Create the repository on the coordinator and replicate it like a commit."""
        if not isinstance(cluster_text, str):
            raise ServiceError("bootstrap needs the cluster file text", "bad_arguments")
        author = author or "eccfg"
        await self._wait_established(self.commit_timeout)
        async with self.propose_lock:
            term = self._require_coordinator()
            try:
                if self.repo.bootstrapped:
                    rev = await self.git(self.repo.bootstrap, cluster_text, author)
                    return {"rev": rev, "created": False}
                pos = await self.git(self.sync.bootstrap_fresh, cluster_text, author, term)
            except ConfigRepoError as e:
                raise repo_error(e) from None
            if not await self._replicate(pos.head, None, term):
                raise ServiceError("no majority holds the initial commit: not acknowledged", "no_quorum")
            await self._commit_point(pos.head, pos.height, term)
            return {"rev": pos.head, "created": True}

    @rpc(access.MEMBERS)
    async def rpc_outcome(self, rev: str) -> str:
        """"committed", "pending" (still being decided) or "absent" (never will be)."""
        self._require_coordinator()
        if rev in self.inflight:
            return "pending"
        return await self.git(self.sync.outcome, rev, self.committed)

    # -- member RPC: replication --------------------------------------------------------
    @rpc(access.MEMBERS)
    async def rpc_store(self, bundle: bytes, rev: str, term: int) -> dict:
        """Coordinator -> member: hold ``rev`` durably (main moved, fsynced) before answering."""
        if not isinstance(rev, str) or not isinstance(term, int) or not isinstance(bundle, (bytes, bytearray)):
            raise ServiceError("store needs bundle (bytes), rev and term", "bad_arguments")
        try:
            pos = await self.git(self.sync.store, bytes(bundle), rev, term)
        except Behind as e:
            raise ServiceError(str(e), "behind") from None
        except StaleTerm as e:
            raise ServiceError(str(e), "stale_term") from None
        except ConfigRepoError as e:
            raise repo_error(e) from None
        if self.committed and self.committed != self.applied:
            self._spawn(self._apply_committed())
        return pos.as_dict()

    @rpc(access.MEMBERS)
    async def rpc_position(self, term: int) -> dict:
        """A new coordinator of ``term`` asks where our main stands; we promise ``term``."""
        if not isinstance(term, int):
            raise ServiceError("position needs a term", "bad_arguments")
        try:
            await self.git(self.sync.promise, term)
        except StaleTerm as e:
            raise ServiceError(str(e), "stale_term") from None
        return (await self.git(self.sync.position)).as_dict()

    @rpc(access.ANYONE)
    async def rpc_head(self) -> dict:
        pos = await self.git(self.sync.position)
        return {"member": self.member.name, **pos.as_dict(), "committed": self.committed,
                "committed_height": self.committed_height, "applied": self.applied,
                "coordinator": self.is_coordinator() and self.established_term == self.coord_term,
                "term": self.coord_term}

    @rpc(access.MEMBERS)
    async def rpc_snapshot(self, base: str | None = None) -> dict:
        """``{head, height, stamp, bundle}``: main from ``base`` (everything when ``base`` is
        unknown here) and the position it has, for a member catching up."""
        try:
            return await self.git(self.sync.snapshot, base)
        except ConfigRepoError as e:
            raise repo_error(e) from None

    @rpc(access.MEMBERS)
    async def rpc_bundle_since(self, base: str | None = None) -> bytes:
        try:
            return await self.git(self.repo.bundle_since, base)
        except ConfigRepoError as e:
            raise repo_error(e) from None

    # -- member RPC: the operator's commands ----------------------------------------------
    async def _forward(self, method: str, timeout: float, **args) -> Any:
        if self.is_coordinator():
            return await getattr(self, f"rpc_{method}")(**args)
        coord = self.coordinator_now()
        if coord is None:
            raise ServiceError("no coordinator: this member does not see a majority of the cluster "
                               "(a minority cannot commit); try again when it does", "no_coordinator")
        return await self.call(coord, "configsync", method, timeout=timeout, **args)

    async def _submit(self, p: Proposal) -> dict:
        """Send a proposal to the coordinator. When the coordinator is lost on the way, ask
        the next one whether it was committed; when it was not (or never got it), propose it
        again there. Gives up RESOLVE_TIMEOUT after the first loss."""
        deadline: float | None = None
        unknown = False         # sent to a coordinator that was lost before it answered
        while True:
            if deadline is not None and time.monotonic() > deadline:
                if unknown:
                    raise ServiceError(f"outcome of {p.rev[:12]} unknown: no coordinator answered within "
                                       f"{RESOLVE_TIMEOUT:g}s (see eccfg log / status --cluster)", "unknown")
                await self.git(self.repo.drop_proposal, p.rev)
                raise ServiceError(f"commit {p.rev[:12]} failed: the coordinator was lost and no new one "
                                   f"took it within {RESOLVE_TIMEOUT:g}s; nothing was changed", "failed")
            if unknown:
                verdict = await self._ask_outcome(p.rev)
                if verdict == "committed":
                    return {"rev": p.rev, "term": self.coord_term, "height": self.committed_height, "resolved": True}
                if verdict != "absent":
                    await asyncio.sleep(0.1)
                    continue
                unknown = False         # nowhere, and the old coordinator can no longer commit it
            if deadline is not None and self.coordinator_now() is None:
                await asyncio.sleep(0.1)
                continue
            outcome, result = await self._try_propose(p)
            if outcome == "ok":
                return result
            if deadline is None:
                deadline = time.monotonic() + RESOLVE_TIMEOUT
                self.log.warning("lost the coordinator while committing %s (%s): trying the next one",
                                 p.rev[:12], outcome)
            unknown = outcome == "unknown"
            if not unknown:
                await asyncio.sleep(0.1)

    async def _try_propose(self, p: Proposal) -> tuple[str, dict | None]:
        """("ok", result), ("unknown", None) when the coordinator got it but was lost before
        answering, ("undelivered", None) when it surely did not take it; raises a refusal."""
        changed = self.coord_changed
        call = asyncio.ensure_future(self._forward("propose", self.commit_timeout + 2.0, bundle=p.bundle,
                                                   rev=p.rev, parent=p.parent, proposer=self.member.name))
        watch = asyncio.ensure_future(changed.wait())
        try:
            await asyncio.wait({call, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not call.done():         # a new coordinator: let the old call run out on its own
            self._bg.add(call)
            call.add_done_callback(lambda t: (self._bg.discard(t), t.cancelled() or t.exception()))
            return "unknown", None
        try:
            return "ok", call.result()
        except CallTimeout:
            return "unknown", None
        except RemoteError as e:
            if e.code in UNDELIVERED:
                return "undelivered", None
            if e.code != "no_quorum":   # refused outright: it is nowhere, forget it
                await self.git(self.repo.drop_proposal, p.rev)
            raise

    async def _ask_outcome(self, rev: str) -> str | None:
        """The current coordinator's verdict on ``rev``; None when none answers yet."""
        coord = self.coordinator_now()
        if coord is None:
            return None
        try:
            if coord == self.member.name:
                await self._wait_established(2.0)
                return await self.rpc_outcome(rev)
            return await self.call(coord, "configsync", "outcome", timeout=2.0, rev=rev)
        except BusError:
            return None

    def _may_propose(self, verb: str) -> None:
        """A node proposes only when ``[security] nodes_may_commit`` is on. Checked here and
        not only at the coordinator: a node that is itself the coordinator never calls out."""
        if self.member.role == "node" and self._switches.get("nodes_may_commit") is not True:
            self.forbidden[verb] = self.forbidden.get(verb, 0) + 1
            raise ServiceError(f"{self.member.name} is a node and nodes may not commit configuration "
                               "(commit on a manager, or set [security] nodes_may_commit = true)", access.FORBIDDEN)

    async def _commit_proposal(self, make, *args) -> dict:
        self._may_propose("commit")
        try:
            p: Proposal = await self.git(make, *args)
        except ConfigRepoError as e:
            raise repo_error(e) from None
        result = await self._submit(p)
        self._note_committed(p.rev, result.get("height"))
        await self._apply_committed()
        applied = await self._wait_applied(p.rev, 3.0)
        return {**result, "parent": p.parent, "member": self.member.name, "applied": applied}

    @rpc(access.ADMIN_ONLY)
    async def rpc_commit(self, message: str, add_all: bool = False, author: str = "") -> dict:
        """Commit the edits of this member's live ``conf`` through the coordinator."""
        if not isinstance(message, str) or not message.strip():
            raise ServiceError("empty commit message: give -m MESSAGE", "bad_arguments")
        return await self._commit_proposal(self.repo.prepare_commit, message, bool(add_all), self._author(author))

    @rpc(access.ADMIN_ONLY)
    async def rpc_revert(self, rev: str, author: str = "") -> dict:
        """Commit the inverse of ``rev`` through the coordinator."""
        if not isinstance(rev, str) or not rev:
            raise ServiceError("revert needs a revision", "bad_arguments")
        return await self._commit_proposal(self.repo.revert_proposal, rev, self._author(author))

    def _author(self, author: str) -> str:
        return author if isinstance(author, str) and author.strip() else f"operator <operator@{self.member.name}>"

    @rpc(access.ADMIN_ONLY)
    async def rpc_bootstrap(self, cluster_text: str, author: str = "") -> dict:
        """Create the cluster's repository (through the coordinator) with this cluster file."""
        self._may_propose("bootstrap")
        r = await self._forward("bootstrap_repo", self.commit_timeout + 5.0, cluster_text=cluster_text,
                                author=self._author(author))
        if r.get("rev"):
            if r.get("created"):
                self._note_committed(r["rev"], 1)
            if not self.is_coordinator():
                await self._catch_up()
            await self._wait_applied(r["rev"], 3.0)
        return {**r, "member": self.member.name, "applied": self.applied}

    @rpc(access.ADMIN_ONLY)
    async def rpc_pull(self, theirs: bool = False) -> dict:
        """Catch up now and apply the committed revision; ``theirs`` discards local edits."""
        if not self.is_coordinator():
            self._last_catch_up = 0.0
            await self._catch_up()
        if not self.repo.bootstrapped:
            raise ServiceError("not bootstrapped: no repository here yet (run eccfg bootstrap)", "not_bootstrapped")
        before = self.applied
        status = await self._apply_committed(theirs=bool(theirs))
        if status == "modified":
            try:
                await self.git(self.repo.apply, self.committed, False)
            except ConfigRepoError as e:
                raise repo_error(e) from None
        return {"member": self.member.name, "rev": self.applied, "changed": self.applied != before,
                "committed": self.committed}

    @rpc(access.ANYONE)
    async def rpc_status(self) -> dict:
        """This member's configuration: applied rev, head, state, coordinator."""
        st = await self.git(self.sync.local_status)
        pos = await self.git(self.sync.position)
        local = bool(st.get("modified") or st.get("untracked"))
        applied = st.get("rev")
        return {"member": self.member.name, "role": self.member.role, "rev": applied, "head": st.get("head"),
                "height": pos.height, "committed": self.committed,
                "state": member_state(st["bootstrapped"], local, applied, self.committed),
                "modified": st.get("modified", []), "untracked": st.get("untracked", []),
                "coordinator": self.coordinator_now(), "term": self.coord_term}

    @rpc(access.ANYONE)
    async def rpc_cluster_status(self) -> dict:
        """Every member's status; one that does not answer shows as unreachable."""
        async def one(m: str) -> dict:
            if m == self.member.name:
                return await self.rpc_status()
            try:
                return await self.call(m, "configsync", "status", timeout=1.5)
            except BusError as e:
                return {"member": m, "role": self.cluster.member(m).role, "rev": None, "head": None,
                        "state": UNREACHABLE, "error": str(e)}

        rows = await asyncio.gather(*(one(m) for m in self.cluster.members))
        return {"coordinator": self.coordinator_now(), "term": self.coord_term, "committed": self.committed,
                "members": list(rows)}

    # -- member RPC: reading the repository -----------------------------------------------
    @rpc(access.ANYONE)
    async def rpc_log(self, n: int = 10) -> list:
        try:
            return await self.git(self.repo.log, n)
        except ConfigRepoError as e:
            raise repo_error(e) from None

    @rpc(access.ANYONE)
    async def rpc_diff(self, rev: str | None = None) -> str:
        try:
            return await self.git(self.repo.diff, rev)
        except ConfigRepoError as e:
            raise repo_error(e) from None

    @rpc(access.ANYONE)
    async def rpc_show(self, node: str | None = None, rev: str | None = None) -> dict:
        node = node or self.member.name
        try:
            check_node_name(node)
            table = await self.git(self.repo.resolution_table, node, rev)
        except ConfigRepoError as e:
            raise repo_error(e) from None
        return {"node": node, "rev": rev or self.applied,
                "files": [{"name": n, "file": w, "shadowed": s} for n, w, s in table]}


__all__ = ["ConfigSyncService", "Position", "read_height", "read_position", "read_promised", "write_position",
           "store_action", "best_position", "member_state", "validation_message"]
