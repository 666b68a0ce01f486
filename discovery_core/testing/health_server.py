"""A real gRPC server with only grpc.health.v1, whose answers a test sets."""

from __future__ import annotations

from concurrent import futures
from types import TracebackType
from typing import Self

import grpc
from grpc_health.v1 import health, health_pb2_grpc

__all__ = ["HealthServer"]


class HealthServer:
    """Serves grpc.health.v1 on 127.0.0.1 (an ephemeral port) until closed."""

    def __init__(self) -> None:
        self._servicer = health.HealthServicer()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def set(self, service: str, status: int) -> None:
        """Answer ``status`` (a ``HealthCheckResponse`` enum value) for ``service``."""
        self._servicer.set(service, status)

    def close(self) -> None:
        self._server.stop(grace=None).wait(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
