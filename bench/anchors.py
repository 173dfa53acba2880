"""What the benches share: loopback ports, child processes, waiting, bench cluster files,
and the raw pyzmq anchors an ecluster figure is put beside.

A bench imports it with bench/ on sys.path after the repository root (bench/ is not a
package, and bench/bus.py would shadow the ``bus`` package if bench/ came first)::

    sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
    import anchors

A raw anchor runs its sender as a child: ``python bench/anchors.py push PORT N BATCH SIZE``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import zmq

HERE = os.path.abspath(__file__)


def terminate_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every finally clause of a bench cleans up.

    Only in this process: children that inherit the handler before they exec (pyroute2's netns
    helpers are forked and ended with SIGTERM) keep the signal's default meaning."""
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def bench_main(name: str, argv: list[str], parse_args, run, report, error: type[Exception],
               exit_code=lambda doc: 0, interrupted: str = "interrupted; everything started was stopped") -> int:
    """A bench's main(): arguments (``error`` from ``parse_args``: one line, exit 2), SIGTERM
    unwinding like Ctrl-C, ``run(args)`` (``error``: one line, exit 1; Ctrl-C: exit 130), the
    report on stdout, the JSON to ``args.json`` if asked, then ``exit_code(doc)``."""
    import json
    try:
        args = parse_args(argv)
    except error as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    terminate_on_sigterm()
    try:
        doc = run(args)
    except error as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: {interrupted}", file=sys.stderr)
        return 130
    print()
    print(report(doc))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"\nJSON: {args.json}")
    return exit_code(doc)


def free_ports(n: int) -> list[int]:
    """``n`` distinct tcp ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Children:
    """Subprocesses of a bench, each logging to ``<log_dir>/<name>.log``, stopped by PID."""

    def __init__(self, log_dir: Path, stop_timeout: float = 10.0):
        self.log_dir = Path(log_dir)
        self.stop_timeout = stop_timeout
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], name: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            p = subprocess.Popen(argv, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        """SIGTERM, then SIGKILL if it is still there after ``stop_timeout``."""
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        self._reap(p)

    def stop_all(self) -> None:
        """Stop every child: all signalled first, so they wind down together."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            self._reap(p)

    def _reap(self, p: subprocess.Popen) -> None:
        try:
            p.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something true (returned); exit the bench after
    ``timeout`` seconds. An exception from ``cond`` means "not yet"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception:  # noqa: BLE001 - not yet
            pass
        time.sleep(interval)
    raise SystemExit(f"bench: {what} not true within {timeout:g}s")


def member_table(role: str, name: str, data_dir: Path, ports: dict[str, int]) -> str:
    """One ``[nodes.<name>]`` or ``[managers.<name>]`` table of a loopback cluster file. Pure."""
    lines = [f"[{role}.{name}]", 'address = "127.0.0.1"', f'data_dir = "{data_dir}"']
    lines += [f"{key} = {port}" for key, port in ports.items()]
    return "\n".join(lines) + "\n"


def write_cluster(base: Path, text: str, members: list[str]):
    """Write ``base/cluster.toml`` with ``text``, keys for ``members`` and the admin; load it."""
    from bus import keys as keymod
    from ecluster.clusterfile import load_cluster
    path = base / "cluster.toml"
    path.write_text(text)
    for name in (*members, keymod.ADMIN):
        keymod.create(base / "keys", name)
    return load_cluster(path)


# -- raw pyzmq anchors ------------------------------------------------------------------------------

def record(k: int, size: int) -> bytes:
    """Record ``k`` of a bench: its number, then filler up to ``size`` bytes. Pure."""
    head = b"%010d " % k
    return head + b"r" * (size - len(head))


def child_push(port: int, n: int, batch: int, size: int) -> None:
    """The sender of :func:`raw_push_pull`: ``n`` ``[seq, record]`` pairs, ``batch`` a message."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.connect(f"tcp://127.0.0.1:{port}")
    packb = msgpack.packb
    recs = [record(k, size) for k in range(min(n, 10_000))]
    if batch == 1:
        for k in range(n):
            s.send(packb([k, recs[k % len(recs)]], use_bin_type=True))
    else:
        for i in range(0, n, batch):
            s.send(packb([[k, recs[k % len(recs)]] for k in range(i, min(n, i + batch))], use_bin_type=True))
    s.close(linger=-1)
    ctx.term()


def raw_push_pull(n: int, batch: int, size: int, log_dir: Path) -> float:
    """Records/s of raw pyzmq PUSH (another process) -> PULL (here) on loopback tcp, msgpack
    ``[seq, record]`` pairs, ``batch`` to a message (1: one pair a message). Timed from the
    first message received, which is not counted."""
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    kids = Children(log_dir)
    try:
        p = kids.start([sys.executable, HERE, "push", str(port), str(n), str(batch), str(size)], f"push-{batch}")
        got = 0
        t0 = None
        unpackb = msgpack.unpackb
        while got < n:
            msg = unpackb(pull.recv(), raw=False)
            if t0 is None:
                t0 = time.perf_counter()
            got += len(msg) if batch > 1 else 1
        rate = (n - (batch if batch > 1 else 1)) / (time.perf_counter() - t0)
        p.wait(timeout=30)
    finally:
        kids.stop_all()
        pull.close(linger=0)
    return rate


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "push":
        child_push(*(int(a) for a in sys.argv[2:]))
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} push PORT N BATCH SIZE (a child of raw_push_pull)")
