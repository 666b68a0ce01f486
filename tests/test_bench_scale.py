"""Smoke run of bench/scale.py with tiny sizes on the memory backend: every row but
Consul's prints (tests/consul/test_bench_scale.py runs that one). No figure is
asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "scale.py"

pytestmark = pytest.mark.timeout(180)

TINY = ("--sizes", "1,20", "--samples", "3", "--services", "2,5", "--warmup", "0.2", "--idle", "0.5")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=150, check=False)


def test_every_memory_row_is_printed_in_the_table() -> None:
    rows = "subscriber,picker,build,idle,services,calls"
    result = run("--rows", rows, *TINY, "--rounds", "2", "--calls", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    measures = [line.split(" | ")[0].removeprefix("| ") for line in table[2:]]
    assert measures == [
        "register → picker holds it, N = 20 instances",
        "channel build over 20 instances, every instance connected",
        "20 instances, health on, all unreachable, idle, every instance connected",
        "memory backend, 5 services watched",
        "per-call cost after the split",
    ], result.stdout
    for label in ("subscriber, N=1 ", "subscriber, N=20 ", "picker, N=20 ", "5 services "):
        assert label in result.stdout, result.stdout


def test_an_unknown_row_is_refused() -> None:
    result = run("--rows", "picker,bogus")
    assert result.returncode == 2
    assert "bogus" in result.stderr
