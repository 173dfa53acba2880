"""supervisord, started so that a member's programs share its imported pages.

    python -m node.zygote -n -c <data_dir>/run/supervisord.conf

Every program of a member is a Python process that imports the same modules (zmq, msgpack,
asyncio, the bus, the service base, the cluster file reader, the service's own module): as
a fresh interpreter each, a dozen of them cost a dozen copies of those pages and a dozen
start-ups' CPU. This entry point imports them once, then runs supervisord itself (same
configuration, same supervision: each program is supervisord's own child, with its pid,
its pipes, its restarts and its signals) with one change: where supervisord would
``execve`` one of *our* programs (``<this python> -m node.program bus|service run ...``),
the child it has just forked runs that program at once instead, on the pages it shares
with supervisord (copy-on-write; :func:`gc.freeze` keeps the collector off them). Any
other program (a plug-in's own binary) is exec'd as usual.

The child starts as supervisord's ``_spawn_as_child`` leaves it before the exec: in its own
process group, fds 0-2 on its log pipes and every other fd closed, in its directory and
umask, with the program's environment. It puts the signals supervisord caught back to
their defaults, takes the environment and the title (``setproctitle``: ``ps`` and the
footprint bench show the program's own command line), runs :func:`node.program.main` and
leaves with ``os._exit`` (never through supervisord's stack above it).

Must never: start a thread, a zmq context or an event loop before the fork (the children
would inherit them half-made), nor import anything whose import has effects a child must
not share. Module state that must differ per process is re-made after the fork
(``os.register_at_fork``: bus.envelope's id prefix; ``random`` does it itself).

The runner (``ecluster node run``) execs this after taking the data-directory lock, so the
member is one supervisord process and its programs; each program asks for SIGTERM when
supervisord dies (PR_SET_PDEATHSIG). ``ECLUSTER_NO_ZYGOTE=1`` in the runner's environment
runs plain ``supervisord`` as the runner's child instead.
"""
from __future__ import annotations

import gc
import logging
import os
import re
import shlex
import signal
import sys
import traceback

#: modules every program of a member imports: loaded once, before supervisord starts
COMMON = ("ctypes", "asyncio", "zmq", "msgpack", "bus.envelope", "bus.transport", "bus.client", "bus.broker",
          "services.base", "ecluster.clusterfile", "ecluster.timing", "node.program", "node.datadir",
          "node.fsutil")
#: the signals supervisord handles (supervisor.options.ServerOptions.setsignals)
SUPERVISORD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
                       signal.SIGUSR2)
_COMMAND = re.compile(r"^command=(.*)$", re.M)


def our_program(filename: str, argv: list[str], python: str = sys.executable) -> list[str] | None:
    """The node.program arguments when supervisord is about to exec one of our programs
    with this interpreter (``python -m node.program ... bus|service run ...``), else None. Pure."""
    if len(argv) < 4 or argv[1:3] != ["-m", "node.program"]:
        return None
    if os.path.realpath(filename) != os.path.realpath(python):
        return None
    args = argv[3:]
    words = [a for a in args if not a.startswith("-")]
    if "run" not in words or not ({"bus", "service"} & set(words[:words.index("run")])):
        return None          # ``member run`` (a runner) is never forked from here
    return args


def services_in(conf_text: str) -> list[str]:
    """Service names of the programs of a supervisord.conf we wrote (``service run NAME``). Pure."""
    out = []
    for command in _COMMAND.findall(conf_text):
        words = shlex.split(command.replace("%%", "%"))
        for i in range(len(words) - 2):
            if words[i:i + 2] == ["service", "run"]:
                out.append(words[i + 2])
    return out


def preload(conf_text: str) -> list[str]:
    """Import what the member's programs import; the services' names whose class loaded."""
    import importlib
    for name in COMMON:
        importlib.import_module(name)
    from services.base import load_service
    loaded = []
    for name in services_in(conf_text):
        try:
            # its module and what that imports; not what it imports once it runs (pyroute2 for
            # vip, uvicorn for the console): measured, preloading those made every other
            # program ~1 MB bigger (more of the parent's heap copied on write) than it saved
            load_service(name)
            loaded.append(name)
        except Exception as e:           # the child will say why, in its own log, as before
            logging.getLogger("ecluster.zygote").warning("not preloading %s: %s", name, e)
    return loaded


def _die_with_parent() -> None:
    """SIGTERM when supervisord dies, even by SIGKILL (Linux PR_SET_PDEATHSIG): no program
    outlives its supervisor unowned."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG = 1
        if os.getppid() == 1:            # it died before we asked
            os.kill(os.getpid(), signal.SIGTERM)
    except Exception:
        pass


def run_forked(args: list[str], env: dict[str, str], title: str) -> None:
    """In supervisord's child, instead of the exec: run ``node.program`` and leave."""
    code = 1
    try:
        try:
            import setproctitle
            setproctitle.setproctitle(title)      # before the environment changes (it moved it)
        except Exception:        # cosmetic: ps then shows supervisord's command line
            pass
        for sig in SUPERVISORD_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent()
        gc.enable()
        os.environ.clear()
        os.environ.update(env)
        # fds 1 and 2 are this program's log pipes now; write through as PYTHONUNBUFFERED does
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.reconfigure(line_buffering=True, write_through=True)
            except Exception:
                pass
        logging.root.handlers.clear()          # node.program configures its own
        sys.argv = [sys.executable, "-m", "node.program", *args]
        from node.program import main
        code = main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def install(python: str = sys.executable) -> None:
    """Make supervisord fork our programs instead of exec'ing them (see the module docstring)."""
    from supervisor import options as sup_options
    exec_for_real = sup_options.ServerOptions.execve

    def execve(self, filename, argv, env):
        args = our_program(filename, list(argv), python)
        if args is None:
            return exec_for_real(self, filename, argv, env)
        run_forked(args, dict(env), " ".join(shlex.quote(a) for a in argv))

    sup_options.ServerOptions.execve = execve


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    conf = argv[argv.index("-c") + 1] if "-c" in argv[:-1] else None
    text = ""
    if conf:
        try:
            with open(conf) as f:
                text = f.read()
        except OSError:
            pass                         # supervisord will say so
    try:
        # set up once here, with the environment as the kernel gave it: the children only
        # write their titles (setproctitle moves the environment out of the way on first use)
        import setproctitle
        setproctitle.setproctitle(setproctitle.getproctitle())
    except Exception:
        pass
    gc.disable()                         # no collection while the shared pages are made
    preload(text)
    gc.collect()
    gc.freeze()                          # what exists now is never collected: its pages stay shared
    gc.enable()
    install()
    from supervisor import supervisord
    supervisord.main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
