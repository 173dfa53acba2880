"""Parser for the cidr_server query language (Momentum's, with precise errors).

Grammar (keywords case-insensitive, series names case-sensitive)::

    query   := "show" "available"
             | "show" "count" "for" BLOCK "in" SERIES clause*
    SERIES  := NAME ("," NAME)*                 one column per series, in this order
             | "union" "(" NAME ("," NAME)* ")"  one column: the sum of the series
    clause  := "since" DATE | "on" DAY | "from" DATE "to" DATE
             | "cidrsize" INT ["to" INT]
             | "order" "by" ("cidr" | "count")
             | "aggregate" "daily"
             | "threshold" INT
             | "limit" INT

* The clauses after ``in …`` come in any order, each at most once; ``since``,
  ``on`` and ``from … to`` are one clause (the date range), so only one of them.
* ``BLOCK`` is ``ip/mask`` (IPv4 or IPv6) with no host bits set; a bare address
  means a single host (/32 or /128).
* ``DATE`` is ``YYYYMMDD`` (midnight) or ``YYYYMMDDTHHMMSS``, always UTC.
  ``on`` takes a day ``YYYYMMDD`` and means that whole day.  In ``from A to B``
  a ``B`` given as a day includes that whole day; ``B`` with a time is the exact
  (exclusive) end.  ``A`` must not be after ``B``.
* ``cidrsize N to M`` needs ``block mask ≤ N ≤ M ≤ 32`` (128 for IPv6).
* ``threshold`` ≥ 0, ``limit`` ≥ 1.

A malformed query raises :class:`QueryError` whose ``str`` is one line naming
the bad token and its 1-based column.  No I/O here; :func:`parse_query` and
:meth:`CountQuery.to_text` round-trip.
"""

from __future__ import annotations

import calendar
import datetime as _dt
import ipaddress
import re
from dataclasses import dataclass
from typing import Union

from node.audit import SERIES_NAME_PATTERN

__all__ = [
    "QueryError",
    "Block",
    "Moment",
    "Since",
    "On",
    "Between",
    "DateRange",
    "ShowAvailable",
    "CountQuery",
    "Query",
    "parse_query",
    "CLAUSE_KEYWORDS",
]

DAY = 86400
CLAUSE_KEYWORDS = ("since", "on", "from", "cidrsize", "order", "aggregate", "threshold", "limit")
_MAX_QUERY = 4096  # characters; longer input is refused before tokenizing
_TOKEN_RE = re.compile(r"\s*(?:([(),])|([^\s(),]+))", re.ASCII)
_INT_RE = re.compile(r"[0-9]{1,15}", re.ASCII)
_DATE_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})(?:[Tt]([0-9]{2})([0-9]{2})([0-9]{2}))?", re.ASCII)
_SERIES_RE = re.compile(SERIES_NAME_PATTERN, re.ASCII)


class QueryError(ValueError):
    """A malformed query: ``message`` (one line), 1-based ``position`` and the ``token``."""

    def __init__(self, message: str, position: int, token: str) -> None:
        super().__init__(message)
        self.message = message
        self.position = position
        self.token = token

    def __str__(self) -> str:
        return self.message


# -- AST -----------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A CIDR block: IP ``version`` (4/6), ``network`` as int, ``prefixlen``."""

    version: int
    network: int
    prefixlen: int

    @property
    def bits(self) -> int:
        """Address width: 32 or 128."""
        return 32 if self.version == 4 else 128

    def last(self) -> int:
        """Highest address inside the block."""
        return self.network | ((1 << (self.bits - self.prefixlen)) - 1)

    def __str__(self) -> str:
        cls = ipaddress.IPv4Network if self.version == 4 else ipaddress.IPv6Network
        return str(cls((self.network, self.prefixlen)))


