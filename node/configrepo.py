"""The git side of config sync (ecconfigd / ``eccfg``): one member's copy of the cluster's
configuration repository, with no bus.

On-disk layout of a member's data directory::

    <data_dir>/config.git          bare repository, branch ``main``: the durable copy
    <data_dir>/conf -> conf.d/<rev12>-<n>
                                   the live configuration: a SYMLINK to a checkout
    <data_dir>/conf.d/<rev12>-<n>  checkouts; each is a ``git worktree`` of config.git
                                   (detached HEAD), so ``git status``/``git diff`` work
                                   inside ``conf`` and new commits land straight in config.git
    <data_dir>/conf.applied        the revision ``conf`` shows (written atomically)
    <data_dir>/config.lock         flock held while refs or ``conf`` change

Why worktrees rather than clones: they share config.git's object store, so a commit
prepared from the live copy needs no push, and checkouts cost no extra disk. Their
``.git`` files hold absolute paths: if the data directory moves, run
``git --git-dir=<data_dir>/config.git worktree repair <data_dir>/conf.d/*``.

Applying a revision is atomic for readers: the new revision is checked out beside the
live one, its files are fsynced, then a temporary symlink is ``os.replace``d over
``conf`` and the directory is fsynced. The previous checkout is kept (``rollback``);
older ones are removed.

Repository layout (as Momentum): ``global/``, ``<nodename>/``, ``default/``; a file
name is looked up in that order and the first found wins (:meth:`MemberRepo.resolve`).

Flow of one change (the service that calls this over the bus comes later)::

    proposer:     p = repo.prepare_commit("msg", add_all=True, author="Ann <ann@x>")
    coordinator:  coord.accept(p.bundle, p.rev, p.parent)   # OutOfDate / ValidationFailed
    every member: m.store(coord.bundle_since(m.head()), coord.head()); m.apply(coord.head())

Durability: config.git is configured with ``core.fsync=all`` (``core.fsyncObjectFiles``
on git older than 2.36), so git fsyncs the objects and refs it writes; after moving
``main`` we also fsync the ref file and its directory ourselves.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import git
from git.exc import BadName, GitCommandError
from git.refs.symbolic import SymbolicReference

from ecluster.clusterfile import NAME_RE, ClusterFileError, parse_cluster
from node.fsutil import atomic_write, fsync_dir, fsync_file

log = logging.getLogger(__name__)

MAIN = "refs/heads/main"
PROPOSALS = "refs/proposals/"
SEARCH_DIRS = ("global", "default")          # a node's own directory goes between these
README = "README"
VALIDATOR_GROUP = "ecluster.validators"
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
ZERO_SHA = "0" * 40

# A plug-in validator: (path in the repository, file bytes) -> [(line, reason)]
Validator = Callable[[str, bytes], Iterable[tuple[int, str]]]


# ----------------------------------------------------------------------------- errors

class ConfigRepoError(Exception):
    """Base of every config-repository error; the message is one line."""


class NotBootstrapped(ConfigRepoError):
    """The data directory has no configuration repository yet."""


class AlreadyBootstrapped(ConfigRepoError):
    """``bootstrap`` was asked for a different initial tree than the one already there."""


class OutOfDate(ConfigRepoError):
    """A proposal is not based on the current head."""

    def __init__(self, message: str = "out of date: run eccfg pull"):
        super().__init__(message)


class NotFastForward(ConfigRepoError):
    """``store`` was handed a head that does not descend from the current one."""


class NothingToCommit(ConfigRepoError):
    """The working copy (or a revert) does not change anything."""


class BadBundle(ConfigRepoError):
    """Bundle bytes git cannot read, or missing the commit they were said to carry."""


class ModifiedLocally(ConfigRepoError):
    """The live copy has uncommitted edits that applying a revision would destroy."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)
        shown = ", ".join(self.files[:5]) + (f" (+{len(self.files) - 5} more)" if len(self.files) > 5 else "")
        super().__init__(f"modified locally: {shown} (commit them, or pull --theirs to discard)")


