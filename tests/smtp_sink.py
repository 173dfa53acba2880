#!/usr/bin/env python3
"""smtp_sink.py ADDRESS PORT OUT -- an SMTP server that accepts everything and appends one
JSON line per message to OUT: the client's address, envelope sender and recipients, and the
Message-ID. The receiving end of the outbound-address test (runs in the lab's client namespace)."""
import asyncio
import json
import re
import sys

from aiosmtpd.controller import Controller


class Recorder:
    def __init__(self, out: str):
        self.out = out

    async def handle_DATA(self, server, session, envelope):
        m = re.search(rb"^Message-I[dD]: *(<[^>\r\n]+>)", envelope.original_content or b"", re.M)
        rec = {"peer": session.peer[0], "from": envelope.mail_from, "to": envelope.rcpt_tos,
               "mid": m.group(1).decode() if m else ""}
        with open(self.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return "250 2.0.0 stored"


def main() -> None:
    address, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ctl = Controller(Recorder(out), hostname=address, port=port)
    ctl.start()
    try:
        asyncio.run(asyncio.Event().wait())
    finally:
        ctl.stop()


if __name__ == "__main__":
    main()
