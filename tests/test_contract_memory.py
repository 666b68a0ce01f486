"""The memory backend runs the whole contract suite."""

from collections.abc import Callable

import pytest

import discovery_core as dc
from discovery_core.testing import BackendContract


class TestMemoryContract(BackendContract):
    @pytest.fixture
    def make_backend(self) -> Callable[[], dc.Backend]:
        return lambda: dc.connect("memory://")

    @pytest.fixture
    def shared_store(self) -> bool:
        return False  # each memory backend object has its own store
