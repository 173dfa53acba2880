"""``ecluster service run|list``: one service process, and what runs where."""
from __future__ import annotations

from typing import Annotated

import typer

from ecluster.commands.common import ConfigOpt, JsonOpt, MemberOpt, die, load, new_app, print_json

app = new_app("Run or list services (built-ins and plug-ins).")


@app.command("run")
def service_run(name: Annotated[str, typer.Argument(metavar="NAME", help="The service to run.")],
                config: ConfigOpt = None, member: MemberOpt = ...):
    """Run one service of a member in the foreground (supervisord does this for you).

    Example: ecluster service run control -c cluster.toml --member n1
    """
    from node.program import ProgramError, run_one_service
    cluster = load(config)
    try:
        run_one_service(cluster, member, name)
    except ProgramError as e:
        die(str(e))


@app.command("list")
def service_list(config: ConfigOpt = None, member: MemberOpt = ..., json_: JsonOpt = False):
    """List the services that run on a member.

    Example: ecluster service list -c cluster.toml --member n1
    """
    from services.base import load_service, services_for
    cluster = load(config)
    cluster.member(member)
    names = services_for(cluster, member)
    rows = []
    for n in names:
        cls = load_service(n)
        rows.append({"name": n, "kind": "built-in" if cls.builtin else "plug-in",
                     "module": f"{cls.__module__}:{cls.__qualname__}"})
    if json_:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"services on {member}")
    for col in ("name", "kind", "module"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["kind"], r["module"])
    Console().print(t)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="service")
