"""Smoke run of bench/propagation.py on the memory backend (no Consul needed).

It checks the benchmark runs and reports sane figures, never how fast they are."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "propagation.py"


def load_bench() -> dict[str, Any]:
    return runpy.run_path(str(BENCH), run_name="bench_propagation")


def test_memory_only_run_reports_p50_and_p99(capsys: pytest.CaptureFixture[str]) -> None:
    (result,) = load_bench()["run"](["--backends", "memory", "--memory-count", "5"])
    assert result.label == "memory"
    assert len(result.samples) == 5
    assert 0 <= result.p50 <= result.p99
    assert "p50=" in capsys.readouterr().out


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(SystemExit):
        load_bench()["run"](["--backends", "zookeeper"])
