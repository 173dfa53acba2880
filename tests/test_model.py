"""The Promela model of the election protocol (docs/model/election.pml), checked with Spin.

Runs ``tools/check_model.sh --quick``: a depth-bounded run of the lease model (no two
holders), the commit model in full (no acknowledged commit lost), and one mutant of each,
which must fail. ``make chaos`` runs the exhaustive version. Skips when spin or gcc is
missing and cannot be installed (not root, or no apt).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "check_model.sh"


def test_model_passes_and_its_mutants_fail():
    r = subprocess.run(["bash", str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=110,
                       stdin=subprocess.DEVNULL)
    if r.returncode == 2:
        pytest.skip(f"spin/gcc unavailable: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'missing'}")
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "PASS  leases-bounded" in out and "errors: 0" in out
    assert "PASS  commits  " in out
    assert "mutant-nohandover fails as it must" in out and "assertion violated" in out
    assert "commits-no-rule-no-view-change fails as it must" in out
    assert out.rstrip().endswith("model check: OK")
