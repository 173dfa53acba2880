"""``ecluster keys init|list|rotate``: the cluster's CURVE key pairs."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Callable

import typer

from ecluster.commands.common import (ConfigOpt, JsonOpt, OptionalMemberOpt, die, identity, load, new_app,
                                      print_json, remote_client)

app = new_app("CURVE key pairs: one per member and one for the admin CLI.")

CALL_TIMEOUT = 5.0          # s for each bus call of a rotation
SWITCH_TIMEOUT = 15.0       # s for a member to answer with its new key


@app.command("init")
def keys_init(config: ConfigOpt = None,
              force: Annotated[bool, typer.Option("--force", help="Regenerate pairs that exist.")] = False):
    """Create a key pair for every member and for `admin`; existing pairs are kept.

    After --force, restart the brokers (or call bus.reload_keys) to use the new keys;
    to change keys on a running cluster use `ecluster keys rotate` instead.

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


@app.command("bundle")
def keys_bundle(out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR",
                                                  help="A new directory to write the bundle into.")],
                config: ConfigOpt = None, member: OptionalMemberOpt = None,
                admin: Annotated[bool, typer.Option("--admin", help="The bundle of the host the operator runs "
                                                    "the CLI on: the admin (or --identity) secret.")] = False):
    """Write the key directory one host needs, and nothing more.

    --member NAME: NAME's secret key and every public key (members and admin), for the
    host that runs NAME (start it with `--keys DIR`). --admin: the admin secret (or the
    one of `ecluster --identity NAME`) and every public key, for the operator's machine.
    The directory is 0700, secrets 0600; a stolen node bundle is one node, not the cluster.

    Example: ecluster keys bundle -c cluster.toml --member n1 --out /tmp/n1-keys
    """
    from bus import keys as keymod
    cluster = load(config)
    if (member is None) == (not admin):
        die("give exactly one of --member NAME or --admin", 2)
    if member is not None:
        cluster.member(member)
        name = member
    else:
        name = identity()
        if name in cluster.members:
            die(f"{name!r} is a member: use --member {name}", 2)
    try:
        files = keymod.bundle(cluster.keys_dir, out, name)
    except keymod.KeyError_ as e:
        die(str(e))
    missing = [n for n in [*cluster.members, keymod.ADMIN] if f"{n}.key" not in files]
    typer.echo(f"{out}: {name}'s secret key and {len(files) - 1} public keys")
    if missing:
        typer.echo(f"warning: no public key for {', '.join(missing)} (run: ecluster keys init)", err=True)


