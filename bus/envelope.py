"""The channel: one versioned msgpack envelope, packed and checked in one place.

Transport (sockets) lives in :mod:`bus.transport`; this module only turns bytes into
checked :class:`Envelope` objects and back. Anything that does not decode into the
expected shape raises :class:`BadMessage`; callers count it and drop the message.

Wire form: a msgpack map with short keys (version 1)::

    v   int     envelope version (1)
    k   str     kind: "pub" | "req" | "cast" | "rep"
    id  str     message id (replies carry the request's id)
    src str     origin member            sc  str  origin client id at that member
    dm  str     destination member       ds  str  destination service (req/cast)
                                                  or client id (rep)
    m   str     method (req/cast)         t   str  topic (pub)
    b   any     body: args map (req/cast), result (rep), event body (pub)
    n   bool    pub only: b is a list of bodies (a batch)
    e   map     rep only, on failure: {"code": str, "message": str}
    dl  float   req only: wall-clock deadline on the caller's clock; a late request
                from the same member is dropped, not run (bus.client.is_stale)
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

import msgpack

VERSION = 1
KINDS = ("pub", "req", "cast", "rep")

# Size limits: a frame over MAX_FRAME is refused by the socket (ZMQ_MAXMSGSIZE); inside a
# frame msgpack refuses containers and strings larger than these before allocating them.
MAX_FRAME = 64 * 1024 * 1024
MAX_STR = 4 * 1024 * 1024
MAX_BIN = MAX_FRAME
MAX_ARRAY = 2_000_000
MAX_MAP = 200_000
MAX_NAME = 128


class BadMessage(ValueError):
    """A frame that is not a valid envelope; the message says why, in one line."""


@dataclass(slots=True)
class Envelope:
    kind: str
    id: str
    src: str = ""
    sc: str = ""
    dm: str | None = None
    ds: str | None = None
    method: str | None = None
    topic: str | None = None
    body: Any = None
    batch: bool = False
    error: dict | None = None
    deadline: float | None = None
    extra: dict = field(default_factory=dict)

    def to_wire(self) -> dict:
        d: dict[str, Any] = {"v": VERSION, "k": self.kind, "id": self.id, "src": self.src, "sc": self.sc}
        if self.dm is not None:
            d["dm"] = self.dm
        if self.ds is not None:
            d["ds"] = self.ds
        if self.method is not None:
            d["m"] = self.method
        if self.topic is not None:
            d["t"] = self.topic
        if self.body is not None:
            d["b"] = self.body
        if self.batch:
            d["n"] = True
        if self.error is not None:
            d["e"] = self.error
        if self.deadline is not None:
            d["dl"] = self.deadline
        return d


_packer_opts = dict(use_bin_type=True)


def pack(env: Envelope) -> bytes:
    """Envelope -> bytes. Raises BadMessage when the body holds something msgpack cannot carry."""
    try:
        return msgpack.packb(env.to_wire(), **_packer_opts)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadMessage(f"cannot encode message body: {e}") from None


def unpack_raw(data: bytes) -> Any:
    """Bytes -> Python objects, with size limits; no shape check."""
    if len(data) > MAX_FRAME:
        raise BadMessage(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=MAX_STR,
                               max_bin_len=MAX_BIN, max_array_len=MAX_ARRAY, max_map_len=MAX_MAP,
                               max_ext_len=0)
    except Exception as e:  # msgpack raises many types on garbage: all mean "not ours"
        raise BadMessage(f"undecodable frame: {type(e).__name__}") from None


def _str(d: dict, key: str, required: bool = True, limit: int = MAX_NAME) -> str | None:
    v = d.get(key)
    if v is None:
        if required:
            raise BadMessage(f"missing field {key!r}")
        return None
    if not isinstance(v, str) or len(v) > limit:
        raise BadMessage(f"field {key!r} must be a string of at most {limit} characters")
    return v


def check_wire(d: Any, body: bool = True) -> dict:
    """The shape rules of a decoded envelope map; returns ``d`` or raises BadMessage. Pure.

    ``body=False``: ``d`` holds the header only (see :func:`header`); the body's own shape
    is then left to the receiving end, which decodes it anyway.
    """
    if not isinstance(d, dict):
        raise BadMessage("envelope is not a map")
    v = d.get("v")
    if v != VERSION:
        raise BadMessage(f"unsupported envelope version {v!r}")
    kind = d.get("k")
    if kind not in KINDS:
        raise BadMessage(f"unknown message kind {kind!r}")
    _str(d, "id")
    _str(d, "src", False)
    _str(d, "sc", False)
    if kind == "pub":
        _str(d, "t", limit=256)
        if body and d.get("n") is True and not isinstance(d.get("b"), list):
            raise BadMessage("batched event without a list body")
        return d
    _str(d, "dm")
    _str(d, "ds")
    if kind == "rep":
        e = d.get("e")
        if e is not None and not (isinstance(e, dict) and isinstance(e.get("code"), str)
                                  and isinstance(e.get("message"), str)):
            raise BadMessage("error reply must carry {code, message} strings")
        return d
    _str(d, "m")
    if body:
        args = d.get("b")
        if args is not None and (not isinstance(args, dict) or not all(isinstance(k, str) for k in args)):
            raise BadMessage("call arguments must be a map with string keys")
    dl = d.get("dl")
    if dl is not None and not isinstance(dl, (int, float)):
        raise BadMessage("deadline must be a number")
    return d


def unpack(data: bytes) -> Envelope:
    """Bytes -> checked Envelope, or BadMessage."""
    d = check_wire(unpack_raw(data))
    kind = d["k"]
    env = Envelope(kind=kind, id=d["id"], src=d.get("src") or "", sc=d.get("sc") or "", body=d.get("b"))
    if kind == "pub":
        env.topic = d["t"]
        env.batch = d.get("n") is True
    else:
        env.dm, env.ds = d["dm"], d["ds"]
        if kind == "rep":
            env.error = d.get("e")
        else:
            env.method = d["m"]
            env.deadline = d.get("dl")
            if env.body is None:
                env.body = {}
    return env


# first byte of a msgpack map / array (fix, 16-bit and 32-bit lengths) and of nil
_MAP_BYTES = frozenset([*range(0x80, 0x90), 0xDE, 0xDF, 0xC0])
_ARRAY_BYTES = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])


def _header(data: bytes) -> tuple[dict, int | None]:
    """(header fields, first byte of the body or None); see :func:`header`."""
    if len(data) > MAX_FRAME:
        raise BadMessage(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    u = msgpack.Unpacker(raw=False, strict_map_key=True, max_str_len=MAX_STR, max_bin_len=MAX_BIN,
                         max_array_len=MAX_ARRAY, max_map_len=MAX_MAP, max_ext_len=0,
                         max_buffer_size=max(len(data), 1024))
    u.feed(data)
    head: dict = {}
    first = None
    try:
        for _ in range(u.read_map_header()):
            key = u.unpack()
            if not isinstance(key, str):
                raise ValueError("map key is not a string")
            if key == "b":
                first = data[u.tell()]          # the body's first byte: its msgpack type
                u.skip()
            else:
                head[key] = u.unpack()
    except Exception as e:  # msgpack raises many types on garbage: all mean "not ours"
        raise BadMessage(f"undecodable frame: {type(e).__name__}") from None
    if u.tell() != len(data):
        raise BadMessage("undecodable frame: ExtraData")
    return head, first


def header(data: bytes) -> dict:
    """The header fields of an envelope (everything but the body ``b``), without decoding the body.

    A broker only needs the routing fields of a message; its body goes on as bytes and the
    receiving end decodes and checks it (the channel), so decoding a large body in every
    broker would only multiply its cost. Same size limits as :func:`unpack_raw`; the body is
    walked (``skip``) so a truncated one is still refused. Raises :class:`BadMessage`. Pure.
    """
    return _header(data)[0]


def checked_header(data: bytes) -> dict:
    """:func:`header`, checked like :func:`check_wire`, plus the body's type (a map of call
    arguments, a list for a batch) read from its first byte. Pure."""
    head, first = _header(data)
    check_wire(head, body=False)
    kind = head["k"]
    if kind in ("req", "cast") and first is not None and first not in _MAP_BYTES:
        raise BadMessage("call arguments must be a map with string keys")
    if kind == "pub" and head.get("n") is True and first not in _ARRAY_BYTES:
        raise BadMessage("batched event without a list body")
    return head


_ids = itertools.count(1)
_prefix = os.urandom(4).hex()


def _new_prefix() -> None:
    global _prefix
    _prefix = os.urandom(4).hex()


# a program forked from a pre-imported parent (node.zygote) must not reuse its ids
os.register_at_fork(after_in_child=_new_prefix)


def new_id() -> str:
    """Unique per process run; cheap (no uuid per message)."""
    return f"{_prefix}{next(_ids):x}"


def request(dm: str, ds: str, method: str, args: dict, deadline: float | None, kind: str = "req") -> Envelope:
    return Envelope(kind=kind, id=new_id(), dm=dm, ds=ds, method=method, body=args, deadline=deadline)


def reply_to(req: Envelope, result: Any = None, error: dict | None = None) -> Envelope:
    """The reply to ``req``: addressed to the client that sent it, at its member."""
    return Envelope(kind="rep", id=req.id, dm=req.src, ds=req.sc, body=result, error=error)


def event(topic: str, body: Any, batch: bool = False) -> Envelope:
    return Envelope(kind="pub", id=new_id(), topic=topic, body=body, batch=batch)


def pack_event(topic: str, body: Any, src: str, batch: bool = False) -> bytes:
    """``pack(event(topic, body, batch))`` with ``src`` set, without the Envelope on the way
    (a publisher's hot path). Raises BadMessage like :func:`pack`."""
    d = {"v": VERSION, "k": "pub", "id": new_id(), "src": src, "sc": "", "t": topic, "b": body}
    if batch:
        d["n"] = True
    try:
        return msgpack.packb(d, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadMessage(f"cannot encode message body: {e}") from None