@dataclass(frozen=True)
class ValidationError:
    """One problem in one file; ``line`` is 1-based, 0 when unknown."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class ValidationFailed(ConfigRepoError):
    """A proposed tree failed validation; ``errors`` lists every problem."""

    def __init__(self, errors: Sequence[ValidationError]):
        self.errors = list(errors)
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        super().__init__(f"validation failed: {self.errors[0]}{more}" if self.errors else "validation failed")


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Proposal:
    """A commit made on top of the live HEAD without moving ``main``.

    ``bundle`` is a git bundle holding the new commit(s) with ``parent`` as prerequisite;
    the commit is kept alive by the ref ``refs/proposals/<id>`` until ``main`` reaches it
    (or :meth:`MemberRepo.drop_proposal`).
    """

    id: str
    rev: str
    parent: str
    bundle: bytes = field(repr=False)
    message: str = ""


@dataclass(frozen=True)
class AppliedResult:
    """What :meth:`MemberRepo.apply` did."""

    rev: str
    previous_rev: str | None
    checkout: Path
    changed: bool


# ----------------------------------------------------------------------------- pure helpers

def search_order(node: str) -> tuple[str, str, str]:
    """Directories searched for a file name on ``node``, first found wins."""
    check_node_name(node)
    return (SEARCH_DIRS[0], node, SEARCH_DIRS[1])


def check_node_name(node: str) -> None:
    if not isinstance(node, str) or not NAME_RE.match(node) or node in SEARCH_DIRS:
        raise ConfigRepoError(f"bad node name {node!r}: must match {NAME_RE.pattern} and not be global/default")


def check_file_name(name: str) -> str:
    """A name looked up in the search directories: relative, no '..', POSIX separators."""
    parts = name.split("/") if isinstance(name, str) else []
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ConfigRepoError(f"bad configuration file name {name!r}: must be a relative path without '..'")
    return name


def resolve_in(files: set[str] | frozenset[str], name: str, node: str) -> str | None:
    """The repository path that serves ``name`` on ``node`` among ``files`` (repo paths)."""
    check_file_name(name)
    for d in search_order(node):
        if f"{d}/{name}" in files:
            return f"{d}/{name}"
    return None


def build_resolution_table(files: Iterable[str], node: str) -> list[tuple[str, str, list[str]]]:
    """``[(name, winning path, shadowed paths)]`` sorted by name, for ``eccfg show --node``.

    Only files under the three searched directories count; each directory's README is skipped.
    """
    order = search_order(node)
    fileset = set(files)
    names: set[str] = set()
    for f in fileset:
        top, _, rest = f.partition("/")
        if top in order and rest and rest != README:
            names.add(rest)
    table = []
    for name in sorted(names):
        found = [f"{d}/{name}" for d in order if f"{d}/{name}" in fileset]
        table.append((name, found[0], found[1:]))
    return table


def local_conflicts(local: dict[str, bytes | None], target: dict[str, bytes | None]) -> list[str]:
    """Local edits that checking out ``target`` would destroy.

    ``local`` maps each path that differs from the live HEAD (modified, deleted = None,
    untracked) to its working content; ``target`` maps the same paths to their content in
    the revision being applied (None = absent). An edit that the target already contains
    (the member that made the commit) is not a conflict.
    """
    return sorted(p for p, data in local.items() if target.get(p) != data)


def parse_status_z(out: str) -> tuple[list[str], list[str]]:
    """(modified, untracked) from ``git status --porcelain=v1 -z --no-renames``."""
    modified, untracked = [], []
    for entry in out.split("\0"):
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        (untracked if code == "??" else modified).append(path)
    return sorted(modified), sorted(untracked)


def bundle_heads(bundle: bytes) -> dict[str, str]:
    """``{refname: sha}`` from a git bundle's header (v2 or v3); BadBundle if it is not one."""
    if not isinstance(bundle, (bytes, bytearray)):
        raise BadBundle("not a usable bundle: expected bytes")
    end = bundle.find(b"\n\n")
    lines = bundle[:end].decode("utf-8", "replace").split("\n") if end > 0 else []
    if not lines or lines[0] not in ("# v2 git bundle", "# v3 git bundle"):
        raise BadBundle("not a usable bundle: missing git bundle header")
    heads: dict[str, str] = {}
    for line in lines[1:]:
        if line.startswith(("-", "@")):     # prerequisite / v3 capability
            continue
        sha, _, ref = line.partition(" ")
        if not SHA_RE.match(sha) or not ref:
            raise BadBundle(f"not a usable bundle: bad header line {line[:60]!r}")
        heads[ref] = sha
    return heads


def parse_author(author: str, member: str) -> tuple[str, str]:
    """``"Name <email>"`` or a bare name -> (name, email)."""
    m = re.fullmatch(r"\s*(.*?)\s*<([^<>]*)>\s*", author or "")
    if m and m.group(1):
        return m.group(1), m.group(2)
    name = (author or "").strip()
    if not name or "<" in name or ">" in name or "\n" in name:
        raise ConfigRepoError(f"bad author {author!r}: expected 'Name <email>' or a name")
    return name, f"{name}@{member}"


def next_checkout_name(existing: Iterable[str], rev: str) -> str:
    """``<rev12>-<n>`` with n one more than any checkout seen so far."""
    n = 0
    for name in existing:
        tail = name.rsplit("-", 1)[-1]
        if tail.isdigit():
            n = max(n, int(tail))
    return f"{rev[:12]}-{n + 1}"


