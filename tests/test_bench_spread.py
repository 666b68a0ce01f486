"""bench/spread.py runs with tiny sizes; its churn figures are exact, its spread loose."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "spread.py"


def test_spread_prints_every_placement_and_one_change_per_event() -> None:
    args = ["--clients", "16", "--instances", "64", "--sizes", "4,16", "--trials", "2", "--events", "8"]
    result = subprocess.run(
        [sys.executable, str(BENCH), *args, "--cost-instances", "300"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    figures = r"max/mean ([\d.]+) \(worst [\d.]+\)  min/mean [\d.]+ \(worst [\d.]+\)  above 1.5: \d+/2"
    ours = re.findall(rf"^\s+(\d+) (index|random)\s+{figures}  leave: (\d) changed, .*  join: (\d) changed", out, re.M)
    assert len(ours) == 4, out
    assert len(re.findall(rf"^\s+\d+ a68\s+{figures}$", out, re.M)) == 2, out
    for _size, _placement, _high, leave, join in ours:
        # An instance leaving or joining changes exactly one member of the subsets it
        # touches (8 events in each of 2 trials: some subset is always touched).
        assert (leave, join) == ("1", "1"), out
    # 16 clients numbered 0-15 stand exactly 1/16 of the ring apart, each holding 16 of
    # 64 instances: only the hashes' uneven spacing is left (the seed fixes them).
    index_16 = next(float(high) for size, placement, high, _, _ in ours if (size, placement) == ("16", "index"))
    assert index_16 <= 2.0, out
    assert re.search(r"^ring of 300 instances: build [\d.]+ ms", out, re.M), out
