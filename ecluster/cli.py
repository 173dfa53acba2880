"""``ecluster``: the admin CLI, one typer application.

Command areas live in :mod:`ecluster.commands` (one module per area, each exposing
``register(app)``), found here by listing that package, so adding an area is adding a
file. Errors are one line on stderr and a non-zero exit (see
:mod:`ecluster.commands.common`).
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Annotated

import typer

import ecluster.commands as commands_pkg
from ecluster.commands.common import IDENTITY_ENV, KEYS_ENV, SESSION, run_app

HELP = """ecluster: the high-availability layer of a clustered mail server.

Every command that needs the cluster file takes --config FILE (or $ECLUSTER_CONFIG; default /etc/ecluster/cluster.toml). Over tcp the CLI acts as --identity (default admin) with the keys of --keys DIR (default: the cluster file's `keys`).

Example: ecluster status -c cluster.toml
"""

SKIP = {"common"}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("ecluster")
    except PackageNotFoundError:       # running from a source tree that is not installed
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"ecluster {version()}")
        raise typer.Exit()


def root_options(
        keys: Annotated[Path | None, typer.Option(
            "--keys", envvar=KEYS_ENV, metavar="DIR", show_envvar=True,
            help="This host's key directory (its bundle: `ecluster keys bundle`), "
                 "instead of the cluster file's `keys`.")] = None,
        identity: Annotated[str | None, typer.Option(
            "--identity", envvar=IDENTITY_ENV, metavar="NAME", show_envvar=True,
            help="Act over tcp with <keys>/NAME.key_secret (default: admin).")] = None,
        show_version: Annotated[bool, typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit.")] = False):
    """Options of every command."""
    SESSION["keys"] = keys
    SESSION["identity"] = identity


def build_app() -> typer.Typer:
    """The application with every command area registered."""
    app = typer.Typer(name="ecluster", help=HELP, no_args_is_help=True, pretty_exceptions_enable=False,
                      add_completion=True, rich_markup_mode="rich")
    app.callback()(root_options)
    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda i: i.name):
        if info.name in SKIP or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands_pkg.__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)
    return app


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ecluster``; returns the exit status."""
    return run_app(build_app(), "ecluster", argv)


def eccfg_main(argv: list[str] | None = None) -> int:
    """Entry point of ``eccfg``: the ``config`` command group as its own program."""
    from ecluster.commands.config import app as config_app
    return run_app(config_app, "eccfg", argv)


if __name__ == "__main__":
    sys.exit(main())
