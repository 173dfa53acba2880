"""The plug-in's audit events on their way to as_logger, each batch sent under a stable id.

Events are summed per (series, address) while they wait. A batch is cut from them, given
the next seq, and sent as ``as_logger.add_batch(events, batch=[sender, seq])``. Until it is
answered it is the *unacknowledged* batch: a failed or timed-out call sends exactly the same
batch (same events, same id) again, so an as_logger that counted it before the answer was
lost recognises the replay and counts nothing (``duplicate: true``). Events that arrive
meanwhile wait for the next batch: adding them to the unacknowledged one would change a
batch as_logger may already have counted under that id.

The sender name carries a random token of this process, so a restarted plug-in never
reuses a (sender, seq) that the as_logger of its node remembers.
"""
from __future__ import annotations

import secrets
from collections import Counter


class AuditOutbox:
    """Pending audit events and the one batch in flight. Pure: no I/O (the service calls)."""

    def __init__(self, node: str, max_pending: int, token: str | None = None):
        self.sender = f"smtp-{node}-{token or secrets.token_hex(4)}"
        self.max_pending = max_pending
        self.pending: Counter = Counter()            # (series, address) -> events
        self.seq = 0                                 # the id of the last batch cut
        self.unacked: list | None = None             # events of batch ``seq`` until answered

    def add(self, series: str, address: str) -> bool:
        """Count one event; False (not kept) when ``max_pending`` addresses already wait."""
        key = (series, address)
        if key not in self.pending and len(self.pending) >= self.max_pending:
            return False
        self.pending[key] += 1
        return True

    def next_call(self) -> tuple[list, list] | None:
        """``(events, [sender, seq])`` to send now: the unacknowledged batch again, else a new
        batch of what is pending; None when there is nothing to send."""
        if self.unacked is None:
            if not self.pending:
                return None
            self.seq += 1
            self.unacked = [[s, a, n] for (s, a), n in self.pending.items()]
            self.pending.clear()
        return self.unacked, [self.sender, self.seq]

    def answered(self, seq: int) -> None:
        """Batch ``seq`` was counted (or found to be a replay): it is done. (An answer to a
        batch that is no longer the one in flight, from a second sender of it, is ignored.)"""
        if seq == self.seq:
            self.unacked = None

    def refused(self, seq: int) -> int:
        """Batch ``seq`` was refused for good: drop it; returns how many (series, address)
        entries it held (0 if it is no longer the one in flight)."""
        if seq != self.seq or self.unacked is None:
            return 0
        n = len(self.unacked)
        self.unacked = None
        return n

    def waiting(self) -> int:
        """(series, address) entries not yet counted by as_logger (pending and in flight)."""
        return len(self.pending) + len(self.unacked or ())
