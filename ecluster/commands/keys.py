"""``ecluster keys init|list``: the cluster's CURVE key pairs."""
from __future__ import annotations

from typing import Annotated

import typer

from ecluster.commands.common import ConfigOpt, JsonOpt, load, new_app, print_json

app = new_app("CURVE key pairs: one per member and one for the admin CLI.")


@app.command("init")
def keys_init(config: ConfigOpt = None,
              force: Annotated[bool, typer.Option("--force", help="Regenerate pairs that exist.")] = False):
    """Create a key pair for every member and for `admin`; existing pairs are kept.

    After --force, restart the brokers (or call bus.reload_keys) to use the new keys.

    Example: ecluster keys init -c cluster.toml
    """
    from bus import keys as keymod
    cluster = load(config)
    for name in [*cluster.members, keymod.ADMIN]:
        existed = (cluster.keys_dir / f"{name}.key_secret").exists()
        keymod.create(cluster.keys_dir, name, overwrite=force)
        state = ("regenerated" if force else "kept") if existed else "created"
        typer.echo(f"{name}: {state}")
    typer.echo(f"keys in {cluster.keys_dir}")


def key_rows(cluster) -> list[dict]:
    """One row per expected name (members, admin) and per extra public key found."""
    from bus import keys as keymod
    found = {name: public for public, name in keymod.public_keys(cluster.keys_dir).items()}
    rows = []
    expected = {**{n: m.role for n, m in cluster.members.items()}, keymod.ADMIN: "admin"}
    for name in [*expected, *sorted(set(found) - set(expected))]:
        public = found.get(name)
        rows.append({
            "name": name,
            "role": expected.get(name, "not in the cluster file"),
            "public": public.decode() if public else None,
            "secret": (cluster.keys_dir / f"{name}.key_secret").exists(),
        })
    return rows


@app.command("list")
def keys_list(config: ConfigOpt = None, json_: JsonOpt = False):
    """List the key pairs: who they belong to, public key, whether the secret is here.

    Example: ecluster keys list -c cluster.toml --json
    """
    cluster = load(config)
    rows = key_rows(cluster)
    if json_:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"keys in {cluster.keys_dir}")
    for col in ("name", "role", "public key", "secret"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["role"], r["public"] or "[red]missing[/red]", "yes" if r["secret"] else "no")
    Console().print(t)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="keys")
