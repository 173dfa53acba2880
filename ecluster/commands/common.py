"""What every command module shares: options, loading the cluster file, error handling.

Every failure a user can cause (a bad cluster file, a missing key, a locked data
directory, an unreachable member, ...) ends as ONE line on stderr, ``ecluster: <message>``,
and exit status 1; usage errors exit 2. Never a traceback: :func:`run_app` is the wrapper
around the whole application, :func:`guard` the same for a single function.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, NoReturn

import typer

try:                        # typer >= 0.20 ships its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:         # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exc

from ecluster.clusterfile import Cluster, ClusterFileError, load_cluster

CONFIG_ENV = "ECLUSTER_CONFIG"
KEYS_ENV = "ECLUSTER_KEYS"
IDENTITY_ENV = "ECLUSTER_IDENTITY"
DEBUG_ENV = "ECLUSTER_DEBUG"      # set to 1 to see the traceback of an unexpected error
#: where a host keeps its cluster file when neither --config nor $ECLUSTER_CONFIG says
DEFAULT_CONFIG = Path("/etc/ecluster/cluster.toml")
DEFAULT_IDENTITY = "admin"

#: the root options (``ecluster --keys DIR --identity NAME ...``), set once per run
SESSION: dict[str, Any] = {"keys": None, "identity": None}

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", envvar=CONFIG_ENV, metavar="FILE", show_envvar=True,
    help="The cluster file (TOML).")]
MemberOpt = Annotated[str, typer.Option(
    "--member", "-m", metavar="NAME", help="A member of the cluster (node or manager) by name.")]
OptionalMemberOpt = Annotated[str | None, typer.Option(
    "--member", "-m", metavar="NAME", help="A member of the cluster (node or manager) by name.")]
KeysOpt = Annotated[Path | None, typer.Option(
    "--keys", metavar="DIR", help="This host's key directory (its bundle), instead of the cluster file's "
                                  "`keys` (same as `ecluster --keys DIR ...`).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def new_app(help: str, **kw) -> typer.Typer:
    """A sub-application with the settings every ecluster group shares."""
    return typer.Typer(help=help, no_args_is_help=True, pretty_exceptions_enable=False,
                       add_completion=False, rich_markup_mode="rich", **kw)


class CliError(Exception):
    """A one-line failure to report to the user, with its exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def die(message: str, code: int = 1) -> NoReturn:
    raise CliError(message, code)


def load(config: Path | None) -> Cluster:
    """Read the cluster file named by --config (or $ECLUSTER_CONFIG, else
    /etc/ecluster/cluster.toml), with the key directory of --keys (or $ECLUSTER_KEYS)
    in place of the file's ``keys`` when given: a host's own bundle."""
    if config is None:
        if not DEFAULT_CONFIG.exists():
            die(f"no cluster file: give --config FILE, set {CONFIG_ENV}, or create {DEFAULT_CONFIG}", 2)
        config = DEFAULT_CONFIG
    cluster = load_cluster(config)
    keys = SESSION.get("keys") or os.environ.get(KEYS_ENV)
    if keys:
        import dataclasses
        cluster = dataclasses.replace(cluster, keys_dir=Path(keys).absolute())
    return cluster


def identity() -> str:
    """The key name this CLI acts with over tcp (--identity, $ECLUSTER_IDENTITY, admin)."""
    return SESSION.get("identity") or os.environ.get(IDENTITY_ENV) or DEFAULT_IDENTITY


def remote_client(cluster: Cluster, member: str):
    """A SyncClient to ``member``'s broker over tcp, authenticated with this CLI's identity."""
    from bus.client import SyncClient
    return SyncClient(cluster, remote=member, key=identity())


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def member_client(cluster: Cluster, member: str):
    """A SyncClient to ``member``: over its broker's ipc socket when that is here and
    usable (the member runs on this machine: the call is the member's own) and no
    identity was asked for, else over tcp with this CLI's identity (default admin)."""
    from bus.client import SyncClient
    sock = cluster.member(member).run_dir / "bus.ipc"
    explicit = SESSION.get("identity") or os.environ.get(IDENTITY_ENV)
    if not explicit and sock.exists() and os.access(sock, os.R_OK | os.W_OK):
        return SyncClient(cluster, via=member)
    return remote_client(cluster, member)


