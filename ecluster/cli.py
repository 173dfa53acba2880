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

import typer

import ecluster.commands as commands_pkg
from ecluster.commands.common import run_app

HELP = """ecluster: the high-availability layer of a clustered mail server.

Every command that needs the cluster file takes --config FILE (or $ECLUSTER_CONFIG).

Example: ecluster status -c cluster.toml
"""

SKIP = {"common"}


def build_app() -> typer.Typer:
    """The application with every command area registered."""
    app = typer.Typer(name="ecluster", help=HELP, no_args_is_help=True, pretty_exceptions_enable=False,
                      add_completion=False, rich_markup_mode="rich")
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
