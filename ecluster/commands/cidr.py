"""``ecluster cidr "QUERY"`` and ``ecluster cidr shell``: ask a manager's cidr_server.

A query is checked here first (the same parser as the server's), so a malformed one
is answered at once, without a manager, by one line naming the bad token and its
column. Managers are tried in the order of the cluster file (or only ``--manager``);
the first that answers is kept for the rest of a shell session. See docs/CIDR.md.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ecluster.commands.common import CliError, ConfigOpt, JsonOpt, die, load, print_json, remote_client

PROMPT = "cidr> "
HISTORY_FILE = "~/.ecluster_cidr_history"
HISTORY_LENGTH = 1000
DEFAULT_TIMEOUT = 5.0
#: remote error codes that are about the query itself: another manager would say the same
FINAL_CODES = {"bad_query", "too_large"}
KEYWORDS = ("show", "available", "count", "for", "in", "union(", "since", "on", "from", "to", "cidrsize",
            "order", "by", "cidr", "aggregate", "daily", "threshold", "limit")
SHELL_HELP = """Queries (one per line; keywords are case-insensitive, dates UTC):
  show available
  show count for <ip/mask> in <series[,series...] | union(series,...)>
       [since D | on D | from D to D] [cidrsize N [to M]] [order by cidr|count]
       [aggregate daily] [threshold N] [limit N]
  dates: 20080605 or 20080605T120000
Example: show count for 10.0.0.0/8 in connections,rejects cidrsize 24 order by count limit 10
Other lines: help, quit (or Ctrl-D). History is kept in ~/.ecluster_cidr_history."""

ManagerOpt = Annotated[str | None, typer.Option(
    "--manager", "-m", metavar="NAME", help="Ask only this manager (default: each in turn).")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", "-t", metavar="SECONDS",
                                           help="How long to wait for each manager.")]


def query_text(words: list[str]) -> str:
    """The query given on the command line as one or several words. Pure."""
    return " ".join(words).strip()


def caret_line(column: int, indent: int = 0) -> str:
    """A ``^`` under 1-based ``column`` of a line printed after ``indent`` characters. Pure."""
    return " " * (indent + max(column, 1) - 1) + "^"


class Managers:
    """Query the cidr_server of the first manager that answers (over tcp, admin key)."""

    def __init__(self, cluster, only: str | None, timeout: float):
        if not cluster.managers:
            die(f"{cluster.path}: the cluster has no manager: cidr_server runs on managers")
        if only is not None:
            m = cluster.member(only)
            if m.role != "manager":
                die(f"{only} is a node: cidr_server runs on managers ({', '.join(cluster.managers)})")
            self.names = [only]
        else:
            self.names = list(cluster.managers)
        self.cluster = cluster
        self.timeout = timeout
        self.clients: dict[str, Any] = {}

    def _client(self, name: str):
        if name not in self.clients:
            self.clients[name] = remote_client(self.cluster, name)
        return self.clients[name]

    def query(self, text: str) -> dict:
        """The answer of the first manager that answers; CliError if none does."""
        from bus.client import BusError, CallTimeout, RemoteError
        failures = []
        for name in list(self.names):
            try:
                rep = self._client(name).call(name, "cidr_server", "query", timeout=self.timeout, text=text)
            except RemoteError as e:
                if e.code in FINAL_CODES:
                    raise CliError(e.message or e.code) from None
                failures.append(f"{name}: {e}")
            except (CallTimeout, BusError) as e:
                failures.append(f"{name}: {e}")
                # a reply that comes after the timeout must not be taken for the next answer
                self.clients.pop(name).close()
            else:
                if name != self.names[0]:     # keep asking the one that answered first
                    self.names.remove(name)
                    self.names.insert(0, name)
                return rep
        raise CliError("no manager answered (" + "; ".join(failures) + ")")

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.clients.clear()


def print_answer(rep: dict, empty_note: bool) -> None:
    """Rows on stdout; unknown series (and, in the shell, an empty answer) noted on stderr."""
    rows = rep.get("rows") or []
    for line in rows:
        typer.echo(line)
    result = rep.get("result") or {}
    for name in result.get("unknown_series") or []:
        typer.echo(f"note: no data for series {name!r}", err=True)
    if empty_note and not rows:
        typer.echo("(no rows)", err=True)


def cidr(words: Annotated[list[str] | None, typer.Argument(
            metavar="QUERY", help='A query (quote it), or "shell" for the interactive prompt.')] = None,
         config: ConfigOpt = None, manager: ManagerOpt = None, json_: JsonOpt = False,
         timeout: TimeoutOpt = DEFAULT_TIMEOUT):
    """Query the CIDR server: which networks hit the listeners (see docs/CIDR.md).

    ecluster cidr "QUERY" prints Momentum's rows, e.g. `10.79.18.0/24 : 35217,1264`;
    ecluster cidr shell opens a cidr> prompt (history, Ctrl-D to leave).

    Example: ecluster cidr -c cluster.toml "show count for 10.0.0.0/8 in connections cidrsize 24 limit 10"
    """
    from manager.cidr.query import QueryError, parse_query
    text = query_text(words or [])
    if not text:
        die('give a query (e.g. "show available") or "shell"', 2)
    if text == "shell":
        raise typer.Exit(shell(load(config), manager, timeout))
    try:
        parse_query(text)
    except QueryError as e:
        die(str(e))
    managers = Managers(load(config), manager, timeout)
    try:
        rep = managers.query(text)
    finally:
        managers.close()
    if json_:
        print_json(rep.get("result"))
    else:
        print_answer(rep, empty_note=False)


# -- the shell -------------------------------------------------------------------------------

def _completer(text: str, state: int) -> str | None:
    matches = [k for k in KEYWORDS if k.startswith(text.lower())]
    return matches[state] if state < len(matches) else None


def _setup_readline() -> tuple[Any, Path] | None:
    """Line editing and history when stdin is a terminal (None otherwise)."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:           # a Python without readline: plain input() still works
        return None
    path = Path(os.path.expanduser(HISTORY_FILE))
    try:
        readline.read_history_file(path)
    except (FileNotFoundError, OSError):
        pass
    readline.set_history_length(HISTORY_LENGTH)
    readline.set_completer(_completer)
    readline.set_completer_delims(" \t,()")
    readline.parse_and_bind("tab: complete")
    return readline, path


