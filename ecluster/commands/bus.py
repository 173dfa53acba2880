"""``ecluster bus run``: the member's bus broker."""
from __future__ import annotations

import logging
import sys

import typer

from ecluster.commands.common import ConfigOpt, MemberOpt, load, new_app

app = new_app("The message bus.")


@app.command("run")
def bus_run(config: ConfigOpt = None, member: MemberOpt = ...):
    """Run a member's bus broker in the foreground (supervisord does this for you).

    Holds <data_dir>/run/broker.lock: a second broker for the same member refuses.

    Example: ecluster bus run -c cluster.toml --member n1
    """
    from bus.broker import serve
    from node.datadir import broker_lock, ensure_data_dir
    cluster = load(config)
    m = cluster.member(member)
    ensure_data_dir(m, keep_search=True)      # what the runner or a plug-in set stays
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    with broker_lock(m):
        serve(cluster, member)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="bus")
