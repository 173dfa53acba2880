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
    dl  float   req only: wall-clock deadline; a late request is dropped, not run
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


def unpack(data: bytes) -> Envelope:
    """Bytes -> checked Envelope, or BadMessage."""
    d = unpack_raw(data)
    if not isinstance(d, dict):
        raise BadMessage("envelope is not a map")
    v = d.get("v")
    if v != VERSION:
        raise BadMessage(f"unsupported envelope version {v!r}")
    kind = d.get("k")
    if kind not in KINDS:
        raise BadMessage(f"unknown message kind {kind!r}")
    env = Envelope(kind=kind, id=_str(d, "id"), src=_str(d, "src", False) or "", sc=_str(d, "sc", False) or "")
    env.body = d.get("b")
    if kind == "pub":
        env.topic = _str(d, "t", limit=256)
        env.batch = d.get("n") is True
        if env.batch and not isinstance(env.body, list):
            raise BadMessage("batched event without a list body")
    else:
        env.dm = _str(d, "dm")
        env.ds = _str(d, "ds")
        if kind in ("req", "cast"):
            env.method = _str(d, "m")
            if env.body is None:
                env.body = {}
            if not isinstance(env.body, dict) or not all(isinstance(k, str) for k in env.body):
                raise BadMessage("call arguments must be a map with string keys")
            dl = d.get("dl")
            if dl is not None and not isinstance(dl, (int, float)):
                raise BadMessage("deadline must be a number")
            env.deadline = dl
        else:  # rep
            e = d.get("e")
            if e is not None:
                if not (isinstance(e, dict) and isinstance(e.get("code"), str) and isinstance(e.get("message"), str)):
                    raise BadMessage("error reply must carry {code, message} strings")
                env.error = e
    return env


_ids = itertools.count(1)
_prefix = os.urandom(4).hex()


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
