"""The short chaos run inside `make test`: about 60 s of faults with a fixed seed against a
whole cluster in the namespace lab (3 nodes, 2 managers, 2 VIPs, the SMTP plug-in), then the
verdict of tests/chaos/checker.py must pass. `make chaos` runs a longer one with a random seed.
"""
from __future__ import annotations

import os

import pytest

from .checker import format_verdict
from .runner import run
from .schedule import DEFAULT_KINDS, end_time, format_schedule, generate

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
              pytest.mark.timeout(600)]

SEED = 20261191          # a seed whose 60 s hold every default fault kind (15 faults)
DURATION = 60.0


def test_short_chaos_run_keeps_every_property():
    schedule = generate(SEED, DURATION)
    assert {f.fault for f in schedule} == set(DEFAULT_KINDS)
    print(f"\nseed {SEED}, {len(schedule)} faults over {end_time(schedule):.1f} s\n{format_schedule(schedule)}")
    verdict, history = run(schedule, SEED)
    print(format_verdict(verdict, SEED))
    assert len(history.faults) == len(schedule)
    assert verdict.passed, "\n" + format_verdict(verdict, SEED)