def key_rows(cluster) -> list[dict]:
    """One row per expected name (members, admin) and per extra name found: its current
    public key, whether its secret is here, and a rotation in progress (staged / old key)."""
    from bus import keys as keymod
    d = cluster.keys_dir
    found = set(keymod.public_keys(d).values())
    expected = {**{n: m.role for n, m in cluster.members.items()}, keymod.ADMIN: "admin"}
    rows = []
    for name in [*expected, *sorted(found - set(expected))]:
        try:
            public = keymod.load(d, name, secret=False).public.decode()
        except keymod.KeyError_:
            public = None
        rows.append({
            "name": name,
            "role": expected.get(name, "not in the cluster file"),
            "public": public,
            "secret": (d / f"{name}.key_secret").exists(),
            "staged": (d / f"{name}.{keymod.NEXT}.key").exists(),
            "old": (d / f"{name}.{keymod.OLD}.key").exists(),
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
    for col in ("name", "role", "public key", "secret", "rotation"):
        t.add_column(col)
    for r in rows:
        rotation = ", ".join(w for w, on in (("staged", r["staged"]), ("old key kept", r["old"])) if on)
        t.add_row(r["name"], r["role"], r["public"] or "[red]missing[/red]", "yes" if r["secret"] else "no",
                  rotation or "-")
    Console().print(t)


# -- rotation --------------------------------------------------------------------------------

def rotation_plan(members: list[str], admin: str, only: str | None) -> list[tuple]:
    """The steps of a rotation, in order. Pure.

    Steps: ``("stage", name)``, ``("reload",)``, ``("relink", peer, member)``,
    ``("switch", member)``, ``("wait", member)``, ``("promote", name)``,
    ``("retire", name)``. For each member in turn its peers first link to its staged
    public key (their calls to it queue meanwhile), then it switches to its staged pair,
    then the staged pair becomes its current one. The admin key is promoted last; old
    public keys are forgotten, everywhere, only at the end.
    """
    names = [only] if only else list(dict.fromkeys([*members, admin]))
    switched = [n for n in names if n in members]
    steps: list[tuple] = [("stage", n) for n in names] + [("reload",)]
    for m in switched:
        steps += [("relink", p, m) for p in members if p != m]
        steps += [("switch", m), ("wait", m), ("promote", m)]
    steps += [("promote", n) for n in names if n not in members]
    steps += [("retire", n) for n in names] + [("reload",)]
    return steps


def rotate_keys(cluster, only: str | None = None, echo: Callable[[str], None] = lambda s: None) -> list[str]:
    """Rotate the key pairs of every member and the admin key (or only ``only``'s) on a
    running cluster, with no call failing on the way. Returns the names rotated.

    Works with a bundle per host (docs/SECURITY.md): each member makes its new pair on its
    own host (``bus.stage_key``) and only its public key travels, from here to every other
    broker (``bus.put_public``) and into this CLI's key directory; the admin's new pair is
    made here. Works the same when every host reads one shared directory (each step is
    idempotent). Every broker must be running. Raises RuntimeError (one line) when a step
    fails; the cluster keeps working and running the command again finishes the job.
    """
    from bus import keys as keymod
    from bus.client import BusError

    members = list(cluster.members)
    me = identity()
    if only is not None and only not in members and only != me:
        die(f"unknown member {only!r} (members: {', '.join(members)}, or {me})")
    d = cluster.keys_dir

    def call(target: str, method: str, via: str | None = None, **args):
        with remote_client(cluster, via or target) as c:
            return c.call(target, "bus", method, timeout=CALL_TIMEOUT, **args)

    def step(what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (BusError, keymod.KeyError_, OSError) as e:
            raise RuntimeError(f"key rotation stopped at {what}: {e} (run it again to finish)") from None

    for m in members:       # everyone must be there before anything changes
        step(f"checking {m}", call, m, "ping")
    staged: dict[str, str] = {}
    plan = rotation_plan(members, me, only)
    for s in plan:
        kind = s[0]
        if kind == "stage":
            name = s[1]
            if name in members:     # made on its own host: the secret never travels
                staged[name] = step(f"staging {name}", call, name, "stage_key")["public"]
                step(f"taking {name}'s new public key here", keymod.put_public, d, name, staged[name].encode())
            else:
                staged[name] = step(f"staging {name}", keymod.stage, d, name).public.decode()
            for m in members:
                if m != name:
                    step(f"giving {m} {name}'s new public key", call, m, "put_public", name=name, public=staged[name])
            echo(f"{name}: new key pair staged")
        elif kind == "reload":
            for m in members:
                step(f"reloading keys on {m}", call, m, "reload_keys")
            echo("every broker reloaded its keys")
        elif kind == "relink":
            peer, m = s[1], s[2]
            step(f"relinking {peer} to {m}", call, peer, "relink", peer=m, public=staged[m])
        elif kind == "switch":
            step(f"switching {s[1]}", call, s[1], "switch_keys", staged=True)
        elif kind == "wait":
            _wait_switched(cluster, s[1], call)
            echo(f"{s[1]}: switched to its new key")
        elif kind == "promote":
            name, public = s[1], staged[s[1]]
            # here first: this CLI must know a switched member's new key to reach it
            if name in members:
                step(f"promoting {name}'s key here", keymod.promote_public, d, name, public.encode())
            else:
                step(f"promoting {name}'s key here", keymod.promote_own, d, name, public.encode())
            for m in ([name] if name in members else []) + [m for m in members if m != name]:
                step(f"promoting {name}'s key on {m}", call, m, "promote_key", name=name, public=public)
        elif kind == "retire":
            keymod.retire(d, s[1])
            for m in members:
                step(f"retiring {s[1]}'s old key on {m}", call, m, "retire_key", name=s[1])
    echo("old keys removed")
    return [only] if only else [*members, me]


def _wait_switched(cluster, member: str, call) -> None:
    """Until every other member reaches ``member`` again (it answers with its new key)."""
    deadline = time.monotonic() + SWITCH_TIMEOUT
    for p in (p for p in cluster.members if p != member):
        while True:
            try:
                call(member, "ping", via=p)
                break
            except Exception as e:  # noqa: BLE001 - retried until the deadline, then reported
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"key rotation stopped: {member} does not answer {p} with its new key "
                                       f"({e}); run it again to finish") from None
                time.sleep(0.05)


@app.command("rotate")
def keys_rotate(config: ConfigOpt = None, member: OptionalMemberOpt = None):
    """Replace key pairs on a running cluster without downtime.

    Every member's pair and the admin key (or only --member's; `--member admin` for the
    admin key alone). A new pair is staged next to the current one, every broker accepts
    both, each member in turn switches to its new pair while its peers queue their
    calls to it for those milliseconds, then the old public keys are removed and
    reloaded everywhere: the old keys can no longer connect. Every broker must be
    running and read this key directory.

    Example: ecluster keys rotate -c cluster.toml
    """
    cluster = load(config)
    try:
        names = rotate_keys(cluster, member, echo=typer.echo)
    except RuntimeError as e:
        die(str(e))
    typer.echo(f"rotated: {', '.join(names)}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="keys")
