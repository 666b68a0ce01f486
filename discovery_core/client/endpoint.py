"""One endpoint: an instance's own grpc channel (grpc-go's SubConn).

The pool keeps an endpoint by instance id while the instance stays in the set, so an
update that leaves the instance alone reconnects nothing. Its state is its channel's
connectivity, read when a picker needs it: with health checking on, the channel was
opened with a service config that makes C-core follow the instance's grpc.health.v1
``Watch`` itself (``health_config``), so READY means connected *and* SERVING and no
Python thread or task watches anything. Its in-flight count is what
``least_request`` compares and what lets a retired endpoint close only after its
last call.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from discovery_core.model import GrpcCheck, ServiceInstance

__all__ = [
    "CONNECTING", "IDLE", "READY", "SHUTDOWN", "TRANSIENT_FAILURE",
    "C", "Endpoint", "channel_options", "health_service_name",
]  # fmt: skip

C = TypeVar("C")  # an endpoint's channel: grpc.Channel (sync) or grpc.aio.Channel

# C-core's connectivity states (grpc_connectivity_state), as the channel reports them.
IDLE, CONNECTING, READY, TRANSIENT_FAILURE, SHUTDOWN = range(5)
_NAMES = ("idle", "connecting", "ready", "down", "closed")

# Unreachable endpoints back off exponentially (C-core: 1 s doubling by 1.6, jittered)
# up to this cap, so thousands of dead endpoints cost next to no CPU.
MAX_RECONNECT_BACKOFF_MS = 30_000
_SERVICE_CONFIG = "grpc.service_config"


def health_service_name(instance: ServiceInstance) -> str:
    """The name a client asks the instance's health service about: what its gRPC
    check asks, else the server as a whole."""
    return instance.check.service if isinstance(instance.check, GrpcCheck) else ""


def channel_options(
    options: Sequence[tuple[str, Any]], instance: ServiceInstance, *, health_check: bool
) -> list[tuple[str, Any]]:
    """The options of an endpoint's channel: the caller's, plus a reconnect backoff
    cap and, with health checking, a service config in which C-core watches the
    instance's health (merged into the caller's service config, which wins)."""
    merged = dict(options)
    merged.setdefault("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)
    if health_check:
        config = json.loads(merged.get(_SERVICE_CONFIG) or "{}")
        config.setdefault("loadBalancingConfig", [{"round_robin": {}}])  # health checks need an LB policy
        config.setdefault("healthCheckConfig", {"serviceName": health_service_name(instance)})
        merged[_SERVICE_CONFIG] = json.dumps(config)
    return list(merged.items())


class Endpoint(Generic[C]):
    """One instance's own grpc channel, kept while the instance stays in the set."""

    __slots__ = ("_lock", "_state", "calls", "channel", "closed", "inflight", "instance", "retired")

    def __init__(self, instance: ServiceInstance, channel: C) -> None:
        self.instance = instance
        self.channel = channel
        # grpc.Channel and grpc.aio.Channel both hold C-core's channel as ``_channel``;
        # the sync one has no public way to read its state without a thread per channel.
        self._state: Callable[[bool], int] = channel._channel.check_connectivity_state  # type: ignore[attr-defined]
        self.inflight = 0
        self.retired = False  # out of the set: closed once its last call ends
        self.closed = False  # its channel is closed (or closing): no new call may start
        # Underlying multicallables, keyed by this channel's multicallable object.
        self.calls: dict[object, Any] = {}
        self._lock = threading.Lock()
        self._state(True)  # start connecting (and health watching) now, not at the first call

    def state(self, connect: bool = False) -> int:
        """The channel's connectivity (``connect``: leave IDLE for CONNECTING)."""
        if self.closed:
            return SHUTDOWN
        try:
            return self._state(connect)
        except ValueError:  # closed between the two lines
            return SHUTDOWN

    def ready(self) -> bool:
        """Connected and, with health checking, SERVING: may take a call now."""
        return self.state() == READY

    def state_name(self) -> str:
        """``idle``, ``connecting``, ``ready``, ``down`` or ``closed``: for diagnostics."""
        return _NAMES[self.state()]

    def begin(self) -> bool:
        """Count a call started; False if the channel is closed (a picker read just
        before the endpoint left): pick again."""
        with self._lock:
            if self.closed:
                return False
            self.inflight += 1
            return True

    def end(self) -> bool:
        """Count a call done; True when a retired endpoint just became idle (close it)."""
        with self._lock:
            self.inflight -= 1
            self.closed = self.retired and self.inflight == 0
            return self.closed

    def retire(self, *, now: bool = False) -> bool:
        """Leave the set; True when it is to be closed now (idle, or ``now``), else its
        last call closes it."""
        with self._lock:
            self.retired = True
            self.closed = now or self.inflight == 0
            return self.closed

    def __repr__(self) -> str:
        return f"<endpoint {self.instance.id} {self.state_name()} inflight={self.inflight}>"
