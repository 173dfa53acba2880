"""The check of Postfix settings in the replicated configuration, before a commit is accepted.

Registered as the ``ecluster.validators`` entry point ``postfix``: configsync calls
:func:`validate_file` for every file of a proposed tree (on the member that prepares the
commit and on the coordinator that accepts it), and a problem refuses the whole commit,
naming the file and line. Files under ``<dir>/postfix/`` (``dir`` = ``global``, ``default``
or a node's name) are checked; only ``postfix/main.cf.d/*.cf`` is read by the plug-in, so
anything else there is refused rather than silently ignored.

What is checked, in order (the first two need no Postfix, the rest use Postfix's own tools
and are skipped, with a warning in the log, where ``postconf`` is not installed):

1. main.cf syntax and managed parameters (:func:`ecluster_postfix.render.parse_fragment`);
2. each parameter is known to Postfix: ``postconf -n`` over a scratch instance holding the
   fragment warns ``unused parameter`` for a name nothing uses;
3. values of numeric, boolean and time parameters have that form (the kind is read from
   Postfix's own default, ``postconf -d``): Postfix would otherwise refuse them only when
   a daemon starts, on every node at once;
4. ``postfix check`` over the scratch instance (global parameters, directories).

This module may run a few short Postfix commands; it must not touch a running instance.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from ecluster_postfix.render import FragmentError, Parameter, parse_fragment

log = logging.getLogger("ecluster.postfix.validate")

FRAGMENT_DIR = "postfix/main.cf.d/"
_PATH_RE = re.compile(r"^(?P<dir>[^/]+)/postfix/(?P<rest>.+)$")
_FRAGMENT_RE = re.compile(r"^main\.cf\.d/[A-Za-z0-9_.-]+\.cf$")
_UNUSED_RE = re.compile(r"unused parameter: ([A-Za-z0-9_]+)=")
_FATAL_RE = re.compile(r"fatal: (.*)")
_TIME_RE = re.compile(r"^[0-9]+[smhdw]?$")
POSTCONF = "/usr/sbin/postconf"
POSTFIX = "/usr/sbin/postfix"
TOOL_TIMEOUT = 20.0


def is_postfix_path(path: str) -> bool:
    return bool(_PATH_RE.match(path))


def validate_file(path: str, data: bytes) -> list[tuple[int, str]]:
    """``ecluster.validators`` contract: (path in the repository, bytes) -> [(line, reason)].

    Every commit validates the whole tree, so results are kept per (path, content): an
    unchanged fragment costs nothing the second time."""
    if not _PATH_RE.match(path):
        return []
    return list(_validate_cached(path, bytes(data)))


@lru_cache(maxsize=512)
def _validate_cached(path: str, data: bytes) -> tuple[tuple[int, str], ...]:
    return tuple(_validate(path, data))


def _validate(path: str, data: bytes) -> list[tuple[int, str]]:
    m = _PATH_RE.match(path)
    if not m:
        return []
    if not _FRAGMENT_RE.match(m.group("rest")):
        return [(0, "only postfix/main.cf.d/<name>.cf files are read by ecluster-postfix")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [(0, "not valid UTF-8")]
    try:
        params = parse_fragment(path, text)
    except FragmentError as e:
        return [(e.line, e.reason)]
    if not params:
        return []
    return deep_check(params)


def value_problem(name: str, value: str, default: str | None) -> str | None:
    """Whether ``value`` cannot be a value of ``name`` whose default is ``default``. Pure.

    Only values that are literal (no ``$`` expansion) are judged, by the shape of the
    default: an integer, yes/no, or a time with a unit letter."""
    if default is None or "$" in value or value == "":
        return None
    d = default.strip()
    if re.fullmatch(r"-?[0-9]+", d) and not re.fullmatch(r"-?[0-9]+", value):
        return f"{name} must be a number, got {value[:40]!r}"
    if d in ("yes", "no") and value.lower() not in ("yes", "no"):    # Postfix refuses true/false
        return f"{name} must be yes or no, got {value[:40]!r}"
    if re.fullmatch(r"[0-9]+[smhdw]", d) and not _TIME_RE.match(value):
        return f"{name} must be a time such as 30s or 5m, got {value[:40]!r}"
    return None


@lru_cache(maxsize=1)
def postfix_defaults() -> dict[str, str] | None:
    """``postconf -d`` as a dict, or None where Postfix is not installed."""
    if not os.path.exists(POSTCONF):
        return None
    try:
        out = subprocess.run([POSTCONF, "-d"], capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                             env=_env(), stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("postconf -d failed: %s", e)
        return None
    out_map = {}
    for line in out.splitlines():
        k, _, v = line.partition(" = ")
        out_map[k.strip()] = v
    return out_map


def _env() -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


def deep_check(params: list[Parameter]) -> list[tuple[int, str]]:
    """Checks 2-4 of the module docstring over a scratch instance; [] when Postfix is absent."""
    defaults = postfix_defaults()
    if defaults is None:
        log.warning("postconf not found: Postfix settings checked for syntax only")
        return []
    line_of = {p.name: p.line for p in params}
    errors: list[tuple[int, str]] = []
    for p in params:
        why = value_problem(p.name, p.value, defaults.get(p.name))
        if why:
            errors.append((p.line, why))
    scratch = Path(tempfile.mkdtemp(prefix="eclpf-"))
    try:
        etc, queue, data = scratch / "etc", scratch / "q", scratch / "d"
        for d in (etc, queue, data):
            d.mkdir()
        try:
            shutil.chown(data, "postfix")
        except (LookupError, OSError):
            pass
        # a fixed host name: Postfix would otherwise look this host's name up (DNS) every time
        body = [f"config_directory = {etc}", f"queue_directory = {queue}", f"data_directory = {data}",
                "compatibility_level = 3.6", "maillog_file = /dev/stdout", "inet_protocols = ipv4",
                "myhostname = check.invalid", "mydomain = invalid"]
        body += [f"{p.name} = {p.value}" for p in params]
        (etc / "main.cf").write_text("\n".join(body) + "\n")
        master = Path("/etc/postfix/master.cf")
        (etc / "master.cf").write_text(master.read_text() if master.exists() else "")
        try:
            r = subprocess.run([POSTCONF, "-c", str(etc), "-n"], capture_output=True, text=True,
                               timeout=TOOL_TIMEOUT, env=_env(), stdin=subprocess.DEVNULL)
            for name in _UNUSED_RE.findall(r.stderr):
                if name in line_of:
                    errors.append((line_of[name], f"unknown Postfix parameter {name} (postconf: unused parameter)"))
            if os.geteuid() == 0 and os.path.exists(POSTFIX):
                r = subprocess.run([POSTFIX, "-c", str(etc), "check"], capture_output=True, text=True,
                                   timeout=TOOL_TIMEOUT, env=_env(), stdin=subprocess.DEVNULL)
                if r.returncode != 0:
                    why = _FATAL_RE.search(r.stdout + r.stderr)
                    text = why.group(1) if why else (r.stdout + r.stderr).strip().splitlines()[-1:] or ["failed"]
                    text = text if isinstance(text, str) else text[0]
                    line = next((line_of[n] for n in line_of if re.search(rf"\b{n}\b", text)), 0)
                    errors.append((line, f"postfix check: {text[:200]}"))
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append((0, f"cannot run Postfix's checks: {e}"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    errors.sort()
    return errors
