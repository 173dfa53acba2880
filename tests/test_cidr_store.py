"""cidr_server store: every clause against a brute-force recount, idempotence, condensation,
retention, reopening."""

from __future__ import annotations

import calendar
import ipaddress
import random
import shutil
import tempfile
from collections import defaultdict
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manager.cidr.query import CountQuery, parse_query
from manager.cidr.store import (
    DAY,
    HOUR,
    AvailableResult,
    CidrStore,
    CidrStoreError,
    CountResult,
    Row,
    format_rows,
    result_to_dict,
)
from node.audit import Window

D0 = calendar.timegm((2008, 6, 5, 0, 0, 0, 0, 0, 0))  # 20080605
NOW = D0 + DAY + 12 * HOUR + 1234  # 20080606T122034
SERIES = ("connections", "rejects", "rcpt")
NODES = ("mta1", "mta2")
INTERVAL = 60

Event = tuple[str, str, int, tuple[int, int], int]  # node, series, time, (version, address), count


def make_events(seed: int = 7, n: int = 6000) -> list[Event]:
    """Events over 20080603..20080606 from clustered address ranges (so prefixes collide)."""
    rnd = random.Random(seed)
    v4_nets = [int(ipaddress.ip_address(a)) for a in ("10.79.18.0", "10.79.200.0", "10.1.0.0", "192.0.2.0",
                                                      "198.51.100.0", "203.0.113.0")]
    v6_nets = [int(ipaddress.ip_address(a)) for a in ("2001:db8::", "2001:db8:0:1::", "2001:db8:ffff::",
                                                      "2a00:1450::")]
    events = []
    for _ in range(n):
        t = rnd.randrange(D0 - 2 * DAY, NOW)
        if rnd.random() < 0.8:
            address = (4, rnd.choice(v4_nets) + rnd.randrange(0, 2**rnd.choice([4, 8, 10])))
        else:
            base = rnd.choice(v6_nets)
            spread = rnd.choice([4, 16, 70])  # 70 crosses the 64-bit half
            address = (6, base + rnd.randrange(0, 2**spread))
        events.append((rnd.choice(NODES), rnd.choices(SERIES, (5, 2, 1))[0], t, address, rnd.randint(1, 5)))
    return events


def to_windows(events: list[Event]) -> dict[str, list[Window]]:
    """Windows per node, as each node's as_logger would emit them."""
    acc: dict[tuple[str, str, int], dict] = defaultdict(lambda: defaultdict(int))
    for node, series, t, address, count in events:
        acc[(node, series, t - t % INTERVAL)][address] += count
    out: dict[str, list[Window]] = defaultdict(list)
    for (node, series, start), counts in sorted(acc.items()):
        out[node].append(Window(series, start, start + INTERVAL, dict(counts)))
    return out


def brute_force(query: CountQuery, events: list[Event], now: int, condensed_days: set[int]) -> list[Row]:
    """The rows the store must give, recounted from raw events (see store docstring for semantics)."""
    if query.when is None:
        lo, hi = now - now % HOUR - 23 * HOUR, None
    else:
        lo, hi = query.when.bounds()
    block = query.block
    bits = block.bits
    columns = query.series
    cells: dict[tuple, list[int]] = {}
    for _node, series, t, (version, address), count in events:
        if version != block.version or series not in columns:
            continue
        if not block.network <= address <= block.last():
            continue
        day = t - t % DAY
        start, unit = (day, DAY) if day in condensed_days else (t - t % HOUR, HOUR)
        if start + unit <= lo or (hi is not None and start >= hi):
            continue
        col = 0 if query.union else columns.index(series)
        label = calendar_day(day) if query.aggregate_daily else None
        for p in query.prefix_lengths():
            net = address >> (bits - p) << (bits - p)
            cell = cells.setdefault((label, net, p), [0] * (1 if query.union else len(columns)))
            cell[col] += count
    by_day: dict[str | None, list[tuple[int, int, list[int]]]] = defaultdict(list)
    for (label, net, p), counts in cells.items():
        if query.threshold is None or sum(counts) >= query.threshold:
            by_day[label].append((net, p, counts))
    rows = []
    for label in sorted(by_day, key=lambda x: x or ""):
        items = by_day[label]
        if query.order == "count":
            items.sort(key=lambda it: (-sum(it[2]), it[0], it[1]))
        else:
            items.sort(key=lambda it: (it[0], it[1]))
        if query.limit is not None:
            items = items[:query.limit]
        for net, p, counts in items:
            cls = ipaddress.IPv4Network if block.version == 4 else ipaddress.IPv6Network
            cidr = str(cls((net, p)))
            rows.append(Row(cidr, tuple(counts), label))
    return rows


