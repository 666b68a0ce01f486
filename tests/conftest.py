"""What every test shares: the guard against threads a test leaves running."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Iterator
from types import FrameType

import pytest

# Closing a backend cuts its queries, so its threads end within a second even when the
# agent does not answer; a loaded machine gets some slack on top.
LEAK_PATIENCE = 5.0


def library_threads() -> set[threading.Thread]:
    """The library's threads alive now (every one is named ``discovery-...``)."""
    return {thread for thread in threading.enumerate() if thread.name.startswith("discovery-")}


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail the test that leaves a library thread running once its fixtures are torn
    down: a watch, detector, keepalive or health thread of a backend left open keeps
    retrying toward its agent's port, which a later test's agent may get (its
    connections were then counted to that agent)."""
    before = library_threads()
    yield
    deadline = time.monotonic() + LEAK_PATIENCE
    while (left := library_threads() - before) and time.monotonic() < deadline:
        for thread in left:
            thread.join(max(0.0, deadline - time.monotonic()))
    if left:
        frames = sys._current_frames()
        where = [f"{thread.name}:\n{_stack(frames.get(thread.ident or 0))}" for thread in sorted(left, key=str)]
        pytest.fail(f"threads left running {LEAK_PATIENCE:g} s after the test: " + "\n".join(where), pytrace=False)


def _stack(frame: FrameType | None) -> str:
    """Where a thread is now: its innermost frames."""
    return "".join(traceback.format_stack(frame, limit=8)) if frame is not None else "  (ended)\n"
