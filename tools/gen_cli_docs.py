#!/usr/bin/env python3
"""Write docs/CLI.md, the command reference, from the ``ecluster`` typer application.

    .venv/bin/python tools/gen_cli_docs.py            # (re)write docs/CLI.md
    .venv/bin/python tools/gen_cli_docs.py --check    # exit 1 if docs/CLI.md is out of date

Walks the click command tree behind the typer app (every group and command, hidden ones
left out) and writes, per command: its usage line, its help text (the docstring, with its
example), its arguments and its options with their help, defaults and environment
variables. The output depends only on the code, so a test can compare it with the file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "CLI.md"
PROG = "ecluster"

HEADER = f"""# `{PROG}` command reference

Generated from the typer application by `tools/gen_cli_docs.py`; do not edit by hand.
After changing a command, run `.venv/bin/python tools/gen_cli_docs.py` (a test fails while
this file is out of date). Every command also answers `--help`.

`eccfg` is the `{PROG} config` group as a program of its own: `eccfg commit ...` is
`{PROG} config commit ...`.
"""


def _ctx(cmd, name: str, parent=None):
    return cmd.context_class(cmd, info_name=name, parent=parent)


def _is_group(cmd) -> bool:
    return hasattr(cmd, "list_commands")


def _arg_name(p) -> str:
    name = p.metavar or p.name.upper()
    if getattr(p, "nargs", 1) == -1 and not name.endswith("..."):
        name += "..."
    return name if p.required else f"[{name}]"


def usage(cmd, ctx) -> str:
    """``ecluster vip move [OPTIONS] ADDRESS NODE`` (arguments by name, not typer's braces)."""
    params = cmd.get_params(ctx)
    pieces = [ctx.command_path]
    if any(not _is_argument(p) for p in params):
        pieces.append("[OPTIONS]")
    pieces += [_arg_name(p) for p in params if _is_argument(p)]
    if _is_group(cmd):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def _is_argument(p) -> bool:
    return type(p).__name__.endswith("Argument")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def params_table(cmd, ctx) -> list[str]:
    rows = []
    for p in cmd.get_params(ctx):
        if getattr(p, "hidden", False) or p.name == "help":
            continue
        record = p.get_help_record(ctx)
        text = record[1] if record else ""
        if _is_argument(p):
            names = _arg_name(p)
        else:
            names = record[0] if record else ", ".join(p.opts)
        rows.append(f"| `{_cell(names)}` | {_cell(text)} |")
    if not rows:
        return []
    return ["| argument / option | description |", "|---|---|", *rows, ""]


def help_text(cmd) -> str:
    text = (cmd.help or "").strip()
    # "Example: ..." lines become code so they can be copied as they are
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("Example:") and len(s) > len("Example:"):
            out += ["Example:", "", "```", s[len("Example:"):].strip(), "```"]
        else:
            out.append(line)
    return "\n".join(out)


def walk(cmd, ctx, depth: int = 0):
    """Yield (command, context) for ``cmd`` and everything under it, in the app's order."""
    yield cmd, ctx
    if _is_group(cmd):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            yield from walk(sub, _ctx(sub, name, ctx), depth + 1)


def render_markdown() -> str:
    """The whole reference as markdown (pure apart from building the app)."""
    import typer

    from ecluster.cli import build_app
    root = typer.main.get_command(build_app())
    root_ctx = _ctx(root, PROG)
    entries = list(walk(root, root_ctx))
    lines = [HEADER, "## Commands", ""]
    for cmd, ctx in entries[1:]:
        depth = ctx.command_path.count(" ") - 1
        anchor = ctx.command_path.replace(" ", "-")
        summary = _cell(cmd.get_short_help_str(limit=200)) if not _is_group(cmd) else _cell((cmd.help or "").split("\n")[0])
        lines.append(f"{'  ' * depth}- [`{ctx.command_path}`](#{anchor}): {summary}")
    lines.append("")
    for cmd, ctx in entries:
        anchor = ctx.command_path.replace(" ", "-")
        lines += [f'<a id="{anchor}"></a>', "", f"## `{ctx.command_path}`", "", "```", usage(cmd, ctx), "```", ""]
        text = help_text(cmd)
        if text:
            lines += [text, ""]
        lines += params_table(cmd, ctx)
        if _is_group(cmd):
            subs = [n for n in cmd.list_commands(ctx) if not getattr(cmd.get_command(ctx, n), "hidden", False)]
            lines += ["Commands: " + ", ".join(f"[`{n}`](#{anchor}-{n})" for n in subs), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write docs/CLI.md from the ecluster typer app.")
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/CLI.md is out of date")
    ap.add_argument("--output", type=Path, default=OUT, help="where to write (default docs/CLI.md)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    text = render_markdown()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run .venv/bin/python tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
