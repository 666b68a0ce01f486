"""The pytest plugin: a fresh in-process backend for users' own tests.

Kept free of heavy imports: it loads in every pytest run of an environment that has
discovery-core installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from discovery_core.backend import DEFAULT_URL, Backend, connect


@pytest.fixture
def discovery_backend() -> Iterator[Backend]:
    """An empty in-memory backend, closed after the test: the test double."""
    with connect(DEFAULT_URL) as backend:
        yield backend
