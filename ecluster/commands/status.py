"""``ecluster status``: what the first reachable member knows about the cluster."""
from __future__ import annotations

from typing import Annotated, Any

import typer

from ecluster.commands.common import ConfigOpt, JsonOpt, OptionalMemberOpt, die, load, print_json, remote_client
from node.health import check_summary

DEFAULT_TIMEOUT = 0.8


def link_state(link: dict | None, heard_ago: float | None = None) -> str:
    """A peer link as one word, from bus.status's ``links`` row (the broker's failure
    detector: up, or down since). Pure."""
    if not isinstance(link, dict):
        return "never" if heard_ago is None else "unknown"
    if link.get("up"):
        return "up"
    return "never" if link.get("changes") == 0 else "down"


def status_report(cluster, answered_by: str, bus_status: dict, control_status: dict | None,
                  control_error: str | None = None) -> dict[str, Any]:
    """Combine a member's bus.status and control.status replies into one report. Pure."""
    peers = bus_status.get("peers", {}) or {}
    links = bus_status.get("links", {}) or {}
    members = []
    for name, m in cluster.members.items():
        row = {"name": name, "role": m.role, "address": m.address, "bus": m.bus_endpoint}
        if name == answered_by:
            row.update(link="self", heard_ago=0.0)
        else:
            p = peers.get(name) or {}
            heard = p.get("heard_ago")
            row.update(link=link_state(links.get(name), heard), heard_ago=heard)
        members.append(row)
    return {"cluster": cluster.name, "answered_by": answered_by, "members": members,
            "broker": {k: bus_status.get(k) for k in ("uptime", "pid", "counters")},
            "control": control_status, "control_error": control_error}


def ask(cluster, name: str, timeout: float) -> dict[str, Any]:
    """Ask member ``name`` over tcp with the admin key; raises BusError if it does not answer."""
    from bus.client import BusError
    with remote_client(cluster, name) as c:
        bus_status = c.call(name, "bus", "status", timeout=timeout)
        try:
            ctl, err = c.call(name, "control", "status", timeout=timeout), None
        except BusError as e:
            ctl, err = None, str(e)
        try:
            election = c.call(name, "election", "status", timeout=timeout)
        except BusError:
            election = None
    return add_election(status_report(cluster, name, bus_status, ctl, err), election)


def add_election(rep: dict[str, Any], election: dict | None) -> dict[str, Any]:
    """Fold the member's election status (coordinator, term, membership states, health
    checks per node) in. Pure."""
    if election is None:
        rep.update(coordinator=None, term=None, role=None)
        for m in rep["members"]:
            m["state"] = "unknown"
            if m["role"] == "node":
                m["checks"] = "-"
        return rep
    view = (election.get("view") or {}).get("members") or {}
    rep.update(coordinator=election.get("leader"), term=election.get("term"), role=election.get("role"),
               view_number=(election.get("view") or {}).get("number"))
    health = election.get("health") if isinstance(election.get("health"), dict) else {}
    for m in rep["members"]:
        info = view.get(m["name"]) or {}
        m["state"] = info.get("state", "unknown")
        m["incarnation"] = info.get("inc")
        if m["role"] == "node":
            entry = health.get(m["name"])
            m["checks"] = check_summary(entry)
            m["failing_vips"] = sorted((entry or {}).get("failing") or []) if (entry or {}).get("fresh") else []
    return rep


def status(config: ConfigOpt = None, member: OptionalMemberOpt = None, json_: JsonOpt = False,
           timeout: Annotated[float, typer.Option("--timeout", "-t", metavar="SECONDS",
                                                  help="How long to wait for each member.")] = DEFAULT_TIMEOUT):
    """Show the cluster as the first reachable member sees it (or as --member sees it).

    Per member: membership state, link, and for nodes their health checks ("ok",
    "failing: NAME", "starting: NAME", or "-" when the node reports none).

    Members are tried in the order of the cluster file, over tcp with the admin key.

    Example: ecluster status -c cluster.toml --json
    """
    from bus.client import BusError
    cluster = load(config)
    names = [cluster.member(member).name] if member else list(cluster.members)
    failures = []
    for name in names:
        try:
            rep = ask(cluster, name, timeout)
        except BusError as e:
            failures.append(f"{name}: {e}")
            continue
        if json_:
            print_json(rep)
        else:
            show(rep)
        return
    die("no member answered (" + "; ".join(failures) + ")")


def show(rep: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    colour = {"self": "cyan", "up": "green", "down": "red", "never": "yellow"}
    t = Table(title=f"cluster {rep['cluster']}, as seen by {rep['answered_by']}")
    for col in ("member", "role", "address", "state", "link", "heard ago", "checks"):
        t.add_column(col)
    states = {"alive": "green", "suspect": "yellow", "dead": "red", "unknown": "white"}
    for m in rep["members"]:
        heard = "" if m["heard_ago"] is None else f"{m['heard_ago']:.2f} s"
        coord = " (coordinator)" if m["name"] == rep.get("coordinator") else ""
        st = m.get("state", "unknown")
        checks = m.get("checks", "")
        checks = f"[red]{checks}[/]" if checks.startswith("failing") else checks
        t.add_row(m["name"] + coord, m["role"], m["address"], f"[{states.get(st, 'white')}]{st}[/]",
                  f"[{colour[m['link']]}]{m['link']}[/]", heard, checks)
    console = Console()
    console.print(t)
    console.print(f"coordinator {rep.get('coordinator') or 'none'}, term {rep.get('term')}")
    b = rep["broker"]
    console.print(f"broker pid {b['pid']}, up {b['uptime']} s, counters {b['counters']}")
    if rep["control"] is not None:
        c = rep["control"]
        console.print(f"control pid {c.get('pid')} on {c.get('host')}, up {c.get('uptime')} s")
    else:
        console.print(f"control: [red]{rep['control_error']}[/]")


def register(root: typer.Typer) -> None:
    root.command("status")(status)