def shell(cluster, manager: str | None, timeout: float) -> int:
    """The ``cidr>`` prompt: each line a query; errors are printed and the prompt comes back."""
    from manager.cidr.query import QueryError, parse_query
    managers = Managers(cluster, manager, timeout)
    rl = _setup_readline()
    interactive = rl is not None
    if interactive:
        typer.echo(f"CIDR queries on cluster {cluster.name}; 'help' for the language, Ctrl-D to leave.")
    try:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                typer.echo("")
                return 0
            except KeyboardInterrupt:    # like a shell: drop the line, keep the prompt
                typer.echo("")
                continue
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            word = line.lower()
            if word in ("quit", "exit", r"\q"):
                return 0
            if word in ("help", "?"):
                typer.echo(SHELL_HELP)
                continue
            try:
                parse_query(line)
            except QueryError as e:
                if interactive:
                    typer.echo(caret_line(e.position, len(PROMPT)), err=True)
                typer.echo(f"error: {e}", err=True)
                continue
            try:
                rep = managers.query(line)
            except CliError as e:
                typer.echo(f"error: {e}", err=True)
                continue
            except KeyboardInterrupt:
                typer.echo("\n(interrupted)", err=True)
                continue
            print_answer(rep, empty_note=True)
    finally:
        managers.close()
        if rl is not None:
            readline, path = rl
            try:
                readline.write_history_file(path)
            except OSError:
                pass


def register(root: typer.Typer) -> None:
    root.command("cidr")(cidr)
