"""Active health probes (gRPC health, HTTP, TCP) for backends that check for themselves.

Consul checks instances from its agent; a backend without such a checker (the memory
backend, a third party's) runs a ``Prober`` per checked instance instead. Results
follow Consul's rules so every backend agrees: gRPC SERVING is passing, anything else
critical; HTTP 2xx passing, 429 warning, anything else critical; TCP connect passing.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery_core.model import GrpcCheck, HealthStatus, HttpCheck, ProbeCheck, ServiceInstance, TcpCheck

__all__ = ["Prober", "probe"]

log = logging.getLogger("discovery_core.health")


def _grpc_channel(check: GrpcCheck, instance: ServiceInstance) -> grpc.Channel:
    if not check.tls:
        return grpc.insecure_channel(instance.target)
    root: bytes | None = None
    if check.tls_skip_verify:
        # grpcio cannot turn verification off: trust the server's own certificate instead.
        pem = ssl.get_server_certificate((instance.address, instance.port), timeout=check.timeout)
        root = pem.encode()
    return grpc.secure_channel(instance.target, grpc.ssl_channel_credentials(root_certificates=root))


def _probe_grpc(check: GrpcCheck, channel: grpc.Channel) -> HealthStatus:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=check.service), timeout=check.timeout)
    except grpc.RpcError as exc:
        log.debug("gRPC health check failed: %s", exc)
        return HealthStatus.CRITICAL
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    return HealthStatus.PASSING if serving else HealthStatus.CRITICAL


def _probe_http(check: HttpCheck, instance: ServiceInstance) -> HealthStatus:
    scheme = "https" if check.tls else "http"
    host = f"[{instance.address}]" if ":" in instance.address else instance.address
    url = f"{scheme}://{host}:{check.port or instance.port}{check.path}"
    context = None
    if check.tls and check.tls_skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=check.timeout, context=context) as reply:
            code = int(reply.status)
    except urllib.error.HTTPError as exc:
        code = exc.code
    except (OSError, ValueError) as exc:
        log.debug("HTTP check of %s failed: %s", url, exc)
        return HealthStatus.CRITICAL
    if 200 <= code < 300:
        return HealthStatus.PASSING
    return HealthStatus.WARNING if code == 429 else HealthStatus.CRITICAL


def _probe_tcp(check: TcpCheck, instance: ServiceInstance) -> HealthStatus:
    try:
        with socket.create_connection((instance.address, check.port or instance.port), timeout=check.timeout):
            return HealthStatus.PASSING
    except OSError:
        return HealthStatus.CRITICAL


def probe(check: ProbeCheck, instance: ServiceInstance) -> HealthStatus:
    """Run one check of ``instance`` now (blocks up to ``check.timeout``)."""
    if isinstance(check, GrpcCheck):
        channel = _grpc_channel(check, instance)
        try:
            return _probe_grpc(check, channel)
        finally:
            channel.close()
    if isinstance(check, HttpCheck):
        return _probe_http(check, instance)
    if isinstance(check, TcpCheck):
        return _probe_tcp(check, instance)
    raise TypeError(f"no probe for {type(check).__name__}")


class Prober:
    """Probes one instance at its check's interval on a thread, reporting each result.

    The first probe runs at once. A gRPC prober keeps one channel for its life, as a
    long-lived health checker would, instead of reconnecting every interval.
    """

    def __init__(self, check: ProbeCheck, instance: ServiceInstance, report: Callable[[HealthStatus], None]) -> None:
        self.check = check
        self.instance = instance
        self._report = report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"discovery-probe:{instance.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop probing; waits for a probe in flight (at most the check's timeout)."""
        self._stop.set()
        if self._thread is not threading.current_thread() and self._thread.ident is not None:
            self._thread.join()

    def _run(self) -> None:
        check = self.check
        channel = None
        try:
            while not self._stop.is_set():
                if isinstance(check, GrpcCheck):
                    try:
                        channel = channel or _grpc_channel(check, self.instance)
                    except OSError:
                        status = HealthStatus.CRITICAL
                    else:
                        status = _probe_grpc(check, channel)
                else:
                    status = probe(check, self.instance)
                if self._stop.is_set():
                    break
                self._report(status)
                self._stop.wait(check.interval)
        finally:
            if channel is not None:
                channel.close()
