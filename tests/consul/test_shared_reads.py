"""How often shared feeds read each service, counted by a proxy in front of a real
agent: once at start-up, once per ``wait`` period while nothing changes, and only the
services a change concerns.

The detectors' answers are held back a moment on their way to the backend, so reads
sent before a detector's first answer would show (they would have to be sent again:
such a read may predate a change that answer holds)."""

from __future__ import annotations

import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from discovery_consul.devagent import DevAgent
from discovery_consul.devproxy import CountingProxy, _Lines

import discovery_core as dc

pytestmark = [pytest.mark.consul, pytest.mark.timeout(60)]

Until = Callable[[Callable[[], bool], float, str], None]

WAIT = 3.0  # the backend's wait: resyncs every 0.9-1.0 of it, detectors answer after it
HELD = 0.3  # seconds each detector answer is held back
SERVICES = 6
DETECTORS = (b"/v1/health/state/any", b"/v1/catalog/services")
CHECK = dc.TtlCheck(ttl=600, initial_status=dc.HealthStatus.PASSING)


class _Connection(_Lines):
    detector = False  # the answer on its way belongs to a detector


class SlowDetectors(CountingProxy):
    """A counting proxy that holds each detector answer back for ``HELD`` seconds."""

    def _pair(self) -> _Connection:
        return _Connection()

    def _forward(self, data: bytes, sink: socket.socket, *, up: bool, pair: Any) -> bool:
        if up:
            pair.detector = any(path in data for path in DETECTORS)
        elif pair.detector:
            pair.detector = False
            time.sleep(HELD)
        return super()._forward(data, sink, up=up, pair=pair)

    def reads(self, services: list[str]) -> Counter[str]:
        counts = self.counts()
        return Counter({service: counts[f"GET /v1/health/service/{service}"] for service in services})

    def queries(self) -> list[int]:
        """How many queries each detector sent."""
        counts = self.counts()
        return [counts[f"GET {path.decode()}"] for path in DETECTORS]


@dataclass
class Watching:
    """Shared feeds on ``services`` (one instance each), through the proxy, each with
    its first snapshot; ``writer`` registers directly with the agent."""

    proxy: SlowDetectors
    services: list[str]
    watches: list[dc.Watch]
    writer: dc.Backend


@pytest.fixture
def watching(dev_agent: DevAgent) -> Iterator[Watching]:
    prefix = f"reads-{uuid.uuid4().hex[:6]}"
    services = [f"{prefix}-{n}" for n in range(SERVICES)]
    with dc.connect(f"consul://{dev_agent.address}") as writer:
        for service in services:
            writer.register(dc.ServiceInstance(service, "127.0.0.1", 5001, check=CHECK))
        with (
            SlowDetectors(dev_agent.address) as proxy,
            dc.connect(f"consul://{proxy.address}?max_connections=5&wait={WAIT:g}s") as backend,
        ):
            watches = [backend.watch(service) for service in services]  # all shared
            for watch in watches:
                assert len(watch.wait(timeout=10).instances) == 1
            yield Watching(proxy, services, watches, writer)


def test_each_shared_feed_reads_once_at_start_up_and_once_per_wait_at_idle(watching: Watching, until: Until) -> None:
    proxy, services = watching.proxy, watching.services
    started = time.monotonic()
    # Counted past the follow-up a change would set off (1 s), before any resync.
    time.sleep(1.5)
    assert proxy.reads(services) == Counter(dict.fromkeys(services, 1))
    # Each detector's second query times out after WAIT, its index unmoved (its third
    # is then sent); each service's resync comes 0.9-1.0 x WAIT after its read, the
    # next at least 1.8 x WAIT after it. Counted at 1.7 x WAIT.
    window = started + 1.7 * WAIT
    until(lambda: min(proxy.queries()) >= 3, window - time.monotonic(), "the detectors asking again after a timeout")
    time.sleep(max(0.0, window - time.monotonic()))
    assert proxy.reads(services) == Counter(dict.fromkeys(services, 2))


def test_a_change_reads_only_the_service_it_concerns(watching: Watching, until: Until) -> None:
    # Right after start-up: the detectors' queries were narrowed before any read.
    proxy, services, writer = watching.proxy, watching.services, watching.writer
    assert proxy.reads(services) == Counter(dict.fromkeys(services, 1))
    # A change elsewhere in the datacenter moves both detectors' indexes.
    sent = proxy.queries()
    writer.register(dc.ServiceInstance(f"{services[0]}-other", "127.0.0.1", 5002, check=CHECK))
    until(lambda: min(map(int.__sub__, proxy.queries(), sent)) > 0, 10, "the detectors' answers")
    # Then one of a watched service. Its follow-up read a second later comes once the
    # reader has nothing else to read: any read the first change set off was sent.
    writer.register(dc.ServiceInstance(services[0], "127.0.0.1", 5003, check=CHECK))
    until(lambda: len(watching.watches[0].wait(timeout=10).instances) == 2, 10, "the new instance")
    until(lambda: proxy.reads(services)[services[0]] >= 3, 10, "the follow-up read")
    assert proxy.reads(services) == Counter({services[0]: 3}) + Counter(dict.fromkeys(services[1:], 1))
