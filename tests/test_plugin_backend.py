"""A backend that exists only as another distribution's entry point loads by name
and passes the whole contract suite (tox installs tests/plugin_backend)."""

import importlib.metadata
from collections.abc import Callable

import pytest

import discovery_core as dc
from discovery_core.testing import BackendContract


def test_the_plugin_comes_from_another_distribution() -> None:
    found = importlib.metadata.entry_points(group="discovery_core.backends", name="wrapped")
    assert found, "install the test plugin first: pip install tests/plugin_backend"
    (entry_point,) = found
    assert entry_point.dist is not None
    assert entry_point.dist.name == "discovery-wrapped-example"
    assert "wrapped" in dc.available_backends()


class TestPluginBackendContract(BackendContract):
    @pytest.fixture
    def make_backend(self) -> Callable[[], dc.Backend]:
        return lambda: dc.connect("wrapped://")

    @pytest.fixture
    def shared_store(self) -> bool:
        return False
