"""docs/CLI.md is generated from the typer app (tools/gen_cli_docs.py) and must be up to date."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "tools" / "gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_up_to_date():
    text = _generator().render_markdown()
    current = (ROOT / "docs" / "CLI.md").read_text()
    assert current == text, "docs/CLI.md is out of date: run .venv/bin/python tools/gen_cli_docs.py"


def test_reference_covers_every_command_with_its_help():
    text = _generator().render_markdown()
    for path in ("ecluster status", "ecluster demo", "ecluster demo kill", "ecluster vip move",
                 "ecluster config commit", "ecluster service run"):
        assert f"## `{path}`" in text, path
    assert "| `-c, --config FILE` | The cluster file (TOML). [env var: ECLUSTER_CONFIG] |" in text
    # every command's section opens with its usage line
    for header in re.findall(r"^## `([^`]+)`$", text, re.M):
        section = text.split(f"## `{header}`\n", 1)[1]
        assert section.startswith(f"\n```\n{header} "), header
