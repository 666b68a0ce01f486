"""The gRPC story on a real Consul agent: serve() registers with a gRPC check the
agent runs, the discovery channel follows Consul's blocking queries.

Waits are conditions with deadlines; the one timing bound is the issue's 1 s after a
health flip (the client's own health watch, not Consul's 10 s check interval).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import grpc.aio
import pytest
from discovery_examples.addservice import add_pb2, add_pb2_grpc
from discovery_examples.addservice.fleet import KILL_RETRY, Event, Fleet, Load, Traffic, wait_until

import discovery_core as dc
from discovery_core import aio

pytestmark = [pytest.mark.consul, pytest.mark.timeout(120)]


@pytest.fixture
def backend(consul_agent: object) -> Iterator[dc.Backend]:
    with dc.connect(f"consul://{consul_agent.address}") as backend:  # type: ignore[attr-defined]
        yield backend


@pytest.fixture
def service() -> str:
    return f"add-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fleet(backend: dc.Backend, service: str) -> Iterator[Fleet]:
    fleet = Fleet(backend, service=service, drain=1.0)
    yield fleet
    fleet.close()


def test_serve_registers_a_grpc_check_consul_runs(backend: dc.Backend, fleet: Fleet, service: str) -> None:
    instance = fleet.start()
    snapshot = backend.instances(service)
    assert [i.id for i in snapshot.instances] == [instance.id]
    fleet.drain(instance)
    assert backend.instances(service, passing_only=False).instances == ()


def test_the_first_call_on_a_fresh_channel_waits_for_the_first_snapshot(
    backend: dc.Backend, fleet: Fleet, service: str
) -> None:
    fleet.start()
    for _ in range(3):  # each a fresh watch: the issue saw 10 first calls of 10 fail
        with dc.discovery_channel(backend, service) as channel:
            assert add_pb2_grpc.AdderStub(channel).Add(add_pb2.AddRequest(a=1, b=2), timeout=20).v == 3


async def test_the_first_aio_call_on_a_fresh_channel_waits_for_the_first_snapshot(
    backend: dc.Backend, fleet: Fleet, service: str
) -> None:
    await asyncio.to_thread(fleet.start)
    for _ in range(3):
        async with aio.discovery_channel(backend, service) as channel:
            assert (await add_pb2_grpc.AdderStub(channel).Add(add_pb2.AddRequest(a=1, b=2), timeout=20)).v == 3


def test_rolling_restart_under_load_loses_no_call(backend: dc.Backend, fleet: Fleet, service: str) -> None:
    old = [fleet.start() for _ in range(3)]
    with dc.discovery_channel(backend, service) as channel:
        assert wait_until(lambda: list(channel.instances().values()).count("ready") == 3, timeout=20)
        load = Load(channel, threads=4).start()
        try:
            for instance in old:
                fresh = fleet.start()
                assert load.wait_for("join", fresh.name, since=time.monotonic(), timeout=20)
                fleet.drain(instance)
        finally:
            load.stop()
    assert load.failures() == 0, Counter(code for _, _, code in load.snapshot())
    assert len(load.snapshot()) > 100


def test_kill_with_retries_loses_nothing_and_health_flip_moves_traffic(
    backend: dc.Backend, fleet: Fleet, service: str
) -> None:
    victim, flipped, _stays = fleet.start(), fleet.start(), fleet.start()
    with dc.discovery_channel(backend, service, retry=KILL_RETRY) as channel:
        assert wait_until(lambda: list(channel.instances().values()).count("ready") == 3, timeout=20)
        load = Load(channel, threads=4).start()
        try:
            assert load.wait_for("join", victim.name, since=time.monotonic(), timeout=20)
            at = time.monotonic()
            fleet.kill(victim)
            assert load.wait_for("leave", victim.name, since=at, timeout=20)

            at = time.monotonic()
            fleet.flip(flipped, serving=False)
            assert load.wait_for("leave", flipped.name, since=at, timeout=20)
            outcome = load.outcome(Event("flip", flipped.name, at, "leave"), until=time.monotonic())
            assert outcome.follow is not None
            assert outcome.follow < 1.0, f"traffic left {outcome.follow:.3f} s after NOT_SERVING (bound: 1 s)"
            at = time.monotonic()
            fleet.flip(flipped, serving=True)
            assert load.wait_for("join", flipped.name, since=at, timeout=20)
        finally:
            load.stop()
    assert load.failures() == 0, Counter(code for _, _, code in load.snapshot())


async def test_aio_channel_follows_a_rolling_restart_on_consul(backend: dc.Backend, fleet: Fleet, service: str) -> None:
    old = [fleet.start() for _ in range(2)]
    traffic, stop = Traffic(), asyncio.Event()
    async with aio.discovery_channel(backend, service) as channel:
        await asyncio.wait_for(channel.channel_ready(), 20)
        stub = add_pb2_grpc.AdderStub(channel)

        async def load() -> None:
            while not stop.is_set():
                try:
                    call = stub.Add(add_pb2.AddRequest(a=1, b=1), timeout=5)
                    await call
                    traffic.record(str(dict(await call.trailing_metadata())["instance"]), "OK")
                except grpc.aio.AioRpcError as error:
                    traffic.record(None, error.code().name)

        runner = asyncio.gather(load(), load())
        try:
            for instance in old:
                fresh = fleet.start()
                since = time.monotonic()
                joined = await asyncio.to_thread(wait_until, lambda: traffic.followed("join", fresh.name, since), 20)  # noqa: B023
                assert joined
                await asyncio.to_thread(fleet.drain, instance)
        finally:
            stop.set()
            await runner
    assert traffic.failures() == 0, traffic.counts()
