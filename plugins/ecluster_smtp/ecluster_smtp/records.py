"""Journal records of the SMTP plug-in: one JSON object per record (one line each).

* ``mainlog`` (the node's standard log) gets one *reception* record per accepted message,
  written before the client is answered 250::

    {"type": "reception", "time", "id", "node", "vip", "port", "peer", "helo", "from",
     "rcpt": [...], "size", "spool"}

  and a *withdrawal* when a reception record is (or may yet be) journalled although the
  client got 451 (the journal write timed out, or the spool commit failed after it)::

    {"type": "withdrawn", "time", "id", "node", "reason"}

  A reader pairs them by ``id``: a withdrawn message is not in any spool (the client sends
  it again). A withdrawal may come without its reception record (the write never landed)
  and may come twice; both mean the same.

* the plug-in's own log (``[services.smtp].log``, default ``smtplog``) gets session
  events, written in the background: ``connect``, ``reject`` (with ``stage``: rcpt, data,
  size), ``accept``, ``disconnect``.

Records are compact JSON without newlines, so the managers' aggregated files
(``<root>/<day>/<log>/<node>``) hold one record per line.
"""
from __future__ import annotations

import json
from typing import Any


def _dump(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def reception_record(*, msg_id: str, node: str, vip: str, port: int, peer: str, helo: str, mail_from: str,
                     rcpts: list[str], size: int, spool: str, at: float) -> bytes:
    """The mainlog record of an accepted message. Pure."""
    return _dump({"type": "reception", "time": round(at, 6), "id": msg_id, "node": node, "vip": vip,
                  "port": port, "peer": peer, "helo": helo, "from": mail_from, "rcpt": list(rcpts),
                  "size": size, "spool": spool})


def withdrawal_record(*, msg_id: str, node: str, reason: str, at: float) -> bytes:
    """The mainlog record voiding the reception record ``msg_id`` (the client got 451). Pure."""
    return _dump({"type": "withdrawn", "time": round(at, 6), "id": msg_id, "node": node, "reason": reason})


def session_record(event: str, *, node: str, at: float, **fields: Any) -> bytes:
    """A session event for the plug-in's own log. Pure."""
    return _dump({"type": event, "time": round(at, 6), "node": node, **fields})


def parse_record(payload: bytes | str) -> dict:
    """A record read back from a journal or an aggregated file; ValueError if it is not one. Pure."""
    obj = json.loads(payload)
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ValueError("not an smtp plug-in record")
    return obj
