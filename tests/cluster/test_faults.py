"""Trouble in Consul never becomes a failed call (principle 1), on a real cluster.

Each scenario runs its fault on a cluster of its own under load from several threads
with retries off, and asserts that no call failed. The figures of a failure (calls
failed, how long, what Consul did when) are in the assertion's message.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from discovery_examples.addservice import faults

pytestmark = pytest.mark.timeout(150)


@pytest.mark.parametrize("name", list(faults.SCENARIOS))
def test_no_call_fails(name: str, tmp_path: Path) -> None:
    result = faults.run(name, logs=tmp_path)
    print(result.report())  # the figures, in the report with -rA
    assert result.calls > 0
    assert result.failed == 0, f"{result.report()}\n(agent logs in {tmp_path})"
