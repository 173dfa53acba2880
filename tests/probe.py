#!/usr/bin/env python3
"""probe.py VIP PORT DURATION INTERVAL -- the client's view of a service address.

Every INTERVAL seconds, for DURATION seconds, start a new non-blocking connection to VIP:PORT
and read the answering node's name (whoami.py); attempts overlap (each may take up to
ATTEMPT_TIMEOUT_S), so a SYN lost in a handover costs only that attempt, never the cadence:
the client-visible gap (last answer before to first answer after) is measured to about one
INTERVAL. EVERY finished attempt is recorded as (t0, t1, who|None, err|None), t0/t1 on the
time.time() scale (t1: when the name arrived, or when the attempt failed). At the end (or on
SIGTERM/SIGINT) the records are printed as JSON lines {"t0", "t1", "who", "err"}, by t0.
Attempts still unfinished at the end get STOP_GRACE_S to finish; those that do not are
dropped (their outcome is unknown), and their number is printed to stderr.

One thread, one epoll selector: no thread per attempt, so the probe stays light (its CPU
use is printed to stderr at the end).
"""

import errno
import json
import resource
import selectors
import signal
import socket
import sys
import threading
import time
from typing import NamedTuple

ATTEMPT_TIMEOUT_S = 0.25     # below the kernel's first SYN retransmission (1 s)
STOP_GRACE_S = 0.1
MAX_ANSWER = 256


class UsageError(Exception):
    """Bad command line."""


class ProbeRecord(NamedTuple):
    """One connection attempt: start, end, who answered (None: nobody), why not (or None)."""
    t0: float
    t1: float
    who: str | None
    err: str | None = None


class _Attempt:
    """An attempt in flight: its socket, start, deadline, phase ("connect" or "read"), data."""
    __slots__ = ("sock", "t0", "deadline", "phase", "data")

    def __init__(self, sock: socket.socket, t0: float, deadline: float):
        self.sock, self.t0, self.deadline = sock, t0, deadline
        self.phase, self.data = "connect", b""


def error_name(code: int) -> str:
    """How a failed attempt is labelled: "refused", "timeout" or the error's text. Pure."""
    if code == errno.ECONNREFUSED:
        return "refused"
    if code == errno.ETIMEDOUT:
        return "timeout"
    return errno.errorcode.get(code, str(code)) if code else "error"


