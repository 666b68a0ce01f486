"""How often shared feeds read each service, counted by a proxy in front of a real
agent: once at start-up, then once per ``wait`` period while nothing changes.

The detectors' answers are held back a moment on their way to the backend, so reads
sent before a detector's first answer would show (they would have to be sent again:
such a read may predate a change that answer holds)."""

from __future__ import annotations

import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from discovery_consul.devagent import DevAgent
from discovery_consul.devproxy import CountingProxy, _Lines

import discovery_core as dc

pytestmark = [pytest.mark.consul, pytest.mark.timeout(60)]

WAIT = 3.0  # the backend's wait: resyncs every 0.9-1.0 of it, detectors answer after it
HELD = 0.3  # seconds each detector answer is held back
SERVICES = 6
DETECTORS = (b"/v1/health/state/any", b"/v1/catalog/services")


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


def reads(proxy: CountingProxy, services: list[str]) -> Counter[str]:
    counts = proxy.counts()
    return Counter({service: counts[f"GET /v1/health/service/{service}"] for service in services})


def test_each_shared_feed_reads_once_at_start_up_and_once_per_wait_at_idle(
    dev_agent: DevAgent, until: Callable[[Callable[[], bool], float, str], None]
) -> None:
    prefix = f"reads-{uuid.uuid4().hex[:6]}"
    services = [f"{prefix}-{n}" for n in range(SERVICES)]
    check = dc.TtlCheck(ttl=600, initial_status=dc.HealthStatus.PASSING)
    with dc.connect(f"consul://{dev_agent.address}") as writer:
        registrations = [writer.register(dc.ServiceInstance(s, "127.0.0.1", 5001, check=check)) for s in services]
        with (
            SlowDetectors(dev_agent.address) as proxy,
            dc.connect(f"consul://{proxy.address}?max_connections=5&wait={WAIT:g}s") as backend,
        ):
            watches = [backend.watch(service) for service in services]  # all shared
            for watch in watches:
                assert len(watch.wait(timeout=10).instances) == 1
            started = time.monotonic()
            # Counted past the follow-up a change would set off (1 s), before any resync.
            time.sleep(1.5)
            assert reads(proxy, services) == Counter(dict.fromkeys(services, 1))
            # Each detector's second query times out after WAIT, its index unmoved (its
            # third is then sent); each service's resync comes 0.9-1.0 x WAIT after its
            # read, the next at least 1.8 x WAIT after it. Counted at 1.7 x WAIT.
            window = started + 1.7 * WAIT
            detectors = [f"GET {path.decode()}" for path in DETECTORS]
            until(
                lambda: all(proxy.counts()[d] >= 3 for d in detectors),
                window - time.monotonic(),
                "the detectors asking again after a timed-out query",
            )
            time.sleep(max(0.0, window - time.monotonic()))
            assert reads(proxy, services) == Counter(dict.fromkeys(services, 2))
            for watch in watches:
                watch.close()
        for registration in registrations:
            registration.deregister()
