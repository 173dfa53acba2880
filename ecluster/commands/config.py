"""``ecluster config ...`` / ``eccfg ...``: the cluster's configuration repository.

Each command talks to a member's ``configsync`` service (over its ipc socket when the
member runs on this machine, else over tcp with the admin key), or, for the read-only
commands, reads a working copy directly (``--wc DIR``: a member's ``conf`` directory).
See docs/CONFIG.md.
"""
from __future__ import annotations

import contextlib
import getpass
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator

import typer

from ecluster.commands.common import CliError, ConfigOpt, JsonOpt, die, load, member_client, new_app, print_json

HELP = """The cluster's configuration: a git repository every member applies (eccfg).

Edit files in a member's live copy (<data_dir>/conf), then commit them from that
member: the coordinator orders, validates and replicates the commit, and every member
applies it. Files are looked up in global/, then <node>/, then default/.

Every command takes --config FILE --member NAME, or --wc DIR (a member's conf
directory; the read-only commands status, log, diff and show then read it directly).

Example: eccfg commit -c cluster.toml --member n1 -m "raise the connection limit"
"""

app = new_app(HELP)

MemberOpt = Annotated[str | None, typer.Option(
    "--member", "-m", metavar="NAME", help="The member whose configsync to talk to.")]
LongMemberOpt = Annotated[str | None, typer.Option(
    "--member", metavar="NAME", help="The member whose live copy to commit (-m is the message here).")]
