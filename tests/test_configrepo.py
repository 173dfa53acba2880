"""Config sync, git side: three MemberRepo objects in tmp_path stand for three members
(n1, n2 = the coordinator, n3); bundles are handed over by the test instead of the bus."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from node import configrepo
from node.configrepo import (
    AlreadyBootstrapped, BadBundle, ConfigRepoError, MemberRepo, ModifiedLocally, NotBootstrapped,
    NotFastForward, NothingToCommit, bundle_heads, OutOfDate, ValidationError, ValidationFailed, build_resolution_table,
    find_key_line, local_conflicts, next_checkout_name, parse_status_z, resolve_in, run_validators,
    validate_tree,
)

pytestmark = pytest.mark.timeout(60)

AUTHOR = "Ann Operator <ann@example.org>"


def cluster_text(root: Path, extra: str = "") -> str:
    return f"""[cluster]
name = "lab"
{extra}
[nodes.n1]
address = "10.99.0.11"
data_dir = "{root}/n1"

[nodes.n2]
address = "10.99.0.12"
data_dir = "{root}/n2"

[nodes.n3]
address = "10.99.0.13"
data_dir = "{root}/n3"
"""


@pytest.fixture
def members(tmp_path):
    """n1 bootstraps; n2 and n3 join from a bundle of n1's main."""
    repos = [MemberRepo(tmp_path / n, n) for n in ("n1", "n2", "n3")]
    try:
        a, b, c = repos
        a.bootstrap(cluster_text(tmp_path), AUTHOR)
        full = a.bundle_since(None)
        b.clone_from_bundle(full)
        c.clone_from_bundle(full)
        yield a, b, c
    finally:
        for r in repos:
            r.close()


def live_tree(m: MemberRepo) -> dict[str, bytes]:
    """Every file the live conf shows (git metadata excluded)."""
    out = {}
    for dirpath, dirs, files in os.walk(m.conf, followlinks=True):
        dirs[:] = [d for d in dirs if d != ".git"]
        for f in files:
            if f == ".git":
                continue
            p = Path(dirpath, f)
            out[p.relative_to(m.conf).as_posix()] = p.read_bytes()
    return out


def replicate(coord: MemberRepo, everyone: list[MemberRepo]) -> str:
    """What the service will do after an accept: store the new head everywhere, apply everywhere."""
    head = coord.head()
    for m in everyone:
        if m is not coord:
            m.store(coord.bundle_since(m.head()), head)
    for m in everyone:
        m.apply(head)
    return head


