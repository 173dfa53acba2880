"""``ecluster demo``: a whole cluster with mail flowing, and ``demo kill|start NODE`` to play with it.

The work is done by :mod:`ecluster.demo`; this module is the command line.
"""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from ecluster.commands.common import die

HELP = """Run a whole cluster on this machine with mail flowing through it (what `make demo` runs).

As root: a network-namespace lab with three nodes, a manager and a client, two VIPs
plumbed for real, the SMTP plug-in listening on them (port 25) and a stream of mail from
the client. Without root: the same cluster on 127.0.0.11-14 with VIP plumbing in dry-run
(port 2525). It prints the web console's address, a status table, and what to try (kill
a node, move a VIP, commit a config, run a CIDR query). Ctrl-C stops it and removes
every process, namespace and file it made. With --mta postfix (root only) the nodes run
Debian's Postfix behind the VIPs instead, delivering into Maildirs.

Example: ecluster demo --duration 60
"""

DirOpt = Annotated[Path | None, typer.Option(
    "--dir", metavar="DIR", help="The demo's work directory (default /tmp/ecluster-demo-<uid>).")]


class MtaName(str, enum.Enum):
    smtp = "smtp"
    postfix = "postfix"


app = typer.Typer(help=HELP, invoke_without_command=True, no_args_is_help=False, pretty_exceptions_enable=False,
                  add_completion=False, rich_markup_mode="rich")


def _workdir(d: Path | None) -> Path:
    from ecluster.demo import default_workdir
    return (d or default_workdir()).absolute()


@app.callback()
def demo(ctx: typer.Context,
         duration: Annotated[float | None, typer.Option(
             "--duration", metavar="SECONDS", min=1,
             help="Stop by itself after this many seconds of running (default: until Ctrl-C).")] = None,
         workdir: DirOpt = None,
         loopback: Annotated[bool, typer.Option(
             "--loopback", help="Use loopback addresses and VIP dry-run even as root.")] = False,
         keep: Annotated[bool, typer.Option("--keep", help="Keep the work directory (logs) at the end.")] = False,
         mta: Annotated[MtaName, typer.Option(
             "--mta", metavar="MTA",
             help="The MTA on the nodes: smtp (the example plug-in) or postfix (Debian's Postfix; "
                  "needs root and the postfix package).")] = MtaName.smtp):
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"workdir": workdir}      # `demo --dir X kill n1` means the demo in X too
        return
    from ecluster.demo import DemoError, run
    try:
        status = run(duration, _workdir(workdir), force_loopback=loopback, keep=keep, mta=mta.value)
    except DemoError as e:
        die(str(e), e.code)
    raise typer.Exit(status)


@app.command("kill")
def kill(ctx: typer.Context,
         node: Annotated[str, typer.Argument(metavar="MEMBER", help="The member to kill (n1, n2, n3, m1).")],
         workdir: DirOpt = None):
    """Kill -9 every process of a member of the running demo, as if its machine died.

    In namespace mode that is everything in its namespace; on loopback, its runner,
    supervisord and services. Its VIP moves to another node and the mail goes on.

    Example: ecluster demo kill n1
    """
    from ecluster.demo import DemoError, kill_member
    try:
        n = kill_member(_workdir(workdir or (ctx.obj or {}).get("workdir")), node)
    except DemoError as e:
        die(str(e))
    typer.echo(f"killed {n} process(es) of {node}" if n else f"{node} was not running")


@app.command("start")
def start(ctx: typer.Context,
          node: Annotated[str, typer.Argument(metavar="MEMBER", help="The member to start (n1, n2, n3, m1).")],
          workdir: DirOpt = None):
    """Start a member of the running demo again (after `ecluster demo kill`).

    Example: ecluster demo start n1
    """
    from ecluster.demo import DemoError, start_member
    try:
        pid = start_member(_workdir(workdir or (ctx.obj or {}).get("workdir")), node)
    except DemoError as e:
        die(str(e))
    typer.echo(f"started {node} (pid {pid}); it rejoins in a few seconds")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="demo")
