"""serve(): health service, registration, and the leaving order that loses no call."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from discovery_examples.addservice import add_pb2, add_pb2_grpc
from discovery_examples.addservice.fleet import wait_until
from discovery_examples.addservice.server import Adder, make_server
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import discovery_core as dc
from discovery_core.server import advertise_address


@pytest.fixture
def backend() -> Iterator[dc.Backend]:
    with dc.connect("memory://") as backend:
        yield backend


@pytest.fixture
def executor() -> Iterator[futures.ThreadPoolExecutor]:
    with futures.ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def health_of(target: str, service: str = "add") -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


def test_serve_binds_an_ephemeral_port_answers_health_and_registers_it(
    backend: dc.Backend, executor: futures.ThreadPoolExecutor
) -> None:
    with dc.serve(
        make_server(Adder(), executor), backend, "add", advertise="127.0.0.1", handle_signals=False
    ) as served:
        assert served.port > 0
        assert served.instance.target == f"127.0.0.1:{served.port}"
        assert health_of(served.target) == health_pb2.HealthCheckResponse.SERVING
        assert health_of(served.target, "") == health_pb2.HealthCheckResponse.SERVING
        snapshot = backend.instances("add")
        assert [inst.id for inst in snapshot.instances] == [served.instance.id]
        check = snapshot.instances[0].check
        assert isinstance(check, dc.GrpcCheck)
        assert check.service == "add"
        assert check.initial_status is dc.HealthStatus.PASSING
        with grpc.insecure_channel(served.target) as channel:
            assert add_pb2_grpc.AdderStub(channel).Add(add_pb2.AddRequest(a=2, b=3), timeout=5).v == 5
    assert backend.instances("add").instances == ()
    assert not served.wait_for_termination(0)


def test_stop_turns_not_serving_and_deregisters_before_the_server_stops(
    backend: dc.Backend, executor: futures.ThreadPoolExecutor
) -> None:
    served = dc.serve(
        make_server(Adder(), executor), backend, "add", advertise="127.0.0.1", drain=30, handle_signals=False
    )
    stopper = threading.Thread(target=served.stop)
    stopper.start()
    try:
        # During the drain: gone from the registry, saying NOT_SERVING, still answering calls.
        assert wait_until(lambda: backend.instances("add").instances == (), timeout=10)
        assert health_of(served.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(served.target) as channel:
            assert add_pb2_grpc.AdderStub(channel).Add(add_pb2.AddRequest(a=1, b=1), timeout=5).v == 2
        assert served.wait_for_termination(0)  # still running: timed out
    finally:
        served._done.set()  # cut the 30 s drain short: the order above is what this test checks
        stopper.join()
    assert not served.wait_for_termination(5)


def test_advertise_defaults_to_a_non_loopback_ipv4_or_localhost(
    backend: dc.Backend, executor: futures.ThreadPoolExecutor
) -> None:
    address = advertise_address()
    assert address == "127.0.0.1" or not address.startswith("127.")
    with dc.serve(make_server(Adder(), executor), backend, "add", handle_signals=False, drain=0) as served:
        assert served.instance.address == address


def test_a_server_with_its_own_health_service_must_hand_it_over(
    backend: dc.Backend, executor: futures.ThreadPoolExecutor
) -> None:
    server = make_server(Adder(), executor)
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    with pytest.raises(dc.InvalidConfig, match="health"):
        dc.serve(server, backend, "add", advertise="127.0.0.1", handle_signals=False)
    with dc.serve(
        server, backend, "add", advertise="127.0.0.1", health_servicer=servicer, handle_signals=False, drain=0
    ) as served:
        served.set_serving(False)
        assert health_of(served.target) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_no_check_and_explicit_port(backend: dc.Backend, executor: futures.ThreadPoolExecutor) -> None:
    with dc.serve(
        make_server(Adder(), executor), backend, "add", advertise="127.0.0.1", check=None, handle_signals=False, drain=0
    ) as served:
        assert backend.instances("add").instances[0].check is None
        port = served.port
    with dc.serve(
        make_server(Adder(), executor), backend, "add", port=port, advertise="127.0.0.1", handle_signals=False, drain=0
    ) as served:
        assert served.port == port


@pytest.mark.parametrize(("field", "value"), [("port", -1), ("port", 70000), ("drain", -1), ("grace", "x")])
def test_bad_arguments_fail_before_binding(
    backend: dc.Backend, executor: futures.ThreadPoolExecutor, field: str, value: object
) -> None:
    with pytest.raises(dc.InvalidConfig, match=field):
        dc.serve(make_server(Adder(), executor), backend, "add", handle_signals=False, **{field: value})  # type: ignore[arg-type]


def test_a_bad_service_name_is_an_invalid_instance(backend: dc.Backend, executor: futures.ThreadPoolExecutor) -> None:
    with pytest.raises(dc.InvalidInstance):
        dc.serve(make_server(Adder(), executor), backend, "not a name", handle_signals=False)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_sigterm_leaves_cleanly_and_restores_the_handler(
    backend: dc.Backend, executor: futures.ThreadPoolExecutor
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    served = dc.serve(make_server(Adder(), executor), backend, "add", advertise="127.0.0.1", drain=0)
    assert signal.getsignal(signal.SIGTERM) is not before
    os.kill(os.getpid(), signal.SIGTERM)
    assert not served.wait_for_termination(10), "SIGTERM did not stop the server"
    assert backend.instances("add").instances == ()
    served.stop()  # joins the signal's stop; restores handlers from the main thread
    assert signal.getsignal(signal.SIGTERM) is before


def test_bind_replaces_add_insecure_port(backend: dc.Backend, executor: futures.ThreadPoolExecutor) -> None:
    bound: list[str] = []

    def bind(server: grpc.Server, address: str) -> int:
        bound.append(address)
        return server.add_insecure_port("127.0.0.1:0")

    with dc.serve(
        make_server(Adder(), executor), backend, "add", advertise="127.0.0.1", bind=bind, handle_signals=False, drain=0
    ) as served:
        assert bound == ["[::]:0"]
        assert health_of(served.target) == health_pb2.HealthCheckResponse.SERVING


def test_a_failed_registration_stops_the_server(executor: futures.ThreadPoolExecutor) -> None:
    backend = dc.connect("memory://")
    backend.close()
    server = make_server(Adder(), executor)
    with pytest.raises(dc.ClosedError):
        dc.serve(server, backend, "add", advertise="127.0.0.1", handle_signals=False)
    assert not server.wait_for_termination(5)


class Unreachable(dc.Registry):
    """Registers in memory but cannot deregister, as a backend that went away."""

    def __init__(self, backend: dc.Backend) -> None:
        super().__init__()
        self.backend = backend

    def _add(self, instance: dc.ServiceInstance) -> None:
        self.backend._add(instance)

    def deregister(self, instance_id: str) -> None:
        raise dc.BackendUnavailable("connection refused", backend="test")

    def _heartbeat(self, instance_id: str) -> None:
        self.backend._heartbeat(instance_id)

    def _is_registered(self, instance: dc.ServiceInstance) -> bool:
        return self.backend._is_registered(instance)


def test_stop_still_stops_the_server_when_deregistering_fails(
    backend: dc.Backend, executor: futures.ThreadPoolExecutor
) -> None:
    registry = Unreachable(backend)
    served = dc.serve(make_server(Adder(), executor), registry, "add", advertise="127.0.0.1", handle_signals=False)
    served.stop(drain=0)
    assert not served.server.wait_for_termination(5)
    assert health_of_stopped(served.target)


def health_of_stopped(target: str) -> bool:
    try:
        health_of(target)
    except grpc.RpcError as error:
        return isinstance(error, grpc.Call) and error.code() is grpc.StatusCode.UNAVAILABLE
    return False


def test_serving_one_server_twice_says_so(backend: dc.Backend, executor: futures.ThreadPoolExecutor) -> None:
    server = make_server(Adder(), executor)
    with dc.serve(server, backend, "add", advertise="127.0.0.1", handle_signals=False, drain=0):
        with pytest.raises(dc.InvalidConfig) as raised:
            dc.serve(server, backend, "add", advertise="127.0.0.1", handle_signals=False, drain=0)
        assert raised.value.option == "server"
        assert "already" in str(raised.value)
        assert "health_servicer" not in str(raised.value)
        assert len(backend.instances("add").instances) == 1


def test_the_default_check_reaps_an_instance_whose_process_died(
    backend: dc.Backend, executor: futures.ThreadPoolExecutor
) -> None:
    """A kill -9 leaves no one to deregister: the default check's deregister_after
    removes the instance once it has been critical that long."""
    with dc.serve(
        make_server(Adder(), executor), backend, "add", advertise="127.0.0.1", handle_signals=False
    ) as served:
        check = served.instance.check
        assert isinstance(check, dc.GrpcCheck)
        assert check.deregister_after is not None
        assert 60 <= check.deregister_after <= 120  # Consul's minimum is a minute; it reaps every 30 s
