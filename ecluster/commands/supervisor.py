"""``ecluster supervisor-conf``: print a member's supervisord configuration."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ecluster.commands.common import ConfigOpt, MemberOpt, load


def supervisor_conf_cmd(config: ConfigOpt = None, member: MemberOpt = ...,
                        output: Annotated[Path | None, typer.Option(
                            "--output", "-o", metavar="FILE", help="Write to FILE instead of stdout.")] = None):
    """Print the supervisord configuration of a member: one program per process.

    The broker (priority 10) and every service that runs there, plug-ins included
    (priority 20); `ecluster node run` writes and uses the same file.

    Example: ecluster supervisor-conf -c cluster.toml --member n1 > n1.conf
    """
    from node.supervisor import supervisor_conf
    cluster = load(config)
    text = supervisor_conf(cluster, member, config.resolve())
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)


def register(root: typer.Typer) -> None:
    root.command("supervisor-conf")(supervisor_conf_cmd)
