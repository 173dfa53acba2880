"""``ecluster manager run``: run one manager (its supervisord and every program under it)."""
from __future__ import annotations

from typing import Annotated

import typer

from ecluster.commands.common import ConfigOpt, KeysOpt, new_app
from ecluster.commands.node import run_role

app = new_app("Run a manager.")


@app.command("run")
def manager_run(config: ConfigOpt = None,
                manager: Annotated[str, typer.Option("--manager", "-m", metavar="NAME",
                                                     help="The manager to run.")] = ...,
                keys: KeysOpt = None):
    """Run a manager in the foreground: supervisord with the broker and every service.

    Example: ecluster manager run -c cluster.toml --manager m1
    """
    raise typer.Exit(run_role(config, manager, "manager", keys))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="manager")
