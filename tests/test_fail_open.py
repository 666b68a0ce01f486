"""Fail-open: when the registry's healthy set collapses while the instances still
answer SERVING on their own health streams, the channel keeps calling them.

The fleet serves on one memory backend; the channel follows a second one where the
same instances are registered with TTL checks this test heartbeats by hand, so the
registry can be made to call every instance critical while every server is up (what
a failed or partitioned Consul agent looks like to a client).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
from discovery_examples.addservice.fleet import Fleet, Load, wait_until

import discovery_core as dc

pytestmark = pytest.mark.timeout(60)

TTL = 0.5


class Registry:
    """The channel's view: the fleet's instances with heartbeated TTL checks."""

    def __init__(self, fleet: Fleet) -> None:
        self.backend = dc.connect("memory://")
        self.fleet = fleet
        self.beating = threading.Event()
        self.beating.set()
        self._stop = threading.Event()
        self.ids: list[str] = []
        self.registrations: list[dc.Registration] = []
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def start(self, count: int) -> Registry:
        for _ in range(count):
            served = self.fleet.start().served.instance
            check = dc.TtlCheck(ttl=TTL, initial_status=dc.HealthStatus.PASSING)
            inst = dc.ServiceInstance(served.name, served.address, served.port, id=served.id, check=check)
            self.registrations.append(self.backend.register(inst, keepalive=False))
            self.ids.append(inst.id)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(TTL / 4):
            if self.beating.is_set():
                for registration in self.registrations:
                    registration.heartbeat()

    def critical(self) -> int:
        snapshot = self.backend.instances("add", passing_only=False)
        return sum(snapshot.health.get(i) is dc.HealthStatus.CRITICAL for i in self.ids)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.backend.close()


@pytest.fixture
def serving() -> Iterator[dc.Backend]:
    with dc.connect("memory://") as backend:
        yield backend


@pytest.fixture
def fleet(serving: dc.Backend) -> Iterator[Fleet]:
    fleet = Fleet(serving, drain=0.3, grace=2.0)
    yield fleet
    fleet.close()


@pytest.fixture
def registry(fleet: Fleet) -> Iterator[Registry]:
    registry = Registry(fleet).start(3)
    yield registry
    registry.close()


def _collapse(registry: Registry, channel: dc.DiscoveryChannel, load: Load) -> float:
    assert wait_until(lambda: len(load.counts()) == 3, 10), "traffic never reached all three"
    registry.beating.clear()
    assert wait_until(lambda: registry.critical() == 3, 10), "the registry never called them critical"
    return time.monotonic()


def test_a_collapsed_registry_keeps_traffic_on_instances_that_serve(
    registry: Registry, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="discovery_core.channel")
    with dc.discovery_channel(registry.backend, "add") as channel:
        load = Load(channel, threads=3).start()
        try:
            collapsed = _collapse(registry, channel, load)
            assert wait_until(lambda: channel.fail_open_since is not None, 5)
            time.sleep(1.0)  # traffic during the collapse is what is measured
            assert len(load.counts(since=collapsed + 0.2)) == 3  # still spread over all three
            # In fail-open an instance's own health stream still decides: NOT_SERVING leaves.
            flipped = fleet.instances[0]
            fleet.flip(flipped, False)
            since = time.monotonic()
            assert load.wait_for("leave", flipped.id, since=since, timeout=5)
            registry.beating.set()  # the registry recovers: fail-open ends
            assert wait_until(lambda: channel.fail_open_since is None, 5)
        finally:
            load.stop()
    assert load.failures() == 0
    entered = [r for r in caplog.records if "failing open" in r.getMessage()]
    left = [r for r in caplog.records if "fail-open ends" in r.getMessage()]
    assert [r.levelno for r in entered] == [logging.WARNING]
    assert [r.levelno for r in left] == [logging.INFO]


def test_without_fail_open_the_same_collapse_fails_calls(registry: Registry) -> None:
    with dc.discovery_channel(registry.backend, "add", panic_threshold=0) as channel:
        load = Load(channel, threads=3).start()
        try:
            _collapse(registry, channel, load)
            assert wait_until(lambda: load.failures() > 0, 5)
        finally:
            load.stop()
    assert channel.fail_open_since is None


def test_fail_open_without_health_checking_keeps_the_last_known_set(registry: Registry) -> None:
    with dc.discovery_channel(registry.backend, "add", health_check=False) as channel:
        load = Load(channel, threads=2).start()
        try:
            collapsed = _collapse(registry, channel, load)
            assert wait_until(lambda: channel.fail_open_since is not None, 5)
            time.sleep(0.5)
            assert len(load.counts(since=collapsed + 0.2)) == 3
        finally:
            load.stop()
    assert load.failures() == 0


def test_graceful_drains_are_no_collapse(serving: dc.Backend, fleet: Fleet) -> None:
    # A rolling restart: each instance leaves the registry before it stops serving.
    with dc.discovery_channel(serving, "add") as channel:
        for _ in range(3):
            fleet.start()
        load = Load(channel, threads=3).start()
        try:
            assert wait_until(lambda: len(load.counts()) == 3, 10)
            for old in list(fleet.instances):
                fleet.start()
                fleet.drain(old)
                assert channel.fail_open_since is None
        finally:
            load.stop()
    assert load.failures() == 0


@pytest.mark.parametrize("threshold", [-0.1, 1.5, "half", True])
def test_a_bad_panic_threshold_is_refused_before_anything_starts(threshold: object) -> None:
    with dc.connect("memory://") as backend:
        with pytest.raises(dc.InvalidConfig, match="panic_threshold"):
            dc.discovery_channel(backend, "add", panic_threshold=threshold)  # type: ignore[arg-type]
        assert not [t for t in threading.enumerate() if t.name.startswith("discovery-watch")]