def calendar_day(epoch: int) -> str:
    y, m, d = __import__("time").gmtime(epoch)[:3]
    return f"{y:04d}{m:02d}{d:02d}"


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return make_events()


@pytest.fixture()
def tmpdir_path() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="cidrstore-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def loaded(events: list[Event]) -> Iterator[tuple[CidrStore, CidrStore]]:
    """Two stores with the same data: one with hour records only, one condensed at NOW."""
    paths = [tempfile.mkdtemp(prefix="cidrstore-"), tempfile.mkdtemp(prefix="cidrstore-")]
    stores = [CidrStore(p) for p in paths]
    try:
        for store in stores:
            for node, windows in to_windows(events).items():
                assert store.add_windows(node, windows) == len(windows)
        assert stores[1].condense(NOW) > 0
        yield stores[0], stores[1]
    finally:
        for store in stores:
            store.close()
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)


CONDENSED = {D0 - 2 * DAY, D0 - DAY}  # days that ended at least a day before NOW

QUERIES = [
    "show count for 0.0.0.0/0 in connections",
    "show count for 10.0.0.0/8 in connections cidrsize 16 to 24",
    "show count for 10.79.0.0/16 in connections,rejects,rcpt cidrsize 24 to 28",
    "show count for 10.79.0.0/16 in union(connections,rejects) cidrsize 24 to 28",
    "show count for 0.0.0.0/0 in connections since 20080605 cidrsize 24 order by count",
    "show count for 0.0.0.0/0 in connections since 20080605T133000 cidrsize 24",  # bound inside an hour
    "show count for 0.0.0.0/0 in connections on 20080604 cidrsize 24 order by count limit 3",
    "show count for 0.0.0.0/0 in rejects on 20080605 cidrsize 8 to 32 threshold 40",
    "show count for 0.0.0.0/0 in connections from 20080603 to 20080604 cidrsize 16",
    "show count for 0.0.0.0/0 in connections from 20080604T120000 to 20080605T063000 cidrsize 20 to 24",
    "show count for 0.0.0.0/0 in connections,rejects from 20080601 to 20080630 cidrsize 24 order by count "
    "limit 5",
    "show count for 0.0.0.0/0 in connections,rejects since 20080101 cidrsize 0 to 4 order by cidr",
    "show count for 0.0.0.0/0 in connections since 20080603 cidrsize 24 aggregate daily order by count limit 2",
    "show count for 10.79.18.0/24 in connections,rejects since 20080603 aggregate daily",
    "show count for 10.79.18.0/24 in union(rcpt,connections) since 20080603 cidrsize 28 to 32 aggregate daily "
    "threshold 10 order by count limit 4",
    "show count for 192.0.2.0/24 in connections since 20080603 cidrsize 32 order by count threshold 20",
    "show count for 0.0.0.0/0 in connections,nosuch since 20080603 cidrsize 8",
    "show count for ::/0 in connections since 20080603",
    "show count for ::/0 in connections,rejects since 20080603 cidrsize 16 to 48",
    "show count for 2001:db8::/32 in connections since 20080603 cidrsize 48 to 64 order by count",
    "show count for 2001:db8::/48 in union(connections,rejects,rcpt) since 20080603 cidrsize 60 to 72",
    "show count for 2001:db8::/64 in connections since 20080603 cidrsize 120 to 128 order by count limit 7",
    "show count for 2001:db8::/32 in connections on 20080605 cidrsize 64 aggregate daily threshold 3",
    "show count for 0.0.0.0/0 in connections on 20080501",
    "show count for 10.79.18.5 in connections since 20080603",
]


