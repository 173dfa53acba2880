"""Tests of services.pulling: the pure pacing decisions of a manager's pull loop, and the
loop itself driven by scripted async pulls (no bus, no nodes)."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.client import BusError, CallTimeout, RemoteError
from services import as_logger, cidr_server, logagg
from services.pulling import (Pause, PullPolicy, PullState, ack_after_failure, ack_args, after_bug,
                              after_failure, after_pull, checkpoint_after, initial_state, next_backoff,
                              pause, run_pull_loop)

POLICY = PullPolicy(idle_wait=2.0, backoff_min=0.1, backoff_max=2.0, read_timeout=5.0,
                    first_read_timeout=1.0, trickle_below=100, trickle_wait=0.05, bug_wait=3.0)
#: the policies the services really use, checked by the same properties as generated ones
REAL_POLICIES = [logagg.PULL_POLICY, cidr_server.PULL_POLICY, as_logger.RETRY_POLICY]


def timeout_error() -> CallTimeout:
    return CallTimeout("n1", "jlog", "read", 1.0)


# ------------------------------------------------------------------------------ tables

@pytest.mark.parametrize("previous, expected", [
    (0.0, 0.1),      # first failure: the minimum
    (-1.0, 0.1),     # a nonsense previous value is a first failure, not a negative pause
    (0.1, 0.2),
    (0.4, 0.8),
    (1.5, 2.0),      # doubling past the maximum stops at it
    (2.0, 2.0),
    (0.01, 0.1),     # a previous pause below the minimum still pauses at least the minimum
    (0.05, 0.1),
])
def test_next_backoff_table(previous: float, expected: float) -> None:
    assert next_backoff(previous, POLICY) == pytest.approx(expected)


@pytest.mark.parametrize("lo, hi", [(2.0, 1.0), (0.5, 0.1), (float("nan"), 1.0)])
def test_policy_with_minimum_above_maximum_is_refused(lo: float, hi: float) -> None:
    with pytest.raises(ValueError, match="backoff_min .* must not exceed backoff_max") as err:
        PullPolicy(idle_wait=1.0, backoff_min=lo, backoff_max=hi, read_timeout=1.0)
    assert "\n" not in str(err.value)


def test_policy_with_equal_bounds_is_accepted() -> None:
    policy = PullPolicy(idle_wait=1.0, backoff_min=0.5, backoff_max=0.5, read_timeout=1.0)
    assert [next_backoff(p, policy) for p in (0.0, 0.1, 0.5, 9.0)] == [0.5, 0.5, 0.5, 0.5]


def test_initial_state_uses_the_first_contact_timeout() -> None:
    assert initial_state(POLICY) == PullState(backoff=0.0, read_timeout=1.0)
    no_first = replace(POLICY, first_read_timeout=None)
    assert initial_state(no_first) == PullState(backoff=0.0, read_timeout=5.0)


@pytest.mark.parametrize("records, seconds", [
    (0, 2.0),        # nothing new: idle wait (woken by jlog.written)
    (1, 0.05),       # a trickle: wait a little to take more per call
    (99, 0.05),
    (100, None),     # a full enough batch: pull again at once
    (20_000, None),
])
def test_after_pull_table(records: int, seconds: float | None) -> None:
    failing = PullState(backoff=1.6, read_timeout=2.0)
    state, what = after_pull(failing, records, POLICY)
    assert state == PullState(backoff=0.0, read_timeout=POLICY.read_timeout)
    assert what == Pause(seconds, wakeable=True)


def test_after_pull_without_trickle_setting_pulls_again_after_any_records() -> None:
    policy = replace(POLICY, trickle_below=0)
    assert after_pull(initial_state(policy), 1, policy)[1] == Pause(None)


@pytest.mark.parametrize("timed_out, read_timeouts", [
    (True, [2.0, 4.0, 5.0, 5.0]),     # a timed-out read gets twice the time, up to read_timeout
    (False, [1.0, 1.0, 1.0, 1.0]),    # any other error: back to the short first-contact timeout
])
def test_after_failure_sequence(timed_out: bool, read_timeouts: list[float]) -> None:
    state = initial_state(POLICY)
    pauses, timeouts = [], []
    for _ in range(4):
        state, what = after_failure(state, POLICY, timed_out=timed_out)
        assert what.wakeable
        pauses.append(what.seconds)
        timeouts.append(state.read_timeout)
        assert state.backoff == what.seconds
    assert pauses == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert timeouts == pytest.approx(read_timeouts)


def test_other_error_after_timeouts_restarts_at_first_contact_timeout() -> None:
    state = PullState(backoff=0.4, read_timeout=5.0)
    state, _ = after_failure(state, POLICY, timed_out=False)
    assert state.read_timeout == POLICY.first_read_timeout
    assert state.backoff == pytest.approx(0.8)


def test_after_bug_with_bug_wait_keeps_state_and_is_not_wakeable() -> None:
    state = PullState(backoff=0.4, read_timeout=2.0)
    assert after_bug(state, POLICY) == (state, Pause(3.0, wakeable=False))


def test_after_bug_without_bug_wait_is_an_ordinary_failure() -> None:
    policy = replace(POLICY, bug_wait=None)
    state = PullState(backoff=0.4, read_timeout=5.0)
    assert after_bug(state, policy) == after_failure(state, policy, timed_out=False)


@pytest.mark.parametrize("records, expected", [
    ([], None),
    ([[7, b"x"]], 7),
    ([[3, b"a"], [4, b"b"], [9, b"c"]], 9),
    ([[0, b"a"]], 0),                  # seq 0 is a checkpoint, not "nothing"
])
def test_checkpoint_after_table(records: list, expected: int | None) -> None:
    assert checkpoint_after(records) == expected


@pytest.mark.parametrize("pending, expected", [(None, {}), (0, {"ack": 0}), (41, {"ack": 41})])
def test_ack_args_table(pending: int | None, expected: dict) -> None:
    assert ack_args(pending) == expected


@pytest.mark.parametrize("pending, exc, expected", [
    (12, timeout_error(), 12),                                 # may not have arrived: send again
    (12, BusError("unreachable"), 12),
    (12, RemoteError("no_service", "jlog is not running"), 12),
    (12, RemoteError("bad_checkpoint", "seq 12 is past the end"), None),   # journal restarted lower
    (12, OSError(28, "No space left on device"), 12),          # a local failure: the ack still stands
    (None, timeout_error(), None),
    (None, RemoteError("bad_checkpoint", ""), None),
])
def test_ack_after_failure_table(pending: int | None, exc: BaseException, expected: int | None) -> None:
    assert ack_after_failure(pending, exc) == expected


def test_as_logger_retry_schedule_is_the_shared_backoff() -> None:
    delays, delay = [], 0.0
    for _ in range(8):
        delay = next_backoff(delay, as_logger.RETRY_POLICY)
        delays.append(delay)
    assert delays == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0])
    assert as_logger.next_backoff is next_backoff      # one implementation, not two


# ------------------------------------------------------------------------------ properties

@st.composite
def policies(draw) -> PullPolicy:
    """Valid policies: 0 < backoff_min <= backoff_max, positive timeouts."""
    lo = draw(st.floats(0.001, 30.0))
    hi = draw(st.floats(lo, 120.0))
    read = draw(st.floats(0.01, 60.0))
    first = draw(st.one_of(st.none(), st.floats(0.01, read)))
    bug = draw(st.one_of(st.none(), st.floats(0.0, 30.0)))
    trickle = draw(st.integers(0, 1000))
    return PullPolicy(idle_wait=draw(st.floats(0.0, 60.0)), backoff_min=lo, backoff_max=hi, read_timeout=read,
                      first_read_timeout=first, trickle_below=trickle, trickle_wait=draw(st.floats(0.0, 1.0)),
                      bug_wait=bug)


any_policy = st.one_of(st.sampled_from(REAL_POLICIES), policies())
#: what one pull does: ("ok", records) | ("timeout",) | ("error",) | ("bug",)
outcomes = st.lists(st.one_of(st.tuples(st.just("ok"), st.integers(0, 50_000)),
                              st.tuples(st.sampled_from(["timeout", "error", "bug"]))), max_size=60)


@settings(max_examples=300, deadline=None)
@given(policy=any_policy, steps=outcomes)
def test_backoff_bounded_growing_and_reset_by_success(policy: PullPolicy, steps: list) -> None:
    state = initial_state(policy)
    failures = 0                  # consecutive failures (a bug with bug_wait is not one)
    for step in steps:
        previous = state
        if step[0] == "ok":
            state, what = after_pull(state, step[1], policy)
            failures = 0
            assert state.backoff == 0.0 and state.read_timeout == policy.read_timeout
            assert what.wakeable
        elif step[0] == "bug" and policy.bug_wait is not None:
            state, what = after_bug(state, policy)
            assert state == previous and what == Pause(policy.bug_wait, wakeable=False)
        else:
            if step[0] == "bug":
                state, what = after_bug(state, policy)
            else:
                state, what = after_failure(state, policy, timed_out=step[0] == "timeout")
            failures += 1
            assert what.wakeable and what.seconds == state.backoff
            assert policy.backoff_min <= state.backoff <= policy.backoff_max
            # grows: doubling until the maximum, never shrinking while failures go on
            assert state.backoff >= previous.backoff
            assert state.backoff == pytest.approx(min(policy.backoff_max,
                                                      policy.backoff_min * 2 ** (failures - 1)))
        lo = min(policy.initial_read_timeout, policy.read_timeout)
        assert lo <= state.read_timeout <= policy.read_timeout
        assert 0.0 <= state.backoff <= policy.backoff_max


@settings(max_examples=200, deadline=None)
@given(policy=any_policy, previous=st.floats(-10.0, 1000.0))
def test_next_backoff_stays_within_bounds(policy: PullPolicy, previous: float) -> None:
    # any previous value, also one below the minimum or above the maximum
    wait = next_backoff(previous, policy)
    assert policy.backoff_min <= wait <= policy.backoff_max
    if previous > 0:
        assert wait == min(policy.backoff_max, max(policy.backoff_min, previous * 2))
    if policy.backoff_min <= previous <= policy.backoff_max:      # a back-off this function gave
        assert wait == min(policy.backoff_max, previous * 2)


@settings(max_examples=200, deadline=None)
@given(policy=any_policy, timeouts=st.integers(0, 30))
def test_timed_out_reads_reach_read_timeout_and_stop(policy: PullPolicy, timeouts: int) -> None:
    state = initial_state(policy)
    for _ in range(timeouts):
        new, _ = after_failure(state, policy, timed_out=True)
        assert new.read_timeout >= min(state.read_timeout, policy.read_timeout)
        state = new
    if timeouts >= 30:
        assert state.read_timeout == pytest.approx(policy.read_timeout)


@settings(max_examples=200, deadline=None)
@given(seqs=st.lists(st.integers(0, 2**62), min_size=0, max_size=30, unique=True),
       failures=st.lists(st.sampled_from(["timeout", "bus", "refused", "bad_checkpoint", "sink"]), max_size=10))
def test_ack_semantics_only_bad_checkpoint_drops_the_ack(seqs: list[int], failures: list[str]) -> None:
    batch = [[s, b""] for s in sorted(seqs)]
    pending = checkpoint_after(batch)
    assert pending == (max(seqs) if seqs else None)
    errors = {"timeout": timeout_error(), "bus": BusError("unreachable"),
              "refused": RemoteError("not_ready", "starting"),
              "bad_checkpoint": RemoteError("bad_checkpoint", "journal restarted"), "sink": OSError("disk")}
    for name in failures:
        new = ack_after_failure(pending, errors[name])
        # a kept ack is the same seq (re-sent); a dropped one only for bad_checkpoint
        assert new == (None if name == "bad_checkpoint" else pending)
        pending = new
    # the next read carries exactly the pending ack, if any
    assert ack_args(pending) == ({} if pending is None else {"ack": pending})


# ------------------------------------------------------------------------------ the loop

class ScriptedPull:
    """A fake ``pull(read_timeout)``: each call takes the next outcome of the script (an
    int is a number of records, an exception is raised, a callable is awaited first);
    once the script is used up a call blocks until cancelled. Calls are recorded with
    their loop time and read timeout."""

    def __init__(self, script: list):
        self.script = list(script)
        self.calls: list[tuple[float, float]] = []
        self._changed = asyncio.Event()

    async def __call__(self, read_timeout: float) -> int:
        self.calls.append((asyncio.get_running_loop().time(), read_timeout))
        self._changed.set()
        if not self.script:
            await asyncio.Event().wait()          # blocks until the loop is cancelled
        outcome = self.script.pop(0)
        if callable(outcome):
            outcome = await outcome()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def wait_calls(self, n: int, timeout: float = 5.0) -> None:
        """Wait (with a deadline) until at least ``n`` calls were made."""
        async def reached() -> None:
            while len(self.calls) < n:
                self._changed.clear()
                await self._changed.wait()
        try:
            await asyncio.wait_for(reached(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{len(self.calls)} pulls within {timeout} s, expected {n}") from None

    def gaps(self) -> list[float]:
        return [b[0] - a[0] for a, b in zip(self.calls, self.calls[1:])]


class Failures:
    """A fake ``failed`` callback recording (exception, expected, previous back-off)."""

    def __init__(self):
        self.seen: list[tuple[BaseException, bool, float]] = []

    async def __call__(self, exc: BaseException, expected: bool, previous: float) -> None:
        self.seen.append((exc, expected, previous))


async def start_loop(pull, policy: PullPolicy, wake: asyncio.Event | None = None,
                     failed: Failures | None = None, expected=(BusError,)):
    wake = wake or asyncio.Event()
    failed = failed or Failures()
    task = asyncio.ensure_future(run_pull_loop(wake, pull, failed, policy, expected=expected))
    return task, wake, failed


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5.0)


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 20.0))


LOOP_POLICY = PullPolicy(idle_wait=30.0, backoff_min=0.05, backoff_max=0.2, read_timeout=0.4,
                         first_read_timeout=0.1)


def test_wake_event_cuts_the_idle_pause_short() -> None:
    async def main() -> None:
        pull = ScriptedPull([0, 0])
        task, wake, failed = await start_loop(pull, LOOP_POLICY)
        try:
            await pull.wait_calls(1)
            wake.set()                      # the node's jlog.written event
            await pull.wait_calls(2)        # well before idle_wait (30 s) passes
            assert pull.gaps()[0] < LOOP_POLICY.idle_wait / 3
            assert failed.seen == []
        finally:
            await stop(task)
    run(main())


def test_event_during_the_read_ends_the_following_pause_at_once() -> None:
    async def main() -> None:
        wake = asyncio.Event()

        async def records_while_reading() -> int:
            wake.set()                      # written while the read was in flight
            return 0

        pull = ScriptedPull([records_while_reading, 0])
        task, _, _ = await start_loop(pull, LOOP_POLICY, wake=wake)
        try:
            await pull.wait_calls(2)
            assert pull.gaps()[0] < LOOP_POLICY.idle_wait / 3
        finally:
            await stop(task)
    run(main())


def test_idle_pause_without_an_event_lasts_idle_wait() -> None:
    async def main() -> None:
        policy = replace(LOOP_POLICY, idle_wait=0.3)
        pull = ScriptedPull([0, 0])
        task, _, _ = await start_loop(pull, policy)
        try:
            await pull.wait_calls(2)
            assert pull.gaps()[0] >= 0.3 - 0.02       # not cut short without an event
        finally:
            await stop(task)
    run(main())


def test_full_batches_are_pulled_back_to_back() -> None:
    async def main() -> None:
        pull = ScriptedPull([500, 500, 500])
        task, _, _ = await start_loop(pull, LOOP_POLICY)
        try:
            await pull.wait_calls(4)
            assert all(gap < LOOP_POLICY.idle_wait / 3 for gap in pull.gaps())
            assert [t for _, t in pull.calls] == pytest.approx([0.1, 0.4, 0.4, 0.4])
        finally:
            await stop(task)
    run(main())


def test_cancellation_during_a_pull_stops_the_loop_without_a_failure() -> None:
    async def main() -> None:
        pull = ScriptedPull([])             # the first pull blocks
        task, _, failed = await start_loop(pull, LOOP_POLICY)
        await pull.wait_calls(1)
        await stop(task)
        assert task.cancelled()
        assert failed.seen == []            # a cancellation is not reported as a failure
        for _ in range(5):
            await asyncio.sleep(0)          # let anything still scheduled run
        assert len(pull.calls) == 1
    run(main())


def test_cancellation_during_a_pause_stops_the_loop() -> None:
    async def main() -> None:
        pull = ScriptedPull([0, 0])
        task, _, failed = await start_loop(pull, LOOP_POLICY)   # idle pause of 30 s after the first
        await pull.wait_calls(1)
        await stop(task)
        assert task.cancelled() and failed.seen == []
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(pull.calls) == 1
    run(main())


def test_failing_pull_backs_off_then_resets_after_success() -> None:
    async def main() -> None:
        script = [timeout_error(), timeout_error(), timeout_error(), BusError("unreachable"),
                  BusError("unreachable"), 0]
        pull = ScriptedPull(script)
        policy = replace(LOOP_POLICY, idle_wait=0.05)
        task, _, failed = await start_loop(pull, policy)
        try:
            await pull.wait_calls(7)
        finally:
            await stop(task)
        # each failure reported as expected, with the back-off before it
        assert [e for e, _, _ in failed.seen] == script[:5]
        assert all(expected for _, expected, _ in failed.seen)
        assert [b for _, _, b in failed.seen] == pytest.approx([0.0, 0.05, 0.1, 0.2, 0.2])
        # the pauses between pulls were at least the back-off (doubling, capped at 0.2)
        for gap, wait in zip(pull.gaps(), [0.05, 0.1, 0.2, 0.2, 0.2]):
            assert gap >= wait - 0.02
        # read timeouts: doubled by timeouts, back to first contact after another error,
        # the full read_timeout after a success
        assert [t for _, t in pull.calls] == pytest.approx([0.1, 0.2, 0.4, 0.4, 0.1, 0.1, 0.4])
    run(main())


def test_a_bug_neither_ends_the_loop_nor_is_woken_nor_touches_the_backoff() -> None:
    async def main() -> None:
        policy = replace(LOOP_POLICY, bug_wait=0.3)
        pull = ScriptedPull([BusError("down"), ValueError("bug"), BusError("down")])
        task, wake, failed = await start_loop(pull, policy)
        try:
            await pull.wait_calls(2)
            wake.set()                       # must not cut the bug pause short
            await pull.wait_calls(4)
        finally:
            await stop(task)
        assert [(type(e), expected) for e, expected, _ in failed.seen] == \
            [(BusError, True), (ValueError, False), (BusError, True)]
        assert pull.gaps()[1] >= 0.3 - 0.02
        # the bug kept the back-off: the failure after it is the second one in a row
        assert [b for _, _, b in failed.seen] == pytest.approx([0.0, 0.05, 0.05])
    run(main())


def test_pause_helper() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        start = loop.time()
        await pause(wake, Pause(None))                  # no pause at all
        wake.set()
        await pause(wake, Pause(30.0))                  # already set: returns at once
        assert loop.time() - start < 5.0
        start = loop.time()
        await pause(wake, Pause(0.1, wakeable=False))   # ignores the event
        assert loop.time() - start >= 0.1 - 0.02
    run(main())
