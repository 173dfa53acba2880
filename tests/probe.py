#!/usr/bin/env python3
"""probe.py VIP PORT DURATION INTERVAL -- the client's view of a service address.

Every INTERVAL seconds, for DURATION seconds, connect to VIP:PORT (50 ms connect timeout) and
read the answering node's name (whoami.py). EVERY attempt is recorded as (t0, t1, who|None,
err|None), t0/t1 on the time.time() scale, so outages can be bounded from both sides. At the
end (or on SIGTERM/SIGINT) the records are printed as JSON lines {"t0", "t1", "who", "err"}.
"""

import json
import signal
import socket
import sys
import threading
import time
from typing import NamedTuple

CONNECT_TIMEOUT_S = 0.05
READ_TIMEOUT_S = 0.2


class UsageError(Exception):
    """Bad command line."""


class ProbeRecord(NamedTuple):
    """One connection attempt: start, end, who answered (None: nobody), why not (or None)."""
    t0: float
    t1: float
    who: str | None
    err: str | None = None


def attempt(vip: str, port: int, connect_timeout: float = CONNECT_TIMEOUT_S,
            read_timeout: float = READ_TIMEOUT_S) -> ProbeRecord:
    """One connect + read of a name line."""
    t0 = time.time()
    who, err = None, None
    try:
        with socket.create_connection((vip, port), timeout=connect_timeout) as s:
            s.settimeout(read_timeout)
            data = b""
            while not data.endswith(b"\n") and len(data) < 256:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            who = data.decode(errors="replace").strip() or None
            if who is None:
                err = "empty"
    except socket.timeout:
        err = "timeout"
    except ConnectionRefusedError:
        err = "refused"
    except OSError as e:
        err = e.strerror or type(e).__name__
    return ProbeRecord(t0, time.time(), who, err)


def probe(vip: str, port: int, duration: float, interval: float,
          stop: threading.Event | None = None) -> list[ProbeRecord]:
    """Attempt every `interval` s (fixed cadence) for `duration` s or until `stop` is set."""
    stop = stop or threading.Event()
    records: list[ProbeRecord] = []
    end = time.monotonic() + duration
    next_start = time.monotonic()
    while not stop.is_set() and time.monotonic() < end:
        records.append(attempt(vip, port))
        # A slow attempt (timeout) delays the next one rather than causing a burst.
        next_start = max(next_start + interval, time.monotonic())
        stop.wait(max(0.0, min(next_start, end) - time.monotonic()))
    return records


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
    records = probe(vip, port, duration, interval, stop)
    out = sys.stdout
    for r in records:
        out.write(json.dumps({"t0": round(r.t0, 6), "t1": round(r.t1, 6),
                              "who": r.who, "err": r.err}) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
