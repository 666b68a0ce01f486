"""Smoke run of bench/scale.py's Consul row on a real agent: it captures two answers,
decodes them both ways and prints the ratio (no figure is asserted)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.consul

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scale.py"


def test_the_consul_row_decodes_a_captured_answer_before_and_now(consul_agent: Any) -> None:
    run = runpy.run_path(str(BENCH), run_name="bench_scale")["run"]
    args = ["--rows", "consul", "--consul-instances", "20", "--rounds", "2", "--decodes", "2"]
    (row,) = run([*args, "--consul-address", consul_agent.address])
    assert row.measure == "Consul poll of a 20-instance service"
    assert re.fullmatch(r"[\d.]+x", row.ratio), row
