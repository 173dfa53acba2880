"""``ecluster logs ...``: write to a node's journal, watch aggregation, read the aggregated files.

Journal commands talk to the node's ``jlog`` service: over its ipc socket when the node
runs on this machine (its run directory is reachable), else over tcp with the admin key.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Callable, Iterator

import typer

from ecluster.commands.common import (ConfigOpt, JsonOpt, MemberOpt, OptionalMemberOpt, die, load, member_client,
                                      new_app, print_json)

app = new_app("Journals (jlog) on the nodes and the aggregated logs on the managers.")

LogOpt = Annotated[str, typer.Option("--log", "-l", metavar="LOG", help="The log, e.g. mainlog.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", "-t", metavar="SECONDS",
                                           help="How long to wait for each answer.")]
WRITE_BATCH_RECORDS = 2000
WRITE_BATCH_BYTES = 1 << 20


# -- helpers ------------------------------------------------------------------------------------

def node_of(cluster, member: str):
    m = cluster.member(member)
    if m.role != "node":
        die(f"{member} is a {m.role}: journals live on nodes (give a node's name)")
    return m


@contextlib.contextmanager
def jlog_of(cluster, node: str) -> Iterator[Callable[..., Any]]:
    """``call(method, timeout, **args)`` on ``node``'s jlog service, one connection for all calls."""
    node_of(cluster, node)
    with member_client(cluster, node) as c:
        yield lambda method, timeout, **args: c.call(node, "jlog", method, timeout=timeout, **args)


def call_jlog(cluster, node: str, method: str, timeout: float, **args) -> Any:
    """One call of ``jlog.<method>`` on ``node``."""
    with jlog_of(cluster, node) as call:
        return call(method, timeout, **args)


def jlog_answer(config, node: str, method: str, timeout: float, json_: bool, **args) -> dict | None:
    """The answer of ``jlog.<method>`` on ``node`` for a command to show, or None once
    it is printed as JSON (``--json``)."""
    rep = call_jlog(load(config), node, method, timeout, **args)
    if json_:
        print_json(rep)
        return None
    return rep


def batches(stream: BinaryIO, max_records: int = WRITE_BATCH_RECORDS,
            max_bytes: int = WRITE_BATCH_BYTES) -> Iterator[list[bytes]]:
    """Stdin lines (without their line end) in batches; every line is one record."""
    batch: list[bytes] = []
    size = 0
    for line in stream:
        if line.endswith(b"\n"):
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        batch.append(line)
        size += len(line)
        if len(batch) >= max_records or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def status_rows(reports: dict[str, dict]) -> list[dict]:
    """Flatten jlog.status answers {node: reply or {"error"}} into one row per subscriber. Pure."""
    rows = []
    for node, rep in sorted(reports.items()):
        if "error" in rep and "logs" not in rep:
            rows.append({"node": node, "log": None, "subscriber": None, "error": rep["error"]})
            continue
        for log, st in sorted(rep["logs"].items()):
            if "error" in st:
                rows.append({"node": node, "log": log, "subscriber": None, "error": st["error"]})
                continue
            alarms = ",".join(sorted({a["kind"] for a in st.get("alarms", [])}))
            subs = st.get("subscribers") or {None: {}}
            for sub, s in sorted(subs.items(), key=lambda kv: kv[0] or ""):
                rows.append({"node": node, "log": log, "subscriber": sub, "last_seq": st["last_seq"],
                             "bytes": st["bytes"], "checkpoint": s.get("checkpoint"),
                             "lag_records": s.get("lag_records"), "lag_bytes": s.get("lag_bytes"),
                             "alarms": alarms, "error": None})
    return rows


def logs_root(cluster, manager: str) -> Path:
    m = cluster.member(manager)
    if m.role != "manager":
        die(f"{manager} is a {m.role}: aggregated logs live on managers (give a manager's name)")
    return Path(m.logs_root or m.data_dir / "logs")


