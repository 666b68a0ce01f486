"""Health following: what an endpoint's grpc.health.v1 ``Watch`` stream means for it.

Each reply, and each way the stream ends, becomes the endpoint's state and a delay
before watching again, decided here once; the sync pool (a thread per endpoint) and
the aio pool (a task per endpoint) only do the I/O. (Not ``health.py``: that module
holds the server side's probes.)
"""

from __future__ import annotations

import logging
import random
from typing import Generic

import grpc
from grpc_health.v1 import health_pb2

from discovery_core.client.endpoint import CONNECTING, DOWN, READY, C, Endpoint
from discovery_core.client.pool import Pool
from discovery_core.model import GrpcCheck, ServiceInstance

__all__ = ["Backoff", "HealthFollower", "health_service_name"]

log = logging.getLogger("discovery_core.channel")

_HEALTH_RETRY_BASE = 0.05
_HEALTH_RETRY_CAP = 1.0


def health_service_name(instance: ServiceInstance) -> str:
    """The name a client asks the instance's health service about: what its gRPC
    check asks, else the server as a whole."""
    return instance.check.service if isinstance(instance.check, GrpcCheck) else ""


class Backoff:
    """Delay before re-opening a failed health watch: doubles up to a cap, jittered."""

    def __init__(self) -> None:
        self.delay = _HEALTH_RETRY_BASE

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, _HEALTH_RETRY_CAP)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.delay = _HEALTH_RETRY_BASE


class HealthFollower(Generic[C]):
    """What one endpoint's health watch loop does with each outcome; the sync thread
    and the aio task only do the I/O (and hold the pool's lock around these calls)."""

    def __init__(self, pool: Pool[C], endpoint: Endpoint[C]) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.request = health_pb2.HealthCheckRequest(service=health_service_name(endpoint.instance))
        self._backoff = Backoff()

    def reply(self, status: int) -> None:
        self._backoff.reset()
        serving = status == health_pb2.HealthCheckResponse.SERVING
        self.pool.set_state(self.endpoint, READY if serving else DOWN)

    def ended(self, code: grpc.StatusCode | None) -> float | None:
        """The watch ended (``code`` None: the server closed it). Returns seconds to
        wait before watching again, or None to stop watching.

        UNIMPLEMENTED: no health service, so serving for good. CANCELLED: a failed call
        marked the endpoint down and restarted the watch: watch again at once, still
        down. Anything else: down, and watch again after a backoff.
        """
        endpoint = self.endpoint
        if code is grpc.StatusCode.UNIMPLEMENTED:
            log.info("%s has no health service: treated as serving", endpoint.instance.id)
            self.pool.set_state(endpoint, READY)
            return None
        if code is grpc.StatusCode.CANCELLED:
            if endpoint.state != DOWN:
                self.pool.set_state(endpoint, CONNECTING)
            return 0.0
        self.pool.set_state(endpoint, DOWN)
        return self._backoff.next()
