"""Test support: the backend contract suite and its helpers (needs pytest and hypothesis).

The pytest plugin (``discovery_core.testing.plugin``, registered as an entry point)
only adds a ``discovery_backend`` fixture; importing this package pulls in the
contract suite.
"""

from discovery_core.testing.contract import BackendContract, ContractTiming
from discovery_core.testing.health_server import HealthServer

__all__ = ["BackendContract", "ContractTiming", "HealthServer"]
