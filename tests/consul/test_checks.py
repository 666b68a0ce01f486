"""Consul's own checkers run our checks: gRPC health, HTTP, TCP and the reaper."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from grpc_health.v1 import health_pb2

import discovery_core as dc
from discovery_core.testing.health_server import HealthServer

pytestmark = pytest.mark.consul

Until = Callable[[Callable[[], bool], float, str], None]


@pytest.fixture
def backend(consul_agent: Any) -> Iterator[dc.Backend]:
    with dc.connect(f"consul://{consul_agent.address}") as backend:
        yield backend


def _agent_check(address: str, check_id: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}/v1/agent/checks", timeout=5) as response:
        checks: dict[str, dict[str, Any]] = json.loads(response.read())
    return checks[check_id]


def _until_snapshot(watch: dc.Watch, predicate: Callable[[dc.Snapshot], bool], timeout: float) -> dc.Snapshot:
    """The first snapshot satisfying ``predicate`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            snapshot = watch.wait(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
        except TimeoutError:
            continue
        if predicate(snapshot):
            return snapshot
    raise AssertionError(f"no matching snapshot within {timeout} s; last: {watch.current}")


def test_consul_runs_our_grpc_check_on_address_port_service(
    backend: dc.Backend, consul_agent: Any, service: str, until: Until
) -> None:
    with HealthServer() as server:
        server.set(service, health_pb2.HealthCheckResponse.SERVING)
        check = dc.GrpcCheck(service=service, interval=1.0, timeout=1.5, deregister_after=90)
        inst = dc.ServiceInstance(service, "127.0.0.1", server.port, check=check)
        with backend.register(inst):

            def ran() -> bool:
                state = _agent_check(consul_agent.address, f"service:{inst.id}")
                return state["Type"] == "grpc" and state["Status"] == "passing" and inst.target in state["Output"]

            until(ran, 10, "Consul's gRPC checker reports our server passing")
            assert f"{inst.target}/{service}" in _agent_check(consul_agent.address, f"service:{inst.id}")["Output"]


def test_not_serving_turns_critical_drops_from_watch_and_is_reaped(backend: dc.Backend, service: str) -> None:
    with HealthServer() as server:
        server.set(service, health_pb2.HealthCheckResponse.SERVING)
        check = dc.GrpcCheck(service=service, interval=1.0, timeout=1.0, deregister_after=60.0)
        inst = dc.ServiceInstance(service, "127.0.0.1", server.port, check=check)
        # keepalive=False: a process that died; a live Registration would put it back.
        backend.register(inst, keepalive=False)
        with backend.watch(service) as passing, backend.watch(service, passing_only=False) as every:
            _until_snapshot(passing, lambda s: [i.id for i in s.instances] == [inst.id], 10)
            server.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            _until_snapshot(passing, lambda s: not s.instances, 10)
            seen = _until_snapshot(every, lambda s: s.status(inst.id) is dc.HealthStatus.CRITICAL, 10)
            assert [i.id for i in seen.instances] == [inst.id]
            # Consul's reaper runs every 30 s once the minute of DeregisterCriticalServiceAfter passed.
            _until_snapshot(every, lambda s: not s.instances, 60 + 40)


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 500)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def test_http_and_tcp_checks_pass_on_a_live_endpoint(backend: dc.Backend, service: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        http_inst = dc.ServiceInstance(
            service, "127.0.0.1", port, id=f"{service}-http", check=dc.HttpCheck(path="/healthz", interval=1.0)
        )
        tcp_inst = dc.ServiceInstance(service, "127.0.0.1", port, id=f"{service}-tcp", check=dc.TcpCheck(interval=1.0))
        bad = dc.ServiceInstance(
            service, "127.0.0.1", port, id=f"{service}-bad", check=dc.HttpCheck(path="/nope", interval=1.0)
        )
        with backend.register(http_inst), backend.register(tcp_inst), backend.register(bad):
            with backend.watch(service, passing_only=False) as watch:
                snapshot = _until_snapshot(
                    watch,
                    lambda s: (
                        s.status(http_inst.id) is dc.HealthStatus.PASSING
                        and s.status(tcp_inst.id) is dc.HealthStatus.PASSING
                        and len(s.instances) == 3
                    ),
                    10,
                )
            assert snapshot.status(bad.id) is dc.HealthStatus.CRITICAL
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_initial_status_passing_is_sent(backend: dc.Backend, service: str) -> None:
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
    check = dc.TcpCheck(interval=60.0, initial_status=dc.HealthStatus.PASSING)
    inst = dc.ServiceInstance(service, "127.0.0.1", port, check=check)
    with backend.register(inst):
        snapshot = backend.instances(service)
        assert [i.id for i in snapshot.instances] == [inst.id]
        assert snapshot.instances[0].check is None  # the catalog does not give checks back