@dataclass(frozen=True)
class Moment:
    """A UTC instant given in a query; ``has_time`` says whether it had ``THHMMSS``."""

    epoch: int
    has_time: bool

    def __str__(self) -> str:
        t = _dt.datetime.fromtimestamp(self.epoch, _dt.timezone.utc)
        return t.strftime("%Y%m%dT%H%M%S") if self.has_time else t.strftime("%Y%m%d")


@dataclass(frozen=True)
class Since:
    """``since D``: from ``D`` on, with no upper bound."""

    start: Moment

    def bounds(self) -> tuple[int, int | None]:
        """``[lo, hi)`` in epoch seconds; ``hi`` None means open-ended."""
        return self.start.epoch, None

    def __str__(self) -> str:
        return f"since {self.start}"


@dataclass(frozen=True)
class On:
    """``on D``: the whole UTC day ``D``."""

    day: Moment

    def bounds(self) -> tuple[int, int | None]:
        """``[lo, hi)`` in epoch seconds."""
        return self.day.epoch, self.day.epoch + DAY

    def __str__(self) -> str:
        return f"on {self.day}"


@dataclass(frozen=True)
class Between:
    """``from A to B``; a date-only ``B`` includes its whole day."""

    start: Moment
    end: Moment

    def bounds(self) -> tuple[int, int | None]:
        """``[lo, hi)`` in epoch seconds."""
        hi = self.end.epoch if self.end.has_time else self.end.epoch + DAY
        return self.start.epoch, hi

    def __str__(self) -> str:
        return f"from {self.start} to {self.end}"


DateRange = Union[Since, On, Between]


@dataclass(frozen=True)
class ShowAvailable:
    """``show available``."""

    def to_text(self) -> str:
        """Canonical query text."""
        return "show available"


@dataclass(frozen=True)
class CountQuery:
    """``show count for …``.  ``cidrsize`` is ``(N, M)`` (``N == M`` without ``to``);
    ``order`` is ``"cidr"``, ``"count"`` or None (default: by cidr)."""

    block: Block
    series: tuple[str, ...]
    union: bool = False
    when: DateRange | None = None
    cidrsize: tuple[int, int] | None = None
    order: str | None = None
    aggregate_daily: bool = False
    threshold: int | None = None
    limit: int | None = None

    def prefix_lengths(self) -> range:
        """The prefix lengths that get rows: ``N..M`` or the block's own mask."""
        lo, hi = self.cidrsize if self.cidrsize else (self.block.prefixlen, self.block.prefixlen)
        return range(lo, hi + 1)

    def columns(self) -> tuple[str, ...]:
        """Column names of the result: the series, or ``union(a,b)``."""
        return (f"union({','.join(self.series)})",) if self.union else self.series

    def to_text(self) -> str:
        """Canonical query text (parses back to an equal CountQuery)."""
        names = ",".join(self.series)
        parts = [f"show count for {self.block} in " + (f"union({names})" if self.union else names)]
        if self.when is not None:
            parts.append(str(self.when))
        if self.cidrsize is not None:
            n, m = self.cidrsize
            parts.append(f"cidrsize {n}" if n == m else f"cidrsize {n} to {m}")
        if self.order is not None:
            parts.append(f"order by {self.order}")
        if self.aggregate_daily:
            parts.append("aggregate daily")
        if self.threshold is not None:
            parts.append(f"threshold {self.threshold}")
        if self.limit is not None:
            parts.append(f"limit {self.limit}")
        return " ".join(parts)


Query = Union[ShowAvailable, CountQuery]


# -- tokenizer -------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    text: str
    column: int  # 1-based

    @property
    def word(self) -> str:
        return self.text.lower()


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while True:
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            break
        group = 1 if match.group(1) is not None else 2
        tokens.append(_Token(match.group(group), match.start(group) + 1))
        pos = match.end()
    return tokens


# -- parser ------------------------------------------------------------------------


