"""The cluster tests: a real Consul cluster (3 servers, agents A and B) per test.

They kill agents and cut them off with iptables, so they run only as root in a private
network namespace: ``tests/cluster/run`` (``tox -e cluster``) makes one. Elsewhere
they skip saying why, or fail with ``CI`` set. The default ``pytest`` run leaves this
directory out (``--ignore`` in pyproject.toml).
"""

from __future__ import annotations

import os

import pytest
from discovery_consul.devcluster import netns_problem


@pytest.fixture(autouse=True)
def _private_network_namespace() -> None:
    problem = netns_problem()
    if problem is None:
        return
    message = f"the cluster tests cannot run here: {problem}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