class Prober:
    """Starts an attempt every ``interval`` s and advances all of them on one selector."""

    def __init__(self, vip: str, port: int, interval: float, timeout: float = ATTEMPT_TIMEOUT_S):
        self.addr, self.interval, self.timeout = (vip, port), interval, timeout
        self.sel = selectors.DefaultSelector()
        self.inflight: set[_Attempt] = set()
        self.records: list[ProbeRecord] = []
        self.dropped = 0

    def _forget(self, a: _Attempt) -> None:
        self.inflight.discard(a)
        try:
            self.sel.unregister(a.sock)
        except (KeyError, ValueError):
            pass
        a.sock.close()

    def _finish(self, a: _Attempt, who: str | None, err: str | None) -> None:
        self.records.append(ProbeRecord(a.t0, time.time(), who, err))
        self._forget(a)

    def launch(self) -> None:
        """Start one attempt (connect in progress, or failed at once)."""
        t0 = time.time()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:          # e.g. out of file descriptors: a failed attempt, not a crash
            self.records.append(ProbeRecord(t0, time.time(), None, error_name(e.errno or 0)))
            return
        sock.setblocking(False)
        a = _Attempt(sock, t0, time.monotonic() + self.timeout)
        code = sock.connect_ex(self.addr)
        self.inflight.add(a)
        if code == 0:
            a.phase = "read"
            self.sel.register(sock, selectors.EVENT_READ, a)
        elif code in (errno.EINPROGRESS, errno.EAGAIN):
            self.sel.register(sock, selectors.EVENT_WRITE, a)
        else:
            self._finish(a, None, error_name(code))

    def _advance(self, a: _Attempt) -> None:
        if a.phase == "connect":
            code = a.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._finish(a, None, error_name(code))
                return
            a.phase = "read"
            self.sel.modify(a.sock, selectors.EVENT_READ, a)
            return
        try:
            chunk = a.sock.recv(MAX_ANSWER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._finish(a, None, error_name(e.errno or 0))
            return
        a.data += chunk
        if chunk and not a.data.endswith(b"\n") and len(a.data) < MAX_ANSWER:
            return
        who = a.data.decode(errors="replace").strip() or None
        self._finish(a, who, None if who else "empty")

    def poll(self, until: float) -> None:
        """Advance attempts until monotonic time ``until`` (at least one non-blocking look)."""
        while True:
            wait = max(0.0, until - time.monotonic())
            if self.inflight:
                wait = min(wait, max(0.0, min(a.deadline for a in self.inflight) - time.monotonic()))
                for key, _ in self.sel.select(wait):
                    self._advance(key.data)
            elif wait > 0:
                time.sleep(wait)
            now = time.monotonic()
            for a in [a for a in self.inflight if a.deadline <= now]:
                self._finish(a, None, "timeout")
            if now >= until:
                return

    def drop_inflight(self) -> None:
        """Forget unfinished attempts (outcome unknown)."""
        for a in list(self.inflight):
            self.dropped += 1
            self._forget(a)
        self.sel.close()


    def run(self, duration: float, stop: threading.Event | None = None) -> list[ProbeRecord]:
        """Start an attempt every interval (fixed cadence) for `duration` s or until `stop`;
        then STOP_GRACE_S for the unfinished ones. The finished attempts, by start time."""
        stop = stop or threading.Event()
        end = time.monotonic() + duration
        next_start = time.monotonic()
        while not stop.is_set() and time.monotonic() < end:
            self.launch()
            # after a stall, resume the cadence from now rather than bursting
            next_start = max(next_start + self.interval, time.monotonic())
            self.poll(min(next_start, end))
        grace_end = time.monotonic() + STOP_GRACE_S
        while self.inflight and time.monotonic() < grace_end:
            self.poll(min(grace_end, time.monotonic() + self.interval))
        self.drop_inflight()
        return sorted(self.records, key=lambda r: (r.t0, r.t1))


def probe(vip: str, port: int, duration: float, interval: float,
          stop: threading.Event | None = None, timeout: float = ATTEMPT_TIMEOUT_S) -> list[ProbeRecord]:
    """Probe VIP:PORT (see Prober.run); the finished attempts, by start time."""
    return Prober(vip, port, interval, timeout).run(duration, stop)


def parse_args(argv: list[str]) -> tuple[str, int, float, float]:
    if len(argv) != 4:
        raise UsageError("usage: probe.py VIP PORT DURATION INTERVAL")
    vip = argv[0]
    try:
        port, duration, interval = int(argv[1]), float(argv[2]), float(argv[3])
    except ValueError:
        raise UsageError("PORT must be an integer, DURATION and INTERVAL numbers") from None
    if not 1 <= port <= 65535 or duration < 0 or interval <= 0:
        raise UsageError("need 1 <= PORT <= 65535, DURATION >= 0, INTERVAL > 0")
    return vip, port, duration, interval


def main(argv: list[str]) -> int:
    try:
        vip, port, duration, interval = parse_args(argv)
    except UsageError as e:
        print(f"probe.py: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    wall0, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    prober = Prober(vip, port, interval)
    records = prober.run(duration, stop)
    out = sys.stdout
    for r in records:
        out.write(json.dumps({"t0": round(r.t0, 6), "t1": round(r.t1, 6),
                              "who": r.who, "err": r.err}) + "\n")
    out.flush()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    wall = max(1e-9, time.monotonic() - wall0)
    used = cpu.ru_utime - cpu0.ru_utime + cpu.ru_stime - cpu0.ru_stime
    print(f"probe.py: {len(records)} attempts in {wall:.1f} s, {prober.dropped} unfinished at the end, "
          f"cpu {used:.2f} s ({100 * used / wall:.1f}% of one core)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
