"""``ecluster broadcast CMD...`` and ``ecluster unicast MEMBER CMD...``: command delegation.

The CLI asks a manager (``--manager``, or the first one that answers) to run the command
on the members; the manager gathers the replies, reporting a member that does not answer
within ``--timeout`` as down. Output: one block per member. Exit status 0 when every
member answered ok, 1 otherwise (and for any error, as one line on stderr).
"""
from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ecluster.commands.common import ConfigOpt, JsonOpt, die, first_answer, load, print_json

ManagerOpt = Annotated[str | None, typer.Option(
    "--manager", "-M", metavar="NAME", help="The manager to ask (default: the first one that answers).")]
TimeoutOpt = Annotated[float, typer.Option(
    "--timeout", "-t", metavar="S", help="Seconds to wait for each member; a silent one is reported down.")]
WordsArg = Annotated[list[str], typer.Argument(metavar="CMD...", help="The command and its arguments, e.g. vip move 10.0.0.100 n2.")]
PING_TIMEOUT = 0.8
SLACK = 2.0          # the manager's own work on top of the members' timeout


def ask_manager(cluster, manager: str | None, method: str, timeout: float, **args) -> Any:
    """Call ``control.<method>`` on a manager (tcp, admin key). Without ``manager``, the
    first manager whose broker and control service answer."""
    if manager is not None:
        m = cluster.member(manager)
        if m.role != "manager":
            die(f"{manager} is a node, not a manager (managers: {', '.join(cluster.managers) or 'none'})")
        candidates = [manager]
    else:
        candidates = list(cluster.managers)
        if not candidates:
            die(f"{cluster.path}: no manager in the cluster file: delegation is served by managers")

    def ask(c, name: str) -> Any:
        c.call(name, "bus", "ping", timeout=PING_TIMEOUT)     # quick: is anybody there?
        return c.call(name, "control", method, timeout=timeout + SLACK, **args)

    return first_answer(cluster, candidates, ask, who="manager")


def format_value(value: Any, indent: int = 2) -> list[str]:
    """A reply's result as indented ``key: value`` lines. Pure."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:")
                lines += format_value(v, indent + 2)
            else:
                lines.append(f"{pad}{k}: {scalar(v)}")
        return lines
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        lines = []
        for item in value:
            if isinstance(item, (dict, list)) and item:
                sub = format_value(item, indent + 2)
                lines.append(pad + "- " + sub[0].lstrip())
                lines += sub[1:]
            else:
                lines.append(f"{pad}- {scalar(item)}")
        return lines
    return [pad + scalar(value)]


def scalar(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def format_replies(rep: dict) -> str:
    """One block per member: ``== n1: ok`` then the result (or the error / why down). Pure."""
    out = []
    for member, r in rep.get("replies", {}).items():
        status = r.get("status", "?")
        if status == "ok":
            out.append(f"== {member}: ok")
            out += format_value(r.get("result"))
        elif status == "down":
            out.append(f"== {member}: DOWN ({r.get('message')})")
        else:
            out.append(f"== {member}: ERROR {r.get('code')}: {r.get('message')}")
    words = " ".join([rep.get("command", ""), *rep.get("args", [])])
    out.append(f"({words} via {rep.get('manager')}, {rep.get('elapsed')} s, timeout {rep.get('timeout')} s)")
    return "\n".join(out)


def all_ok(rep: dict) -> bool:
    return all(r.get("status") == "ok" for r in rep.get("replies", {}).values())


def broadcast(words: WordsArg, config: ConfigOpt = None, manager: ManagerOpt = None, timeout: TimeoutOpt = 3.0,
              all_members: Annotated[bool, typer.Option("--all", help="Managers too, not only the nodes.")] = False,
              json_: JsonOpt = False):
    """Run a command on every node (--all: every member) and show each one's reply.

    A member silent for --timeout seconds is reported DOWN; nobody is waited for longer.

    Commands: status, vip show, vip move ADDRESS NODE, config status, config reload, logs status, membership, version, help [CMD], and any plug-in's.

    Example: ecluster broadcast config status -c cluster.toml --timeout 2
    """
    cluster = load(config)
    rep = ask_manager(cluster, manager, "broadcast", timeout, command=list(words), args=[], timeout_s=timeout,
                      include_managers=all_members)
    print_json(rep) if json_ else typer.echo(format_replies(rep))
    raise typer.Exit(0 if all_ok(rep) else 1)


def unicast(member: Annotated[str, typer.Argument(metavar="MEMBER", help="The node (or manager) to run it on.")],
            words: WordsArg, config: ConfigOpt = None, manager: ManagerOpt = None, timeout: TimeoutOpt = 3.0,
            json_: JsonOpt = False):
    """Run a command on one member, through a manager, and show its reply.

    Example: ecluster unicast n2 vip show -c cluster.toml
    """
    cluster = load(config)
    cluster.member(member)
    rep = ask_manager(cluster, manager, "unicast", timeout, node=member, command=list(words), args=[],
                      timeout_s=timeout)
    print_json(rep) if json_ else typer.echo(format_replies(rep))
    raise typer.Exit(0 if all_ok(rep) else 1)


def register(root: typer.Typer) -> None:
    root.command("broadcast")(broadcast)
    root.command("unicast")(unicast)
