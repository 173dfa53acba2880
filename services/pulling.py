"""Pulling a node's journal: the per-node loop shared by ``logagg`` and ``cidr_server``.

A manager consumes each (node, log) with one loop: read a batch through its own jlog
subscriber, make the batch durable here, then checkpoint it at the node. Nothing is
checkpointed before it is durable here (so nothing is lost) and the consumer drops what a
crash makes it read again (so nothing counts twice); see docs/LOGS.md and docs/CIDR.md.

The decisions are pure functions of a :class:`PullPolicy`: how long to pause after a batch
(:func:`after_pull`) or a failure (:func:`after_failure`, :func:`after_bug`), how long the
next read may take, what to checkpoint (:func:`checkpoint_after`) and, for a consumer that
lets the checkpoint ride on its next read, what that read carries (:func:`ack_args`,
:func:`ack_after_failure`). :func:`run_pull_loop` is the edge that awaits the pull and
the pauses; the consumer supplies the pull (read, store, checkpoint) and the reporting.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

from bus.client import CallTimeout, RemoteError


@dataclass(frozen=True)
class PullPolicy:
    """How one consumer paces its pull loops (all times in seconds)."""

    #: nothing new: pause until the node's ``jlog.written`` event or this long
    idle_wait: float
    #: consecutive failures pause ``backoff_min``, then twice as long each time, up to ``backoff_max``
    backoff_min: float
    backoff_max: float
    #: how long a read may take once the node answers
    read_timeout: float
    #: at first contact and after an error other than a timeout (None: ``read_timeout``);
    #: a timed-out read doubles it up to ``read_timeout``
    first_read_timeout: float | None = None
    #: a batch of fewer records than this (but not none) pauses ``trickle_wait``, so a
    #: trickle is taken in batches rather than one call per record (0: never)
    trickle_below: int = 0
    trickle_wait: float = 0.0
    #: an unexpected exception (a bug): pause this long, not woken by events, and leave
    #: the back-off as it was (None: treat it like any other failure)
    bug_wait: float | None = None

    def __post_init__(self) -> None:
        if not self.backoff_min <= self.backoff_max:
            raise ValueError(f"PullPolicy: backoff_min ({self.backoff_min}) must not exceed backoff_max ({self.backoff_max})")

    @property
    def initial_read_timeout(self) -> float:
        return self.read_timeout if self.first_read_timeout is None else self.first_read_timeout


@dataclass(frozen=True)
class PullState:
    """Where one loop stands between pulls."""

    #: the pause after the last failure; 0 when the last pull succeeded
    backoff: float
    #: the timeout of the next read
    read_timeout: float


@dataclass(frozen=True)
class Pause:
    """What a loop does before its next pull: nothing (``seconds`` None), or wait."""

    seconds: float | None
    #: the node's ``jlog.written`` event ends the wait early
    wakeable: bool = True


def initial_state(policy: PullPolicy) -> PullState:
    """The state of a loop that has not pulled yet. Pure."""
    return PullState(backoff=0.0, read_timeout=policy.initial_read_timeout)


def next_backoff(previous: float, policy: PullPolicy) -> float:
    """The pause after one more consecutive failure (``previous`` 0: the first). Pure.

    Never below ``backoff_min`` nor above ``backoff_max``, whatever ``previous`` holds (a
    value below the minimum, say from a policy changed between two failures).
    """
    if previous <= 0:
        return policy.backoff_min
    return min(policy.backoff_max, max(policy.backoff_min, previous * 2))


def after_pull(state: PullState, records: int, policy: PullPolicy) -> tuple[PullState, Pause]:
    """A pull that read ``records`` records succeeded: back-off reset, then pull or pause. Pure."""
    new = PullState(backoff=0.0, read_timeout=policy.read_timeout)
    if records <= 0:
        return new, Pause(policy.idle_wait)
    if records < policy.trickle_below:
        return new, Pause(policy.trickle_wait)
    return new, Pause(None)              # a full batch: more is likely waiting


def after_failure(state: PullState, policy: PullPolicy, timed_out: bool) -> tuple[PullState, Pause]:
    """A pull failed (the node did not answer, or the batch could not be stored). Pure.

    A timed-out read gets twice the time next (up to ``read_timeout``); any other error
    restarts at the short first-contact timeout: a reply sent while the node's broker link
    to this manager is still coming up is lost, and a short timeout retries it quickly.
    """
    wait = next_backoff(state.backoff, policy)
    timeout = (min(policy.read_timeout, state.read_timeout * 2) if timed_out
               else policy.initial_read_timeout)
    return PullState(backoff=wait, read_timeout=timeout), Pause(wait)


def after_bug(state: PullState, policy: PullPolicy) -> tuple[PullState, Pause]:
    """A pull raised an unexpected exception: see :attr:`PullPolicy.bug_wait`. Pure."""
    if policy.bug_wait is None:
        return after_failure(state, policy, timed_out=False)
    return state, Pause(policy.bug_wait, wakeable=False)


def checkpoint_after(records: list) -> int | None:
    """The seq to checkpoint once a batch ``[[seq, payload], ...]`` (in seq order, as
    checked by the consumer) is durable here: its last; None for an empty batch. Pure."""
    return records[-1][0] if records else None


def ack_args(pending_ack: int | None) -> dict[str, int]:
    """The ``ack`` argument of the next ``jlog.read``: the checkpoint of the last batch
    made durable here, which the node applies before reading. Pure."""
    return {} if pending_ack is None else {"ack": pending_ack}


def ack_after_failure(pending_ack: int | None, exc: BaseException) -> int | None:
    """The ack still to send after a failed pull. Pure.

    An ack that did not reach the node is sent again with the next read (moving a
    checkpoint twice to the same seq is harmless); one the node refuses as
    ``bad_checkpoint`` (its journal restarted lower) is dropped, and the consumer's
    dedup floor is checked against what the node now has instead.
    """
    if isinstance(exc, RemoteError) and exc.code == "bad_checkpoint":
        return None
    return pending_ack


async def pause(wake: asyncio.Event, what: Pause) -> None:
    """Wait as ``what`` says; a wakeable pause ends early when ``wake`` is set."""
    if what.seconds is None:
        return
    if not what.wakeable:
        await asyncio.sleep(what.seconds)
        return
    try:
        await asyncio.wait_for(wake.wait(), what.seconds)
    except asyncio.TimeoutError:
        pass


#: pull(read_timeout) -> records read; raises on failure
Pull = Callable[[float], Awaitable[int]]
#: failed(exc, expected, previous back-off) -> None; called inside the except block
Failed = Callable[[BaseException, bool, float], Awaitable[None]]


async def run_pull_loop(wake: asyncio.Event, pull: Pull, failed: Failed, policy: PullPolicy,
                        expected: tuple[type[BaseException], ...]) -> None:
    """Pull forever: ``pull``, then pause as the policy says; until cancelled.

    ``expected`` exceptions are failures (the node is down, a batch cannot be stored);
    any other is a bug, reported the same way (``failed(exc, False, ...)``, where a
    traceback can still be logged) but never ends the loop.
    """
    state = initial_state(policy)
    while True:
        wake.clear()         # before the read: an event during it makes the pause below end at once
        try:
            records = await pull(state.read_timeout)
        except asyncio.CancelledError:
            raise
        except expected as e:
            await failed(e, True, state.backoff)
            state, next_pause = after_failure(state, policy, timed_out=isinstance(e, CallTimeout))
        except Exception as e:  # noqa: BLE001 - a bug must not end this node's consumption
            await failed(e, False, state.backoff)
            state, next_pause = after_bug(state, policy)
        else:
            state, next_pause = after_pull(state, records, policy)
        await pause(wake, next_pause)
