"""cidr_server query language: valid/invalid tables, fuzzing, round trips."""

from __future__ import annotations

import calendar
import ipaddress
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manager.cidr.query import (
    Between,
    Block,
    CountQuery,
    Moment,
    On,
    QueryError,
    ShowAvailable,
    Since,
    parse_query,
)


def day(y: int, m: int, d: int, hh: int = 0, mm: int = 0, ss: int = 0, has_time: bool = False) -> Moment:
    return Moment(calendar.timegm((y, m, d, hh, mm, ss, 0, 0, 0)), has_time)


def v4(text: str) -> Block:
    net = ipaddress.ip_network(text)
    return Block(4, int(net.network_address), net.prefixlen)


def v6(text: str) -> Block:
    net = ipaddress.ip_network(text)
    return Block(6, int(net.network_address), net.prefixlen)


VALID = [
    ("show available", ShowAvailable()),
    ("  SHOW   Available  ", ShowAvailable()),
    ("show count for 10.79.18.0/24 in connections",
     CountQuery(v4("10.79.18.0/24"), ("connections",))),
    ("show count for 10.79.18.0/24 in connections,rejects",
     CountQuery(v4("10.79.18.0/24"), ("connections", "rejects"))),
    ("show count for 10.79.18.0/24 in connections , rejects",
     CountQuery(v4("10.79.18.0/24"), ("connections", "rejects"))),
    ("show count for 0.0.0.0/0 in union(connections, rejects) since 20080605",
     CountQuery(v4("0.0.0.0/0"), ("connections", "rejects"), union=True, when=Since(day(2008, 6, 5)))),
    ("Show Count For 10.0.0.0/8 In c On 20080605",
     CountQuery(v4("10.0.0.0/8"), ("c",), when=On(day(2008, 6, 5)))),
    ("show count for 10.0.0.0/8 in c from 20080601 to 20080605T120000",
     CountQuery(v4("10.0.0.0/8"), ("c",), when=Between(day(2008, 6, 1), day(2008, 6, 5, 12, has_time=True)))),
    ("show count for 10.0.0.0/8 in c from 20080605 to 20080605",
     CountQuery(v4("10.0.0.0/8"), ("c",), when=Between(day(2008, 6, 5), day(2008, 6, 5)))),
    ("show count for 0.0.0.0/0 in connections cidrsize 24 order by count limit 10",
     CountQuery(v4("0.0.0.0/0"), ("connections",), cidrsize=(24, 24), order="count", limit=10)),
    ("show count for 10.0.0.0/8 in c limit 5 threshold 100 aggregate daily order by cidr cidrsize 16 to 24 "
     "since 20080605t010203",
     CountQuery(v4("10.0.0.0/8"), ("c",), when=Since(day(2008, 6, 5, 1, 2, 3, has_time=True)),
                cidrsize=(16, 24), order="cidr", aggregate_daily=True, threshold=100, limit=5)),
    ("show count for 10.1.2.3 in c", CountQuery(v4("10.1.2.3/32"), ("c",))),
    ("show count for 2001:db8::/32 in c cidrsize 48 to 128",
     CountQuery(v6("2001:db8::/32"), ("c",), cidrsize=(48, 128))),
    ("show count for ::/0 in c cidrsize 0", CountQuery(v6("::/0"), ("c",), cidrsize=(0, 0))),
    ("show count for 2001:DB8::1 in c", CountQuery(v6("2001:db8::1/128"), ("c",))),
    # a series may be named like a keyword; it is a name where a name is expected
    ("show count for 1.0.0.0/8 in since since 20080101",
     CountQuery(v4("1.0.0.0/8"), ("since",), when=Since(day(2008, 1, 1)))),
    ("show count for 1.0.0.0/8 in union", CountQuery(v4("1.0.0.0/8"), ("union",))),
    ("show count for 1.0.0.0/8 in union(union)", CountQuery(v4("1.0.0.0/8"), ("union",), union=True)),
    ("show count for 1.0.0.0/8 in c threshold 0", CountQuery(v4("1.0.0.0/8"), ("c",), threshold=0)),
]


@pytest.mark.parametrize("text,expected", VALID, ids=[t for t, _ in VALID])
def test_valid_queries_parse_to_expected_ast(text: str, expected: object) -> None:
    assert parse_query(text) == expected


def test_brief_example_error_message() -> None:
    text = "show count for 10.79.18.0/24 in c cidrsiz 24"
    with pytest.raises(QueryError) as info:
        parse_query(text)
    err = info.value
    assert str(err) == ("unexpected 'cidrsiz' at column 35: expected one of since, on, from, cidrsize, "
                        "order, aggregate, threshold, limit")
    assert (err.token, err.position) == ("cidrsiz", 35)


