#!/usr/bin/env python3
"""whoami.py NAME PORT [BIND] -- TCP server answering every connection with NAME + "\\n".

Each accepted connection gets the name and is closed at once, so a client learns which node
answered on an address (e.g. a VIP). SO_REUSEADDR is set so a restarted server rebinds at
once; IP_FREEBIND lets it bind an address (a VIP) that is not yet on any interface.
"""

import signal
import socket
import sys

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # Linux value; absent from older Pythons


class UsageError(Exception):
    """Bad command line."""


def parse_args(argv: list[str]) -> tuple[str, int, str]:
    """(name, port, bind address) from argv (without the program name)."""
    if len(argv) not in (2, 3):
        raise UsageError("usage: whoami.py NAME PORT [BIND]")
    name = argv[0]
    if not name or "\n" in name:
        raise UsageError("NAME must be a non-empty single line")
    try:
        port = int(argv[1])
    except ValueError:
        raise UsageError(f"PORT must be an integer, got {argv[1]!r}") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"PORT must be in 1..65535, got {port}")
    return name, port, argv[2] if len(argv) == 3 else "0.0.0.0"


def serve(name: str, port: int, bind: str = "0.0.0.0") -> None:
    """Accept forever, answering each connection with the name."""
    answer = name.encode() + b"\n"
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    srv.bind((bind, port))
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        try:
            conn.sendall(answer)
        except OSError:
            pass  # the client gave up already; keep serving others
        finally:
            conn.close()


def main(argv: list[str]) -> int:
    try:
        name, port, bind = parse_args(argv)
    except UsageError as e:
        print(f"whoami.py: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(name, port, bind)
    except OSError as e:
        print(f"whoami.py: cannot serve on {bind}:{port}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
