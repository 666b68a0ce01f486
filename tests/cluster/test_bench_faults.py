"""bench/faults.py runs end to end with tiny sizes (smoke only: no figure is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from discovery_examples.addservice.faults import SCENARIOS

BENCH = Path(__file__).resolve().parents[2] / "bench" / "faults.py"

pytestmark = pytest.mark.timeout(240)


def test_faults_reports_every_scenario() -> None:
    tiny = ["--instances", "2", "--threads", "1", "--settle", "0.2"]
    tiny += ["--a-down", "1", "--partition", "1", "--quorum-lost", "1", "--b-down", "1"]
    result = subprocess.run(
        [sys.executable, str(BENCH), *tiny], capture_output=True, text=True, timeout=220, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for title, _ in SCENARIOS.values():
        assert re.search(rf"^{re.escape(title)}  \(failed: \d+ of \d+ calls\)$", result.stdout, re.M), result.stdout
        assert re.search(rf"^{re.escape(title)}\s+\d+ failed of \d+ calls$", result.stdout, re.M), result.stdout
    rows = re.findall(r"^  \S.*\s+(?:[\d.]+ ms|never)\s+\d+$", result.stdout, re.M)
    assert len(rows) >= len(SCENARIOS), result.stdout  # an event row (or more) per scenario