@pytest.mark.parametrize("text", QUERIES)
def test_counts_match_brute_force(loaded: tuple[CidrStore, CidrStore], events: list[Event], text: str) -> None:
    hourly, condensed = loaded
    query = parse_query(text)
    for store, days in ((hourly, set()), (condensed, CONDENSED)):
        result = store.execute(query, NOW)
        assert isinstance(result, CountResult)
        assert list(result.rows) == brute_force(query, events, NOW, days), (text, days)
        assert result.columns == query.columns()
        assert result.unknown_series == (("nosuch",) if "nosuch" in text else ())


def test_queries_exercise_real_data(loaded: tuple[CidrStore, CidrStore], events: list[Event]) -> None:
    """Guard against a vacuous comparison: most of the table yields rows, some of them many."""
    sizes = [len(brute_force(parse_query(q), events, NOW, set())) for q in QUERIES]
    assert sum(1 for s in sizes if s > 0) >= len(QUERIES) - 2
    assert max(sizes) > 100


@st.composite
def random_queries(draw) -> str:
    v6 = draw(st.booleans())
    block = draw(st.sampled_from(["::/0", "2001:db8::/32", "2001:db8::/63"] if v6 else
                                 ["0.0.0.0/0", "10.0.0.0/8", "10.79.0.0/16", "192.0.2.0/24"]))
    mask = int(block.split("/")[1])
    bits = 128 if v6 else 32
    names = draw(st.lists(st.sampled_from(SERIES), min_size=1, max_size=3, unique=True))
    target = f"union({','.join(names)})" if draw(st.booleans()) else ",".join(names)
    clauses = []
    when = draw(st.sampled_from(["", "since 20080604", "on 20080605", "on 20080604",
                                 "from 20080604T090000 to 20080606T010000", "since 20080605T224500"]))
    if when:
        clauses.append(when)
    if draw(st.booleans()):
        n = draw(st.integers(mask, bits))
        m = draw(st.integers(n, min(bits, n + 8)))
        clauses.append(f"cidrsize {n} to {m}")
    if draw(st.booleans()):
        clauses.append(f"order by {draw(st.sampled_from(['cidr', 'count']))}")
    if draw(st.booleans()):
        clauses.append("aggregate daily")
    if draw(st.booleans()):
        clauses.append(f"threshold {draw(st.integers(0, 60))}")
    if draw(st.booleans()):
        clauses.append(f"limit {draw(st.integers(1, 12))}")
    return f"show count for {block} in {target} " + " ".join(draw(st.permutations(clauses)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(random_queries())
def test_random_queries_match_brute_force(loaded: tuple[CidrStore, CidrStore], events: list[Event],
                                          text: str) -> None:
    hourly, condensed = loaded
    query = parse_query(text)
    assert list(hourly.execute(query, NOW).rows) == brute_force(query, events, NOW, set())
    assert list(condensed.execute(query, NOW).rows) == brute_force(query, events, NOW, CONDENSED)


def test_query_text_is_accepted_and_formats(loaded: tuple[CidrStore, CidrStore]) -> None:
    hourly, _ = loaded
    result = hourly.execute("show count for 10.79.18.0/24 in connections,rejects since 20080603", NOW)
    [line] = format_rows(result)
    assert line.startswith("10.79.18.0/24 : ")
    a, b = (int(x) for x in line.split(" : ")[1].split(","))
    assert (a, b) == result.rows[0].counts and a > 0 and b > 0
    daily = hourly.execute("show count for 10.79.18.0/24 in union(connections,rejects) since 20080603 "
                           "aggregate daily", NOW)
    assert [line.split(" ")[0] for line in format_rows(daily)] == ["20080603", "20080604", "20080605", "20080606"]
    as_dict = result_to_dict(daily)
    assert as_dict["kind"] == "count" and as_dict["columns"] == ["union(connections,rejects)"]
    assert as_dict["rows"][0]["day"] == "20080603"
    assert sum(r["total"] for r in as_dict["rows"]) == result.rows[0].total


def expected_ranges(events: list[Event], series: str, condensed_days: set[int]) -> tuple[tuple[int, int], ...]:
    """Contiguous time ranges of the records that hold ``series`` (brute force)."""
    spans = set()
    for _node, s, t, _a, _c in events:
        if s == series:
            day = t - t % DAY
            spans.add((day, day + DAY) if day in condensed_days else (t - t % HOUR, t - t % HOUR + HOUR))
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return tuple((a, b) for a, b in merged)


def test_show_available(loaded: tuple[CidrStore, CidrStore], events: list[Event]) -> None:
    hourly, condensed = loaded
    for store in (hourly, condensed):
        result = store.execute("show available", NOW)
        assert isinstance(result, AvailableResult)
        assert [s.series for s in result.series] == sorted(SERIES)
        days = CONDENSED if store is condensed else set()
        for span in result.series:
            assert span.ranges == expected_ranges(events, span.series, days), span
        lines = format_rows(result)
        assert lines[0] == "connections : 20080603T000000-20080606T130000"  # every hour has connections
        assert result_to_dict(result)["series"][0]["ranges"][0]["start"] == D0 - 2 * DAY


def test_add_window_is_idempotent_per_node_series_start(tmpdir_path: str) -> None:
    window = Window("connections", D0 + 120, D0 + 180, {(4, 0x0A000001): 3, (6, 1 << 100): 2})
    total = "show count for 0.0.0.0/0 in connections on 20080605"
    with CidrStore(tmpdir_path) as store:
        assert store.add_window("mta1", window) is True
        assert store.add_window("mta1", window) is False
        assert store.add_windows("mta1", [window, window]) == 0
        assert store.add_window("mta2", window) is True  # another node's window is other data
        assert [r.counts for r in store.execute(total, NOW).rows] == [(6,)]
        # the same window twice inside one new batch counts once
        other = Window("connections", D0 + 180, D0 + 240, {(4, 0x0A000001): 1})
        assert store.add_windows("mta1", [other, other]) == 1
        assert [r.counts for r in store.execute(total, NOW).rows] == [(7,)]
        store.condense(D0 + 3 * DAY)
        assert store.add_window("mta1", window) is False  # still known after condensation
    with CidrStore(tmpdir_path) as store:
        assert store.add_window("mta2", window) is False  # and after reopening
        assert [r.counts for r in store.execute(total, NOW).rows] == [(7,)]


def test_condensation_keeps_totals_and_late_windows_merge_into_day(tmpdir_path: str, events: list[Event]) -> None:
    everything = "show count for {} in connections,rejects,rcpt since 20080101 cidrsize {}"
    queries = [everything.format("0.0.0.0/0", "0 to 24"), everything.format("::/0", "0 to 64")]
    with CidrStore(tmpdir_path) as store:
        for node, windows in to_windows(events).items():
            store.add_windows(node, windows)
        before = [store.execute(q, NOW).rows for q in queries]
        assert store.condense(NOW) == 2 * len(SERIES)
        assert store.condense(NOW) == 0  # nothing left to condense
        assert [store.execute(q, NOW).rows for q in queries] == before
        spans = {s.series: s.ranges for s in store.execute("show available", NOW).series}
        assert all(r[0][0] == D0 - 2 * DAY for r in spans.values())
        # a late window for a condensed day is merged into the day record
        late = Window("rejects", D0 - DAY + 5 * HOUR, D0 - DAY + 5 * HOUR + 60, {(4, 0xC0000201): 11})
        assert store.add_window("mta3", late)
        q = "show count for 192.0.2.1 in rejects on 20080604"
        expected = sum(c for n, s, t, a, c in events if s == "rejects" and a == (4, 0xC0000201)
                       and D0 - DAY <= t < D0) + 11
        assert [r.counts for r in store.execute(q, NOW).rows] == [(expected,)]
        after_late = [store.execute(q, NOW).rows for q in queries]
        c, r, x = before[0][0].counts
        assert after_late[0][0].counts == (c, r + 11, x)
    # condense_after=0: every day before today is condensed (20080605 too); totals unchanged
    with CidrStore(tmpdir_path, condense_after=0) as store:
        assert store.condense(NOW) == len(SERIES)
        assert [store.execute(q, NOW).rows for q in queries] == after_late


def test_retention_drops_old_days(tmpdir_path: str) -> None:
    days = [D0 + i * DAY for i in range(6)]
    with CidrStore(tmpdir_path, retention_days=2) as store:
        for i, d in enumerate(days):
            store.add_window("mta1", Window("connections", d + 600, d + 660, {(4, 0x0A000000 + i): 1}))
        now = days[-1] + 10 * HOUR
        store.condense(now)
        store.expire(now)
        available = store.execute("show available", now)
        assert available.series[0].ranges[0][0] == days[3]  # today (days[5]) and the 2 days before
        rows = store.execute("show count for 10.0.0.0/24 in connections since 20080101 cidrsize 32", now).rows
        assert [r.cidr for r in rows] == ["10.0.0.3/32", "10.0.0.4/32", "10.0.0.5/32"]
        # windows for expired days are refused, not resurrected
        assert store.add_window("mta2", Window("connections", days[1] + 60, days[1] + 120, {(4, 1): 1})) is False
        assert store.add_window("mta2", Window("connections", days[4] + 60, days[4] + 120, {(4, 1): 1})) is True
    with CidrStore(tmpdir_path, retention_days=2) as store:  # the watermark survives reopening
        assert store.add_window("mta2", Window("connections", days[2] + 60, days[2] + 120, {(4, 1): 1})) is False
        # expiry never moves backwards
        store.expire(days[0])
        assert store.add_window("mta2", Window("connections", days[2] + 60, days[2] + 120, {(4, 1): 1})) is False


def test_reopening_keeps_everything(tmpdir_path: str, events: list[Event]) -> None:
    queries = QUERIES[:6] + QUERIES[17:20] + ["show available"]
    with CidrStore(tmpdir_path) as store:
        for node, windows in to_windows(events[:2000]).items():
            store.add_windows(node, windows)
        store.condense(NOW)
        before = [store.execute(q, NOW) for q in queries]
    with CidrStore(tmpdir_path) as store:
        assert [store.execute(q, NOW) for q in queries] == before
        assert store.series_names() == sorted(SERIES)


def test_default_range_is_current_hour_and_23_before(tmpdir_path: str) -> None:
    with CidrStore(tmpdir_path) as store:
        now = D0 + 10 * HOUR + 5
        for h in range(-30, 2):
            start = D0 + 10 * HOUR + h * HOUR
            store.add_window("n", Window("c", start, start + 60, {(4, 0x0A000000): 1}))
        rows = store.execute("show count for 10.0.0.0/8 in c", now).rows
        assert rows == (Row("10.0.0.0/8", (24 + 1,)),)  # 24 hours + the (future) next hour: since has no end
        result = store.execute("show count for 10.0.0.0/8 in c", now)
        assert (result.start, result.end) == (D0 - 13 * HOUR, None)


def test_bad_windows_are_refused_whole(tmpdir_path: str) -> None:
    good = Window("c", D0, D0 + 60, {(4, 1): 1})
    with CidrStore(tmpdir_path) as store:
        for bad in (Window("c", D0, D0 + 60, {(5, 1): 1}), Window("c", D0, D0 + 60, {(4, 2**32): 1}),
                    Window("c", D0, D0 + 60, {(4, 1): 0}), Window("c d", D0, D0 + 60, {}),
                    Window("c", -60, 0, {(4, 1): 1}), Window("c", D0, D0 + 60, {(6, -1): 1})):
            with pytest.raises(CidrStoreError):
                store.add_windows("n", [good, bad])
        with pytest.raises(CidrStoreError):
            store.add_windows("", [good])
        with pytest.raises(CidrStoreError):
            store.add_windows("n", ["not a window"])  # type: ignore[list-item]
        assert store.series_names() == []
        assert store.add_window("n", good) is True  # nothing of the failed batches was marked seen


def test_map_grows_when_full(tmpdir_path: str) -> None:
    big = {(4, i * 7919): 1 + i % 3 for i in range(60_000)}
    with CidrStore(tmpdir_path, map_size=1 << 20) as store:
        for k in range(4):
            assert store.add_window("n", Window("c", D0 + k * 60, D0 + k * 60 + 60, big))
        rows = store.execute("show count for 0.0.0.0/0 in c on 20080605", NOW).rows
        assert rows[0].counts == (4 * sum(big.values()),)


def test_bad_arguments() -> None:
    with pytest.raises(CidrStoreError):
        CidrStore(tempfile.gettempdir() + "/never-created", retention_days=-1)
    with pytest.raises(Exception):
        parse_query("show count for 10.0.0.0/8 in c limit 0")