def last_lines(path: Path, n: int) -> tuple[list[bytes], int]:
    """The last ``n`` complete lines of ``path`` and the offset just after them."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        data = b""
        pos = end
        while pos > 0 and data.count(b"\n") <= n:
            step = min(pos, 64 * 1024)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    complete = data.rfind(b"\n") + 1        # a line still being written is not shown yet
    lines = data[:complete].split(b"\n")[:-1]
    return (lines[-n:] if n > 0 else []), end - (len(data) - complete)


# -- commands ---------------------------------------------------------------------------------------

@app.command("write")
def logs_write(config: ConfigOpt = None, member: MemberOpt = ..., log: LogOpt = ...,
               timeout: TimeoutOpt = 10.0):
    """Append each line of standard input to a node's journal as one record.

    Exits 0 only once every record is acknowledged (durable per the fsync policy), like
    `logger` does for syslog. On a failure, says how many records were acknowledged.

    Example: echo "hello" | ecluster logs write -c cluster.toml --member n1 --log mainlog
    """
    from bus.client import BusError
    acked = 0
    with jlog_of(load(config), member) as call:
        for batch in batches(sys.stdin.buffer):
            try:
                call("write", timeout, log=log, records=batch)
            except BusError as e:
                die(f"{e} ({acked} records acknowledged before this batch of {len(batch)})")
            acked += len(batch)


@app.command("status")
def logs_status(config: ConfigOpt = None, member: OptionalMemberOpt = None, json_: JsonOpt = False,
                timeout: TimeoutOpt = 2.0):
    """Per node, log and subscriber: checkpoint and lag in records and bytes.

    Asks every node (or only --member) over the bus; a node that does not answer is shown
    with its error. Exits 1 when no node answered.

    Example: ecluster logs status -c cluster.toml --json
    """
    from bus.client import BusError
    cluster = load(config)
    nodes = [node_of(cluster, member).name] if member else sorted(cluster.nodes)
    reports: dict[str, dict] = {}
    for node in nodes:
        try:
            reports[node] = call_jlog(cluster, node, "status", timeout)
        except BusError as e:
            reports[node] = {"error": str(e)}
    if json_:
        print_json(reports)
    else:
        show_status(status_rows(reports))
    if all("logs" not in r for r in reports.values()):
        die("no node answered (" + "; ".join(f"{n}: {r['error']}" for n, r in reports.items()) + ")")


def show_status(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="journals")
    for col in ("node", "log", "subscriber", "last seq", "bytes", "checkpoint", "lag records", "lag bytes", "alarms"):
        t.add_column(col, no_wrap=col in ("node", "log", "subscriber"))
    for r in rows:
        if r["error"]:
            t.add_row(r["node"], r["log"] or "", "", f"[red]{r['error']}[/]", "", "", "", "", "")
            continue
        t.add_row(r["node"], r["log"], r["subscriber"] or "", str(r["last_seq"]), str(r["bytes"]),
                  "" if r["checkpoint"] is None else str(r["checkpoint"]),
                  "" if r["lag_records"] is None else str(r["lag_records"]),
                  "" if r["lag_bytes"] is None else str(r["lag_bytes"]), r["alarms"])
    Console(width=None if sys.stdout.isatty() else 160).print(t)


@app.command("tail")
def logs_tail(config: ConfigOpt = None, member: MemberOpt = ...,
              node: Annotated[str | None, typer.Option("--node", "-n", metavar="NODE",
                                                       help="Only this node's records.")] = None,
              log: Annotated[str | None, typer.Option("--log", "-l", metavar="LOG", help="Only this log.")] = None,
              lines: Annotated[int, typer.Option("--lines", metavar="N", help="Lines to show first, per file.")] = 10,
              follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False):
    """Show the aggregated logs on a manager (its files under the logs root).

    For each node and log, the newest day's file. Lines are prefixed with "node/log: "
    unless both --node and --log are given. With -f, new lines (and new days) follow.

    Example: ecluster logs tail -c cluster.toml --member m1 --node n1 --log mainlog -f
    """
    from manager.logsink import aggregated_files
    cluster = load(config)
    root = logs_root(cluster, member)
    if node is not None:
        node_of(cluster, node)
    if lines < 0:
        die("--lines must be 0 or more", 2)
    prefix = node is None or log is None
    out = sys.stdout.buffer

    def newest() -> dict[tuple[str, str], Path]:
        files: dict[tuple[str, str], Path] = {}
        for _day, lg, nd, path in aggregated_files(root, node, log):
            files[(nd, lg)] = path           # later days come later: the newest wins
        return files

    def emit(key: tuple[str, str], chunk: list[bytes]) -> None:
        head = f"{key[0]}/{key[1]}: ".encode() if prefix else b""
        for ln in chunk:
            out.write(head + ln + b"\n")

    current = newest()
    if not current and not follow:
        die(f"no aggregated logs under {root}" + (f" for node {node}" if node else "")
            + (f" and log {log}" if log else ""))
    offsets: dict[Path, int] = {}
    for key, path in sorted(current.items()):
        got, offsets[path] = last_lines(path, lines)
        emit(key, got)
    out.flush()
    if not follow:
        return
    try:
        while True:
            time.sleep(0.2)
            for key, path in sorted(newest().items()):
                if current.get(key) != path:         # a new day: start the new file at its top
                    current[key] = path
                    offsets.setdefault(path, 0)
                pos = offsets.get(path, 0)
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                if size < pos:
                    pos = 0                          # cut back by recovery: start over
                if size == pos:
                    continue
                with open(path, "rb") as fh:
                    fh.seek(pos)
                    data = fh.read(size - pos)
                complete = data.rfind(b"\n") + 1
                if complete:
                    emit(key, data[:complete].split(b"\n")[:-1])
                    offsets[path] = pos + complete
            out.flush()
    except KeyboardInterrupt:
        return


@app.command("inspect")
def logs_inspect(config: ConfigOpt = None, member: MemberOpt = ..., log: LogOpt = ..., json_: JsonOpt = False,
                 timeout: TimeoutOpt = 5.0):
    """Describe a node's journal: segments, seqs, subscribers and lag, alarms, torn bytes.

    Example: ecluster logs inspect -c cluster.toml --member n1 --log mainlog
    """
    rep = jlog_answer(config, member, "inspect", timeout, json_, log=log)
    if rep is None:
        return
    typer.echo(f"log {rep['name']} on {member} at {rep['path']} (writer pid {rep.get('writer_pid')})")
    typer.echo(f"seqs {rep['first_seq']}..{rep['last_seq']}, {len(rep['segments'])} segment(s), "
               f"{rep['disk_bytes']} bytes")
    typer.echo(f"torn bytes cut at the last recovery {rep['torn_bytes_last']}, in total {rep['torn_bytes_total']}")
    typer.echo("counters: " + ", ".join(f"{k} {v}" for k, v in sorted(rep["counters"].items())))
    for sub, s in sorted(rep["subscribers"].items()):
        typer.echo(f"subscriber {sub}: checkpoint {s['checkpoint']}, lag {s['lag_records']} records "
                   f"/ {s['lag_bytes']} bytes")
    for a in rep["alarms"]:
        typer.echo(f"ALARM {a['kind']}" + (f" ({a['subscriber']})" if a.get("subscriber") else "")
                   + f": {a.get('message', '')}")


@app.command("repair")
def logs_repair(config: ConfigOpt = None, member: MemberOpt = ..., log: LogOpt = ...,
                force: Annotated[bool, typer.Option("--force", help="Release stalled subscribers and cut "
                                                    "corrupt segments (records lost are alarmed).")] = False,
                timeout: TimeoutOpt = 60.0):
    """Verify a node's journal and report what recovery could not settle; --force fixes it.

    Prints the report as JSON.

    Example: ecluster logs repair -c cluster.toml --member n1 --log mainlog --force
    """
    jlog_answer(config, member, "repair", timeout, True, log=log, force=force)


@app.command("subscribers")
def logs_subscribers(config: ConfigOpt = None, member: MemberOpt = ..., log: LogOpt = ..., json_: JsonOpt = False,
                     timeout: TimeoutOpt = 5.0):
    """List the subscribers of a node's journal with checkpoint and lag.

    Example: ecluster logs subscribers -c cluster.toml --member n1 --log audit
    """
    rep = jlog_answer(config, member, "subscribers", timeout, json_, log=log)
    if rep is None:
        return
    for sub, s in sorted(rep["subscribers"].items()):
        typer.echo(f"{sub}\tcheckpoint {s['checkpoint']}\tlag {s['lag_records']} records / {s['lag_bytes']} bytes")


@app.command("remove-subscriber")
def logs_remove_subscriber(subscriber: Annotated[str, typer.Argument(metavar="SUBSCRIBER",
                                                                     help="The subscriber to forget.")],
                           config: ConfigOpt = None, member: MemberOpt = ..., log: LogOpt = ...,
                           timeout: TimeoutOpt = 5.0):
    """Forget a subscriber of a node's journal (segments only it held are deleted).

    A declared subscriber (logagg-<manager>, cidr-<manager>) comes back, from the oldest
    retained record, when the jlog service restarts.

    Example: ecluster logs remove-subscriber logagg-m9 -c cluster.toml --member n1 --log mainlog
    """
    rep = jlog_answer(config, member, "remove_subscriber", timeout, False, log=log, subscriber=subscriber)
    note = " (declared: it comes back when jlog restarts)" if rep.get("redeclared_at_restart") else ""
    typer.echo(f"removed subscriber {subscriber} from {log} on {member}{note}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="logs")
