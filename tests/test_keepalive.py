"""The keepalive loop: one thread per backend, heartbeats, batched sweeps, restores.

``Observed`` is the real memory backend counting what the keepalive asks of it,
with a switch that makes it answer as a backend that is down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import pytest
from discovery_memory import MemoryBackend

import discovery_core as dc


class Observed(MemoryBackend):
    """The memory backend, counting heartbeats and sweeps; ``down`` fails every call."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.beats: dict[str, int] = {}
        self.sweeps: list[int] = []  # how many instances each sweep asked about
        self.lookups = 0  # per-instance _is_registered calls
        self.refused = 0  # calls made while down

    def _answer(self) -> None:
        if self.down:
            self.refused += 1
            raise dc.BackendUnavailable("connection refused", backend=self.name)

    def _heartbeat(self, instance_id: str) -> None:
        self._answer()
        super()._heartbeat(instance_id)
        self.beats[instance_id] = self.beats.get(instance_id, 0) + 1

    def registered(self, instances: Sequence[dc.ServiceInstance]) -> Mapping[str, dc.Presence]:
        self._answer()
        self.sweeps.append(len(instances))
        return super().registered(instances)

    def _is_registered(self, instance: dc.ServiceInstance) -> bool:
        self.lookups += 1
        return super()._is_registered(instance)

    def _add(self, instance: dc.ServiceInstance) -> None:
        self._answer()
        super()._add(instance)

    def poll(self, query: dc.Query, index: int, stop: dc.Stop) -> dc.Snapshot:
        self._answer()
        return super().poll(query, index, stop)

    def lose(self, instance_id: str) -> None:
        """Drop an instance behind the keepalive's back (a backend that lost its state)."""
        MemoryBackend.deregister(self, instance_id)


def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


def keepalive_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "discovery-keepalive"]


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[Observed]:
    """An ``Observed`` backend; ``@pytest.mark.tune(name=value)`` sets class attributes."""
    marker = request.node.get_closest_marker("tune")
    tuned = type("Tuned", (Observed,), dict(marker.kwargs) if marker else {})
    backend = tuned()
    yield backend
    backend.close()


def instances(n: int, service: str = "svc", check: dc.Check | None = None) -> list[dc.ServiceInstance]:
    return [dc.ServiceInstance(service, "127.0.0.1", 1000 + i, check=check) for i in range(n)]


def test_200_registrations_share_one_thread_which_ends_with_the_last(backend: Observed) -> None:
    before = threading.active_count()
    registrations = [backend.register(inst) for inst in instances(200)]
    assert threading.active_count() == before + 1
    assert len(keepalive_threads()) == 1
    for registration in registrations:
        registration.close()
    until(lambda: threading.active_count() == before, 5, "the keepalive thread ended with the last registration")
    backend.register(instances(1)[0])  # and starts again with the next
    assert len(keepalive_threads()) == 1
    backend.close()
    assert not keepalive_threads()


def test_heartbeats_keep_200_ttl_checks_passing(backend: Observed) -> None:
    ttl = dc.TtlCheck(ttl=0.9)
    insts = instances(200, check=ttl)
    expired: list[str] = []

    def follow(snapshot: dc.Snapshot) -> None:
        expired.extend(i for i in snapshot.health if snapshot.status(i) is not dc.HealthStatus.PASSING)

    registrations = [backend.register(inst) for inst in insts]  # each passes at once
    with backend.watch("svc", passing_only=False) as watch:
        until(lambda: watch.current is not None and len(watch.current.instances) == 200, 5, "all registered")
        watch.subscribe(follow)
        # Four more heartbeats each: more than a TTL has passed for every one.
        until(lambda: all(backend.beats.get(i.id, 0) >= 5 for i in insts), 10, "heartbeats at a third of the TTL")
    assert expired == []
    assert len(keepalive_threads()) == 1
    for registration in registrations:
        registration.close()


@pytest.mark.tune(keepalive_interval=0.05)
def test_one_sweep_asks_about_every_registration_through_the_default(backend: Observed) -> None:
    registrations = [backend.register(inst) for inst in instances(50)]
    until(lambda: len([n for n in backend.sweeps if n == 50]) >= 3, 10, "three sweeps of all 50")
    lookups = backend.lookups
    sweeps = list(backend.sweeps)
    # The default registered() asks _is_registered once per instance per sweep (one
    # sweep may be under way while they are read).
    assert sum(sweeps) - 50 <= lookups <= sum(sweeps)
    status = registrations[0].status()
    assert status.live
    assert status.catalog_visible is True
    assert status.last_verified is not None
    assert status.last_error is None


