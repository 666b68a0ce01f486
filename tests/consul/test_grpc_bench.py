"""bench/failover.py runs end to end on a real Consul agent (smoke only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.consul, pytest.mark.timeout(180)]

FAILOVER = Path(__file__).resolve().parents[2] / "bench" / "failover.py"


def test_failover_runs_on_consul(consul_agent: object) -> None:
    address = consul_agent.address  # type: ignore[attr-defined]
    result = subprocess.run(
        [sys.executable, str(FAILOVER), "--backends", "consul", "--threads", "1", "--consul-address", address],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "health flip" in result.stdout, result.stdout