#: remote error codes meaning "this member cannot serve the call": the next one is asked
NOT_SERVED = ("unreachable", "no_service")


def first_answer(cluster: Cluster, names: Iterable[str], ask: Callable[[Any, str], Any], who: str = "member") -> Any:
    """The answer of ``ask(client, name)`` from the first of ``names`` that answers (tcp, :func:`identity`).

    A member that does not answer (a timeout, or a broker reporting it unreachable or
    without the service) is skipped; any other error is the cluster's answer and is
    raised as is. When none answers: one line naming each failure.
    """
    from bus.client import CallTimeout, RemoteError
    failures = []
    for name in names:
        try:
            with remote_client(cluster, name) as c:
                return ask(c, name)
        except CallTimeout:
            failures.append(f"{name}: no answer")
        except RemoteError as e:
            if e.code not in NOT_SERVED:
                raise
            failures.append(f"{name}: {e}")
    die(f"no {who} answered (" + "; ".join(failures) + ")")


def _known_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean "the user's input or environment", not a bug.

    Classes are taken only from modules already imported: an exception of a module that
    was never loaded cannot have been raised, and importing zmq just to report a typo in
    a path would slow every error down.
    """
    names = {
        "ecluster.clusterfile": ["ClusterFileError"],
        "bus.keys": ["KeyError_"],
        "bus.client": ["BusError"],           # CallTimeout, RemoteError
        "bus.broker": ["BrokerError"],
        "bus.envelope": ["BadMessage"],
        "node.datadir": ["LockedError"],
        "node.supervisor": ["SupervisorError"],
        "services.base": ["UnknownService"],
        "ecluster.timing": [],
    }
    out: list[type[BaseException]] = [CliError, ClusterFileError, OSError]
    for mod, classes in names.items():
        m = sys.modules.get(mod)
        for c in classes:
            cls = getattr(m, c, None) if m else None
            if cls is not None:
                out.append(cls)
    return tuple(out)


def error_line(exc: BaseException) -> str:
    """One line describing ``exc`` for a user."""
    if isinstance(exc, OSError) and not type(exc).__module__.startswith("zmq"):
        what = exc.strerror or str(exc)
        msg = f"{exc.filename}: {what}" if exc.filename else what
    elif isinstance(exc, LookupError) and exc.args:
        msg = str(exc.args[0])          # KeyError would add quotes around the message
    else:
        msg = str(exc) or type(exc).__name__
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(exc).__name__


def report(prog: str, exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr; return the exit status for it."""
    if isinstance(exc, click_exc.UsageError):
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        sys.stderr.write(f"{prog}: {error_line(exc)}{hint}\n")
        return 2
    if isinstance(exc, _known_errors()):
        sys.stderr.write(f"{prog}: {error_line(exc)}\n")
        return exc.code if isinstance(exc, CliError) else 1
    if os.environ.get(DEBUG_ENV):
        raise exc
    sys.stderr.write(f"{prog}: internal error: {type(exc).__name__}: {error_line(exc)} "
                     f"(set {DEBUG_ENV}=1 for a traceback)\n")
    return 1


def guard(fn: Callable, prog: str = "ecluster") -> Callable:
    """Decorator: a known exception from ``fn`` becomes one stderr line and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - report() decides: known -> one line
            raise typer.Exit(report(prog, e)) from None

    return wrapper


def run_app(app: typer.Typer, prog: str, argv: list[str] | None = None) -> int:
    """Run a typer application; every error is one stderr line. Returns the exit status."""
    try:
        rv = app(args=argv, prog_name=prog, standalone_mode=False)
    except click_exc.NoArgsIsHelpError as e:   # bare `ecluster node`: the help is the answer
        if e.format_message().strip():         # rich printed it already; plain click did not
            e.show()
        return 2
    except typer.Abort:
        sys.stderr.write(f"{prog}: aborted\n")
        return 130
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception as e:  # noqa: BLE001
        return report(prog, e)
    return rv if isinstance(rv, int) else 0