@pytest.mark.tune(keepalive_interval=0.05)
def test_a_lost_instance_comes_back_at_the_next_sweep(backend: Observed, caplog: pytest.LogCaptureFixture) -> None:
    inst = dc.ServiceInstance("svc", "127.0.0.1", 1, check=dc.TtlCheck(ttl=30))
    with caplog.at_level(logging.INFO, "discovery_core.registry"), backend.register(inst) as registration:
        backend.lose(inst.id)
        until(lambda: "is registered again" in caplog.text, 5, "restored and confirmed")
        assert backend.instances("svc").instances == (inst,)  # passing: heartbeat sent with the restore
        assert registration.status().catalog_visible is True
    assert "was missing from memory: adding it again" in caplog.text
    assert not backend._is_registered(inst)  # closing still deregisters


@pytest.mark.tune(keepalive_interval=3600, keepalive_retry_cap=0.2)  # only the fast path can restore in time
def test_after_an_outage_it_retries_fast_and_restores_without_waiting_the_interval(
    backend: Observed, caplog: pytest.LogCaptureFixture
) -> None:
    inst = dc.ServiceInstance("svc", "127.0.0.1", 1, check=dc.TtlCheck(ttl=0.6))
    with caplog.at_level(logging.INFO, "discovery_core.registry"), backend.register(inst) as registration:
        backend.down = True
        backend.lose(inst.id)
        until(lambda: registration.status().last_error is not None, 5, "a failed heartbeat noted")
        until(lambda: backend.refused >= 4, 5, "retries on the fast cadence")
        backend.down = False
        until(lambda: backend._is_registered(inst), 5, "restored by a fast retry")
        until(lambda: registration.status().last_error is None, 5, "the error cleared")
    assert caplog.text.count("retrying") == 1  # one warning per outage
    assert "works again" in caplog.text


# Neither the idle nor the retry cadence can restore in time; the watch's backoff is short.
@pytest.mark.tune(keepalive_interval=3600, keepalive_retry_base=3600, keepalive_retry_cap=3600, retry_cap=0.05)
def test_a_watch_that_sees_the_backend_again_sweeps_at_once(backend: Observed) -> None:
    inst = dc.ServiceInstance("kept", "127.0.0.1", 1)
    with backend.register(inst) as registration, backend.watch("other") as watch:
        until(lambda: registration.status().last_verified is not None, 5, "the first sweep")
        until(lambda: watch.current is not None, 5, "the watch's first snapshot")
        backend.down = True
        MemoryBackend._add(backend, dc.ServiceInstance("other", "127.0.0.1", 2))  # ends the blocking poll
        until(lambda: watch.current is not None and watch.current.stale, 5, "the watch sees the outage")
        backend.lose(inst.id)
        backend.down = False
        until(lambda: backend._is_registered(inst), 5, "restored when the watch recovered")


@pytest.mark.tune(keepalive_interval=3600)
def test_a_watch_that_sees_one_of_ours_leave_sweeps_at_once(backend: Observed) -> None:
    inst = dc.ServiceInstance("svc", "127.0.0.1", 1)
    with backend.register(inst) as registration, backend.watch("svc") as watch:
        until(lambda: registration.status().last_verified is not None, 5, "the first sweep")
        until(lambda: watch.current is not None and len(watch.current.instances) == 1, 5, "registered")
        backend.lose(inst.id)
        until(lambda: backend._is_registered(inst), 5, "restored")


class Unpublished(MemoryBackend):
    """Holds everything but publishes nothing, as an agent that cannot sync."""

    sync_grace = 0.1
    keepalive_retry_cap = 0.05
    keepalive_interval = 0.05
    publish = False

    def registered(self, instances: Sequence[dc.ServiceInstance]) -> Mapping[str, dc.Presence]:
        return {
            i.id: dc.Presence(held=True, visible=self.publish, cause="the test's agent cannot sync") for i in instances
        }


def test_an_instance_held_but_not_visible_warns_once_and_clears_once(caplog: pytest.LogCaptureFixture) -> None:
    inst = dc.ServiceInstance("svc", "127.0.0.1", 1)
    with Unpublished() as backend, caplog.at_level(logging.INFO, "discovery_core.registry"):
        registration = backend.register(inst)
        until(lambda: "not visible to clients" in caplog.text, 5, "the warning")
        assert registration.status().catalog_visible is False
        sweeps_after_warning = registration.status().last_verified
        until(lambda: registration.status().last_verified != sweeps_after_warning, 5, "another sweep")
        backend.publish = True
        until(lambda: "visible to clients again" in caplog.text, 5, "the all-clear")
        assert registration.status().catalog_visible is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "the test's agent cannot sync" in warnings[0].getMessage()
    assert "registered again" not in caplog.text


def test_presence_cannot_be_visible_without_being_held() -> None:
    with pytest.raises(ValueError, match="cannot be visible"):
        dc.Presence(held=False, visible=True)


def test_status_of_a_closed_or_unkept_registration(backend: Observed) -> None:
    a, b = instances(2)
    kept = backend.register(a)
    unkept = backend.register(b, keepalive=False)
    assert unkept.status() == dc.RegistrationStatus(b.id, "svc", live=False)
    kept.close()
    assert not kept.status().live
