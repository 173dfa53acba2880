"""``ecluster node run``: run one node (its supervisord and every program under it)."""
from __future__ import annotations

from typing import Annotated

import typer

from ecluster.commands.common import SESSION, ConfigOpt, KeysOpt, die, load, new_app

app = new_app("Run a node.")


def run_role(config, name: str, role: str, keys=None) -> int:
    """Shared by ``node run`` and ``manager run``: check the role, then become the runner
    (``node.program member run``, exec'd: same pid, without the CLI's modules, which the
    runner would otherwise keep in memory for the member's whole life)."""
    import os
    import sys
    if keys is not None:
        SESSION["keys"] = keys
    cluster = load(config)
    m = cluster.member(name)
    if m.role != role:
        other = "manager" if role == "node" else "node"
        die(f"{name} is a {m.role}, not a {role} (use: ecluster {other} run)")
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "node.program", "--keys", str(cluster.keys_dir),
            "member", "run", "--config", str(config or cluster.path), "--member", name]
    os.execv(sys.executable, argv)
    return 1        # not reached


@app.command("run")
def node_run(config: ConfigOpt = None,
             node: Annotated[str, typer.Option("--node", "-n", metavar="NAME", help="The node to run.")] = ...,
             keys: KeysOpt = None):
    """Run a node in the foreground: supervisord with the broker and every service.

    Holds the data-directory lock (a second runner on the same directory refuses);
    SIGTERM stops every program and exits.

    Example: ecluster node run -c cluster.toml --node n1 --keys /etc/ecluster/keys
    """
    raise typer.Exit(run_role(config, node, "node", keys))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="node")
