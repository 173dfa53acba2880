"""``ecluster bus run``: the member's bus broker."""
from __future__ import annotations

import typer

from ecluster.commands.common import ConfigOpt, MemberOpt, load, new_app

app = new_app("The message bus.")


@app.command("run")
def bus_run(config: ConfigOpt = None, member: MemberOpt = ...):
    """Run a member's bus broker in the foreground (supervisord does this for you).

    Holds <data_dir>/run/broker.lock: a second broker for the same member refuses.

    Example: ecluster bus run -c cluster.toml --member n1
    """
    from node.program import run_broker
    run_broker(load(config), member)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="bus")
