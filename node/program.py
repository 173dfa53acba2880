"""The entry point of the programs supervisord runs: a member's broker and its services.

    python -m node.program [--keys DIR] bus run --config FILE --member NAME
    python -m node.program [--keys DIR] service run NAME --config FILE --member NAME
    python -m node.program [--keys DIR] member run --config FILE --member NAME

The last is what ``ecluster node run`` / ``manager run`` become once they have checked
their arguments (they exec it): the runner then waits on supervisord for as long as the
member lives, and should not keep the CLI's modules in memory all that time.

The same grammar as ``ecluster bus run`` / ``ecluster service run`` (which call the same
functions), without the admin CLI: a service process must not import typer, click and
every command module only to parse four arguments. That costs each of a member's dozen
processes memory and start-up CPU (bench/footprint.py).

Errors are one line on stderr (``ecluster: ...``) and exit status 1; usage errors 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ProgramError(Exception):
    """A one-line refusal to start (the service does not run on this member, ...)."""


def load(config: Path, keys: Path | None):
    """The cluster file, with this host's key directory in place of its ``keys`` when given."""
    from ecluster.clusterfile import load_cluster
    cluster = load_cluster(config)
    if keys:
        cluster = dataclasses.replace(cluster, keys_dir=Path(keys).absolute())
    return cluster


def run_broker(cluster, member: str) -> None:
    """Serve ``member``'s bus broker in the foreground; holds <data_dir>/run/broker.lock."""
    from bus.broker import serve
    from node.datadir import broker_lock, ensure_data_dir
    m = cluster.member(member)
    ensure_data_dir(m, keep_search=True)      # what the runner or a plug-in set stays
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    with broker_lock(m):
        serve(cluster, member)


def run_one_service(cluster, member: str, name: str) -> None:
    """Run service ``name`` of ``member`` in the foreground, if it runs there."""
    from services.base import load_service, run_service
    m = cluster.member(member)
    cls = load_service(name)
    if not cls.runs_on(cluster, member):
        where = "/".join(cls.roles)
        raise ProgramError(f"service {name!r} does not run on {m.role} {member} "
                           f"(runs on: {where}{'' if cls.builtin else ', where [services.' + name + '] is configured'})")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    run_service(cluster, member, name)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ecluster", description="A member's broker or one of its services "
                                                               "(supervisord runs these).")
    ap.add_argument("--keys", type=Path, metavar="DIR", help="this host's key directory")
    area = ap.add_subparsers(dest="area", required=True)
    for name in ("bus", "service", "member"):
        verb = area.add_parser(name).add_subparsers(dest="verb", required=True)
        run = verb.add_parser("run")
        if name == "service":
            run.add_argument("name", metavar="NAME")
        run.add_argument("--config", "-c", type=Path, required=True, metavar="FILE")
        run.add_argument("--member", "-m", required=True, metavar="NAME")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)          # usage errors: argparse's message, exit 2
    try:
        cluster = load(args.config, args.keys)
        if args.area == "member":
            from node.supervisor import run_member
            return run_member(cluster, args.member, args.config)
        if args.area == "bus":
            run_broker(cluster, args.member)
        else:
            run_one_service(cluster, args.member, args.name)
    except KeyboardInterrupt:
        return 130
    except Exception as e:     # one line, never a traceback: see known_error
        if not known_error(e):
            raise
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        sys.stderr.write(f"ecluster: {lines[0].strip() if lines else type(e).__name__}\n")
        return 1
    return 0


def known_error(e: BaseException) -> bool:
    """An error of the user's input or environment (reported in one line), not a bug."""
    names = {"ClusterFileError", "KeyError_", "BusError", "BrokerError", "LockedError", "SupervisorError",
             "UnknownService", "ProgramError"}
    return isinstance(e, OSError) or any(c.__name__ in names for c in type(e).__mro__)


if __name__ == "__main__":
    sys.exit(main())
