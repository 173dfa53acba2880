"""``ecluster vip list|move|unpin`` and ``ecluster node drain|undrain``: durable VIPs."""
from __future__ import annotations

from typing import Annotated, Any

import typer

from ecluster.commands.common import ConfigOpt, JsonOpt, die, first_answer, load, new_app, print_json, remote_client
from ecluster.commands.node import app as node_app

app = new_app("Durable VIPs: who owns each address, and moving them.")
TIMEOUT = 1.5


def ask_cluster(cluster, service: str, method: str, timeout: float = TIMEOUT, **args) -> Any:
    """Call ``service.method`` on the first member that answers (tcp, admin key).

    A reply that is an error (RemoteError) is the cluster's answer and is raised as is;
    only members that do not answer at all are skipped.
    """
    return first_answer(cluster, cluster.members,
                        lambda c, name: c.call(name, service, method, timeout=timeout, **args))


COORDINATOR_WAIT = 5.0     # s to find the coordinator while it changes


def ask_coordinator(cluster, method: str, timeout: float = TIMEOUT, **args) -> Any:
    """Call ``election.<method>`` on the coordinator itself, with this CLI's identity.

    Asked at another member, an operator's call would be forwarded under that member's
    name (a member never speaks for its caller: bus.roles), so a member that is not the
    coordinator answers ``not_coordinator`` and the coordinator is asked directly; while
    the coordinator changes, this retries for up to COORDINATOR_WAIT seconds."""
    import time

    from bus.client import CallTimeout, RemoteError
    deadline = time.monotonic() + COORDINATOR_WAIT
    while True:
        st = ask_cluster(cluster, "election", "status")
        leader = st.get("member") if st.get("role") == "leader" else st.get("leader")
        try:
            if not leader:
                raise RemoteError("no_coordinator", "no coordinator at the moment (no majority?)")
            with remote_client(cluster, leader) as c:
                return c.call(leader, "election", method, timeout=timeout, **args)
        except (CallTimeout, RemoteError) as e:
            retry = isinstance(e, CallTimeout) or e.code in ("not_coordinator", "no_coordinator", "unreachable")
            if not retry or time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def coordinator_status(cluster) -> dict:
    """The coordinator's election status (or the best member's view when there is none)."""
    st = ask_cluster(cluster, "election", "status")
    if st.get("role") != "leader" and st.get("leader"):
        try:
            with remote_client(cluster, st["member"]) as c:
                return c.call(st["leader"], "election", "status", timeout=TIMEOUT)
        except Exception:  # noqa: BLE001 - fall back to what the member knows
            return st
    return st


def vip_rows(st: dict) -> list[dict]:
    """Rows for ``vip list``. Pure."""
    return [{"address": r["address"], "kind": r["kind"], "owner": r["owner"], "state": r["state"],
             "holders": r["holders"], "candidates": r["candidates"], "preference": r["preference"],
             "follow": r["follow"], "pinned": r["pinned"], "settled_for": r["settled_for"],
             "avoided": r.get("avoided") or {},
             # nodes failing a health check that guards the VIP (not eligible for it there)
             "unhealthy": r.get("unhealthy") or [], "health": health_word(r)}
            for r in st.get("vips", [])]


def health_word(r: dict) -> str:
    """"unhealthy" when the VIP's owner or preferred node fails a check guarding it, else
    "ok". Pure."""
    bad = set(r.get("unhealthy") or [])
    return "unhealthy" if bad & {r.get("owner"), r.get("preference")} else "ok"


@app.command("list")
def vip_list(config: ConfigOpt = None, json_: JsonOpt = False):
    """List every VIP: owner, candidates, state (owned/unsafe/broken/unowned), seconds settled,
    nodes passed over for it because they could not keep it (seconds left), and nodes failing
    a health check that guards it ("unhealthy" when that is its owner or preferred node).

    Example: ecluster vip list -c cluster.toml --json
    """
    cluster = load(config)
    st = coordinator_status(cluster)
    rows = vip_rows(st)
    if json_:
        print_json({"coordinator": st.get("leader"), "term": st.get("term"), "vips": rows})
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"VIPs of {cluster.name} (coordinator {st.get('leader') or 'none'}, term {st.get('term')})")
    for col in ("address", "kind", "owner", "state", "candidates", "preference", "settled (s)", "passed over",
                "failing checks"):
        t.add_column(col)
    for r in rows:
        failing = ", ".join(r["unhealthy"]) or "-"
        t.add_row(r["address"], r["kind"], r["owner"] or "-", r["state"], ",".join(r["candidates"]),
                  r["preference"] or (f"follows {r['follow']}" if r["follow"] else "-"), f"{r['settled_for']:.1f}",
                  ", ".join(f"{n} ({left:.0f} s)" for n, left in r["avoided"].items()) or "-",
                  f"[red]unhealthy: {failing}[/]" if r["health"] == "unhealthy" else failing)
    Console().print(t)


@app.command("move")
def vip_move(address: Annotated[str, typer.Argument(help="The VIP, e.g. 10.99.0.100")],
             node: Annotated[str, typer.Argument(help="The node to move it to")],
             config: ConfigOpt = None, json_: JsonOpt = False):
    """Move a VIP to a node (gracefully: release, then acquire) and pin it there.

    Refused when the node is unknown, down or drained. Undo the pin with `vip unpin`.

    Example: ecluster vip move 10.99.0.100 n2 -c cluster.toml
    """
    cluster = load(config)
    if node not in cluster.nodes:
        die(f"unknown node {node!r} (nodes: {', '.join(cluster.nodes)})")
    r = ask_coordinator(cluster, "move", vip=address, node=node)
    print_json(r) if json_ else typer.echo(f"{r['vip']} -> {r['node']} (term {r['term']})")


@app.command("unpin")
def vip_unpin(address: Annotated[str, typer.Argument(help="The VIP")], config: ConfigOpt = None):
    """Forget a manual move: the VIP goes back to its normal election.

    Example: ecluster vip unpin 10.99.0.100 -c cluster.toml
    """
    cluster = load(config)
    r = ask_coordinator(cluster, "unpin", vip=address)
    typer.echo(f"{r['vip']} unpinned")


def _set_drain(config, node: str, method: str) -> None:
    r = ask_coordinator(load(config), method, node=node)
    typer.echo(f"drained: {', '.join(r['drained']) or 'none'}")


@node_app.command("drain")
def node_drain(node: Annotated[str, typer.Argument(help="The node to drain")], config: ConfigOpt = None):
    """Move every VIP off a node and keep them off until `node undrain`.

    Example: ecluster node drain n2 -c cluster.toml
    """
    _set_drain(config, node, "drain")


@node_app.command("undrain")
def node_undrain(node: Annotated[str, typer.Argument(help="The node to undrain")], config: ConfigOpt = None):
    """Let a drained node hold VIPs again.

    Example: ecluster node undrain n2 -c cluster.toml
    """
    _set_drain(config, node, "undrain")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="vip")
