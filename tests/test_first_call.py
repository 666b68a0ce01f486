"""The first call on a fresh discovery channel (sync and aio), and what a call that
finds no instance says: it waits within its deadline for the watch's first snapshot
and for new endpoints' health, says what it waited for, and blames the watch's error
rather than a missing deployment when the watch fails.

``HeldBackend`` is the memory backend with its feeds started only when the test says
(a registry whose first answer is slow); ``FailingBackend`` has feeds that only fail.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest
from discovery_examples.addservice import add_pb2, add_pb2_grpc
from discovery_examples.addservice.fleet import Fleet
from discovery_memory import MemoryBackend

import discovery_core as dc
from discovery_core import aio

pytestmark = pytest.mark.timeout(60)

DENIED = dc.PermissionDenied("Consul at http://127.0.0.1:1 denied the request: ACL not found")


class HeldBackend(MemoryBackend):
    """The memory backend whose watches deliver nothing until ``release()``."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[dc.Feed] = []

    def start_feed(self, feed: dc.Feed) -> None:
        self.held.append(feed)

    def release(self) -> None:
        for feed in self.held:
            super().start_feed(feed)


class FailingBackend(MemoryBackend):
    """The memory backend whose watches only ever fail (it drives them itself)."""

    def start_feed(self, feed: dc.Feed) -> None:
        feed.fail(DENIED)


@pytest.fixture
def held() -> Iterator[HeldBackend]:
    with HeldBackend() as backend:
        yield backend


@pytest.fixture
def fleet(held: HeldBackend) -> Iterator[Fleet]:
    fleet = Fleet(held, drain=0.0, grace=1.0)
    yield fleet
    fleet.close()


def request() -> add_pb2.AddRequest:
    return add_pb2.AddRequest(a=20, b=22)


def test_the_first_call_waits_for_the_first_snapshot_and_the_health_of_new_endpoints(
    held: HeldBackend, fleet: Fleet
) -> None:
    fleet.start()
    with dc.discovery_channel(held, "add") as channel:
        # The snapshot comes while the call waits (or before it starts: the outcome is
        # the same); a channel that fails the call before its first snapshot fails this.
        threading.Timer(0.2, held.release).start()
        assert add_pb2_grpc.AdderStub(channel).Add(request(), timeout=30).v == 42


def test_a_first_call_that_gets_no_snapshot_says_what_it_waited_for(held: HeldBackend) -> None:
    with dc.discovery_channel(held, "add") as channel, pytest.raises(grpc.RpcError) as raised:
        add_pb2_grpc.AdderStub(channel).Add(request(), timeout=0.3)
    error = raised.value
    assert isinstance(error, grpc.Call)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no snapshot of service 'add'" in error.details()
    assert "registered" not in error.details()


def test_a_call_on_a_failing_watch_fails_at_once_with_the_watch_error() -> None:
    with (
        FailingBackend() as backend,
        dc.discovery_channel(backend, "add") as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        add_pb2_grpc.AdderStub(channel).Add(request(), timeout=60)  # waiting would hit the test timeout
    error = raised.value
    assert isinstance(error, grpc.Call)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert error.details() == f"the watch on 'add' fails: {DENIED}"


def test_an_empty_stale_set_blames_the_watch_not_a_missing_deployment(held: HeldBackend) -> None:
    with dc.discovery_channel(held, "add") as channel:
        (feed,) = held.held
        feed.deliver(dc.Snapshot("add", index=3))
        feed.fail(DENIED)
        with pytest.raises(grpc.RpcError) as raised:
            add_pb2_grpc.AdderStub(channel).Add(request(), timeout=60)
    assert isinstance(raised.value, grpc.Call)
    details = raised.value.details() or ""
    assert details.startswith(f"the watch on 'add' fails: {DENIED}")
    assert "registered" not in details


def test_a_call_without_an_instance_raises_the_public_no_instance_error(held: HeldBackend) -> None:
    with dc.discovery_channel(held, "add") as channel:
        held.release()  # its first snapshot: no instance
        with pytest.raises(dc.NoInstanceError) as raised:
            add_pb2_grpc.AdderStub(channel).Add(request(), timeout=30)
    assert isinstance(raised.value, grpc.RpcError)
    assert isinstance(raised.value, grpc.Call)
    assert not isinstance(raised.value, dc.DiscoveryError)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert raised.value.details() == "no instance of service 'add' is registered and healthy"


async def test_the_first_aio_call_waits_for_the_first_snapshot(held: HeldBackend, fleet: Fleet) -> None:
    fleet.start()
    async with aio.discovery_channel(held, "add") as channel:
        threading.Timer(0.2, held.release).start()
        assert (await add_pb2_grpc.AdderStub(channel).Add(request(), timeout=30)).v == 42


async def test_a_first_aio_call_that_gets_no_snapshot_says_what_it_waited_for(held: HeldBackend) -> None:
    async with aio.discovery_channel(held, "add") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await add_pb2_grpc.AdderStub(channel).Add(request(), timeout=0.3)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no snapshot of service 'add'" in (raised.value.details() or "")


async def test_an_aio_call_on_a_failing_watch_fails_at_once_with_the_watch_error() -> None:
    with FailingBackend() as backend:
        async with aio.discovery_channel(backend, "add") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await add_pb2_grpc.AdderStub(channel).Add(request(), timeout=60)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert raised.value.details() == f"the watch on 'add' fails: {DENIED}"