# (query, bad token, column, fragment of the message)
INVALID = [
    ("", "", 1, "expected show"),
    ("   ", "", 1, "end of query"),
    ("shw available", "shw", 1, "expected show"),
    ("show", "", 5, "expected one of count, available"),
    ("show available now", "now", 16, "expected end of query"),
    ("show count 10.0.0.0/8", "10.0.0.0/8", 12, "expected for"),
    ("show count for", "", 15, "CIDR block"),
    ("show count for 10.0.0.0/33 in c", "10.0.0.0/33", 16, "mask at most 32"),
    ("show count for 10.0.0.1/8 in c", "10.0.0.1/8", 16, "did you mean 10.0.0.0/8"),
    ("show count for 10.0.0/8 in c", "10.0.0/8", 16, "not a CIDR block"),
    ("show count for 2001:db8::/129 in c", "2001:db8::/129", 16, "128 for IPv6"),
    ("show count for fe80::/64%eth0 in c", "fe80::/64%eth0", 16, "bad"),
    ("show count for 10.0.0.0/8 c", "c", 27, "expected in"),
    ("show count for 10.0.0.0/8 in", "", 29, "a series name"),
    ("show count for 10.0.0.0/8 in 9lives", "9lives", 30, "not a series name"),
    ("show count for 10.0.0.0/8 in a,", "", 32, "a series name"),
    ("show count for 10.0.0.0/8 in a,a", "a", 32, "listed twice"),
    ("show count for 10.0.0.0/8 in union(a,b", "", 39, "expected ')'"),
    ("show count for 10.0.0.0/8 in union()", ")", 36, "a series name"),
    ("show count for 10.0.0.0/8 in a b", "b", 32, "expected one of since, on, from"),
    ("show count for 10.0.0.0/8 in a since", "", 37, "expected a date"),
    ("show count for 10.0.0.0/8 in a since 2008065", "2008065", 38, "YYYYMMDD"),
    ("show count for 10.0.0.0/8 in a since 20080231", "20080231", 38, "not a real date"),
    ("show count for 10.0.0.0/8 in a since 20080605T250000", "20080605T250000", 38, "not a real date"),
    ("show count for 10.0.0.0/8 in a on 20080605T120000", "20080605T120000", 35, "without a time"),
    ("show count for 10.0.0.0/8 in a from 20080605 20080606", "20080606", 46, "expected to"),
    ("show count for 10.0.0.0/8 in a from 20080606 to 20080605", "20080605", 49, "ends before it starts"),
    ("show count for 10.0.0.0/8 in a since 20080605 on 20080605", "on", 47, "only once"),
    ("show count for 10.0.0.0/8 in a limit 3 limit 4", "limit", 40, "only once"),
    ("show count for 10.0.0.0/8 in a limit 0", "0", 38, "at least 1"),
    ("show count for 10.0.0.0/8 in a limit -1", "-1", 38, "expected a row count"),
    ("show count for 10.0.0.0/8 in a limit ten", "ten", 38, "expected a row count"),
    ("show count for 10.0.0.0/8 in a threshold", "", 41, "expected a count"),
    ("show count for 10.0.0.0/8 in a cidrsize 7", "7", 41, "between the block's mask 8 and 32"),
    ("show count for 10.0.0.0/8 in a cidrsize 33", "33", 41, "between the block's mask 8 and 32"),
    ("show count for 10.0.0.0/8 in a cidrsize 24 to 16", "16", 47, "upper bound"),
    ("show count for ::/0 in a cidrsize 64 to 129", "129", 41, "upper bound must be between 64 and 128"),
    ("show count for 10.0.0.0/8 in a order count", "count", 38, "expected by"),
    ("show count for 10.0.0.0/8 in a order by size", "size", 41, "expected one of cidr, count"),
    ("show count for 10.0.0.0/8 in a aggregate weekly", "weekly", 42, "expected daily"),
    ("show count for 10.0.0.0/8 in a limit 5 (", "(", 40, "expected one of since, on, from, cidrsize, order, "
                                                     "aggregate, threshold\n"),
]


@pytest.mark.parametrize("text,token,column,fragment", INVALID, ids=[t or "<empty>" for t, *_ in INVALID])
def test_invalid_queries_name_token_and_column(text: str, token: str, column: int, fragment: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_query(text)
    err = info.value
    message = str(err)
    assert (err.token, err.position) == (token, column), message
    assert "\n" not in message
    assert f"column {column}" in message
    if fragment.endswith("\n"):  # the whole tail of the message
        assert message.endswith(fragment[:-1]), message
    else:
        assert fragment in message, message
    if token:
        assert repr(token) in message
        assert text[column - 1:column - 1 + len(token)] == token


def test_non_text_and_overlong_input_are_query_errors() -> None:
    with pytest.raises(QueryError):
        parse_query(None)  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="too long"):
        parse_query("show count for 10.0.0.0/8 in " + "a," * 5000 + "a")


def _check_outcome(text: str) -> None:
    try:
        result = parse_query(text)
    except QueryError as err:
        message = str(err)
        assert message and "\n" not in message
        assert f"column {err.position}" in message
        assert err.position >= 1
        if err.token:
            assert text[err.position - 1:err.position - 1 + len(err.token)] == err.token
        return
    # whatever parses must render and re-parse to itself
    assert parse_query(result.to_text()) == result


