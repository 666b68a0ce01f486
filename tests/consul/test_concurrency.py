"""Many threads registering through one Consul backend against a healthy agent."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import urllib.request
from concurrent import futures
from typing import Any

import pytest
from discovery_consul.devproxy import Proxy

import discovery_core as dc

pytestmark = [pytest.mark.consul, pytest.mark.timeout(180)]

THREADS = 50
ROUNDS = 20


def agent_services(address: str, service: str) -> list[str]:
    with urllib.request.urlopen(f"http://{address}/v1/agent/services", timeout=10) as response:
        held: dict[str, Any] = json.loads(response.read())
    return sorted(sid for sid, entry in held.items() if entry.get("Service") == service)


def test_fifty_threads_register_and_close_without_an_error_or_a_leftover(
    consul_agent: Any, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    baseline = threading.active_count()
    peak = baseline
    errors: list[BaseException] = []
    backend = dc.connect(f"consul://{consul_agent.address}")

    def churn(worker: int) -> None:
        nonlocal peak
        for n in range(ROUNDS):
            inst = dc.ServiceInstance(service, "127.0.0.1", 10000 + worker, id=f"{service}-{worker}-{n}")
            try:
                with backend.register(inst):
                    peak = max(peak, threading.active_count())
            except dc.DiscoveryError as exc:
                errors.append(exc)

    with futures.ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(churn, range(THREADS)))
    backend.close()
    assert errors == []
    assert [r.getMessage() for r in caplog.records if "pool" in r.getMessage().lower()] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # The pool's threads, the keepalive's one, and no thread per registration.
    assert peak <= baseline + THREADS + 5, peak - baseline
    assert agent_services(consul_agent.address, service) == []


def test_a_backend_closed_while_threads_register_leaves_nothing(consul_agent: Any, service: str) -> None:
    backend = dc.connect(f"consul://{consul_agent.address}")
    started = threading.Barrier(THREADS + 1)

    def register(worker: int) -> None:
        started.wait()
        for n in range(ROUNDS):
            try:
                backend.register(dc.ServiceInstance(service, "127.0.0.1", 10000 + worker, id=f"{service}-{worker}-{n}"))
            except dc.ClosedError:
                return

    with futures.ThreadPoolExecutor(THREADS) as pool:
        done = [pool.submit(register, worker) for worker in range(THREADS)]
        started.wait()
        backend.close()
        for future in done:
            future.result()
    assert agent_services(consul_agent.address, service) == []


class AnswerCutter(Proxy):
    """A TCP proxy to an agent that, once, lets a registration reach the agent and
    resets the connection instead of passing the answer back: a register() that
    fails in transport after the agent wrote the instance."""

    def __init__(self, upstream: str) -> None:
        self.armed = threading.Event()
        self.cut = threading.Event()
        super().__init__(upstream)

    def _pair(self) -> threading.Event:
        return threading.Event()  # a registration went up this connection

    def _forward(self, data: bytes, sink: socket.socket, *, up: bool, pair: Any) -> bool:
        if up and data.startswith(b"PUT /v1/agent/service/register"):
            pair.set()
        elif not up and pair.is_set():
            pair.clear()
            if self.armed.is_set():
                self.armed.clear()
                sink.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sink.shutdown(socket.SHUT_RD)  # wakes the other pump's recv; sends nothing
                sink.close()  # a reset: the answer is dropped
                self.cut.set()
                return False
        return super()._forward(data, sink, up=up, pair=pair)


def test_a_register_that_failed_in_transport_removes_what_the_agent_wrote(
    consul_agent: Any, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    inst = dc.ServiceInstance(service, "127.0.0.1", 5001)
    with AnswerCutter(consul_agent.address) as proxy, dc.connect(f"consul://{proxy.address}") as backend:
        proxy.armed.set()
        with caplog.at_level(logging.WARNING, logger="discovery_core"), pytest.raises(dc.BackendUnavailable):
            backend.register(inst)
        assert proxy.cut.is_set()
        assert agent_services(consul_agent.address, service) == []
        assert "removed it again" in caplog.text
        with backend.register(inst):  # the next one works
            assert agent_services(consul_agent.address, service) == [inst.id]
    assert agent_services(consul_agent.address, service) == []
