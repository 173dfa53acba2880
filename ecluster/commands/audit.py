"""``ecluster audit add``: count audit events on a node's as_logger (for scripts and tests)."""
from __future__ import annotations

from typing import Annotated

import typer

from ecluster.commands.common import ConfigOpt, JsonOpt, MemberOpt, die, load, new_app, print_json, remote_client

app = new_app("Audit series (as_logger): count events by source address.")

DEFAULT_TIMEOUT = 3.0


@app.command("add")
def audit_add(series: Annotated[str, typer.Argument(metavar="SERIES", help="Series name, e.g. connections.")],
              address: Annotated[str, typer.Argument(metavar="ADDRESS", help="Source IPv4 or IPv6 address.")],
              count: Annotated[int, typer.Argument(metavar="COUNT", help="How many events (default 1).")] = 1,
              config: ConfigOpt = None, member: MemberOpt = ..., json_: JsonOpt = False,
              timeout: Annotated[float, typer.Option("--timeout", "-t", metavar="SECONDS",
                                                     help="How long to wait for the node.")] = DEFAULT_TIMEOUT):
    """Count COUNT events of SERIES from ADDRESS in the current window of node --member.

    Example: ecluster audit add -c cluster.toml --member n1 connections 10.1.2.3 5
    """
    cluster = load(config)
    m = cluster.member(member)
    if m.role != "node":
        die(f"{member} is a {m.role}: as_logger runs on nodes ({', '.join(cluster.nodes)})")
    with remote_client(cluster, m.name) as c:
        rep = c.call(m.name, "as_logger", "add", timeout=timeout, series=series, address=address, count=count)
    if json_:
        print_json(rep)
    elif rep.get("ignored"):
        typer.echo(f"{m.name}: series {series!r} is not logged (series_include/series_exclude): ignored")
    else:
        typer.echo(f"{m.name}: counted {rep.get('counted')} {series} event(s) from {address}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="audit")
