"""Active probes against real servers: gRPC health, HTTP and TCP."""

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2

import discovery_core as dc
from discovery_core.health import Prober, probe
from discovery_core.testing import HealthServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(int(self.path.strip("/")))
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def inst(port: int) -> dc.ServiceInstance:
    return dc.ServiceInstance("svc", "127.0.0.1", port)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (200, dc.HealthStatus.PASSING),
        (204, dc.HealthStatus.PASSING),
        (429, dc.HealthStatus.WARNING),
        (500, dc.HealthStatus.CRITICAL),
        (404, dc.HealthStatus.CRITICAL),
    ],
)
def test_http_probe_follows_consul_rules(http_server: int, code: int, status: dc.HealthStatus) -> None:
    assert probe(dc.HttpCheck(path=f"/{code}", timeout=2), inst(http_server)) is status


def test_tcp_probe_passes_on_a_listener_and_fails_on_a_closed_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert probe(dc.TcpCheck(timeout=1), inst(listener.getsockname()[1])) is dc.HealthStatus.PASSING
    assert probe(dc.TcpCheck(timeout=1), inst(free_port())) is dc.HealthStatus.CRITICAL


def test_grpc_probe_reads_the_health_service() -> None:
    with HealthServer() as server:
        check = dc.GrpcCheck(service="add", timeout=2)
        assert probe(check, inst(server.port)) is dc.HealthStatus.CRITICAL  # unknown service
        server.set("add", health_pb2.HealthCheckResponse.SERVING)
        assert probe(check, inst(server.port)) is dc.HealthStatus.PASSING
        server.set("add", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe(check, inst(server.port)) is dc.HealthStatus.CRITICAL
    assert probe(dc.GrpcCheck(timeout=0.5), inst(free_port())) is dc.HealthStatus.CRITICAL


def test_prober_reports_at_once_and_stops() -> None:
    with HealthServer() as server:
        server.set("", health_pb2.HealthCheckResponse.SERVING)
        reported = threading.Event()
        results: list[dc.HealthStatus] = []

        def report(status: dc.HealthStatus) -> None:
            results.append(status)
            reported.set()

        prober = Prober(dc.GrpcCheck(interval=60, timeout=2), inst(server.port), report)
        prober.start()
        assert reported.wait(5)
        prober.stop()
        assert results == [dc.HealthStatus.PASSING]
