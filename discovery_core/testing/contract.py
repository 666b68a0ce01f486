"""The backend contract: one set of behaviours every backend must show.

A backend's test module is a short subclass::

    from discovery_core.testing import BackendContract, ContractTiming

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def make_backend(self):
            return lambda: discovery_core.connect("mine://...")

        @pytest.fixture
        def timing(self):          # optional: the backend's own time scales
            return ContractTiming(check_interval=1.0, deregister_after=60.0, reap=100.0)

Each test works on its own service name, so tests never see each other's instances
and a shared backend store (a Consul agent) needs no cleaning between them.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from grpc_health.v1 import health_pb2

from discovery_core import (
    Backend,
    ClosedError,
    GrpcCheck,
    HealthStatus,
    InvalidInstance,
    ServiceInstance,
    Snapshot,
    TtlCheck,
    Watch,
)
from discovery_core.testing.health_server import HealthServer
from discovery_core.testing.invalid import invalid_instances

__all__ = ["BackendContract", "ContractTiming"]


@dataclass(frozen=True)
class ContractTiming:
    """A backend's time scales, in seconds.

    ``check_interval``: the probe interval the tests ask for (Consul's minimum is 1).
    ``ttl``: the TTL of TTL checks. ``deregister_after``: the smallest the backend
    honours (Consul: 60). ``settle``: the longest a change may take to show in a
    watch. ``reap``: the longest an instance critical past ``deregister_after`` may
    take to disappear (Consul reaps every 30 s).
    """

    check_interval: float = 0.2
    ttl: float = 1.0
    deregister_after: float = 1.0
    settle: float = 5.0
    reap: float = 5.0


def _until(watch: Watch, predicate: Callable[[Snapshot], bool], timeout: float) -> Snapshot:
    """The first snapshot of ``watch`` that satisfies ``predicate``, within ``timeout``."""
    deadline = time.monotonic() + timeout
    seen: Snapshot | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no snapshot matched within {timeout} s; last seen: {seen}")
        try:
            seen = watch.wait(timeout=remaining)
        except TimeoutError:
            continue
        if predicate(seen):
            return seen


def _ids(snapshot: Snapshot) -> set[str]:
    return {inst.id for inst in snapshot.instances}


def _thread_count_returns_to(baseline: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline:
        if time.monotonic() > deadline:
            names = sorted(t.name for t in threading.enumerate())
            raise AssertionError(f"{threading.active_count()} threads, expected {baseline}: {names}")
        time.sleep(0.02)


class BackendContract:
    """The behaviours; a backend supplies ``make_backend`` (and maybe ``timing``)."""

    @pytest.fixture
    def make_backend(self) -> Callable[[], Backend]:
        raise NotImplementedError("a backend's contract test class must provide the make_backend fixture")

    @pytest.fixture
    def timing(self) -> ContractTiming:
        return ContractTiming()

    @pytest.fixture
    def shared_store(self) -> bool:
        """Capability: two objects from ``make_backend`` see the same registrations."""
        return True

    @pytest.fixture
    def backend(self, make_backend: Callable[[], Backend]) -> Iterator[Backend]:
        backend = make_backend()
        yield backend
        backend.close()

    @pytest.fixture
    def service(self) -> str:
        return f"contract-{uuid.uuid4().hex[:12]}"

    @pytest.fixture
    def health_server(self) -> Iterator[HealthServer]:
        with HealthServer() as server:
            yield server

    # -- registry ---------------------------------------------------------------------

    def test_register_then_instances_round_trips_every_field(self, backend: Backend, service: str) -> None:
        inst = ServiceInstance(service, "127.0.0.1", 5001, tags=("v1", "blue"), meta={"zone": "a"}, weight=3)
        with backend.register(inst):
            snapshot = backend.instances(service)
            assert snapshot.service == service
            assert _fields(snapshot.instances) == _fields((inst,))
            assert snapshot.status(inst.id) is HealthStatus.PASSING

    def test_register_is_idempotent_and_replaces(self, backend: Backend, service: str) -> None:
        first = ServiceInstance(service, "127.0.0.1", 5001, id=f"{service}-1", tags=("old",))
        second = ServiceInstance(service, "127.0.0.1", 5002, id=f"{service}-1", tags=("new",))
        backend.register(first)
        backend.register(first)
        with backend.register(second):
            (only,) = backend.instances(service).instances
            assert (only.id, only.port, only.tags) == (second.id, 5002, ("new",))

    def test_deregister_of_unknown_id_is_not_an_error(self, backend: Backend, service: str) -> None:
        backend.deregister(f"{service}-never-registered")
        assert backend.instances(service, passing_only=False).instances == ()

    def test_registration_context_manager_deregisters(self, backend: Backend, service: str) -> None:
        with backend.register(ServiceInstance(service, "127.0.0.1", 5001)) as registration:
            assert backend.instances(service).instances
        assert registration.closed
        assert backend.instances(service, passing_only=False).instances == ()

    def test_live_registration_restores_an_instance_the_backend_lost(
        self, backend: Backend, service: str, timing: ContractTiming
    ) -> None:
        inst = ServiceInstance(service, "127.0.0.1", 5001)
        lost, back = threading.Event(), threading.Event()

        def follow(snapshot: Snapshot) -> None:  # every delivery: a reader could miss the gap
            if inst.id not in _ids(snapshot):
                lost.set()
            elif lost.is_set():
                back.set()

        with backend.register(inst), backend.watch(service) as watch:
            _until(watch, lambda s: inst.id in _ids(s), timing.settle)
            watch.subscribe(follow)
            backend.deregister(inst.id)  # as if the backend lost its state behind our back
            assert lost.wait(timing.settle), "the watch never showed the instance gone"
            # The keepalive sweeps when a watch sees one of its instances leave; at
            # the latest at its next idle sweep.
            assert back.wait(timing.settle + backend.keepalive_interval), "the registration did not restore it"

    # -- watch ------------------------------------------------------------------------

    def test_watch_delivers_current_set_first(self, backend: Backend, service: str, timing: ContractTiming) -> None:
        inst = ServiceInstance(service, "127.0.0.1", 5001)
        with backend.register(inst), backend.watch(service) as watch:
            assert _ids(watch.wait(timeout=timing.settle)) == {inst.id}

    def test_watch_follows_register_and_deregister_down_to_empty(
        self, backend: Backend, service: str, timing: ContractTiming
    ) -> None:
        a = ServiceInstance(service, "127.0.0.1", 5001)
        b = ServiceInstance(service, "127.0.0.1", 5002)
        with backend.watch(service) as watch:
            first = watch.wait(timeout=timing.settle)
            assert first.instances == ()
            reg_a = backend.register(a)
            _until(watch, lambda s: _ids(s) == {a.id}, timing.settle)
            reg_b = backend.register(b)
            _until(watch, lambda s: _ids(s) == {a.id, b.id}, timing.settle)
            reg_a.deregister()
            _until(watch, lambda s: _ids(s) == {b.id}, timing.settle)
            reg_b.deregister()
            last = _until(watch, lambda s: not s.instances, timing.settle)
            assert last.index > first.index
            assert not last.stale

    def test_a_feed_return_that_changes_nothing_delivers_nothing(
        self, backend: Backend, service: str, timing: ContractTiming
    ) -> None:
        inst = ServiceInstance(service, "127.0.0.1", 5001)
        other = ServiceInstance(service, "127.0.0.1", 5002, check=TtlCheck(ttl=timing.ttl * 10))
        with backend.register(inst), backend.watch(service) as watch:
            _until(watch, lambda s: _ids(s) == {inst.id}, timing.settle)
            backend._add(inst)  # same content again
            backend._add(other)  # starts critical: not in the passing set
            backend.deregister(other.id)
            with pytest.raises(TimeoutError):
                watch.wait(timeout=min(timing.settle, 2.0))
        backend.deregister(other.id)

    def test_slow_reader_gets_the_latest_set_not_a_backlog(
        self, backend: Backend, service: str, timing: ContractTiming
    ) -> None:
        instances = [ServiceInstance(service, "127.0.0.1", 5001 + n) for n in range(5)]
        with backend.watch(service) as watch:
            watch.wait(timeout=timing.settle)
            everything = threading.Event()
            watch.subscribe(lambda s: everything.set() if len(s.instances) == 5 else None)
            registrations = [backend.register(inst) for inst in instances]
            assert everything.wait(timing.settle)
            assert len(watch.wait(timeout=timing.settle).instances) == 5
            with pytest.raises(TimeoutError):
                watch.wait(timeout=0.3)
            for registration in registrations:
                registration.deregister()

    def test_subscribe_replays_current_and_unsubscribe_stops(
        self, backend: Backend, service: str, timing: ContractTiming
    ) -> None:
        inst = ServiceInstance(service, "127.0.0.1", 5001)
        with backend.register(inst), backend.watch(service) as watch:
            _until(watch, lambda s: inst.id in _ids(s), timing.settle)
            received: list[Snapshot] = []
            unsubscribe = watch.subscribe(received.append)
            assert [_ids(s) for s in received] == [{inst.id}]  # replayed at once, in this thread
            unsubscribe()
            other = ServiceInstance(service, "127.0.0.1", 5002)
            with backend.register(other):  # a change the unsubscribed callback must not see
                _until(watch, lambda s: other.id in _ids(s), timing.settle)
            assert len(received) == 1

    def test_closed_watch_ends_iteration_and_refuses_use(self, backend: Backend, service: str) -> None:
        watch = backend.watch(service)
        reading = threading.Event()

        def read() -> None:
            for _ in watch:
                reading.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert reading.wait(5)
        watch.close()
        reader.join(timeout=5)
        assert not reader.is_alive()
        with pytest.raises(ClosedError):
            watch.wait(timeout=1)
        with pytest.raises(ClosedError):
            watch.subscribe(lambda s: None)

    def test_async_for_delivers_changes(self, backend: Backend, service: str, timing: ContractTiming) -> None:
        inst = ServiceInstance(service, "127.0.0.1", 5001)

        async def follow() -> list[set[str]]:
            seen: list[set[str]] = []
            with backend.watch(service) as watch:
                async for snapshot in watch:
                    seen.append(_ids(snapshot))
                    if not snapshot.instances and len(seen) == 1:
                        await asyncio.to_thread(backend.register, inst)
                    elif snapshot.instances:
                        return seen
            return seen

        try:
            assert asyncio.run(asyncio.wait_for(follow(), timing.settle))[-1] == {inst.id}
        finally:
            backend.deregister(inst.id)

    def test_tag_filter(self, backend: Backend, service: str, timing: ContractTiming) -> None:
        v1 = ServiceInstance(service, "127.0.0.1", 5001, tags=("v1", "blue"))
        v2 = ServiceInstance(service, "127.0.0.1", 5002, tags=("v2", "blue"))
        with backend.register(v1), backend.register(v2):
            assert _ids(backend.instances(service, tags=("v1",))) == {v1.id}
            assert _ids(backend.instances(service, tags=("blue",))) == {v1.id, v2.id}
            assert _ids(backend.instances(service, tags=("v1", "v2"))) == set()
            with backend.watch(service, tags=("v2",)) as watch:
                assert _ids(watch.wait(timeout=timing.settle)) == {v2.id}

    def test_meta_filter(self, backend: Backend, service: str, timing: ContractTiming) -> None:
        a = ServiceInstance(service, "127.0.0.1", 5001, meta={"zone": "a", "tier": "web"})
        b = ServiceInstance(service, "127.0.0.1", 5002, meta={"zone": "b", "tier": "web"})
        with backend.register(a), backend.register(b):
            assert _ids(backend.instances(service, meta={"zone": "a"})) == {a.id}
            assert _ids(backend.instances(service, meta={"tier": "web"})) == {a.id, b.id}
            with backend.watch(service, meta={"zone": "b", "tier": "web"}) as watch:
                assert _ids(watch.wait(timeout=timing.settle)) == {b.id}

    # -- health -----------------------------------------------------------------------

    def test_grpc_checked_instance_leaves_and_rejoins_the_passing_set(
        self, backend: Backend, service: str, timing: ContractTiming, health_server: HealthServer
    ) -> None:
        check = GrpcCheck(service=service, interval=timing.check_interval, timeout=1.0)
        inst = ServiceInstance(service, "127.0.0.1", health_server.port, check=check)
        health_server.set(service, health_pb2.HealthCheckResponse.SERVING)
        settle = timing.settle + 2 * timing.check_interval
        with backend.register(inst), backend.watch(service) as watch:
            _until(watch, lambda s: _ids(s) == {inst.id}, settle)
            health_server.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            _until(watch, lambda s: not s.instances, settle)
            everything = backend.instances(service, passing_only=False)
            assert everything.status(inst.id) is HealthStatus.CRITICAL
            health_server.set(service, health_pb2.HealthCheckResponse.SERVING)
            _until(watch, lambda s: _ids(s) == {inst.id}, settle)

    def test_ttl_check_expires_without_heartbeats(self, backend: Backend, service: str, timing: ContractTiming) -> None:
        inst = ServiceInstance(service, "127.0.0.1", 5001, check=TtlCheck(ttl=timing.ttl))
        registration = backend.register(inst, keepalive=False)
        try:
            with backend.watch(service) as watch:
                assert watch.wait(timeout=timing.settle).instances == ()  # critical until the first beat
                registration.heartbeat()
                _until(watch, lambda s: _ids(s) == {inst.id}, timing.settle)
                _until(watch, lambda s: not s.instances, timing.ttl + timing.settle)
            assert backend.instances(service, passing_only=False).status(inst.id) is HealthStatus.CRITICAL
        finally:
            registration.deregister()

    def test_live_registration_heartbeats_its_ttl(self, backend: Backend, service: str, timing: ContractTiming) -> None:
        inst = ServiceInstance(service, "127.0.0.1", 5001, check=TtlCheck(ttl=timing.ttl))
        with backend.register(inst), backend.watch(service) as watch:
            _until(watch, lambda s: _ids(s) == {inst.id}, timing.settle)
            # Across three TTLs the instance never leaves the passing set.
            dropped = threading.Event()
            watch.subscribe(lambda s: dropped.set() if inst.id not in _ids(s) else None)
            assert not dropped.wait(3 * timing.ttl)

    def test_deregister_after_reaps_a_critical_instance(
        self, backend: Backend, service: str, timing: ContractTiming
    ) -> None:
        check = TtlCheck(ttl=timing.ttl, deregister_after=timing.deregister_after)
        inst = ServiceInstance(service, "127.0.0.1", 5001, check=check)
        backend.register(inst, keepalive=False)  # a process that died: nobody heartbeats
        try:
            with backend.watch(service, passing_only=False) as watch:
                _until(watch, lambda s: inst.id in _ids(s), timing.settle)
                _until(watch, lambda s: inst.id not in _ids(s), timing.deregister_after + timing.reap)
        finally:
            backend.deregister(inst.id)

    def test_passing_only_false_shows_every_instance_with_its_health(
        self, backend: Backend, service: str, timing: ContractTiming
    ) -> None:
        up = ServiceInstance(service, "127.0.0.1", 5001)
        down = ServiceInstance(service, "127.0.0.1", 5002, check=TtlCheck(ttl=timing.ttl * 10))
        with backend.register(up), backend.register(down, keepalive=False):
            everything = backend.instances(service, passing_only=False)
            assert _ids(everything) == {up.id, down.id}
            assert everything.status(down.id) is HealthStatus.CRITICAL
            assert _ids(backend.instances(service)) == {up.id}

    # -- resources --------------------------------------------------------------------

    def test_hundred_watches_of_one_service_share_one_feed(
        self, backend: Backend, service: str, timing: ContractTiming
    ) -> None:
        first = backend.watch(service)
        first.wait(timeout=timing.settle)
        baseline = threading.active_count()
        watches = [backend.watch(service) for _ in range(99)]
        try:
            assert threading.active_count() == baseline
            inst = ServiceInstance(service, "127.0.0.1", 5001)
            with backend.register(inst):
                for watch in [first, *watches]:
                    _until(watch, lambda s: _ids(s) == {inst.id}, timing.settle)
        finally:
            for watch in [first, *watches]:
                watch.close()

    def test_closing_watches_and_backend_releases_threads(
        self, make_backend: Callable[[], Backend], service: str, timing: ContractTiming
    ) -> None:
        baseline = threading.active_count()
        backend = make_backend()
        watches = [backend.watch(f"{service}-{n}") for n in range(3)]
        for watch in watches:
            watch.wait(timeout=timing.settle)
        registration = backend.register(ServiceInstance(service, "127.0.0.1", 5001, check=TtlCheck(ttl=timing.ttl)))
        for watch in watches:
            watch.close()
        backend.close()
        assert registration.closed
        _thread_count_returns_to(baseline, timeout=timing.settle)
        with pytest.raises(ClosedError):
            backend.watch(service)

    def test_close_deregisters_live_registrations(
        self, make_backend: Callable[[], Backend], backend: Backend, service: str, shared_store: bool
    ) -> None:
        other = make_backend()
        registration = other.register(ServiceInstance(service, "127.0.0.1", 5001))
        if shared_store:
            assert backend.instances(service).instances
        other.close()
        assert registration.closed
        if shared_store:
            assert backend.instances(service, passing_only=False).instances == ()

    def test_close_leaves_write_once_registrations_to_their_checks(
        self,
        make_backend: Callable[[], Backend],
        backend: Backend,
        service: str,
        shared_store: bool,
        timing: ContractTiming,
    ) -> None:
        check = TtlCheck(ttl=timing.ttl, deregister_after=timing.deregister_after)
        inst = ServiceInstance(service, "127.0.0.1", 5001, check=check)
        other = make_backend()
        registration = other.register(inst, keepalive=False)
        assert "write-once" in repr(registration)
        assert not registration.status().live
        other.close()
        assert not registration.closed  # what nothing keeps, closing the backend does not remove
        if shared_store:
            try:
                assert _ids(backend.instances(service, passing_only=False)) == {inst.id}
            finally:
                backend.deregister(inst.id)

    def test_closing_a_registration_leaves_what_another_owner_registered_since(
        self, make_backend: Callable[[], Backend], backend: Backend, service: str, shared_store: bool
    ) -> None:
        ours = ServiceInstance(service, "127.0.0.1", 5001, id=f"{service}-1")
        theirs = ServiceInstance(service, "127.0.0.1", 5002, id=f"{service}-1")
        registration = backend.register(ours, keepalive=False)
        owner = make_backend() if shared_store else None
        try:
            if owner is not None:
                owner.register(theirs)  # another process registers the same id
            else:
                backend._add(theirs)  # as another owner's register() would write it
            registration.close()
            (only,) = backend.instances(service).instances
            assert only.port == theirs.port
        finally:
            if owner is not None:
                owner.close()
        if owner is not None:
            assert backend.instances(service, passing_only=False).instances == ()

    # -- validation -------------------------------------------------------------------

    @invalid_instances
    def test_invalid_input_raises_and_writes_nothing(
        self, backend: Backend, service: str, build: Callable[[str], ServiceInstance]
    ) -> None:
        with pytest.raises(InvalidInstance) as raised:
            backend.register(build(service))
        assert raised.value.field
        assert backend.instances(service, passing_only=False).instances == ()

    def test_register_refuses_what_is_not_an_instance(self, backend: Backend, service: str) -> None:
        with pytest.raises(InvalidInstance):
            backend.register({"name": service, "address": "127.0.0.1", "port": 1})  # type: ignore[arg-type]


def _fields(instances: tuple[ServiceInstance, ...]) -> list[tuple[object, ...]]:
    """Everything but ``check``, which a backend's catalog need not give back."""
    return [(i.id, i.name, i.address, i.port, i.tags, dict(i.meta), i.weight) for i in instances]