WcOpt = Annotated[Path | None, typer.Option(
    "--wc", metavar="DIR", help="A working copy: a member's conf directory (instead of --member).")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", "-t", metavar="SECONDS", help="How long to wait for an answer.")]

SHORT = 12


# ----------------------------------------------------------------------------- where to act

@dataclass
class Target:
    """What a command acts on: a member over the bus, or a working copy on disk (or both)."""

    cluster: Any | None
    member: str | None
    data_dir: Path | None      # set with --wc


def data_dir_of_wc(wc: Path) -> Path:
    """The member data directory that working copy ``wc`` belongs to."""
    p = Path(wc).absolute()
    if not p.exists():
        die(f"{wc}: no such working copy")
    if (p / "config.git").is_dir():                 # the data directory itself
        return p
    if p.name == "conf" and (p.parent / "config.git").is_dir():
        return p.parent
    real = p.resolve()
    if real.parent.name == "conf.d" and (real.parent.parent / "config.git").is_dir():
        return real.parent.parent
    die(f"{wc}: not a working copy (expected a member's <data_dir>/conf)")


def resolve_target(config: Path | None, member: str | None, wc: Path | None, need_bus: bool) -> Target:
    """Decide from --config/--member/--wc; ``need_bus``: the command must reach a member."""
    if wc is not None:
        data_dir = data_dir_of_wc(wc)
        cluster = load(config) if (config is not None or need_bus) else None
        if cluster is not None and member is None:
            matches = [n for n, m in cluster.members.items() if Path(m.data_dir).resolve() == data_dir.resolve()]
            if not matches and need_bus:
                die(f"{wc}: no member of {cluster.path} has data directory {data_dir}")
            member = matches[0] if matches else None
        return Target(cluster, member, data_dir)
    cluster = load(config)
    if member is None:
        die("give --member NAME (or --wc DIR)", 2)
    cluster.member(member)
    return Target(cluster, member, None)


@contextlib.contextmanager
def repo_errors() -> Iterator[None]:
    """Repository and remote errors as one-line CLI errors."""
    from bus.client import RemoteError
    from node.configrepo import ConfigRepoError
    try:
        yield
    except ConfigRepoError as e:
        raise CliError(str(e)) from None
    except RemoteError as e:
        raise CliError(e.message or e.code) from None


def rpc(t: Target, method: str, timeout: float, **args) -> Any:
    """Call ``configsync.<method>`` on the target member (ipc if local, else tcp + admin key)."""
    with repo_errors(), member_client(t.cluster, t.member) as c:
        return c.call(t.member, "configsync", method, timeout=timeout, **args)


@contextlib.contextmanager
def local_repo(t: Target) -> Iterator[Any]:
    from node.configrepo import MemberRepo
    with repo_errors(), MemberRepo(t.data_dir, t.member or "wc") as r:
        yield r


def read_only(t: Target, from_repo: Callable[[Any], Any], method: str, timeout: float, **args) -> Any:
    """A read-only command's answer: ``from_repo(repo)`` on the working copy (--wc), else
    ``configsync.<method>(**args)`` on the member."""
    if t.data_dir is not None:
        with local_repo(t) as r:
            return from_repo(r)
    return rpc(t, method, timeout, **args)


def author() -> str:
    """``user <user@host>`` of whoever runs the command."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "operator"
    return f"{user} <{user}@{socket.gethostname()}>"


def short(rev: str | None) -> str:
    return rev[:SHORT] if rev else "-"


# ----------------------------------------------------------------------------- commands

@app.command("bootstrap")
def bootstrap(config: ConfigOpt = None, member: MemberOpt = None,
              timeout: TimeoutOpt = 30.0):
    """Create the cluster's repository with the cluster file as global/cluster.toml.

    Done once per cluster, through the coordinator; every member then holds and applies
    it. Running it again with the same cluster file does nothing.

    Example: eccfg bootstrap -c cluster.toml -m n1
    """
    t = resolve_target(config, member, None, need_bus=True)
    text = Path(t.cluster.path).read_text()
    r = rpc(t, "bootstrap", timeout, cluster_text=text, author=author())
    what = "created" if r.get("created") else "already bootstrapped"
    typer.echo(f"{what}: {short(r.get('rev'))}; {t.member} applied {short(r.get('applied'))}")


@app.command("status")
def status(config: ConfigOpt = None, member: MemberOpt = None, wc: WcOpt = None,
           cluster_wide: Annotated[bool, typer.Option("--cluster", help="Every member's applied revision and state.")] = False,
           json_: JsonOpt = False, timeout: TimeoutOpt = 5.0):
    """Show the applied revision and state (in sync, behind, modified locally, not bootstrapped).

    With --cluster, ask every member (one that does not answer shows as unreachable).

    Example: eccfg status -c cluster.toml -m n1 --cluster --json
    """
    t = resolve_target(config, member, wc, need_bus=cluster_wide or wc is None)
    if cluster_wide:
        rep = rpc(t, "cluster_status", timeout)
        if json_:
            print_json(rep)
            return
        show_cluster(rep)
        return
    if wc is not None:
        rep = wc_status(t)
    else:
        rep = rpc(t, "status", timeout)
    if json_:
        print_json(rep)
        return
    typer.echo(f"{rep['member']}: {rep['state']} at {short(rep.get('rev'))}"
               + (f" (head {short(rep.get('head'))})" if rep.get("head") != rep.get("rev") else "")
               + (f", coordinator {rep['coordinator']}" if rep.get("coordinator") else ""))
    for f in rep.get("modified", []):
        typer.echo(f"  modified:  {f}")
    for f in rep.get("untracked", []):
        typer.echo(f"  untracked: {f}")


def wc_status(t: Target) -> dict:
    """Status of a working copy read from disk (no bus: the committed head is not known)."""
    from services.configsync import member_state
    with local_repo(t) as r:
        if not r.bootstrapped:
            return {"member": t.member or str(t.data_dir), "state": "not bootstrapped", "rev": None, "head": None}
        st = r.status()
    local = bool(st["modified"] or st["untracked"])
    return {"member": t.member or str(t.data_dir), "rev": st["rev"], "head": st["head"],
            "state": member_state(True, local, st["rev"], st["head"]),
            "modified": st["modified"], "untracked": st["untracked"]}


def show_cluster(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    colour = {"in sync": "green", "behind": "yellow", "modified locally": "magenta",
              "not bootstrapped": "yellow", "unreachable": "red"}
    t = Table(title=f"configuration: coordinator {rep.get('coordinator') or 'unknown'}, "
                    f"committed {short(rep.get('committed'))}")
    for col in ("member", "role", "applied", "state"):
        t.add_column(col)
    for m in rep["members"]:
        c = colour.get(m["state"], "white")
        t.add_row(m["member"], m.get("role", ""), short(m.get("rev")), f"[{c}]{m['state']}[/]")
    Console().print(t)


@app.command("commit")
def commit(message: Annotated[str, typer.Option("--message", "-m", metavar="MSG", help="The commit message.")] = ...,
           add_all: Annotated[bool, typer.Option("--add-all", "-a", help="Also take new (untracked) files.")] = False,
           config: ConfigOpt = None, member: LongMemberOpt = None, wc: WcOpt = None,
           timeout: TimeoutOpt = 30.0):
    """Commit the edits of a member's live copy, for the whole cluster.

    Changed and deleted files are taken; new files only with --add-all. The commit is
    refused when the live copy is not at the newest revision ("out of date: run eccfg
    pull") or when a file does not validate (file:line: reason); it succeeds only once a
    majority of the cluster holds it.

    Example: eccfg commit -c cluster.toml --member n1 -m "new relay domain" --add-all
    """
    t = resolve_target(config, member, wc, need_bus=True)
    r = rpc(t, "commit", timeout, message=message, add_all=add_all, author=author())
    where = f"applied on {t.member}" if r.get("applied") else f"not yet applied on {t.member}"
    typer.echo(f"committed {short(r['rev'])} (term {r.get('term')}, height {r.get('height')}); {where}")


@app.command("pull")
def pull(config: ConfigOpt = None, member: MemberOpt = None, wc: WcOpt = None,
         theirs: Annotated[bool, typer.Option("--theirs", help="Discard local edits in the live copy.")] = False,
         timeout: TimeoutOpt = 15.0):
    """Fetch the newest committed revision and apply it to the live copy.

    A live copy edited by hand is left alone ("modified locally") unless --theirs.

    Example: eccfg pull -c cluster.toml -m n2 --theirs
    """
    t = resolve_target(config, member, wc, need_bus=True)
    r = rpc(t, "pull", timeout, theirs=theirs)
    typer.echo(f"{r['member']}: {'now at' if r.get('changed') else 'already at'} {short(r.get('rev'))}")


@app.command("log")
def log_(config: ConfigOpt = None, member: MemberOpt = None, wc: WcOpt = None,
         count: Annotated[int, typer.Option("--count", "-n", metavar="N", min=1, help="How many commits.")] = 10,
         json_: JsonOpt = False, timeout: TimeoutOpt = 5.0):
    """List the newest commits of the repository, newest first.

    Example: eccfg log -c cluster.toml -m n1 -n 5
    """
    t = resolve_target(config, member, wc, need_bus=False)
    entries = read_only(t, lambda r: r.log(count), "log", timeout, n=count)
    if json_:
        print_json(entries)
        return
    for e in entries:
        when = datetime.fromtimestamp(e["time"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(f"{short(e['rev'])}  {when}  {e['author']}  {e['subject']}")


@app.command("diff")
def diff(rev: Annotated[str | None, typer.Argument(metavar="[REV]", help="A commit (default: the live copy's edits).")] = None,
         config: ConfigOpt = None, member: MemberOpt = None, wc: WcOpt = None, timeout: TimeoutOpt = 5.0):
    """Show the live copy's uncommitted edits, or what commit REV changed.

    Example: eccfg diff -c cluster.toml -m n1 HEAD~1
    """
    t = resolve_target(config, member, wc, need_bus=False)
    text = read_only(t, lambda r: r.diff(rev), "diff", timeout, rev=rev)
    typer.echo(text, nl=not text.endswith("\n"))


@app.command("revert")
def revert(rev: Annotated[str, typer.Argument(metavar="REV", help="The commit to undo.")],
           config: ConfigOpt = None, member: MemberOpt = None, wc: WcOpt = None, timeout: TimeoutOpt = 30.0):
    """Commit the inverse of REV (like git revert), for the whole cluster.

    Example: eccfg revert -c cluster.toml -m n1 3f2a9c1e
    """
    t = resolve_target(config, member, wc, need_bus=True)
    r = rpc(t, "revert", timeout, rev=rev, author=author())
    typer.echo(f"reverted {rev} as {short(r['rev'])} (term {r.get('term')}, height {r.get('height')})")


@app.command("show")
def show(config: ConfigOpt = None, member: MemberOpt = None, wc: WcOpt = None,
         node: Annotated[str | None, typer.Option("--node", "-n", metavar="NODE",
                                                  help="Resolve for this node (default: the member).")] = None,
         rev: Annotated[str | None, typer.Option("--rev", metavar="REV", help="At this commit (default: the live copy).")] = None,
         json_: JsonOpt = False, timeout: TimeoutOpt = 5.0):
    """Show which file each configuration name resolves to on a node.

    Search order: global/NAME, then NODE/NAME, then default/NAME; the first found wins,
    the others are shadowed.

    Example: eccfg show -c cluster.toml -m n1 --node n2
    """
    t = resolve_target(config, member, wc, need_bus=False)
    target_node = node or t.member
    if t.data_dir is not None and target_node is None:
        die("give --node NODE with --wc", 2)

    def from_repo(r) -> dict:
        from node.configrepo import check_node_name
        check_node_name(target_node)
        table = r.resolution_table(target_node, rev)
        return {"node": target_node, "rev": rev, "files": [{"name": n, "file": w, "shadowed": s} for n, w, s in table]}

    rep = read_only(t, from_repo, "show", timeout, node=node, rev=rev)
    if json_:
        print_json(rep)
        return
    if not rep["files"]:
        typer.echo(f"no configuration files for {rep['node']}")
    width = max((len(f["name"]) for f in rep["files"]), default=0)
    for f in rep["files"]:
        shadow = f"   (shadows {', '.join(f['shadowed'])})" if f["shadowed"] else ""
        typer.echo(f"{f['name']:<{width}}  ->  {f['file']}{shadow}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="config")


__all__ = ["app", "register", "data_dir_of_wc", "resolve_target"]
