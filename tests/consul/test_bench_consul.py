"""Smoke run of bench/propagation.py on a real agent: it runs and prints the ratio."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.consul

BENCH = Path(__file__).resolve().parents[2] / "bench" / "propagation.py"


def test_consul_run_reports_floor_consul_and_ratio(consul_agent: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run = runpy.run_path(str(BENCH), run_name="bench_propagation")["run"]
    floor, consul = run(["--backends", "consul", "--consul-count", "3", "--consul-address", consul_agent.address])
    assert (floor.label, consul.label) == ("consul floor (raw)", "consul")
    assert len(floor.samples) == len(consul.samples) == 3
    assert "consul p50 / floor p50 =" in capsys.readouterr().out
