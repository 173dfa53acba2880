"""A small stream of mail for ``ecluster demo``: one SMTP transaction per message.

    python -m ecluster.mailsend --vip 10.77.0.100 --vip 10.77.0.101 --port 25 --rate 4 \\
        --source 10.77.0.50 --source 10.77.0.51 --domain example.com --reject-every 10

Messages go to the VIPs in turn, each from the next source address. A message that
fails (no connection, a 4xx answer) is tried again on the same VIP after a short pause,
up to ``--retries`` times, as an MTA would retry: during a failover the VIP comes back
on another node. Every ``--reject-every``-th message is addressed to a domain the
cluster does not accept, so the ``rejects`` series has something to count.

One JSON line per message on stdout: ``{"n", "t", "vip", "src", "result", "code",
"id", "attempts"}`` with result ``accepted`` (250 after DATA), ``refused`` (5xx) or
``failed`` (gave up). SIGTERM ends the stream after the current message.
"""
from __future__ import annotations

import argparse
import email.utils
import json
import signal
import smtplib
import socket
import sys
import time

_stop = False


def message_bytes(n: int, sender: str, rcpt: str, now: float) -> bytes:
    """Message number ``n`` (CRLF line ends, as it goes on the wire). Pure."""
    lines = [f"From: {sender}", f"To: {rcpt}", f"Subject: ecluster demo message {n}",
             f"Date: {email.utils.formatdate(now)}", f"Message-ID: <demo.{n}.{int(now * 1000)}@client.demo.test>",
             "", f"Demo message {n}.", "It travels to a VIP and lands in one node's spool.", ""]
    return "\r\n".join(lines).encode()


def recipient(n: int, domain: str, reject_every: int) -> str:
    """The recipient of message ``n``: every ``reject_every``-th one a refused domain. Pure."""
    if reject_every and n % reject_every == 0:
        return f"user{n}@not-accepted.invalid"
    return f"user{n}@{domain}"


def send_one(vip: str, port: int, source: str | None, rcpt: str, data: bytes, timeout: float) -> tuple[str, int, str]:
    """One transaction: (result, code, text) with result accepted / refused / retry."""
    try:
        with smtplib.SMTP(vip, port, timeout=timeout,
                          source_address=(source, 0) if source else None) as s:
            s.ehlo("client.demo.test")
            code, text = s.mail("sender@client.demo.test")
            if code >= 400:
                return ("refused" if code >= 500 else "retry"), code, text.decode(errors="replace")
            code, text = s.rcpt(rcpt)
            if code >= 400:
                return ("refused" if code >= 500 else "retry"), code, text.decode(errors="replace")
            code, text = s.data(data)
            text = text.decode(errors="replace")
            if code == 250:
                return "accepted", code, text
            return ("refused" if code >= 500 else "retry"), code, text
    except (OSError, smtplib.SMTPException) as e:
        return "retry", 0, str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Send a stream of mail to VIPs (for ecluster demo).")
    ap.add_argument("--vip", action="append", required=True, help="a VIP to send to (repeat)")
    ap.add_argument("--port", type=int, default=25)
    ap.add_argument("--rate", type=float, default=4.0, help="messages per second")
    ap.add_argument("--duration", type=float, default=0.0, help="seconds to run (0: until SIGTERM)")
    ap.add_argument("--source", action="append", default=[], help="a source address to send from (repeat)")
    ap.add_argument("--domain", default="example.com", help="the recipient domain the cluster accepts")
    ap.add_argument("--reject-every", type=int, default=10, help="every Nth message to a refused domain (0: none)")
    ap.add_argument("--retries", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--tag", default="", help="free text (lets a supervisor find this process)")
    args = ap.parse_args(argv)
    if args.rate <= 0:
        ap.error("--rate must be positive")

    def stop(*_):
        global _stop
        _stop = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    start = time.monotonic()
    n = 0
    while not _stop and (not args.duration or time.monotonic() - start < args.duration):
        n += 1
        vip = args.vip[(n - 1) % len(args.vip)]
        src = args.source[(n - 1) % len(args.source)] if args.source else None
        rcpt = recipient(n, args.domain, args.reject_every)
        data = message_bytes(n, "sender@client.demo.test", rcpt, time.time())
        attempts = 0
        while True:
            attempts += 1
            result, code, text = send_one(vip, args.port, src, rcpt, data, args.timeout)
            if result != "retry" or attempts > args.retries or _stop:
                break
            time.sleep(0.5)
        if result == "retry":
            result = "failed"
        line = {"n": n, "t": round(time.time(), 3), "vip": vip, "src": src, "result": result, "code": code,
                "attempts": attempts}
        if result == "accepted":
            line["id"] = text.rsplit(" ", 1)[-1]
        else:
            line["error"] = text[:200]
        try:
            print(json.dumps(line), flush=True)
        except BrokenPipeError:
            return 0
        behind = time.monotonic() - (start + n / args.rate)
        if behind > 1.0:            # after a long retry: go on at the rate, no burst to catch up
            start += behind
        time.sleep(max(0.0, start + n / args.rate - time.monotonic()))
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    sys.exit(main())
