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
    raw, same, consul = run(["--backends", "consul", "--consul-count", "3", "--consul-address", consul_agent.address])
    assert (raw.label, same.label, consul.label) == ("floor (raw PUT)", "floor (same register())", "consul")
    assert len(raw.samples) == len(same.samples) == len(consul.samples) == 3
    out = capsys.readouterr().out
    assert "consul p50 / floor (same register()) p50 =" in out
    assert "consul p50 / floor (raw PUT) p50 =" in out
