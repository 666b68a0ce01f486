"""The shared feed: index rules, staleness and backoff, rate limiting, dedupe.

``ScriptedBackend`` is a real backend whose poll answers from a script, so the
feed's reactions to index resets and outages can be produced on demand.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

import pytest

import discovery_core as dc

A = dc.ServiceInstance("svc", "127.0.0.1", 1, id="a")
B = dc.ServiceInstance("svc", "127.0.0.1", 2, id="b")


class ScriptedBackend(dc.Backend):
    """Answers each poll with the next scripted outcome, then blocks until stopped."""

    name = "scripted"
    retry_base = 0.01
    retry_cap = 0.02

    def __init__(self, *outcomes: dc.Snapshot | Exception) -> None:
        super().__init__()
        self.outcomes = list(outcomes)
        self.indexes: list[int] = []
        self.exhausted = threading.Event()
        self.go = threading.Event()  # the first poll waits for it: subscribers come first

    def poll(self, query: dc.Query, index: int, stop: dc.Stop) -> dc.Snapshot:
        self.go.wait(5)
        self.indexes.append(index)
        if not self.outcomes:
            self.exhausted.set()
            stop.wait(30)
            return dc.Snapshot(query.service, index=index)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _add(self, instance: dc.ServiceInstance) -> None:
        raise NotImplementedError

    def deregister(self, instance_id: str) -> None:
        raise NotImplementedError

    def _heartbeat(self, instance_id: str) -> None:
        raise NotImplementedError

    def _is_registered(self, instance: dc.ServiceInstance) -> bool:
        raise NotImplementedError


def snap(index: int, *instances: dc.ServiceInstance) -> dc.Snapshot:
    return dc.Snapshot("svc", instances, index=index)


def follow(backend: ScriptedBackend) -> Iterator[list[dc.Snapshot]]:
    received: list[dc.Snapshot] = []
    with backend, backend.watch("svc") as watch:
        watch.subscribe(received.append)
        backend.go.set()
        assert backend.exhausted.wait(5)
        yield received


def test_index_resets_to_zero_when_it_goes_backwards_and_never_below_one() -> None:
    backend = ScriptedBackend(snap(0), snap(5, A), snap(3, A), snap(7, A, B))
    for _ in follow(backend):
        pass
    assert backend.indexes[:5] == [0, 1, 5, 0, 7]


def test_outage_serves_the_last_set_stale_logs_once_and_resumes(caplog: pytest.LogCaptureFixture) -> None:
    down = dc.BackendUnavailable("agent at 127.0.0.1:1 refused the connection")
    backend = ScriptedBackend(snap(2, A), down, down, down, snap(3, A))
    with caplog.at_level(logging.INFO, logger="discovery_core.watch"):
        for received in follow(backend):
            assert [(s.stale, len(s.instances)) for s in received] == [(False, 1), (True, 1), (False, 1)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "refused" in warnings[0].getMessage()


def test_unchanged_content_is_delivered_once_and_index_stays_monotonic() -> None:
    backend = ScriptedBackend(snap(4, A), snap(5, A), snap(2, A, B))
    for received in follow(backend):
        assert [len(s.instances) for s in received] == [1, 2]
        assert received[1].index > received[0].index


def test_wait_reports_the_backend_error_when_nothing_ever_arrived() -> None:
    backend = ScriptedBackend(*[dc.BackendUnavailable("down")] * 1000)
    backend.go.set()
    with backend, backend.watch("svc") as watch, pytest.raises(dc.BackendUnavailable):
        watch.wait(timeout=0.5)


def test_a_raising_subscriber_does_not_stop_the_others() -> None:
    backend = ScriptedBackend(snap(2, A), snap(3, A, B))
    got: list[int] = []

    def broken(snapshot: dc.Snapshot) -> None:
        raise RuntimeError("subscriber bug")

    with backend, backend.watch("svc") as watch:
        watch.subscribe(broken)
        watch.subscribe(lambda s: got.append(len(s.instances)))
        backend.go.set()
        assert backend.exhausted.wait(5)
    assert got[-1] == 2


class SpinningBackend(ScriptedBackend):
    """A broken feed that answers at once with new content every time."""

    poll_rate = 20.0
    poll_burst = 5

    def poll(self, query: dc.Query, index: int, stop: dc.Stop) -> dc.Snapshot:
        self.indexes.append(index)
        return dc.Snapshot(query.service, (dc.ServiceInstance("svc", "127.0.0.1", len(self.indexes)),), index=index + 1)


def test_token_bucket_bounds_a_spinning_feed() -> None:
    backend = SpinningBackend()
    with backend:
        started = time.monotonic()
        watch = backend.watch("svc")
        deadline = started + 0.5
        while time.monotonic() < deadline:
            watch.wait(timeout=1)
        watch.close()
        elapsed = time.monotonic() - started
    assert len(backend.indexes) <= SpinningBackend.poll_burst + SpinningBackend.poll_rate * elapsed + 1


def test_async_wait_times_out_with_timeout_error() -> None:
    backend = ScriptedBackend(snap(2, A))
    backend.go.set()

    async def main() -> None:
        with backend, backend.watch("svc") as watch:
            assert len((await watch.wait_async(timeout=5)).instances) == 1
            with pytest.raises(TimeoutError):
                await watch.wait_async(timeout=0.1)

    asyncio.run(main())
