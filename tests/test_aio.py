"""The grpc.aio side: serve() for aio servers and the aio discovery channel.

Same behaviours as the sync tests, on the memory backend; waits are conditions with
deadlines, and the one timing bound is the issue's 1 s after a health flip.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import grpc.aio
import pytest
from discovery_examples.addservice import add_pb2, add_pb2_grpc
from discovery_examples.addservice.fleet import KILL_RETRY, Event, Traffic
from grpc_health.v1 import health_pb2, health_pb2_grpc

import discovery_core as dc
from discovery_core import aio

pytestmark = pytest.mark.timeout(60)


class AsyncAdder(add_pb2_grpc.AdderServicer):
    def __init__(self, name: str) -> None:
        self.name = name

    async def Add(
        self, request: add_pb2.AddRequest, context: grpc.aio.ServicerContext[add_pb2.AddRequest, add_pb2.AddReply]
    ) -> add_pb2.AddReply:
        context.set_trailing_metadata((("instance", self.name),))
        return add_pb2.AddReply(v=request.a + request.b)


class AioFleet:
    def __init__(self, backend: dc.Backend) -> None:
        self.backend = backend
        self.served: dict[str, aio.AioServed] = {}
        self._names = (f"aio-{n}" for n in itertools.count(1))

    async def start(self) -> str:
        name = next(self._names)
        server = grpc.aio.server()
        add_pb2_grpc.add_AdderServicer_to_server(AsyncAdder(name), server)
        self.served[name] = await aio.serve(
            server, self.backend, "add", advertise="127.0.0.1", instance_id=name, drain=0.3, handle_signals=False
        )
        return name

    async def close(self) -> None:
        for served in self.served.values():
            await served.stop(grace=0, drain=0)


@pytest.fixture
def backend() -> Iterator[dc.Backend]:
    with dc.connect("memory://") as backend:
        yield backend


@pytest.fixture
async def fleet(backend: dc.Backend) -> AsyncIterator[AioFleet]:
    fleet = AioFleet(backend)
    yield fleet
    await fleet.close()


@pytest.fixture
async def channel(backend: dc.Backend) -> AsyncIterator[aio.AioDiscoveryChannel]:
    async with aio.discovery_channel(backend, "add") as channel:
        yield channel


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def add(channel: grpc.aio.Channel, *, timeout: float | None = None, wait_for_ready: bool | None = None) -> str:
    call = add_pb2_grpc.AdderStub(channel).Add(
        add_pb2.AddRequest(a=2, b=3), timeout=timeout, wait_for_ready=wait_for_ready
    )
    reply = await call
    assert reply.v == 5
    return str(dict(await call.trailing_metadata())["instance"])


async def load(channel: grpc.aio.Channel, traffic: Traffic, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            traffic.record(await add(channel, timeout=2), "OK")
        except grpc.aio.AioRpcError as error:
            traffic.record(None, error.code().name)


async def test_serve_registers_and_stop_deregisters(backend: dc.Backend) -> None:
    server = grpc.aio.server()
    add_pb2_grpc.add_AdderServicer_to_server(AsyncAdder("one"), server)
    async with await aio.serve(server, backend, "add", advertise="127.0.0.1", drain=0, handle_signals=False) as served:
        assert [i.id for i in backend.instances("add").instances] == [served.instance.id]
        async with grpc.aio.insecure_channel(served.target) as plain:
            reply = await health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(service="add"), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert backend.instances("add").instances == ()
    assert not await served.wait_for_termination(5)


async def test_serve_is_an_async_context_manager_too_and_says_what_it_serves(backend: dc.Backend) -> None:
    server = grpc.aio.server()
    add_pb2_grpc.add_AdderServicer_to_server(AsyncAdder("one"), server)
    async with aio.serve(server, backend, "add", advertise="127.0.0.1", drain=0, handle_signals=False) as served:
        assert [i.id for i in backend.instances("add").instances] == [served.instance.id]
        assert repr(served) == f"<AioServed 'add' {served.instance.id!r} at {served.target} serving>"
    assert backend.instances("add").instances == ()
    assert repr(served).endswith(" stopped>")


async def test_no_instance_fails_at_once_naming_the_service(channel: aio.AioDiscoveryChannel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await add(channel, timeout=60)  # waiting instead of failing fast would hit the test timeout
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "'add'" in (raised.value.details() or "")


async def test_wait_for_ready_succeeds_when_an_instance_registers(
    channel: aio.AioDiscoveryChannel, fleet: AioFleet
) -> None:
    waiting = asyncio.ensure_future(add(channel, timeout=30, wait_for_ready=True))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    name = await fleet.start()
    assert await waiting == name


async def test_health_flip_moves_traffic_within_a_second_and_back(
    channel: aio.AioDiscoveryChannel, fleet: AioFleet
) -> None:
    flipped, _other = await fleet.start(), await fleet.start()
    assert await until(lambda: list(channel.instances().values()).count("ready") == 2)
    traffic, stop = Traffic(), asyncio.Event()
    runner = asyncio.gather(*(load(channel, traffic, stop) for _ in range(2)))
    try:
        assert await until(lambda: traffic.followed("join", flipped, 0.0))
        at = time.monotonic()
        await fleet.served[flipped].set_serving(False)
        assert await until(lambda: traffic.followed("leave", flipped, at)), "traffic never left"
        outcome = traffic.outcome(Event("flip", flipped, at, "leave"), until=time.monotonic())
        assert outcome.follow is not None
        assert outcome.follow < 1.0, f"traffic left {outcome.follow:.3f} s after NOT_SERVING (bound: 1 s)"
        at = time.monotonic()
        await fleet.served[flipped].set_serving(True)
        assert await until(lambda: traffic.followed("join", flipped, at)), "traffic never came back"
    finally:
        stop.set()
        await runner
    assert traffic.failures() == 0


async def test_rolling_restart_under_load_loses_no_call(channel: aio.AioDiscoveryChannel, fleet: AioFleet) -> None:
    old = [await fleet.start() for _ in range(3)]
    await asyncio.wait_for(channel.channel_ready(), 10)
    traffic, stop = Traffic(), asyncio.Event()
    runner = asyncio.gather(*(load(channel, traffic, stop) for _ in range(4)))
    try:
        for name in old:
            fresh = await fleet.start()
            since = time.monotonic()
            assert await until(lambda: traffic.followed("join", fresh, since))  # noqa: B023 - awaited here
            await fleet.served[name].stop()
    finally:
        stop.set()
        await runner
    assert traffic.failures() == 0, traffic.counts()
    assert len(traffic.snapshot()) > 100


async def test_kill_with_retries_loses_nothing(backend: dc.Backend, fleet: AioFleet) -> None:
    names = [await fleet.start() for _ in range(3)]
    async with aio.discovery_channel(backend, "add", retry=KILL_RETRY) as channel:
        assert await until(lambda: list(channel.instances().values()).count("ready") == 3)
        traffic, stop = Traffic(), asyncio.Event()
        runner = asyncio.gather(*(load(channel, traffic, stop) for _ in range(4)))
        try:
            assert await until(lambda: traffic.followed("join", names[0], 0.0))
            at = time.monotonic()
            await fleet.served[names[0]].server.stop(0)  # killed: no deregistration
            assert await until(lambda: traffic.followed("leave", names[0], at))
        finally:
            stop.set()
            await runner
    assert traffic.failures() == 0, traffic.counts()


async def test_close_releases_endpoints_and_the_watch(backend: dc.Backend, fleet: AioFleet) -> None:
    await fleet.start()
    channel = aio.discovery_channel(backend, "add")
    assert isinstance(channel, grpc.aio.Channel)
    await asyncio.wait_for(channel.channel_ready(), 10)
    assert channel.get_state() is grpc.ChannelConnectivity.READY
    await channel.close()
    await channel.close()
    assert not backend._feeds
    assert channel.instances() == {}


async def test_streaming_calls_pick_when_made(backend: dc.Backend) -> None:
    async def split(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:  # type: ignore[type-arg]
        for b in request:
            yield bytes([b])

    async def join(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
        return b"".join([r async for r in requests])

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "echo.Echo",
                {
                    "Split": grpc.unary_stream_rpc_method_handler(split),
                    "Join": grpc.stream_unary_rpc_method_handler(join),
                    "Echo": grpc.stream_stream_rpc_method_handler(lambda requests, context: requests),
                },
            ),
        )
    )
    async with aio.discovery_channel(backend, "echo") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            channel.unary_stream("/echo.Echo/Split")(b"abc", timeout=10)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        served = await aio.serve(server, backend, "echo", advertise="127.0.0.1", drain=0, handle_signals=False)
        try:
            await asyncio.wait_for(channel.channel_ready(), 10)
            assert [r async for r in channel.unary_stream("/echo.Echo/Split")(b"ab", timeout=10)] == [b"a", b"b"]
            assert await channel.stream_unary("/echo.Echo/Join")(iter([b"a", b"b"]), timeout=10) == b"ab"
            echoed = channel.stream_stream("/echo.Echo/Echo")(iter([b"x", b"y"]), timeout=10)
            assert [r async for r in echoed] == [b"x", b"y"]
        finally:
            await served.stop()


async def test_a_call_object_answers_code_details_and_metadata(
    channel: aio.AioDiscoveryChannel, fleet: AioFleet, caplog: pytest.LogCaptureFixture
) -> None:
    failed = add_pb2_grpc.AdderStub(channel).Add(add_pb2.AddRequest(a=1, b=1), timeout=10)
    assert await failed.code() is grpc.StatusCode.UNAVAILABLE
    assert "'add'" in await failed.details()
    assert failed.done()
    del failed
    gc.collect()
    assert "never retrieved" not in caplog.text  # as with grpc's own calls, the error is only raised if awaited
    name = await fleet.start()
    await asyncio.wait_for(channel.channel_ready(), 10)
    call = add_pb2_grpc.AdderStub(channel).Add(add_pb2.AddRequest(a=1, b=1), timeout=10)
    assert (await call).v == 2
    assert await call.code() is grpc.StatusCode.OK
    assert dict(await call.trailing_metadata())["instance"] == name
    await call.initial_metadata()
    assert not call.cancelled()
