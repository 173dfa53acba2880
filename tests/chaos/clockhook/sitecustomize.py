"""Chaos clock hook: steps this process's wall clock by the offset held in a file.

Put this directory on PYTHONPATH and name the file in ECL_CHAOS_CLOCK_FILE (seconds, e.g.
``+30`` or ``-5``; rewritten by the chaos runner while the process runs). Only the wall
clock moves (``time.time``, ``time.time_ns``), as an NTP step does; ``time.monotonic`` is
left alone: it never steps on a real machine, and the lease arithmetic rests on it.
libfaketime cannot do this with Python 3.11 here: with FAKETIME_DONT_FAKE_MONOTONIC=1 its
clock_nanosleep wrapper makes every time.sleep() fail with EINVAL (libfaketime 0.9.10).
Without ECL_CHAOS_CLOCK_FILE this module does nothing.
"""
import os
import time

_path = os.environ.get("ECL_CHAOS_CLOCK_FILE")
if _path:
    _real_time, _real_time_ns, _mono = time.time, time.time_ns, time.monotonic
    _state = [0.0, -1.0]            # offset, monotonic time of the next read of the file

    def _offset() -> float:
        now = _mono()
        if now >= _state[1]:
            _state[1] = now + 0.1   # re-read at most ten times a second
            try:
                with open(_path) as fh:
                    _state[0] = float(fh.read().strip() or 0)
            except (OSError, ValueError):
                pass
        return _state[0]

    def _time() -> float:
        return _real_time() + _offset()

    def _time_ns() -> int:
        return _real_time_ns() + int(_offset() * 1e9)

    time.time = _time
    time.time_ns = _time_ns
