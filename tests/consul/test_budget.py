"""The Consul backend inside its connection budget, on a real agent with Consul's
default limits (200 connections per client address, resets past it).

A process watching 1,000 services, open/close cycles of watches and channels, and
closing while the agent does not answer (SIGSTOP: connections are accepted by the
kernel, nothing answers).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from discovery_consul import ConsulBackend
from discovery_consul._client import Settings, _Connections
from discovery_consul.devagent import DevAgent, connections_to
from discovery_examples.addservice import add_pb2, add_pb2_grpc
from discovery_examples.addservice.fleet import Fleet

import discovery_core as dc

pytestmark = [pytest.mark.consul, pytest.mark.timeout(240)]

Until = Callable[[Callable[[], bool], float, str], None]


class Sampler:
    """The most connections this process held to the agent, sampled every 5 ms."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.most = max(self.most, connections_to(self.address))


def _threads() -> int:
    return threading.active_count()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def problems(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """Warnings and errors the library logged (a reset connection shows here)."""
    caplog.set_level(logging.WARNING)
    return lambda: [r.getMessage() for r in caplog.records if r.name.startswith("discovery")]


SERVICES = 1000  # as in conftest.crowded_agent
INSTANCES = 10


_CATALOG_WRITER = """
import json, sys, urllib.request
address, services = sys.argv[1], sys.argv[2:]
for n, service in enumerate(services):
    body = {"Node": "elsewhere", "Address": "127.0.0.2",
            "Service": {"ID": f"{service}-elsewhere", "Service": service, "Port": 20000}}
    request = urllib.request.Request(f"http://{address}/v1/catalog/register", json.dumps(body).encode(), method="PUT")
    urllib.request.urlopen(request, timeout=10).read()
"""


def _until_all(watches: list[dc.Watch], holds: Callable[[dc.Snapshot], bool], deadline: float) -> None:
    """Wait until every watch delivered a snapshot that ``holds``."""
    for watch in watches:
        while watch.current is None or not holds(watch.current):
            assert time.monotonic() < deadline, f"{watch} never got there: {watch.current}"
            with contextlib.suppress(TimeoutError):
                watch.wait(timeout=max(0.01, deadline - time.monotonic()))


def test_one_process_watches_1000_services_within_its_budget(
    crowded_agent: DevAgent, problems: Callable[[], list[str]]
) -> None:
    services = [f"budget-{s:04d}" for s in range(SERVICES)]
    with dc.connect(f"consul://{crowded_agent.address}") as backend, Sampler(crowded_agent.address) as sampler:
        watches = [backend.watch(service) for service in services]
        started = time.monotonic()
        deadline = started + 120  # the agent syncs its 10,000 instances to the catalog meanwhile
        _until_all(watches, lambda snap: len(snap.instances) == INSTANCES, deadline)
        # Every watch follows a change: an instance of each service registered in the
        # catalog by another process (on a node of its own, as another tool would).
        # Meanwhile this process's own register() works.
        writer = subprocess.Popen([sys.executable, "-c", _CATALOG_WRITER, crowded_agent.address, *services])
        try:
            registrations = [backend.register(dc.ServiceInstance(s, "127.0.0.1", 30000)) for s in services[:10]]
            assert writer.wait(timeout=120) == 0
        finally:
            writer.kill()
        _until_all(watches, lambda snap: f"{snap.service}-elsewhere" in {i.id for i in snap.instances}, started + 200)
        for registration in registrations:
            registration.deregister()
        for watch in watches:
            watch.close()
    assert isinstance(backend, ConsulBackend)
    assert 0 < sampler.most <= backend.max_connections, sampler.most
    assert problems() == []


def test_watch_and_channel_cycles_leave_nothing_behind(
    dev_agent: DevAgent, until: Until, problems: Callable[[], list[str]]
) -> None:
    threads, fds = _threads(), _fds()
    with dc.connect(f"consul://{dev_agent.address}?wait=3s") as backend, Sampler(dev_agent.address) as sampler:
        fleet = Fleet(backend)
        fleet.start()
        try:
            started = time.monotonic()
            for n in range(1000):
                with backend.watch(f"cycle-{n % 50}") as watch:
                    watch.wait(timeout=10)
            for _ in range(200):
                with dc.discovery_channel(backend, "add") as channel:
                    assert channel.wait_ready(10)
                    reply = add_pb2_grpc.AdderStub(channel).Add(add_pb2.AddRequest(a=1, b=2), timeout=10)
                    assert reply.v == 3
            took = time.monotonic() - started
        finally:
            fleet.close()
    assert took < 60, f"the cycles took {took:.1f} s, more than the minute the scenario allows"
    assert isinstance(backend, ConsulBackend)
    assert sampler.most <= backend.max_connections
    assert problems() == []
    # Queries a closed watch left running end within their wait (3 s here).
    until(lambda: _threads() <= threads, 10, f"threads back to {threads} (now {_threads()})")
    until(lambda: _fds() <= fds, 10, f"file descriptors back to {fds} (now {_fds()})")


def test_closing_returns_within_a_second_when_the_agent_does_not_answer(dev_agent: DevAgent) -> None:
    # Closed again on the way out (a no-op once closed): a failed assertion must not
    # leave the backend retrying toward the agent's port for a later test's agent.
    backend = dc.connect(f"consul://{dev_agent.address}?max_connections=8&timeout=5")
    with backend, contextlib.closing(Fleet(backend)) as fleet:
        fleet.start()
        watches = [backend.watch(f"quiet-{n}") for n in range(6)]  # 3 direct, 3 shared
        for watch in watches:
            watch.wait(timeout=10)
        channel = dc.discovery_channel(backend, "add")
        assert channel.wait_ready(10)
        assert add_pb2_grpc.AdderStub(channel).Add(add_pb2.AddRequest(a=1, b=2), timeout=10).v == 3
        with dev_agent.paused():
            started = time.monotonic()
            channel.close()
            for watch in watches:
                watch.close()
            assert time.monotonic() - started < 1.0
            started = time.monotonic()
            backend.close()
            assert time.monotonic() - started < 1.0


def test_a_query_that_connects_after_its_client_closed_is_cut(consul_agent: Any) -> None:
    # A watch's thread may take a connection just before the backend closes and
    # connect just after: its blocking query must still end at once, not when its
    # wait runs out (such a query outlived its backend in the contract tests).
    host, port = consul_agent.address.rsplit(":", 1)
    settings = Settings(host, int(port), "http", None, None, None, None, verify=True, timeout=5.0)
    connections = _Connections(settings, limit=1)
    conn = connections.take()
    index = conn.ask("/v1/catalog/services", {}, 5.0, ()).headers["X-Consul-Index"]
    connections.give(conn)
    conn = connections.take()
    connections.close()
    conn.close()  # not connected now: the query below connects after the close
    started = time.monotonic()
    with contextlib.suppress(http.client.HTTPException, OSError):
        conn.ask(f"/v1/catalog/services?index={index}&wait=30s", {}, 35.0, (connections.closing,))
    assert time.monotonic() - started < 5, "the query ran on after its client closed"


def test_a_change_to_a_service_watched_after_the_detectors_query_left_is_seen(consul_agent: Any) -> None:
    # The detectors' blocking queries were sent when only the first watch existed: a
    # change to a service watched later must still reach its watch.
    prefix = f"late-{uuid.uuid4().hex[:6]}"
    check = dc.TtlCheck(ttl=600, initial_status=dc.HealthStatus.PASSING)
    with dc.connect(f"consul://{consul_agent.address}?max_connections=5") as backend:
        first = backend.watch(f"{prefix}-first")
        first.wait(timeout=10)
        time.sleep(0.2)  # let the detectors send their blocking queries (the outcome does not depend on it)
        with backend.watch(f"{prefix}-late") as late:
            late.wait(timeout=10)
            inst = dc.ServiceInstance(f"{prefix}-late", "127.0.0.1", 5001, check=check)
            with backend.register(inst):
                _until_all([late], lambda snap: inst.id in {i.id for i in snap.instances}, time.monotonic() + 10)
        first.close()
