"""The Consul backend runs the whole contract suite against a real agent."""

from collections.abc import Callable
from typing import Any

import pytest

import discovery_core as dc
from discovery_core.testing import BackendContract, ContractTiming

pytestmark = pytest.mark.consul


class TestConsulContract(BackendContract):
    @pytest.fixture
    def make_backend(self, consul_agent: Any) -> Callable[[], dc.Backend]:
        return lambda: dc.connect(f"consul://{consul_agent.address}")

    @pytest.fixture
    def timing(self) -> ContractTiming:
        # Consul: checks every 1 s at least, DeregisterCriticalServiceAfter >= 1 min, reaped every 30 s.
        return ContractTiming(check_interval=1.0, ttl=3.0, deregister_after=60.0, settle=10.0, reap=100.0)


class TestConsulSharedContract(TestConsulContract):
    """The same contract with no direct share: every watch runs through the shared
    change detector (``max_connections=5``: 2 for writes, 3 for the detectors and their reader)."""

    @pytest.fixture
    def make_backend(self, consul_agent: Any) -> Callable[[], dc.Backend]:
        return lambda: dc.connect(f"consul://{consul_agent.address}?max_connections=5")
