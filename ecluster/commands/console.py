"""``ecluster console url``: the link to a manager's web console, token included."""
from __future__ import annotations

from typing import Annotated

import typer

from ecluster.commands.common import ConfigOpt, die, load, new_app

app = new_app("The web console every manager serves.")


@app.command("url")
def console_url_cmd(config: ConfigOpt = None,
                    manager: Annotated[str, typer.Option("--manager", "-M", metavar="NAME",
                                                         help="The manager whose console to open.")] = ...):
    """Print the console's address with its token, ready to open (makes the token if missing).

    Example: ecluster console url -c cluster.toml --manager m1
    """
    from manager.console.auth import TokenError, ensure_token
    from services.console import console_url
    cluster = load(config)
    m = cluster.member(manager)
    if m.role != "manager":
        die(f"{manager} is a node: the console is served by managers ({', '.join(cluster.managers) or 'none'})")
    try:
        token = ensure_token(cluster.keys_dir)
    except TokenError as e:
        die(str(e))
    address = m.console_address
    if address in ("0.0.0.0", "::"):
        address = m.address        # listening everywhere: the member's own address reaches it
    typer.echo(console_url(address, m.console_port, token))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="console")
