"""jlog: a durable local append-only journal per log with named, checkpointed subscribers.

After OmniTI's jlog. `format` holds the pure on-disk encoding, `journal` the Journal
(segment files + LMDB checkpoints). See `node.jlog.journal` for durability, budget and
recovery semantics.
"""

from .format import (
    CheckpointError,
    JournalClosed,
    JournalConfigError,
    JournalCorrupt,
    JournalError,
    JournalFull,
    JournalLocked,
    SubscriberStalled,
    UnknownSubscriber,
)
from .journal import (
    ALARM_AHEAD,
    ALARM_DROPPED,
    ALARM_FULL,
    ALARM_LOST,
    DEFAULT_SEGMENT_SIZE,
    Journal,
    ReadBatch,
    inspect,
    parse_fsync_policy,
)

__all__ = [
    "ALARM_AHEAD",
    "ALARM_DROPPED",
    "ALARM_FULL",
    "ALARM_LOST",
    "DEFAULT_SEGMENT_SIZE",
    "CheckpointError",
    "Journal",
    "JournalClosed",
    "JournalConfigError",
    "JournalCorrupt",
    "JournalError",
    "JournalFull",
    "JournalLocked",
    "ReadBatch",
    "SubscriberStalled",
    "UnknownSubscriber",
    "inspect",
    "parse_fsync_policy",
]
