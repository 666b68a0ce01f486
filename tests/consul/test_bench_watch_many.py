"""Smoke run of bench/watch_many.py on a real agent: it runs and reports every column."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.consul

BENCH = Path(__file__).resolve().parents[2] / "bench" / "watch_many.py"


def test_watch_many_reports_cost_and_latency_per_size(consul_agent: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run = runpy.run_path(str(BENCH), run_name="bench_watch_many")["run"]
    args = ["--sizes", "2,20", "--count", "3", "--idle", "0.5", "--idle-after", "0,0.5", "--others", "20"]
    small, large = run([*args, "--consul-address", consul_agent.address])
    assert (small.services, large.services) == (2, 20)
    for size in (small, large):
        assert 0 < size.connections <= 16
        assert [window.start for window in size.idle] == [0, 0.5]
        assert all(window.reads.total() == size.services for window in size.idle)  # every service, read or not
        assert len(size.ours.samples) == len(size.floor.samples) == 3
        assert size.requests_per_change > 0
    assert "ratio" in capsys.readouterr().out
