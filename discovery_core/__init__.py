"""Service registration and discovery for Python gRPC services.

One small API over swappable backends: ``connect()`` a backend, ``register()`` an
instance, ``watch()`` a service. Importing this package imports no backend.
"""

import logging

from discovery_core.backend import Backend, available_backends, connect
from discovery_core.client.errors import NoInstanceError
from discovery_core.client.retry import RetryPolicy
from discovery_core.client.sync import DiscoveryChannel, discovery_channel
from discovery_core.errors import (
    BackendNotFound,
    BackendUnavailable,
    ClosedError,
    DiscoveryError,
    InvalidConfig,
    InvalidInstance,
    PermissionDenied,
    WatchTimeout,
)
from discovery_core.model import (
    Check,
    GrpcCheck,
    HealthStatus,
    HttpCheck,
    ProbeCheck,
    ServiceInstance,
    Snapshot,
    SnapshotDiff,
    TcpCheck,
    TtlCheck,
)
from discovery_core.registry import Presence, Registration, RegistrationStatus, Registry
from discovery_core.server import Served, serve
from discovery_core.watcher import Feed, Query, Stop, Watch, Watcher

# A library prints nothing by itself: without a handler of its own, logging's "last
# resort" would write our warnings to stderr of an application that set up no logging.
logging.getLogger("discovery_core").addHandler(logging.NullHandler())

__all__ = [
    "Backend",
    "BackendNotFound",
    "BackendUnavailable",
    "Check",
    "ClosedError",
    "DiscoveryChannel",
    "DiscoveryError",
    "Feed",
    "GrpcCheck",
    "HealthStatus",
    "HttpCheck",
    "InvalidConfig",
    "InvalidInstance",
    "NoInstanceError",
    "PermissionDenied",
    "Presence",
    "ProbeCheck",
    "Query",
    "Registration",
    "RegistrationStatus",
    "Registry",
    "RetryPolicy",
    "Served",
    "ServiceInstance",
    "Snapshot",
    "SnapshotDiff",
    "Stop",
    "TcpCheck",
    "TtlCheck",
    "Watch",
    "WatchTimeout",
    "Watcher",
    "available_backends",
    "connect",
    "discovery_channel",
    "serve",
]