def checkout_seq(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def initial_files(cluster_file_text: str | None, members: Iterable[str]) -> dict[str, bytes]:
    """Files of the bootstrap commit: a README in each directory, the cluster file if given."""
    files = {
        f"global/{README}": b"Files here apply to every node and win over <node>/ and default/.\n",
        f"default/{README}": b"Defaults: used when neither global/ nor <node>/ has the file.\n",
    }
    for m in sorted(set(members)):
        files[f"{m}/{README}"] = f"Files for {m} only: used unless global/ has the same name.\n".encode()
    if cluster_file_text is not None:
        files["global/cluster.toml"] = cluster_file_text.encode()
    return files


_TOML_AT = re.compile(r"\(at line (\d+), column \d+\)")


def _line_of_offset(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, max(0, offset)) + 1


def _toml_error(path: str, data: bytes, e: tomllib.TOMLDecodeError) -> ValidationError:
    lineno = getattr(e, "lineno", None)           # Python >= 3.14 has it; 3.11 only says it
    msg = getattr(e, "msg", None) or str(e)
    if lineno is None:
        m = _TOML_AT.search(str(e))
        lineno = int(m.group(1)) if m else data.count(b"\n") + 1     # "(at end of document)"
        msg = _TOML_AT.sub("", str(e)).replace("(at end of document)", "").strip()
    return ValidationError(path, int(lineno), f"invalid TOML: {msg}")


def find_key_line(text: str, message: str) -> int:
    """Best-effort line of the key a cluster-file message names ('a.b.c' -> key ``c``); 0 if not found."""
    for token in reversed(re.findall(r"'([^']+)'", message)):
        key = re.sub(r"\[\d+\]$", "", token.split(".")[-1])
        if not key:
            continue
        k = re.escape(key)
        pat = re.compile(rf"^\s*(\[\[?[^\]]*\b{k}\b[^\]]*\]\]?|\"?{k}\"?\s*=)")
        for i, line in enumerate(text.splitlines(), 1):
            if pat.match(line):
                return i
    return 0


def builtin_checks(path: str, data: bytes) -> list[ValidationError]:
    """Syntax of every known file kind: TOML, JSON, and the cluster file's meaning."""
    name = path.rsplit("/", 1)[-1]
    errors: list[ValidationError] = []
    if name.endswith((".toml", ".json")):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            return [ValidationError(path, _line_of_offset(data, e.start), "not valid UTF-8")]
        if name.endswith(".toml"):
            try:
                tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                return [_toml_error(path, data, e)]
            if name == "cluster.toml":
                try:
                    parse_cluster(text, Path(path))
                except ClusterFileError as e:
                    reason = str(e)
                    if reason.startswith(f"{path}: "):
                        reason = reason[len(path) + 2:]
                    errors.append(ValidationError(path, find_key_line(text, reason), reason))
        else:
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                errors.append(ValidationError(path, e.lineno, f"invalid JSON: {e.msg}"))
    return errors


def run_validators(files: dict[str, bytes], validators: Iterable[Validator]) -> list[ValidationError]:
    """Built-in checks plus every validator on every file; a crashing validator is an error, not a crash."""
    validators = list(validators)
    errors: list[ValidationError] = []
    for path in sorted(files):
        data = files[path]
        errors.extend(builtin_checks(path, data))
        for v in validators:
            try:
                for line, reason in v(path, data) or ():
                    errors.append(ValidationError(path, int(line), str(reason).splitlines()[0] if reason else "invalid"))
            except Exception as e:  # plug-in code: report it against the file instead of dying
                vname = getattr(v, "__name__", type(v).__name__)
                errors.append(ValidationError(path, 0, f"validator {vname} failed: {type(e).__name__}: {e}".splitlines()[0]))
    return errors


_plugin_validators: list[Validator] | None = None
_plugin_lock = threading.Lock()


def plugin_validators() -> list[Validator]:
    """Validators registered in the ``ecluster.validators`` entry-point group (loaded once)."""
    global _plugin_validators
    with _plugin_lock:
        if _plugin_validators is None:
            from importlib.metadata import entry_points
            found: list[Validator] = []
            for ep in entry_points(group=VALIDATOR_GROUP):
                try:
                    found.append(ep.load())
                except Exception as e:  # a broken plug-in must not block every commit
                    log.warning("validator plug-in %s failed to load: %s", ep.name, e)
            _plugin_validators = found
        return list(_plugin_validators)


def tree_files(repo: git.Repo, rev: str) -> dict[str, bytes]:
    """Every blob of a commit's (or tree's) tree, read through GitPython without a checkout."""
    try:
        obj = repo.rev_parse(rev)
    except (BadName, ValueError, GitCommandError):
        raise ConfigRepoError(f"unknown revision {rev!r}") from None
    if obj.type == "commit":
        tree = obj.tree
    elif obj.type == "tree":      # a bare tree id: give it the root path traversal needs
        tree = git.Tree(repo, obj.binsha, mode=0o040000, path="")
    else:
        raise ConfigRepoError(f"{rev!r} is not a commit or a tree")
    return {b.path: b.data_stream.read() for b in tree.traverse() if b.type == "blob"}


def validate_tree(repo: "git.Repo | MemberRepo", rev: str,
                  validators: Iterable[Validator] = ()) -> list[ValidationError]:
    """Validate the tree of ``rev`` (commit or tree): built-in syntax checks, the
    ``ecluster.validators`` plug-ins and ``validators``. Returns every error (empty = valid)."""
    grepo = repo.repo if isinstance(repo, MemberRepo) else repo
    return run_validators(tree_files(grepo, rev), [*plugin_validators(), *validators])


# ----------------------------------------------------------------------------- I/O helpers

def _fsync_tree(root: Path) -> None:
    """fsync every file and directory of a fresh checkout (git does not sync working trees)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            p = Path(dirpath, f)
            if not p.is_symlink():
                fsync_file(p)
        fsync_dir(Path(dirpath))


def _one_line(e: GitCommandError) -> str:
    err = e.stderr if isinstance(e.stderr, str) else (e.stderr or b"").decode(errors="replace")
    lines = [ln.strip() for ln in err.strip().splitlines()
             if ln.strip() and "core.fsyncObjectFiles is deprecated" not in ln]
    last = lines[-1] if lines else f"exit status {e.status}"
    return last.removeprefix("stderr: ").strip("'").strip()


# ----------------------------------------------------------------------------- the repository

class MemberRepo:
    """One member's copy of the cluster configuration: the bare repository
    ``<data_dir>/config.git`` and the live checkout ``<data_dir>/conf``.

    Thread-safe within a process (one lock); refs and ``conf`` changes also take an
    ``flock`` on ``<data_dir>/config.lock`` so a second process cannot interleave.
    Call :meth:`close` (or use ``with``) to stop GitPython's helper processes.
    """

    def __init__(self, data_dir: Path, member: str, validators: Iterable[Validator] = ()):
        check_node_name(member)
        # resolved: checkouts are compared with realpath(conf)
        self.data_dir = Path(data_dir).resolve()
        self.member = member
        self.validators: list[Validator] = list(validators)
        self.git_dir = self.data_dir / "config.git"
        self.conf = self.data_dir / "conf"
        self.checkouts = self.data_dir / "conf.d"
        self.applied_file = self.data_dir / "conf.applied"
        self._lock_file = self.data_dir / "config.lock"
        self._lock = threading.RLock()
        self._lock_depth = 0
        self._repo: git.Repo | None = None

    # -- plumbing --------------------------------------------------------------------------

    def __enter__(self) -> "MemberRepo":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the persistent ``git cat-file`` processes GitPython keeps."""
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    @property
    def bootstrapped(self) -> bool:
        return (self.git_dir / "HEAD").is_file() and self._main_or_none() is not None

    @property
    def repo(self) -> git.Repo:
        """The GitPython object for config.git (raises NotBootstrapped)."""
        if self._repo is None:
            if not (self.git_dir / "HEAD").is_file():
                raise NotBootstrapped(f"not bootstrapped: {self.git_dir} does not exist (run eccfg bootstrap, or join)")
            self._repo = git.Repo(self.git_dir)
        return self._repo

    def _git(self, *args, cwd: Path | None = None, env: dict[str, str] | None = None,
             binary: bool = False) -> str | bytes:
        """Run git on config.git (or in a checkout when ``cwd``); errors become ConfigRepoError."""
        runner = self.repo.git if cwd is None else git.Git(str(cwd))
        kwargs: dict = {"env": env} if env else {}
        if binary:
            kwargs.update(stdout_as_string=False, strip_newline_in_stdout=False)
        try:
            return runner.execute(["git", *map(str, args)], **kwargs)
        except GitCommandError as e:
            raise ConfigRepoError(f"git {args[0]} failed: {_one_line(e)}") from None

    def _is_ancestor(self, a: str, b: str) -> bool:
        try:
            self.repo.git.merge_base("--is-ancestor", a, b)
            return True
        except GitCommandError as e:
            if e.status == 1:
                return False
            raise ConfigRepoError(f"git merge-base failed: {_one_line(e)}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if self._lock_depth:            # re-entered by this thread: the flock is already ours
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_depth = 1
                yield
            finally:
                self._lock_depth = 0
                os.close(fd)

    @contextlib.contextmanager
    def _temp_path(self, suffix: str) -> Iterator[Path]:
        fd, name = tempfile.mkstemp(dir=self.data_dir, prefix=".cfg-", suffix=suffix)
        os.close(fd)
        try:
            yield Path(name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def _configure(self) -> None:
        with self.repo.config_writer() as cw:
            if git.Git().version_info >= (2, 36):
                cw.set_value("core", "fsync", "all")
                cw.set_value("core", "fsyncMethod", "fsync")
            else:
                cw.set_value("core", "fsyncObjectFiles", "true")
            cw.set_value("fetch", "fsckObjects", "true")      # a corrupt bundle is refused, not stored
            cw.set_value("gc", "autoDetach", "false")

    def _init_bare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not (self.git_dir / "HEAD").is_file():
            try:
                git.Repo.init(self.git_dir, bare=True, initial_branch="main").close()
            except GitCommandError as e:
                raise ConfigRepoError(f"git init failed: {_one_line(e)}") from None
        self._configure()

    def _main_or_none(self) -> str | None:
        try:
            repo = self.repo
        except NotBootstrapped:
            return None
        try:
            # reads the loose ref or packed-refs directly: no subprocess
            return SymbolicReference.dereference_recursive(repo, MAIN)
        except ValueError:
            return None

    def _full_sha(self, rev: str, what: str = "revision") -> str:
        """A commit's full sha, or ConfigRepoError."""
        if not isinstance(rev, str) or not rev or rev.startswith("-"):
            raise ConfigRepoError(f"bad {what} {rev!r}")
        try:
            return self.repo.commit(rev).hexsha
        except (BadName, ValueError, GitCommandError):
            raise ConfigRepoError(f"unknown {what} {rev!r}") from None

    def _check_sha(self, sha: str, what: str) -> str:
        if not isinstance(sha, str) or not SHA_RE.match(sha):
            raise ConfigRepoError(f"bad {what} {sha!r}: expected a 40-hex commit id")
        return sha

    def _set_main(self, new: str, old: str | None) -> None:
        """Compare-and-swap ``main`` (old None = must not exist), then fsync the ref."""
        try:
            self.repo.git.update_ref(MAIN, new, old if old else ZERO_SHA)
        except GitCommandError:
            raise OutOfDate() from None
        ref = self.git_dir / MAIN
        if ref.exists():
            fsync_file(ref)
        fsync_dir(ref.parent)
        self._drop_merged_proposals()

    def _drop_merged_proposals(self) -> None:
        loose = self.git_dir / PROPOSALS
        packed = self.git_dir / "packed-refs"
        if not ((loose.is_dir() and any(loose.iterdir()))
                or (packed.is_file() and PROPOSALS.encode() in packed.read_bytes())):
            return
        merged = self.repo.git.for_each_ref("--merged", MAIN, "--format=%(refname)", PROPOSALS).split()
        for ref in merged:
            self.repo.git.update_ref("-d", ref)

    def _fetch_bundle(self, bundle: bytes, want: str) -> None:
        """Bring the objects of ``bundle`` into config.git (no ref moves) and check ``want`` came with them."""
        if not isinstance(bundle, (bytes, bytearray)) or not bundle:
            raise BadBundle(f"bundle is empty but {want[:12]} is not here")
        heads = bundle_heads(bytes(bundle))
        if want not in heads.values():
            raise BadBundle(f"bundle does not carry {want[:12]} (it carries {', '.join(h[:12] for h in heads.values()) or 'nothing'})")
        with self._temp_path(".bundle") as path:
            path.write_bytes(bundle)
            try:
                # by sha: no ref is written, fetch still checks connectivity and fscks
                self.repo.git.fetch("-q", "--no-tags", "--no-write-fetch-head", str(path), want)
            except GitCommandError as e:
                msg = _one_line(e)
                if "prerequisite" in msg or "lacks these prerequisite" in str(e.stderr):
                    raise OutOfDate("out of date: bundle needs commits this member lacks (run eccfg pull)") from None
                raise BadBundle(f"cannot fetch bundle: {msg}") from None

    # -- paths, trees ---------------------------------------------------------------------

    def _live_checkout(self) -> Path | None:
        """The checkout ``conf`` points at, or None when there is no ``conf``."""
        if not os.path.lexists(self.conf):
            return None
        if not self.conf.is_symlink():
            raise ConfigRepoError(f"{self.conf} is not a symlink managed by eccfg; move it away and apply again")
        target = Path(os.path.realpath(self.conf))
        if not target.is_dir():
            raise ConfigRepoError(f"{self.conf} points at missing {target}; run eccfg pull --theirs")
        return target

    def _require_live(self) -> Path:
        self.repo
        live = self._live_checkout()
        if live is None:
            raise NotBootstrapped(f"no live configuration at {self.conf}: run eccfg pull")
        return live

    def _checkout_gitdir(self, checkout: Path) -> Path:
        text = (checkout / ".git").read_text().strip()
        if not text.startswith("gitdir:"):
            raise ConfigRepoError(f"{checkout} is not a worktree of {self.git_dir}")
        return Path(text.split(":", 1)[1].strip())

    def _checkout_head(self, checkout: Path) -> str:
        """HEAD of a checkout, read from its admin dir (no subprocess for a detached HEAD)."""
        head = (self._checkout_gitdir(checkout) / "HEAD").read_text().strip()
        if SHA_RE.match(head):
            return head
        return str(self._git("rev-parse", "--verify", "HEAD^{commit}", cwd=checkout)).strip()

    def _local_changes(self, checkout: Path) -> dict[str, bytes | None]:
        """Paths that differ from the checkout's HEAD -> working content (None = deleted)."""
        out = str(self._git("status", "--porcelain=v1", "-z", "--no-renames", "--untracked-files=all",
                            "--ignore-submodules", cwd=checkout))
        modified, untracked = parse_status_z(out)
        changes: dict[str, bytes | None] = {}
        for p in modified + untracked:
            f = checkout / p
            if f.is_symlink():
                changes[p] = os.readlink(f).encode()
            elif f.is_file():
                changes[p] = f.read_bytes()
            else:
                changes[p] = None
        return changes

    def _contents_at(self, rev: str, paths: Iterable[str]) -> dict[str, bytes | None]:
        tree = self.repo.commit(rev).tree
        out: dict[str, bytes | None] = {}
        for p in paths:
            try:
                out[p] = (tree / p).data_stream.read()
            except KeyError:
                out[p] = None
        return out

    @contextlib.contextmanager
    def _scratch_index(self, checkout: Path | None) -> Iterator[dict[str, str]]:
        """An env with GIT_INDEX_FILE on a private copy of the checkout's index (or empty),
        so proposals never disturb what the operator sees in ``conf``."""
        with self._temp_path(".index") as path:
            path.unlink()
            if checkout is not None:
                src = self._checkout_gitdir(checkout) / "index"
                if src.exists():
                    shutil.copy2(src, path)     # keep the mtime: a racy-git check depends on it
            yield {"GIT_INDEX_FILE": str(path)}

    def _files_at(self, rev: str | None, prefixes: Iterable[str]) -> set[str]:
        """Repo paths under the given top-level dirs, from ``rev`` or from the live checkout."""
        prefixes = tuple(prefixes)
        if rev is not None:
            tree = self.repo.commit(self._full_sha(rev)).tree
            out = set()
            for d in prefixes:
                try:
                    sub = tree / d
                except KeyError:
                    continue
                out.update(b.path for b in sub.traverse() if b.type == "blob")
            return out
        live = self._require_live()
        out = set()
        for d in prefixes:
            base = live / d
            for dirpath, _dirs, files in os.walk(base):
                for f in files:
                    out.add((Path(dirpath, f)).relative_to(live).as_posix())
        return out

    # -- creating the repository -----------------------------------------------------------

    def bootstrap(self, cluster_file_text: str | None, author: str) -> str:
        """Create config.git with an initial commit (README in ``global/``, ``default/`` and
        each member's directory; the cluster file as ``global/cluster.toml``) and check it
        out live. Idempotent: a second call with the same input only makes sure ``conf``
        exists; a different input raises AlreadyBootstrapped. Returns ``main``."""
        members: list[str] = []
        if cluster_file_text is not None:
            try:
                cluster = parse_cluster(cluster_file_text, self.data_dir / "conf" / "global" / "cluster.toml")
            except ClusterFileError as e:
                raise ConfigRepoError(f"bad cluster file: {e}") from None
            members = list(cluster.members)
        files = initial_files(cluster_file_text, members)
        with self._locked():
            self._init_bare()
            tree = self._write_tree(files)
            main = self._main_or_none()
            if main is not None:
                roots = str(self._git("rev-list", "--max-parents=0", MAIN)).split()
                root_trees = {self.repo.commit(r).tree.hexsha for r in roots}
                if tree not in root_trees:
                    raise AlreadyBootstrapped(
                        f"already bootstrapped differently: {self.git_dir} starts from another initial tree")
            else:
                errors = validate_tree(self.repo, tree, self.validators)
                if errors:
                    raise ValidationFailed(errors)
                sha = self._commit_tree(tree, [], "bootstrap configuration", author)
                self._set_main(sha, None)
                main = sha
        if self._live_checkout() is None:
            self.apply(main)
        return main

    def _write_tree(self, files: dict[str, bytes]) -> str:
        """Store blobs and a tree for ``files`` (git writes them: core.fsync applies)."""
        args: list[str] = []
        for path, data in sorted(files.items()):
            with self._temp_path(".blob") as tmp:
                tmp.write_bytes(data)
                sha = str(self._git("hash-object", "-w", "--", str(tmp))).strip()
            args += ["--cacheinfo", f"100644,{sha},{path}"]
        with self._scratch_index(None) as env:
            self._git("update-index", "--add", *args, env=env)
            return str(self._git("write-tree", env=env)).strip()

    def _commit_tree(self, tree: str, parents: list[str], message: str, author: str) -> str:
        name, email = parse_author(author, self.member)
        env = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
               "GIT_COMMITTER_NAME": f"eccfg on {self.member}", "GIT_COMMITTER_EMAIL": f"eccfg@{self.member}"}
        args = ["commit-tree", tree, "-m", message]
        for p in parents:
            args += ["-p", p]
        return str(self._git(*args, env=env)).strip()

    def clone_from_bundle(self, bundle_bytes: bytes) -> str:
        """Join: create config.git from a bundle of ``main`` (see :meth:`bundle_since`) and
        check it out live. On a member that already has a repository this is :meth:`store`.
        Returns ``main``."""
        heads = bundle_heads(bundle_bytes)
        head = heads.get(MAIN) or (next(iter(heads.values())) if len(heads) == 1 else None)
        if head is None:
            raise BadBundle(f"bundle has no {MAIN}")
        if self.bootstrapped:
            self.store(bundle_bytes, head)
        else:
            with self._locked():
                self._init_bare()
                self._fetch_bundle(bundle_bytes, head)
                self._set_main(head, None)
        if self._live_checkout() is None:
            self.apply(self.head())
        return self.head()

    # -- operator side (live working copy) -------------------------------------------------

    def status(self) -> dict:
        """``{rev, head, modified, untracked, state}`` of the live copy; ``head`` is this
        member's ``main`` (differs from ``rev`` when a stored revision is not applied)."""
        live = self._require_live()
        modified, untracked = parse_status_z(str(self._git(
            "status", "--porcelain=v1", "-z", "--no-renames", "--untracked-files=all", cwd=live)))
        return {"rev": self._checkout_head(live), "head": self.head(), "modified": modified,
                "untracked": untracked, "state": "modified locally" if modified or untracked else "clean"}

    def prepare_commit(self, message: str, add_all: bool, author: str) -> Proposal:
        """Commit the live copy's edits on top of its HEAD without moving ``main``.

        Tracked edits and deletions are always taken (plus anything the operator staged);
        new files only when ``add_all``. The commit is validated here (ValidationFailed)
        and again by :meth:`accept`. Raises OutOfDate when the live copy is behind this
        member's ``main``, NothingToCommit when nothing changed."""
        if not isinstance(message, str) or not message.strip():
            raise ConfigRepoError("empty commit message")
        live = self._require_live()
        parent = self._checkout_head(live)
        if parent != self.head():
            raise OutOfDate()
        with self._scratch_index(live) as env:
            self._git("add", "-A" if add_all else "-u", "--", ".", cwd=live, env=env)
            tree = str(self._git("write-tree", cwd=live, env=env)).strip()
        return self._propose(tree, parent, message, author)

    def revert_proposal(self, rev: str, author: str) -> Proposal:
        """A proposal on top of the live HEAD whose tree undoes ``rev`` (its diff against
        its first parent, applied in reverse). Local edits are not included."""
        live = self._require_live()
        parent = self._checkout_head(live)
        if parent != self.head():
            raise OutOfDate()
        target = self.repo.commit(self._full_sha(rev))
        if not target.parents:
            raise ConfigRepoError(f"cannot revert {target.hexsha[:12]}: it is the initial commit")
        patch = self._git("diff-tree", "-p", "--binary", "--no-commit-id", target.parents[0].hexsha,
                          target.hexsha, binary=True)
        with self._scratch_index(None) as env, self._temp_path(".patch") as pfile:
            pfile.write_bytes(patch)
            self._git("read-tree", parent, env=env)
            if patch.strip():
                try:
                    self._git("apply", "--cached", "-R", str(pfile), env=env)
                except ConfigRepoError:
                    raise ConfigRepoError(
                        f"cannot revert {target.hexsha[:12]} cleanly: later commits changed the same lines") from None
            tree = str(self._git("write-tree", env=env)).strip()
        subject = target.summary if isinstance(target.summary, str) else target.summary.decode()
        message = f'Revert "{subject}"\n\nThis reverts commit {target.hexsha}.\n'
        return self._propose(tree, parent, message, author)

    def _propose(self, tree: str, parent: str, message: str, author: str) -> Proposal:
        if tree == self.repo.commit(parent).tree.hexsha:
            raise NothingToCommit("nothing to commit: the live copy matches its revision")
        errors = validate_tree(self.repo, tree, self.validators)
        if errors:
            raise ValidationFailed(errors)
        sha = self._commit_tree(tree, [parent], message, author)
        pid = sha[:12]
        self._git("update-ref", PROPOSALS + pid, sha)
        bundle = self._git("bundle", "create", "-q", "-", PROPOSALS + pid, f"^{parent}", binary=True)
        return Proposal(id=pid, rev=sha, parent=parent, bundle=bytes(bundle), message=message)

    def drop_proposal(self, rev: str) -> None:
        """Forget a proposal that was refused (its objects go with the next gc)."""
        self._git("update-ref", "-d", PROPOSALS + self._check_sha(rev, "proposal")[:12])

    def log(self, n: int = 10) -> list[dict]:
        """The last ``n`` commits of ``main``, newest first:
        ``{rev, parents, author, time (unix), subject}``."""
        if not isinstance(n, int) or n < 1:
            raise ConfigRepoError(f"bad count {n!r}: must be a positive integer")
        self.head()
        out = str(self._git("log", f"-n{n}", "--format=%H%x00%P%x00%an <%ae>%x00%at%x00%s%x1e", MAIN))
        entries = []
        for rec in out.split("\x1e"):
            rec = rec.strip("\n")
            if not rec:
                continue
            sha, parents, author, at, subject = rec.split("\x00")
            entries.append({"rev": sha, "parents": parents.split(), "author": author,
                            "time": int(at), "subject": subject})
        return entries

    def diff(self, rev: str | None = None) -> str:
        """Unified diff: the live copy (new files included) against its HEAD when ``rev`` is
        None, else ``rev`` against its first parent."""
        if rev is None:
            live = self._require_live()
            with self._scratch_index(live) as env:
                self._git("add", "-A", "--", ".", cwd=live, env=env)
                return str(self._git("diff", "--cached", "HEAD", cwd=live, env=env))
        sha = self._full_sha(rev)
        return str(self._git("diff-tree", "-p", "--root", "--no-commit-id", sha))

    def resolve(self, name: str, node: str, rev: str | None = None) -> str | None:
        """Repository path (e.g. ``"n1/ecelerity.conf"``) that serves ``name`` on ``node``:
        ``global/``, then ``<node>/``, then ``default/``; None when none has it. Looks at the
        live copy, or at ``rev``. The file on disk is ``conf / path``."""
        check_file_name(name)
        order = search_order(node)
        if rev is None:
            live = self._require_live()
            for d in order:
                if (live / d / name).is_file():
                    return f"{d}/{name}"
            return None
        return resolve_in(self._files_at(rev, order), name, node)

    def resolution_table(self, node: str, rev: str | None = None) -> list[tuple[str, str, list[str]]]:
        """``[(name, winning path, shadowed paths)]`` for every file name ``node`` sees."""
        return build_resolution_table(self._files_at(rev, search_order(node)), node)

    # -- coordinator / replication side ----------------------------------------------------

    def head(self) -> str:
        """The sha of ``main`` (raises NotBootstrapped)."""
        main = self._main_or_none()
        if main is None:
            raise NotBootstrapped(f"not bootstrapped: {self.git_dir} has no branch main (run eccfg bootstrap, or join)")
        return main

    def has(self, sha: str) -> bool:
        """Whether config.git holds commit ``sha``."""
        if not isinstance(sha, str) or not SHA_RE.match(sha):
            return False
        try:
            return self.repo.odb.info(bytes.fromhex(sha)).type == b"commit"
        except (ValueError, OSError, git.exc.BadObject):
            return False

    def bundle_since(self, base_sha: str | None) -> bytes:
        """A bundle of ``main`` from ``base_sha`` (exclusive), all of ``main`` when None or
        unknown here; ``b""`` when ``base_sha`` is already ``main``."""
        main = self.head()
        if base_sha == main:
            return b""
        args = ["bundle", "create", "-q", "-", MAIN]
        if base_sha is not None and self.has(base_sha):
            args.append(f"^{base_sha}")
        try:
            return bytes(self._git(*args, binary=True))
        except ConfigRepoError as e:
            if "empty bundle" in str(e):    # base is ahead of main: nothing to send
                return b""
            raise

    def accept(self, bundle_bytes: bytes, new_head: str, expected_parent: str) -> None:
        """Coordinator: take a proposal. Raises OutOfDate unless ``expected_parent`` is
        ``main``; BadBundle, ValidationFailed. On success ``main`` is ``new_head``, durably.
        Accepting the current head again is a no-op (retries)."""
        self._check_sha(new_head, "new head")
        self._check_sha(expected_parent, "expected parent")
        with self._locked():
            main = self.head()
            if main == new_head:
                return
            if main != expected_parent:
                raise OutOfDate()
            if not self.has(new_head):
                self._fetch_bundle(bundle_bytes, new_head)
            if not self._is_ancestor(expected_parent, new_head):
                raise ConfigRepoError(f"proposal {new_head[:12]} does not descend from {expected_parent[:12]}")
            errors = validate_tree(self.repo, new_head, self.validators)
            if errors:
                raise ValidationFailed(errors)
            self._set_main(new_head, expected_parent)

    def store(self, bundle_bytes: bytes, new_head: str) -> bool:
        """Follower: fetch ``bundle_bytes`` and fast-forward ``main`` to ``new_head``.
        Idempotent (returns False when ``main`` already is, or descends from, ``new_head``);
        NotFastForward when ``new_head`` does not descend from ``main``."""
        self._check_sha(new_head, "new head")
        with self._locked():
            main = self.head()
            if main == new_head:
                return False
            if not self.has(new_head):
                self._fetch_bundle(bundle_bytes, new_head)
            if not self._is_ancestor(main, new_head):
                if self._is_ancestor(new_head, main):
                    return False                  # an older head: we are ahead already
                raise NotFastForward(
                    f"refusing non-fast-forward: {new_head[:12]} does not descend from main {main[:12]}")
            self._set_main(new_head, main)
            return True

    # -- applying --------------------------------------------------------------------------

    def applied_rev(self) -> str | None:
        """The revision the live ``conf`` shows (None before the first apply)."""
        self.repo
        live = self._live_checkout()
        return None if live is None else self._checkout_head(live)

    def recorded_rev(self) -> str | None:
        """The revision recorded in ``conf.applied`` by the last apply."""
        try:
            return self.applied_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def apply(self, rev: str, theirs: bool = False) -> AppliedResult:
        """Make ``conf`` show ``rev`` atomically: check out beside the live copy, fsync,
        swap the symlink. Raises ModifiedLocally when hand edits would be lost, unless
        ``theirs`` (``eccfg pull --theirs``). Edits that ``rev`` already contains are not
        conflicts, so the member that committed applies cleanly."""
        with self._locked():
            sha = self._full_sha(rev)
            live = self._live_checkout()
            previous = None
            if live is not None:
                previous = self._checkout_head(live)
                changes = self._local_changes(live)
                if not theirs and changes:
                    conflicts = local_conflicts(changes, self._contents_at(sha, changes))
                    if conflicts:
                        raise ModifiedLocally(conflicts)
                if previous == sha and not changes:
                    if self.recorded_rev() != sha:
                        atomic_write(self.applied_file, f"{sha}\n".encode())
                    return AppliedResult(sha, previous, live, changed=False)
            checkout = self._check_out_beside(sha)
            self._swap_live(checkout)
            atomic_write(self.applied_file, f"{sha}\n".encode())
            self._remove_old_checkouts(keep={checkout, live})
            return AppliedResult(sha, previous, checkout, changed=True)

    def rollback(self) -> AppliedResult:
        """Point ``conf`` back at the previous checkout (kept by the last apply)."""
        with self._locked():
            live = self._require_live()
            older = [p for p in self._checkout_dirs() if p != live and checkout_seq(p.name) < checkout_seq(live.name)]
            if not older:
                raise ConfigRepoError("no previous checkout to roll back to")
            prev = max(older, key=lambda p: checkout_seq(p.name))
            sha = self._checkout_head(prev)
            self._swap_live(prev)
            atomic_write(self.applied_file, f"{sha}\n".encode())
            return AppliedResult(sha, self._checkout_head(live), prev, changed=True)

    def _checkout_dirs(self) -> list[Path]:
        if not self.checkouts.is_dir():
            return []
        return [p for p in self.checkouts.iterdir() if p.is_dir()]

    def _check_out_beside(self, sha: str) -> Path:
        self.checkouts.mkdir(exist_ok=True)
        path = self.checkouts / next_checkout_name((p.name for p in self.checkouts.iterdir()), sha)
        self._git("worktree", "add", "-q", "--detach", str(path), sha)
        _fsync_tree(path)
        fsync_dir(self.checkouts)
        return path

    def _swap_live(self, checkout: Path) -> None:
        tmp = self.data_dir / f".conf.tmp-{os.getpid()}-{threading.get_ident()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(os.path.relpath(checkout, self.data_dir), tmp)
        os.replace(tmp, self.conf)          # the atomic step: readers see old or new, never neither
        fsync_dir(self.data_dir)

    def _remove_old_checkouts(self, keep: set[Path | None]) -> None:
        stray = False
        for p in self._checkout_dirs():
            if p in keep:
                continue
            try:
                self._git("worktree", "remove", "--force", "--force", str(p))
            except ConfigRepoError as e:    # not a worktree any more: plain directory
                log.warning("removing %s: %s", p, e)
                shutil.rmtree(p, ignore_errors=True)
                stray = True
        if stray:
            with contextlib.suppress(ConfigRepoError):
                self._git("worktree", "prune")
