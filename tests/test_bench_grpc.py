"""The gRPC benchmarks run end to end with tiny sizes (smoke only: no figure is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

pytestmark = pytest.mark.timeout(180)


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=150, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_overhead_prints_rounds_and_the_ratio() -> None:
    out = run("overhead.py", "--rounds", "2", "--calls", "50", "--warmup", "10")
    assert len(re.findall(r"^round\s+\d+: plain\s+\d+/s\s+discovery\s+\d+/s\s+ratio [\d.]+$", out, re.M)) == 2, out
    assert re.search(r"median ratio discovery/plain = [\d.]+", out), out


def test_failover_reports_every_event_on_memory() -> None:
    out = run("failover.py", "--backends", "memory", "--threads", "1")
    for title in ("rolling restart of 3", "abrupt kill, no retry policy", "abrupt kill, with retries", "health flip"):
        assert title in out, out
    assert len(re.findall(r"^  \S.*\s+[\d.]+ ms\s+\d+$", out, re.M)) == 10, out