def _quote(token: _Token | None) -> str:
    return "end of query" if token is None or token.text == "" else repr(token.text)


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        last = self.tokens[-1] if self.tokens else None
        self.end = _Token("", last.column + len(last.text) if last else 1)
        self.i = 0

    def peek(self) -> _Token:
        return self.tokens[self.i] if self.i < len(self.tokens) else self.end

    def take(self) -> _Token:
        token = self.peek()
        self.i += 1
        return token

    def fail(self, token: _Token, expected: str) -> QueryError:
        where = "end of query" if token.text == "" else repr(token.text)
        return QueryError(f"unexpected {where} at column {token.column}: expected {expected}", token.column, token.text)

    def bad(self, token: _Token, why: str) -> QueryError:
        return QueryError(f"bad {_quote(token)} at column {token.column}: {why}", token.column, token.text)

    def keyword(self, *words: str) -> str:
        token = self.take()
        if token.word not in words:
            raise self.fail(token, words[0] if len(words) == 1 else "one of " + ", ".join(words))
        return token.word

    def punct(self, char: str) -> None:
        token = self.take()
        if token.text != char:
            raise self.fail(token, repr(char))

    def parse(self) -> Query:
        self.keyword("show")
        what = self.keyword("count", "available")
        if what == "available":
            self.finish([])
            return ShowAvailable()
        self.keyword("for")
        block = self.block()
        self.keyword("in")
        union, series = self.series()
        clauses: dict[str, object] = {}
        while self.peek().text != "":
            remaining = [k for k in CLAUSE_KEYWORDS if self._clause_key(k) not in clauses]
            token = self.peek()
            word = token.word
            if word not in CLAUSE_KEYWORDS:
                raise self.fail(token, "one of " + ", ".join(remaining) if remaining else "end of query")
            key = self._clause_key(word)
            if key in clauses:
                raise self.bad(token, f"the {'date range (since/on/from)' if key == 'when' else word} clause "
                                      "may appear only once")
            self.take()
            clauses[key] = getattr(self, "clause_" + word)(token, block)
        return CountQuery(
            block=block,
            series=series,
            union=union,
            when=clauses.get("when"),  # type: ignore[arg-type]
            cidrsize=clauses.get("cidrsize"),  # type: ignore[arg-type]
            order=clauses.get("order"),  # type: ignore[arg-type]
            aggregate_daily=bool(clauses.get("aggregate", False)),
            threshold=clauses.get("threshold"),  # type: ignore[arg-type]
            limit=clauses.get("limit"),  # type: ignore[arg-type]
        )

    @staticmethod
    def _clause_key(word: str) -> str:
        return "when" if word in ("since", "on", "from") else word

    def finish(self, expected: list[str]) -> None:
        token = self.peek()
        if token.text != "":
            raise self.fail(token, "end of query" if not expected else "one of " + ", ".join(expected))

    # -- pieces --

    def block(self) -> Block:
        token = self.take()
        if token.text in ("", "(", ")", ","):
            raise self.fail(token, "a CIDR block like 10.0.0.0/8 or 2001:db8::/32")
        try:
            net = ipaddress.ip_network(token.text, strict=True)
        except ValueError as exc:
            if "host bits set" in str(exc):
                loose = ipaddress.ip_network(token.text, strict=False)
                raise self.bad(token, f"host bits set; did you mean {loose}?") from None
            raise self.bad(token, "not a CIDR block like 10.0.0.0/8 or 2001:db8::/32 "
                                  "(mask at most 32 for IPv4, 128 for IPv6)") from None
        if "%" in token.text:
            raise self.bad(token, "a CIDR block cannot carry an IPv6 scope")
        return Block(net.version, int(net.network_address), net.prefixlen)

    def name(self) -> str:
        token = self.take()
        if not _SERIES_RE.fullmatch(token.text):
            if token.text in ("", "(", ")", ","):
                raise self.fail(token, "a series name")
            raise self.bad(token, "not a series name (letters, digits, _ . -, starting with a letter or _)")
        return token.text

    def series(self) -> tuple[bool, tuple[str, ...]]:
        union = False
        first = self.peek()
        nxt = self.tokens[self.i + 1] if self.i + 1 < len(self.tokens) else None
        if first.word == "union" and nxt is not None and nxt.text == "(":
            union = True
            self.take()
            self.take()
        names: list[str] = []
        positions: list[_Token] = []
        while True:
            positions.append(self.peek())
            names.append(self.name())
            if self.peek().text != ",":
                break
            self.take()
        if union:
            self.punct(")")
        seen: set[str] = set()
        for token, name in zip(positions, names):
            if name in seen:
                raise self.bad(token, f"series {name!r} is listed twice")
            seen.add(name)
        return union, tuple(names)

    def integer(self, what: str) -> tuple[int, _Token]:
        token = self.take()
        if not _INT_RE.fullmatch(token.text):
            if token.text in ("", "(", ")", ","):
                raise self.fail(token, what)
            raise self.bad(token, f"expected {what}")
        return int(token.text), token

    def moment(self, what: str = "a date YYYYMMDD or YYYYMMDDTHHMMSS") -> Moment:
        token = self.take()
        match = _DATE_RE.fullmatch(token.text)
        if match is None:
            if token.text in ("", "(", ")", ","):
                raise self.fail(token, what)
            raise self.bad(token, f"expected {what} (UTC)")
        parts = [int(p) if p is not None else 0 for p in match.groups()]
        try:
            when = _dt.datetime(*parts)  # type: ignore[misc]
        except ValueError as exc:
            raise self.bad(token, f"not a real date/time ({exc})") from None
        return Moment(calendar.timegm(when.timetuple()), match.group(4) is not None)

    # -- clauses: each takes the keyword token and the block --

    def clause_since(self, keyword: _Token, block: Block) -> Since:
        return Since(self.moment())

    def clause_on(self, keyword: _Token, block: Block) -> On:
        token = self.peek()
        moment = self.moment("a day YYYYMMDD")
        if moment.has_time:
            raise self.bad(token, "'on' takes a day YYYYMMDD without a time")
        return On(moment)

    def clause_from(self, keyword: _Token, block: Block) -> Between:
        start = self.moment()
        self.keyword("to")
        token = self.peek()
        end = self.moment()
        if start.epoch > end.epoch:
            raise self.bad(token, f"the range ends before it starts ({start} is after {end})")
        return Between(start, end)

    def clause_cidrsize(self, keyword: _Token, block: Block) -> tuple[int, int]:
        low, token = self.integer("a prefix length")
        if not block.prefixlen <= low <= block.bits:
            raise self.bad(token, f"cidrsize must be between the block's mask {block.prefixlen} and {block.bits}")
        high = low
        if self.peek().word == "to":
            self.take()
            high, token = self.integer("a prefix length")
            if not low <= high <= block.bits:
                raise self.bad(token, f"cidrsize upper bound must be between {low} and {block.bits}")
        return low, high

    def clause_order(self, keyword: _Token, block: Block) -> str:
        self.keyword("by")
        return self.keyword("cidr", "count")

    def clause_aggregate(self, keyword: _Token, block: Block) -> bool:
        self.keyword("daily")
        return True

    def clause_threshold(self, keyword: _Token, block: Block) -> int:
        value, _ = self.integer("a count (threshold ≥ 0)")
        return value

    def clause_limit(self, keyword: _Token, block: Block) -> int:
        value, token = self.integer("a row count (limit ≥ 1)")
        if value < 1:
            raise self.bad(token, "limit must be at least 1")
        return value


def parse_query(text: str) -> Query:
    """Parse one query; raise :class:`QueryError` (one line, with column) if malformed."""
    if not isinstance(text, str):
        raise QueryError(f"a query must be text, not {type(text).__name__}", 1, "")
    if len(text) > _MAX_QUERY:
        raise QueryError(f"query too long ({len(text)} characters, at most {_MAX_QUERY})", _MAX_QUERY + 1, "")
    return _Parser(text).parse()