def commit_on(proposer: MemberRepo, coord: MemberRepo, everyone, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        p = proposer.conf / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    prop = proposer.prepare_commit(message, add_all=True, author=AUTHOR)
    coord.accept(prop.bundle, prop.rev, prop.parent)
    replicate(coord, everyone)
    return prop.rev


def git_in(path: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=path, check=True, capture_output=True, text=True).stdout


# ----------------------------------------------------------------------------- bootstrap, join

def test_bootstrap_and_join(members, tmp_path):
    a, b, c = members
    head = a.head()
    for m in members:
        assert m.head() == head and m.applied_rev() == head and m.recorded_rev() == head
        assert m.conf.is_symlink() and (m.conf / "global" / "cluster.toml").is_file()
        assert {"global/README", "default/README", "n1/README", "n2/README", "n3/README"} <= set(live_tree(m))
        assert m.status() == {"rev": head, "head": head, "modified": [], "untracked": [], "state": "clean"}
        # the live copy is a git working tree the operator can inspect
        assert git_in(m.conf, "rev-parse", "HEAD").strip() == head
        assert git_in(m.conf, "status", "--porcelain") == ""
    assert live_tree(a) == live_tree(b) == live_tree(c)
    # idempotent with the same input, refused with another
    assert a.bootstrap(cluster_text(tmp_path), "someone else") == head
    assert b.bootstrap(cluster_text(tmp_path), AUTHOR) == head
    with pytest.raises(AlreadyBootstrapped, match="already bootstrapped differently"):
        a.bootstrap(None, AUTHOR)
    assert a.head() == head


def test_not_bootstrapped_and_bad_bootstrap(tmp_path):
    with MemberRepo(tmp_path / "x", "x") as m:
        for call in (m.status, m.head, lambda: m.log(3), lambda: m.apply("main")):
            with pytest.raises(NotBootstrapped, match="not bootstrapped"):
                call()
        with pytest.raises(ConfigRepoError, match="bad cluster file: .*unknown key 'cluster.nope'"):
            m.bootstrap(cluster_text(tmp_path, 'nope = 1'), AUTHOR)
        with pytest.raises(BadBundle):
            m.clone_from_bundle(b"this is not a bundle")
        assert not m.bootstrapped
    with pytest.raises(ConfigRepoError, match="bad node name"):
        MemberRepo(tmp_path / "y", "global")


# ----------------------------------------------------------------------------- the main flow

def test_edit_commit_accept_store_apply_everywhere(members):
    a, b, c = members
    base = a.head()
    (a.conf / "global" / "x.toml").write_text("limit = 10\n")
    (a.conf / "n1").joinpath("README").unlink()
    st = a.status()
    assert st["state"] == "modified locally" and st["modified"] == ["n1/README"] and st["untracked"] == ["global/x.toml"]

    prop = a.prepare_commit("add x, drop n1 readme", add_all=True, author=AUTHOR)
    assert prop.parent == base and len(prop.rev) == 40 and prop.bundle.startswith(b"# v2 git bundle")
    # proposing moves nothing
    assert a.head() == base and b.head() == base and a.applied_rev() == base

    b.accept(prop.bundle, prop.rev, prop.parent)
    assert b.head() == prop.rev and c.head() == base
    b.accept(prop.bundle, prop.rev, prop.parent)        # a retried accept is harmless
    head = replicate(b, [a, b, c])
    assert head == prop.rev
    trees = [live_tree(m) for m in members]
    assert trees[0] == trees[1] == trees[2]
    assert trees[0]["global/x.toml"] == b"limit = 10\n" and "n1/README" not in trees[0]
    for m in members:
        assert m.applied_rev() == head and m.recorded_rev() == head and m.status()["state"] == "clean"
        assert git_in(m.conf, "status", "--porcelain") == ""
    assert git_in(a.git_dir, "for-each-ref", "refs/proposals/") == ""      # proposal ref dropped once merged
    log = a.log(5)
    assert [e["rev"] for e in log] == [head, base] and log[0]["subject"] == "add x, drop n1 readme"
    assert log[0]["author"] == AUTHOR and log[0]["parents"] == [base]
    assert "+limit = 10" in c.diff(head)
    # only two checkouts are kept: live and previous (for rollback)
    assert len(list(a.checkouts.iterdir())) == 2
    with pytest.raises(NothingToCommit):
        a.prepare_commit("nothing", add_all=True, author=AUTHOR)


def test_second_proposal_on_same_parent_is_out_of_date(members):
    a, b, c = members
    base = b.head()
    (a.conf / "global" / "a.toml").write_text("x = 1\n")
    (c.conf / "global" / "c.toml").write_text("y = 2\n")
    pa = a.prepare_commit("from a", True, AUTHOR)
    pc = c.prepare_commit("from c", True, AUTHOR)
    assert pa.parent == pc.parent == base
    b.accept(pa.bundle, pa.rev, pa.parent)
    with pytest.raises(OutOfDate, match="^out of date: run eccfg pull$"):
        b.accept(pc.bundle, pc.rev, pc.parent)
    assert b.head() == pa.rev
    # c learns the new head but keeps its hand edit: apply refuses, a new proposal is out of date
    c.store(b.bundle_since(c.head()), b.head())
    with pytest.raises(OutOfDate):
        c.prepare_commit("again", True, AUTHOR)
    c.drop_proposal(pc.rev)
    assert git_in(c.git_dir, "for-each-ref", "refs/proposals/") == ""


def test_invalid_toml_changes_nothing_anywhere(members, monkeypatch):
    a, b, c = members
    base = b.head()
    before = [(m.applied_rev(), os.readlink(m.conf), live_tree(m)) for m in (b, c)]
    (a.conf / "global" / "bad.toml").write_text("ok = 1\n\nbroken = \n")
    with pytest.raises(ValidationFailed) as ei:
        a.prepare_commit("bad", True, AUTHOR)
    [err] = ei.value.errors
    assert (err.file, err.line) == ("global/bad.toml", 3) and "invalid TOML" in err.reason
    assert str(err).startswith("global/bad.toml:3: invalid TOML")
    assert str(ei.value).startswith("validation failed: global/bad.toml:3:") and "\n" not in str(ei.value)
    assert git_in(a.git_dir, "for-each-ref", "refs/proposals/") == ""

    # a proposer that skipped validation: the coordinator still refuses, nothing moves
    monkeypatch.setattr(configrepo, "validate_tree", lambda *args, **kw: [])
    prop = a.prepare_commit("bad", True, AUTHOR)
    monkeypatch.undo()
    with pytest.raises(ValidationFailed, match="global/bad.toml:3"):
        b.accept(prop.bundle, prop.rev, prop.parent)
    for m in members:
        assert m.head() == base and m.applied_rev() == base
    assert [(m.applied_rev(), os.readlink(m.conf), live_tree(m)) for m in (b, c)] == before
    assert (a.conf / "global" / "bad.toml").read_text().endswith("broken = \n")   # the operator's edit stays


def test_validation_of_json_and_cluster_file(members):
    a, b, c = members
    (a.conf / "default" / "d.json").write_text('{\n  "a": 1,\n  "b": \n}\n')
    cl = a.conf / "global" / "cluster.toml"
    cl.write_text(cl.read_text().replace('address = "10.99.0.13"', 'address = "10.99.0.13"\ncolour = "red"'))
    with pytest.raises(ValidationFailed) as ei:
        a.prepare_commit("two bad files", True, AUTHOR)
    by_file = {e.file: e for e in ei.value.errors}
    assert by_file["default/d.json"].line == 4 and "invalid JSON" in by_file["default/d.json"].reason
    e = by_file["global/cluster.toml"]
    assert "unknown key 'nodes.n3.colour'" in e.reason
    assert cl.read_text().splitlines()[e.line - 1] == 'colour = "red"'


# ----------------------------------------------------------------------------- lookup order

def test_resolve_order_and_table(members):
    a, b, c = members
    files = {"global/a.conf": "g", "n1/a.conf": "n1", "default/a.conf": "d",
             "n1/b.conf": "n1", "default/b.conf": "d", "default/c.conf": "d", "n2/d.conf": "n2",
             "global/sub/e.conf": "g", "default/sub/e.conf": "d"}
    rev = commit_on(a, b, [a, b, c], files, "layout")
    for m, rv in ((a, None), (c, None), (b, rev)):
        assert m.resolve("a.conf", "n1", rev=rv) == "global/a.conf"
        assert m.resolve("b.conf", "n1", rev=rv) == "n1/b.conf"
        assert m.resolve("b.conf", "n2", rev=rv) == "default/b.conf"
        assert m.resolve("c.conf", "n1", rev=rv) == "default/c.conf"
        assert m.resolve("d.conf", "n1", rev=rv) is None
        assert m.resolve("d.conf", "n2", rev=rv) == "n2/d.conf"
        assert m.resolve("sub/e.conf", "n3", rev=rv) == "global/sub/e.conf"
    assert (a.conf / a.resolve("b.conf", "n1")).read_text() == "n1"
    table = a.resolution_table("n1")
    assert table == [
        ("a.conf", "global/a.conf", ["n1/a.conf", "default/a.conf"]),
        ("b.conf", "n1/b.conf", ["default/b.conf"]),
        ("c.conf", "default/c.conf", []),
        ("cluster.toml", "global/cluster.toml", []),
        ("sub/e.conf", "global/sub/e.conf", ["default/sub/e.conf"]),
    ]
    assert b.resolution_table("n1", rev=rev) == table
    assert ("d.conf", "n2/d.conf", []) in c.resolution_table("n2")
    for bad in ("../x", "/etc/passwd", "a//b", ""):
        with pytest.raises(ConfigRepoError, match="bad configuration file name"):
            a.resolve(bad, "n1")
    with pytest.raises(ConfigRepoError, match="bad node name"):
        a.resolve("a.conf", "default")


def test_resolution_pure_functions():
    files = {"global/x", "n1/x", "default/x", "default/y", "n1/README", "other/z"}
    assert resolve_in(files, "x", "n1") == "global/x"
    assert resolve_in(files, "y", "n1") == "default/y"
    assert resolve_in(files, "z", "n1") is None
    assert build_resolution_table(files, "n1") == [("x", "global/x", ["n1/x", "default/x"]), ("y", "default/y", [])]


# ----------------------------------------------------------------------------- applying

def test_apply_is_atomic_for_readers(members):
    a, b, c = members
    # ~60 KB each: a torn or half-written read would show
    old = "".join(f"old_{i} = 1  # {'o' * 200}\n" for i in range(300))
    new = "".join(f"new_{i} = 2  # {'n' * 200}\n" for i in range(300))
    r1 = commit_on(a, b, [a, b, c], {"global/x.toml": old}, "old")
    r2 = commit_on(a, b, [a, b, c], {"global/x.toml": new}, "new")
    path = c.conf / "global" / "x.toml"
    seen = {"old": 0, "new": 0}
    bad: list[str] = []
    stop = threading.Event()

    def observe():
        while not stop.is_set():
            try:
                data = path.read_text()
            except OSError as e:
                bad.append(f"{type(e).__name__}: {e}")
                continue
            if data == old:
                seen["old"] += 1
            elif data == new:
                seen["new"] += 1
            else:
                bad.append(f"torn read of {len(data)} bytes")

    t = threading.Thread(target=observe, daemon=True)
    t.start()
    try:
        for i in range(12):
            c.apply(r1 if i % 2 == 0 else r2)
            assert c.applied_rev() == (r1 if i % 2 == 0 else r2)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    assert bad == []
    assert seen["old"] > 0 and seen["new"] > 0
    assert len(list(c.checkouts.iterdir())) == 2
    assert git_in(c.git_dir, "worktree", "list").count("\n") == 3       # bare + 2: old worktrees pruned
    # rollback points conf at the kept previous checkout
    res = c.rollback()
    assert res.rev == r1 and c.applied_rev() == r1 and c.recorded_rev() == r1 and path.read_text() == old


def test_modified_locally_is_not_overwritten_unless_theirs(members):
    a, b, c = members
    r1 = commit_on(a, b, [a, b, c], {"global/x.toml": "v = 1\n"}, "v1")
    (c.conf / "global" / "x.toml").write_text("v = 99  # hand edit\n")
    (c.conf / "default" / "notes.txt").write_text("scratch\n")
    st = c.status()
    assert st["state"] == "modified locally" and st["modified"] == ["global/x.toml"]
    assert st["untracked"] == ["default/notes.txt"]

    (a.conf / "global" / "y.toml").write_text("w = 2\n")
    prop = a.prepare_commit("y", True, AUTHOR)
    b.accept(prop.bundle, prop.rev, prop.parent)
    assert c.store(b.bundle_since(c.head()), b.head()) is True
    with pytest.raises(ModifiedLocally) as ei:
        c.apply(b.head())
    assert ei.value.files == ["default/notes.txt", "global/x.toml"]
    assert str(ei.value).startswith("modified locally: default/notes.txt, global/x.toml") and "\n" not in str(ei.value)
    assert c.applied_rev() == r1 and c.recorded_rev() == r1
    assert (c.conf / "global" / "x.toml").read_text() == "v = 99  # hand edit\n"
    assert c.status()["head"] == b.head() != c.status()["rev"]

    res = c.apply(b.head(), theirs=True)
    assert res.changed and res.rev == b.head() and res.previous_rev == r1
    b.apply(b.head())
    assert live_tree(c) == live_tree(b)
    assert "default/notes.txt" not in live_tree(c) and (c.conf / "global" / "x.toml").read_text() == "v = 1\n"
    assert c.status()["state"] == "clean"


def test_member_that_missed_three_commits_catches_up_with_one_bundle(members, tmp_path):
    a, b, c = members
    stale = c.head()
    revs = []
    for i in range(3):
        revs.append(commit_on(a, b, [a, b], {f"global/f{i}.toml": f"i = {i}\n"}, f"change {i}"))
    assert c.head() == stale and not c.has(revs[-1])
    bundle = b.bundle_since(c.head())
    assert c.store(bundle, b.head()) is True
    assert c.store(bundle, b.head()) is False                   # idempotent
    assert c.store(b"", revs[0]) is False                       # older head: nothing to do
    assert all(c.has(r) for r in revs)
    c.apply(c.head())
    assert c.applied_rev() == b.head() and live_tree(c) == live_tree(a)
    assert b.bundle_since(b.head()) == b""
    with MemberRepo(tmp_path / "other", "n1") as other:
        other.bootstrap(None, AUTHOR)
        # a bundle that needs commits the receiver lacks
        (other.conf / "global" / "z.toml").write_text("z = 1\n")
        p = other.prepare_commit("z", True, AUTHOR)
        with pytest.raises(OutOfDate, match="lacks"):
            c.store(p.bundle, p.rev)
        # a head from another history is refused
        with pytest.raises(NotFastForward, match="refusing non-fast-forward"):
            c.store(other.bundle_since(None), other.head())
        assert c.head() == b.head()


def test_revert(members):
    a, b, c = members
    r1 = commit_on(a, b, [a, b, c], {"global/x.toml": "v = 1\n"}, "v1")
    r2 = commit_on(a, b, [a, b, c], {"global/x.toml": "v = 2\n", "default/y.toml": "y = 1\n"}, "v2")
    prop = c.revert_proposal(r2, AUTHOR)
    assert prop.parent == r2
    assert c.head() == r2                                     # a proposal moves nothing
    b.accept(prop.bundle, prop.rev, prop.parent)
    replicate(b, [a, b, c])
    for m in members:
        assert (m.conf / "global" / "x.toml").read_text() == "v = 1\n"
        assert not (m.conf / "default" / "y.toml").exists()
    assert b.log(1)[0]["subject"] == 'Revert "v2"'
    assert "-v = 2" in a.diff(prop.rev) and "+v = 1" in a.diff(prop.rev)
    with pytest.raises(ConfigRepoError, match="initial commit"):
        a.revert_proposal(a.log(10)[-1]["rev"], AUTHOR)
    with pytest.raises(ConfigRepoError, match="unknown revision"):
        a.revert_proposal("deadbeef", AUTHOR)
    assert r1 in [e["rev"] for e in a.log(10)]


def test_plugin_validators(members, monkeypatch):
    a, b, c = members

    def no_forbidden(path: str, data: bytes):
        return [(i, "the word 'forbidden' is not allowed") for i, line in
                enumerate(data.splitlines(), 1) if b"forbidden" in line]

    def crashes(path: str, data: bytes):
        raise RuntimeError("plug-in bug")

    strict = MemberRepo(b.data_dir, "n2", validators=[no_forbidden])
    try:
        base = strict.head()
        (a.conf / "default" / "policy.txt").write_text("ok\nforbidden word\n")
        prop = a.prepare_commit("policy", True, AUTHOR)          # a has no such validator
        with pytest.raises(ValidationFailed, match=r"default/policy.txt:2: the word 'forbidden'"):
            strict.accept(prop.bundle, prop.rev, prop.parent)
        assert strict.head() == base == b.head()
        assert [str(e) for e in validate_tree(a, prop.rev, [no_forbidden])] == [
            "default/policy.txt:2: the word 'forbidden' is not allowed"]
        # a validator that crashes is reported against the file, not raised
        errs = validate_tree(a.repo, prop.rev, [crashes])
        assert errs and all("validator crashes failed: RuntimeError: plug-in bug" in e.reason for e in errs)
        # validators from the ecluster.validators entry-point group are honoured too
        monkeypatch.setattr(configrepo, "_plugin_validators", [no_forbidden])
        with pytest.raises(ValidationFailed, match="policy.txt:2"):
            b.accept(prop.bundle, prop.rev, prop.parent)
        assert b.head() == base
    finally:
        strict.close()


# ----------------------------------------------------------------------------- bad input

def test_bad_input_gets_clear_errors(members):
    a, b, c = members
    head = b.head()
    for call, exc, pat in [
        (lambda: b.accept(b"garbage", "1" * 40, head), BadBundle, "does not carry|not a usable bundle"),
        (lambda: b.accept(b"", "1" * 40, head), BadBundle, "bundle is empty"),
        (lambda: b.accept(b"x", "HEAD", head), ConfigRepoError, "bad new head"),
        (lambda: b.store(b"x", "not-a-sha"), ConfigRepoError, "bad new head"),
        (lambda: b.apply("no-such-rev"), ConfigRepoError, "unknown revision"),
        (lambda: b.log(0), ConfigRepoError, "bad count"),
        (lambda: b.diff("--output=/tmp/x"), ConfigRepoError, "bad revision"),
        (lambda: a.prepare_commit("", True, AUTHOR), ConfigRepoError, "empty commit message"),
        (lambda: b.clone_from_bundle(b"junk"), BadBundle, "not a usable bundle"),
    ]:
        with pytest.raises(exc, match=pat) as ei:
            call()
        assert "\n" not in str(ei.value)
    (a.conf / "global" / "q.toml").write_text("q = 1\n")
    with pytest.raises(ConfigRepoError, match="bad author"):
        a.prepare_commit("m", True, "<>")
    prop = a.prepare_commit("q", True, AUTHOR)
    with pytest.raises(BadBundle, match="cannot fetch bundle"):       # header intact, pack cut short
        b.accept(prop.bundle[:-30], prop.rev, prop.parent)
    assert b.head() == head and not b.has(prop.rev) and not b.has("1" * 40) and not b.has("zz")
    b.accept(prop.bundle, prop.rev, prop.parent)
    assert b.head() == prop.rev


# ----------------------------------------------------------------------------- pure helpers

def test_pure_helpers():
    assert local_conflicts({"a": b"1", "b": None, "c": b"3"}, {"a": b"1", "b": b"x", "c": None}) == ["b", "c"]
    assert local_conflicts({"a": None}, {"a": None}) == []
    assert parse_status_z(" M a\0?? b c\0D  d\0") == (["a", "d"], ["b c"])
    assert next_checkout_name(["abc-1", "abd-7", "junk"], "f" * 40) == "ffffffffffff-8"
    assert find_key_line('[cluster]\nname = "x"\n\n[nodes.n1]\nport = 1\n', "unknown key 'nodes.n1.port'") == 5
    assert find_key_line("a = 1\n", "missing table '[cluster]'") == 0
    errs = run_validators({"x.toml": b"a = 1\nb = [\n", "y.json": b"[1,\n2,]", "z.txt": b"\xff"}, [])
    assert [(e.file, e.line) for e in errs] == [("x.toml", 3), ("y.json", 2)]
    assert str(ValidationError("f", 2, "r")) == "f:2: r"
    sha = "a" * 40
    assert bundle_heads(f"# v2 git bundle\n-{'b' * 40} base\n{sha} refs/heads/main\n\nPACK".encode()) == {
        "refs/heads/main": sha}
    for junk in (b"", b"PACK", b"# v2 git bundle\nnot-a-sha ref\n\n"):
        with pytest.raises(BadBundle):
            bundle_heads(junk)
    assert run_validators({"u.toml": b"a = 1\n\xff = 2\n"}, [])[0].line == 2


def test_commit_to_apply_is_fast(members):
    """Guard rail for the 0.3 s end-to-end target: the git side of one change on three members."""
    a, b, c = members
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        commit_on(a, b, [a, b, c], {"global/bench.toml": f"i = {i}\n"}, f"bench {i}")
        times.append(time.perf_counter() - t0)
    assert sorted(times)[2] < 1.0, times