VOCAB = ["show", "count", "available", "for", "in", "union", "(", ")", ",", "since", "on", "from", "to",
         "cidrsize", "order", "by", "cidr", "aggregate", "daily", "threshold", "limit", "10.0.0.0/8",
         "1.2.3.4/33", "::/0", "2001:db8::/32", "20080605", "20080605T120000", "20081340", "24", "0", "-1",
         "128", "connections", "rejects", "c", "SHOW", "Count", "x/y", "%", "\u00a0", "٣", "\t"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=120))
def test_arbitrary_text_only_ever_raises_query_error(text: str) -> None:
    _check_outcome(text)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(VOCAB), max_size=25), st.sampled_from([" ", "  ", "", "\t"]))
def test_token_soup_only_ever_raises_query_error(words: list[str], sep: str) -> None:
    _check_outcome(sep.join(words))
    _check_outcome("show count for 10.0.0.0/8 in c " + sep.join(words))


# -- round trips of generated valid queries ---------------------------------------------

SERIES = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_.\-]{0,12}\Z")
EPOCHS = st.integers(min_value=0, max_value=calendar.timegm((2100, 1, 1, 0, 0, 0, 0, 0, 0)))


@st.composite
def moments(draw, date_only: bool = False) -> Moment:
    epoch = draw(EPOCHS)
    if date_only or draw(st.booleans()):
        return Moment(epoch - epoch % 86400, False)
    return Moment(epoch, True)


@st.composite
def count_queries(draw) -> CountQuery:
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    prefixlen = draw(st.integers(0, bits))
    network = draw(st.integers(0, 2**bits - 1)) >> (bits - prefixlen) << (bits - prefixlen)
    series = tuple(draw(st.lists(SERIES, min_size=1, max_size=4, unique=True)))
    kind = draw(st.sampled_from(["none", "since", "on", "between"]))
    when = None
    if kind == "since":
        when = Since(draw(moments()))
    elif kind == "on":
        when = On(draw(moments(date_only=True)))
    elif kind == "between":
        a, b = sorted([draw(moments()), draw(moments())], key=lambda m: m.epoch)
        when = Between(a, b)
    cidrsize = None
    if draw(st.booleans()):
        n = draw(st.integers(prefixlen, bits))
        cidrsize = (n, draw(st.integers(n, bits)))
    return CountQuery(
        Block(version, network, prefixlen), series, union=draw(st.booleans()), when=when, cidrsize=cidrsize,
        order=draw(st.sampled_from([None, "cidr", "count"])), aggregate_daily=draw(st.booleans()),
        threshold=draw(st.none() | st.integers(0, 10**12)), limit=draw(st.none() | st.integers(1, 10**12)),
    )


def _clauses(q: CountQuery) -> list[str]:
    out = []
    if q.when is not None:
        out.append(str(q.when))
    if q.cidrsize is not None:
        n, m = q.cidrsize
        out.append(f"cidrsize {n}" if n == m and random.random() < 0.5 else f"cidrsize {n} to {m}")
    if q.order:
        out.append(f"order by {q.order}")
    if q.aggregate_daily:
        out.append("aggregate daily")
    if q.threshold is not None:
        out.append(f"threshold {q.threshold}")
    if q.limit is not None:
        out.append(f"limit {q.limit}")
    return out


def _shout(text: str, rnd: random.Random) -> str:
    """Random case for keywords (series names are case-sensitive and left alone)."""
    return "".join(c.upper() if rnd.random() < 0.5 else c for c in text)


@settings(max_examples=400, deadline=None)
@given(count_queries())
def test_generated_queries_round_trip(query: CountQuery) -> None:
    assert parse_query(query.to_text()) == query


@settings(max_examples=300, deadline=None)
@given(count_queries(), st.randoms(use_true_random=False))
def test_clause_order_case_and_spacing_do_not_matter(query: CountQuery, rnd: random.Random) -> None:
    random.seed(rnd.random())
    clauses = _clauses(query)
    rnd.shuffle(clauses)
    names = (" , " if rnd.random() < 0.5 else ",").join(query.series)
    target = f"{_shout('union', rnd)}( {names} )" if query.union else names
    head = f"{_shout('show count for', rnd)}  {query.block}\t{_shout('in', rnd)} {target}"
    text = "  ".join([head] + [_shout(c, rnd) if not c.startswith(("on", "since", "from")) else
                               _shout(c.split(" ", 1)[0], rnd) + " " + c.split(" ", 1)[1] for c in clauses])
    assert parse_query(text) == query


def test_date_ranges_resolve_to_utc_bounds() -> None:
    def bounds(clause: str) -> tuple[int, int | None]:
        q = parse_query(f"show count for 10.0.0.0/8 in c {clause}")
        assert isinstance(q, CountQuery) and q.when is not None
        return q.when.bounds()

    d5 = 1212624000  # 2008-06-05T00:00:00Z
    assert bounds("since 20080605") == (d5, None)
    assert bounds("on 20080605") == (d5, d5 + 86400)
    assert bounds("from 20080605 to 20080605") == (d5, d5 + 86400)  # a day-only end includes that day
    assert bounds("from 20080605T010000 to 20080606T000000") == (d5 + 3600, d5 + 86400)  # a timed end is exact
    assert parse_query("show count for 10.0.0.0/8 in c").when is None
