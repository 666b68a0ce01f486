"""The sync discovery channel against real gRPC servers on the memory backend.

Waits are on conditions with deadlines. The one timing bound asserted is the issue's:
traffic leaves an instance that turned NOT_SERVING within 1 s (measured from the flip
to its last answered call).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from discovery_examples.addservice import add_pb2, add_pb2_grpc
from discovery_examples.addservice.fleet import KILL_RETRY, Event, Fleet, Load, wait_until

import discovery_core as dc
from discovery_core.client.endpoint import CONNECTING, READY, TRANSIENT_FAILURE, Endpoint
from discovery_core.client.picker import LeastRequest, RoundRobin, WeightedRoundRobin

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def backend() -> Iterator[dc.Backend]:
    with dc.connect("memory://") as backend:
        yield backend


@pytest.fixture
def fleet(backend: dc.Backend) -> Iterator[Fleet]:
    fleet = Fleet(backend, drain=0.3, grace=2.0)
    yield fleet
    fleet.close()


@pytest.fixture
def channel(backend: dc.Backend) -> Iterator[dc.DiscoveryChannel]:
    with dc.discovery_channel(backend, "add") as channel:
        yield channel


def add(channel: grpc.Channel, **kwargs: Any) -> tuple[int, str]:
    reply, call = add_pb2_grpc.AdderStub(channel).Add.with_call(add_pb2.AddRequest(a=20, b=22), **kwargs)
    return reply.v, str(dict(call.trailing_metadata() or ())["instance"])


def answered_by(channel: grpc.Channel, calls: int) -> Counter[str]:
    return Counter(add(channel, timeout=10)[1] for _ in range(calls))


def test_no_instance_fails_at_once_with_unavailable_naming_the_service(channel: dc.DiscoveryChannel) -> None:
    # A 60 s deadline and the test's own 60 s timeout: waiting instead of failing fast fails the test.
    with pytest.raises(grpc.RpcError) as raised:
        add(channel, timeout=60)
    error = raised.value
    assert isinstance(error, grpc.Call)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "'add'" in error.details()


def test_wait_for_ready_succeeds_when_an_instance_registers_during_the_wait(
    channel: dc.DiscoveryChannel, fleet: Fleet
) -> None:
    stub = add_pb2_grpc.AdderStub(channel)  # created before any instance exists
    results: list[Any] = []
    caller = threading.Thread(
        target=lambda: results.append(stub.Add(add_pb2.AddRequest(a=1, b=2), timeout=30, wait_for_ready=True))
    )
    caller.start()
    time.sleep(0.2)  # let the call start waiting; the outcome does not depend on it
    fleet.start()
    caller.join(timeout=30)
    assert [r.v for r in results] == [3]


def test_wait_for_ready_without_an_instance_ends_at_the_deadline(channel: dc.DiscoveryChannel) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        add(channel, timeout=0.3, wait_for_ready=True)
    assert isinstance(raised.value, grpc.Call)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "'add'" in raised.value.details()


def test_stubs_created_before_the_first_instance_work_once_it_exists(
    channel: dc.DiscoveryChannel, fleet: Fleet
) -> None:
    stub = add_pb2_grpc.AdderStub(channel)
    with pytest.raises(grpc.RpcError):
        stub.Add(add_pb2.AddRequest(a=1, b=1), timeout=5)
    fleet.start()
    assert channel.wait_ready(timeout=10)
    assert stub.Add(add_pb2.AddRequest(a=1, b=1), timeout=5).v == 2


def test_round_robin_spreads_calls_over_every_healthy_instance(channel: dc.DiscoveryChannel, fleet: Fleet) -> None:
    names = {fleet.start().name for _ in range(3)}
    assert wait_until(lambda: list(channel.instances().values()).count("ready") == 3, timeout=10)
    counts = answered_by(channel, 300)
    assert set(counts) == names
    assert all(count == 100 for count in counts.values())


def test_weighted_round_robin_follows_instance_weights(backend: dc.Backend, fleet: Fleet) -> None:
    light, heavy = fleet.start(), fleet.start()
    heavy_instance = heavy.served.instance
    # Re-register the heavy one with weight 3 (same id and address: the endpoint stays).
    heavy.served.registration = backend.register(
        dc.ServiceInstance(
            "add", heavy_instance.address, heavy_instance.port, id=heavy.id, weight=3, check=heavy_instance.check
        )
    )
    with dc.discovery_channel(backend, "add", policy="weighted_round_robin") as channel:
        assert wait_until(lambda: list(channel.instances().values()).count("ready") == 2, timeout=10)
        assert wait_until(lambda: channel._pool.endpoints[heavy.id].instance.weight == 3, timeout=10)
        counts = answered_by(channel, 400)
    assert counts == {light.name: 100, heavy.name: 300}


class FakeChannel:
    """Stands for a grpc channel in picker tests: a connectivity state to set."""

    def __init__(self, state: int) -> None:
        self.state = state
        self._channel = self

    def check_connectivity_state(self, try_to_connect: bool) -> int:
        return self.state


def fake_endpoints(*inflight: int, weights: tuple[int, ...] = (), state: int = READY) -> list[Endpoint[FakeChannel]]:
    endpoints = []
    for n, busy in enumerate(inflight):
        weight = weights[n] if weights else 1
        instance = dc.ServiceInstance("s", "10.0.0.1", 1000 + n, weight=weight)
        endpoint = Endpoint(instance, FakeChannel(state))
        endpoint.inflight = busy
        endpoints.append(endpoint)
    return endpoints


def test_least_request_prefers_the_endpoint_with_fewer_outstanding_calls() -> None:
    idle, busy = fake_endpoints(0, 50)
    picker = LeastRequest("s", [idle, busy])
    assert {picker.pick() for _ in range(100)} == {idle}
    even = fake_endpoints(0, 0, 0)
    assert set(Counter(LeastRequest("s", even).pick() for _ in range(300))) == set(even)


def test_pickers_pick_only_ready_endpoints_and_none_without_one() -> None:
    for policy in (RoundRobin, WeightedRoundRobin, LeastRequest):
        assert policy("s", []).pick() is None
        connecting = fake_endpoints(0, 0, state=CONNECTING)
        picker = policy("s", connecting)
        assert picker.pick() is None
        assert picker.connecting
        connecting[1].channel.state = READY  # seen at once: nothing was ready, so the pick looks again
        assert {picker.pick() for _ in range(20)} == {connecting[1]}
        connecting[1].channel.state = TRANSIENT_FAILURE  # NOT_SERVING: its next pick sees it
        assert picker.pick() is None
    endpoints = fake_endpoints(0, 0, weights=(1, 2))
    picker = WeightedRoundRobin("s", endpoints)
    schedule = [picker.pick() for _ in range(3)]
    assert sorted(Counter(schedule).values()) == [1, 2]  # smooth: any 3 consecutive picks hold the 1:2 ratio


def test_a_lone_endpoint_is_picked_before_it_connects_only_without_health_checking() -> None:
    (alone,) = fake_endpoints(0, state=CONNECTING)
    assert RoundRobin("s", [alone], lone=True).pick() is alone  # the only choice: the call waits for it
    assert RoundRobin("s", [alone]).pick() is None  # health on: unknown is not serving
    pair = fake_endpoints(0, 0, state=CONNECTING)
    assert RoundRobin("s", pair, lone=True).pick() is None  # several: only connected ones
    alone.channel.state = TRANSIENT_FAILURE
    assert RoundRobin("s", [alone], lone=True).pick() is None


def test_unknown_policy_is_invalid_config(backend: dc.Backend) -> None:
    with pytest.raises(dc.InvalidConfig, match="policy"):
        dc.discovery_channel(backend, "add", policy="random")


def test_health_flip_moves_traffic_away_within_a_second_and_back(channel: dc.DiscoveryChannel, fleet: Fleet) -> None:
    flipped, other = fleet.start(), fleet.start()
    assert wait_until(lambda: list(channel.instances().values()).count("ready") == 2, timeout=10)
    load = Load(channel, threads=2).start()
    try:
        assert load.wait_for("join", flipped.name, since=time.monotonic(), timeout=10)
        at = time.monotonic()
        fleet.flip(flipped, serving=False)
        assert load.wait_for("leave", flipped.name, since=at, timeout=10), "traffic never left"
        outcome = load.outcome(Event("flip", flipped.name, at, "leave"), until=time.monotonic())
        assert outcome.follow is not None
        assert outcome.follow < 1.0, f"traffic left {outcome.follow:.3f} s after NOT_SERVING (bound: 1 s)"
        assert outcome.failed == 0
        at = time.monotonic()
        fleet.flip(flipped, serving=True)
        assert load.wait_for("join", flipped.name, since=at, timeout=10), "traffic never came back"
    finally:
        load.stop()
    assert load.failures() == 0
    assert other.adder.calls > 0


def test_rolling_restart_under_load_loses_no_call(channel: dc.DiscoveryChannel, fleet: Fleet) -> None:
    old = [fleet.start() for _ in range(3)]
    assert channel.wait_ready(timeout=10)
    load = Load(channel, threads=4).start()
    try:
        for instance in old:
            fresh = fleet.start()
            assert load.wait_for("join", fresh.name, since=time.monotonic(), timeout=10)
            fleet.drain(instance)
        assert load.wait_for("join", fresh.name, since=time.monotonic(), timeout=10)
    finally:
        load.stop()
    assert load.failures() == 0, Counter(code for _, _, code in load.snapshot())
    assert len(load.snapshot()) > 100


def test_kill_under_load_with_retries_loses_nothing(backend: dc.Backend, fleet: Fleet) -> None:
    victims = [fleet.start() for _ in range(3)]
    with dc.discovery_channel(backend, "add", retry=KILL_RETRY) as channel:
        assert wait_until(lambda: list(channel.instances().values()).count("ready") == 3, timeout=10)
        load = Load(channel, threads=4).start()
        try:
            assert load.wait_for("join", victims[0].name, since=time.monotonic(), timeout=10)
            at = time.monotonic()
            fleet.kill(victims[0])
            assert load.wait_for("leave", victims[0].name, since=at, timeout=10)
        finally:
            load.stop()
    assert load.failures() == 0, Counter(code for _, _, code in load.snapshot())


def test_kill_under_load_without_retries_fails_at_most_the_calls_in_flight(
    channel: dc.DiscoveryChannel, fleet: Fleet
) -> None:
    threads = 4
    victims = [fleet.start() for _ in range(3)]
    assert wait_until(lambda: list(channel.instances().values()).count("ready") == 3, timeout=10)
    load = Load(channel, threads=threads).start()
    try:
        assert load.wait_for("join", victims[0].name, since=time.monotonic(), timeout=10)
        at = time.monotonic()
        fleet.kill(victims[0])
        assert load.wait_for("leave", victims[0].name, since=at, timeout=10)
    finally:
        load.stop()
    failed = [code for _, _, code in load.snapshot() if code != "OK"]
    assert len(failed) <= threads, failed  # only calls already sent to it can fail
    assert set(failed) <= {"UNAVAILABLE", "CANCELLED"}


def test_calls_that_never_reached_a_server_are_retried_on_another_instance(backend: dc.Backend, fleet: Fleet) -> None:
    dead, alive = fleet.start(), fleet.start()
    with dc.discovery_channel(backend, "add", health_check=False) as channel:
        assert wait_until(lambda: len(channel.instances()) == 2, timeout=10)
        fleet.kill(dead)  # no health watch: the channel only learns by failing to connect
        counts = answered_by(channel, 20)
    assert counts == {alive.name: 20}


def test_set_changes_keep_connections_to_instances_that_stay(channel: dc.DiscoveryChannel, fleet: Fleet) -> None:
    first, second = fleet.start(), fleet.start()
    assert wait_until(lambda: len(channel.instances()) == 2, timeout=10)
    kept = channel._pool.endpoints[first.id].channel
    third = fleet.start()
    assert wait_until(lambda: third.id in channel.instances(), timeout=10)
    fleet.drain(second)
    assert wait_until(lambda: second.id not in channel.instances(), timeout=10)
    assert channel._pool.endpoints[first.id].channel is kept


def test_close_closes_connections_and_unsubscribes(backend: dc.Backend, fleet: Fleet) -> None:
    fleet.start()
    channel = dc.discovery_channel(backend, "add")
    assert channel.wait_ready(timeout=10)
    endpoints = list(channel._pool.endpoints.values())
    assert backend._feeds  # the channel's watch feed is running
    channel.close()
    channel.close()  # idempotent
    assert not backend._feeds, "the watch feed is still running"
    assert all(ep.retired for ep in endpoints)
    mine = ("discovery-connectivity:", "discovery-watch:")
    assert wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith(mine)], timeout=10)
    with pytest.raises(dc.ClosedError):
        add(channel, timeout=5)


def test_generated_stubs_interceptors_and_with_work_unchanged(backend: dc.Backend, fleet: Fleet) -> None:
    fleet.start()
    seen: list[str] = []

    class Recorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            seen.append(details.method)
            return continuation(details, request)

    with dc.discovery_channel(backend, "add") as channel:
        assert isinstance(channel, grpc.Channel)
        intercepted = grpc.intercept_channel(channel, Recorder())
        assert add(intercepted, timeout=10, wait_for_ready=True)[0] == 42
        future = add_pb2_grpc.AdderStub(channel).Add.future(add_pb2.AddRequest(a=1, b=1), timeout=10)
        assert future.result().v == 2
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append)
        assert wait_until(lambda: states == [grpc.ChannelConnectivity.READY], timeout=10), states
        channel.unsubscribe(states.append)
    assert seen == ["/addservice.Adder/Add"]


def test_retry_policy_validates_and_filters_methods() -> None:
    with pytest.raises(dc.InvalidConfig):
        dc.RetryPolicy(max_attempts=0)
    policy = dc.RetryPolicy(methods=frozenset({"/addservice.Adder/Add"}))
    assert policy.applies("/addservice.Adder/Add")
    assert not policy.applies("/other.Svc/Write")


def echo_server(executor: Any) -> grpc.Server:
    """A bytes-in, bytes-out service with every streaming shape (no generated code)."""

    def split(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from (bytes([b]) for b in request)

    def join(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"".join(requests)

    def echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    server = grpc.server(executor)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "echo.Echo",
                {
                    "Split": grpc.unary_stream_rpc_method_handler(split),
                    "Join": grpc.stream_unary_rpc_method_handler(join),
                    "Echo": grpc.stream_stream_rpc_method_handler(echo),
                },
            ),
        )
    )
    return server


def test_streaming_calls_go_to_an_instance_and_close_with_it(backend: dc.Backend) -> None:
    with (
        futures.ThreadPoolExecutor(4) as executor,
        dc.serve(echo_server(executor), backend, "echo", advertise="127.0.0.1", handle_signals=False, drain=0),
        dc.discovery_channel(backend, "echo") as channel,
    ):
        assert channel.wait_ready(timeout=10)
        assert list(channel.unary_stream("/echo.Echo/Split")(b"abc", timeout=10)) == [b"a", b"b", b"c"]
        join = channel.stream_unary("/echo.Echo/Join")
        assert join(iter([b"a", b"b"]), timeout=10) == b"ab"
        assert join.with_call(iter([b"c"]), timeout=10)[0] == b"c"
        assert join.future(iter([b"d"]), timeout=10).result() == b"d"
        assert list(channel.stream_stream("/echo.Echo/Echo")(iter([b"x", b"y"]), timeout=10)) == [b"x", b"y"]
        endpoint = next(iter(channel._pool.endpoints.values()))
        assert wait_until(lambda: endpoint.inflight == 0, timeout=10)  # every call counted done


def test_an_endpoint_closed_after_a_pick_refuses_the_call() -> None:
    (endpoint,) = fake_endpoints(0)
    assert endpoint.begin()
    assert not endpoint.retire()  # a call is in flight: closed by its end
    assert endpoint.begin()  # still open while calls run
    assert not endpoint.end()
    assert endpoint.end()  # the last call closes it
    assert not endpoint.begin()


def unused_ports(count: int) -> list[int]:
    """Loopback ports nothing listens on (bound together, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("health_check", [True, False])
def test_unreachable_endpoints_cost_no_thread_and_take_no_call(
    backend: dc.Backend, fleet: Fleet, health_check: bool, caplog: pytest.LogCaptureFixture
) -> None:
    servers = {fleet.start().name, fleet.start().name}
    for port in unused_ports(40):
        backend.register(dc.ServiceInstance("add", "127.0.0.1", port), keepalive=False)
    baseline = {t.name for t in threading.enumerate()}
    caplog.set_level(logging.DEBUG, logger="discovery_core.channel")
    with dc.discovery_channel(backend, "add", health_check=health_check) as channel:
        assert wait_until(lambda: len(channel.instances()) == 42, timeout=10)
        assert set(answered_by(channel, 200)) == servers
        # Unknown is not ready: no call went to an endpoint that never connected (it
        # would have failed there and been retried elsewhere, which is logged).
        assert not [r for r in caplog.records if "retrying" in r.getMessage()]
        new = sorted(t.name for t in threading.enumerate() if t.name not in baseline)
        assert len(new) <= 3, f"threads grow with endpoints: {new}"  # the watch, grpc's own


def test_a_channel_keeps_a_subset_and_a_leaving_member_is_replaced_by_one(backend: dc.Backend) -> None:
    instances = [dc.ServiceInstance("big", "127.0.0.1", port) for port in unused_ports(30)]
    for instance in instances:
        backend.register(instance, keepalive=False)
    with dc.discovery_channel(backend, "big", subset_size=5, client_index=3) as channel:
        assert wait_until(lambda: len(channel.instances()) == 5, timeout=10)
        before = set(channel.instances())
        backend.deregister(next(iter(before)))
        assert wait_until(lambda: set(channel.instances()) != before, timeout=10)
        after = set(channel.instances())
        assert len(after) == 5
        assert len(after - before) == 1
    with dc.discovery_channel(backend, "big", subset_size=None) as channel:
        assert wait_until(lambda: len(channel.instances()) == 29, timeout=10)
    for bad in ({"subset_size": 0}, {"client_index": -1}):
        with pytest.raises(dc.InvalidConfig, match=next(iter(bad))):
            dc.discovery_channel(backend, "big", **bad)  # type: ignore[arg-type]
