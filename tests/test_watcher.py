"""The shared feed: index rules, staleness and backoff, rate limiting, dedupe.

``ScriptedBackend`` is a real backend whose poll answers from a script, so the
feed's reactions to index resets and outages can be produced on demand.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator

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
            with pytest.raises(dc.WatchTimeout):
                await watch.wait_async(timeout=0.1)

    asyncio.run(main())


def raised_within(seconds: float, call: Callable[[], object]) -> BaseException:
    """What ``call`` raised, run on a thread that must end within ``seconds`` (a hang
    fails the test instead of blocking it)."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    assert outcome, "returned instead of raising"
    return outcome[0]


DENIED = dc.PermissionDenied("Consul at http://127.0.0.1:1 denied the request: ACL not found")
UNREACHABLE = dc.BackendUnavailable("Consul at http://127.0.0.1:1 is unreachable: connection refused")


@pytest.mark.parametrize("timeout", [None, 60.0])
@pytest.mark.parametrize("error", [DENIED, dc.DiscoveryError("Consul at x failed: No path to datacenter")])
def test_wait_raises_a_permanent_error_before_the_first_snapshot_at_once(
    error: dc.DiscoveryError, timeout: float | None
) -> None:
    backend = ScriptedBackend(*[error] * 1000)
    backend.go.set()
    with backend, backend.watch("svc") as watch:
        raised = raised_within(10, lambda: watch.wait(timeout=timeout))
    assert type(raised) is type(error)
    assert str(raised) == str(error)


class Impatient(ScriptedBackend):
    first_snapshot_patience = 0.3


@pytest.mark.parametrize("timeout", [None, 60.0])
def test_wait_gives_up_on_an_unreachable_backend_after_the_patience_not_the_timeout(timeout: float | None) -> None:
    backend = Impatient(*[UNREACHABLE] * 10_000)
    backend.go.set()
    with backend, backend.watch("svc") as watch:
        raised = raised_within(10, lambda: watch.wait(timeout=timeout))
    assert isinstance(raised, dc.BackendUnavailable)
    assert "no snapshot of 'svc'" in str(raised)
    assert "connection refused" in str(raised)
    assert raised.__cause__ is not None


def test_after_the_first_snapshot_a_failing_backend_means_stale_sets_not_errors() -> None:
    backend = Impatient(snap(2, A), *[DENIED] * 10_000)
    backend.go.set()
    with backend, backend.watch("svc") as watch:
        first = watch.wait(timeout=5)  # fresh, or already stale (a slow reader sees the latest)
        assert [i.id for i in first.instances] == ["a"]
        assert (first if first.stale else watch.wait(timeout=5)).stale
        assert watch.error is not None
        assert "ACL not found" in str(watch.error)
        with pytest.raises(dc.WatchTimeout):
            watch.wait(timeout=0.5)  # past the patience: no error raised, the set stays


def test_the_outage_log_says_no_set_is_served_when_there_is_none(caplog: pytest.LogCaptureFixture) -> None:
    backend = ScriptedBackend(UNREACHABLE, snap(2, A))
    with caplog.at_level(logging.WARNING, logger="discovery_core.watch"):
        for _ in follow(backend):
            pass
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "last known set" not in warning
    assert "no snapshot yet" in warning


class SelfDriven(Impatient):
    """A backend that drives its feeds itself (no poll thread), with ``Feed.fail``."""

    def __init__(self, error: dc.DiscoveryError) -> None:
        super().__init__()
        self.error = error

    def start_feed(self, feed: dc.Feed) -> None:
        threading.Timer(0.05, feed.fail, args=(self.error,)).start()


@pytest.mark.parametrize("error", [DENIED, UNREACHABLE])
def test_feeds_a_backend_drives_itself_give_up_the_same_way(error: dc.DiscoveryError) -> None:
    with SelfDriven(error) as backend, backend.watch("svc") as watch:
        raised = raised_within(10, watch.wait)
    assert type(raised) is type(error)
    assert str(error) in str(raised)


def test_wait_timeout_is_a_discovery_error_and_a_timeout_error() -> None:
    backend = ScriptedBackend(snap(2, A))
    backend.go.set()
    with backend, backend.watch("svc") as watch:
        watch.wait(timeout=5)
        with pytest.raises(dc.WatchTimeout) as raised:
            watch.wait(timeout=0.1)
    assert isinstance(raised.value, dc.DiscoveryError)
    assert isinstance(raised.value, TimeoutError)
    assert raised.value.service == "svc"
