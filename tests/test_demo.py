"""``discovery demo`` runs by itself, bounded, and reports every event."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def demo_command() -> list[str]:
    """The installed console script when there is one (as ``tox -e demo`` runs it)."""
    script = shutil.which("discovery", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "discovery_core.cli"]


def test_demo_tells_the_story_and_reports_time_to_follow_and_failures() -> None:
    result = subprocess.run(
        [*demo_command(), "demo", "--steady", "1"], capture_output=True, text=True, timeout=90, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"t=\s*[\d.]+s\s+add-1:\s+\d+\s+add-2:\s+\d+\s+add-3:\s+\d+", out), out
    for event in ("drain add-1", "kill add-2", "start add-4"):
        assert re.search(rf"^{event}\s+[\d.]+ ms\s+\d+$", out, re.MULTILINE), out
    assert re.search(r"^\d+ calls, \d+ failed$", out, re.MULTILINE), out


def test_demo_with_an_unknown_backend_fails_with_a_message() -> None:
    result = subprocess.run(
        [*demo_command(), "demo", "--backend", "nosuch://"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "nosuch" in result.stderr
