"""Registering: who owns what a backend holds, and what a Registration says of itself."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest
from discovery_memory import MemoryBackend

import discovery_core as dc


@pytest.fixture
def backend() -> Iterator[dc.Backend]:
    with dc.connect("memory://") as backend:
        yield backend


def test_the_backend_primitives_are_not_the_users_api(backend: dc.Backend) -> None:
    """Writing an instance nothing owns (no keepalive, not deregistered on close) is
    a backend author's hook, not a method a user finds next to register()."""
    for name in ("add", "heartbeat", "is_registered"):
        assert not hasattr(backend, name), name
    for name in ("register", "deregister", "instances", "watch", "registered"):
        assert callable(getattr(backend, name)), name


def test_a_write_once_registration_says_so(backend: dc.Backend) -> None:
    inst = dc.ServiceInstance("svc", "127.0.0.1", 5001, check=dc.TtlCheck(ttl=30))
    registration = backend.register(inst, keepalive=False)
    assert "write-once" in repr(registration)
    assert "live" not in repr(registration)
    assert not registration.status().live
    registration.deregister()
    assert "closed" in repr(registration)
    assert backend.instances("svc", passing_only=False).instances == ()
    assert "live" in repr(backend.register(inst))


def test_registering_without_a_check_says_once_that_it_never_expires(
    backend: dc.Backend, caplog: pytest.LogCaptureFixture
) -> None:
    inst = dc.ServiceInstance("nocheck", "127.0.0.1", 5001)
    with caplog.at_level(logging.INFO, logger="discovery_core"):
        backend.register(inst).close()
        backend.register(inst).close()
        backend.register(dc.ServiceInstance("checked", "127.0.0.1", 5002, check=dc.TtlCheck(ttl=5))).close()
    said = [r for r in caplog.records if "never expire" in r.getMessage()]
    assert len(said) == 1
    assert said[0].levelno == logging.INFO
    assert "'nocheck'" in said[0].getMessage()


def test_closing_a_registration_leaves_another_owners_instance(backend: dc.Backend) -> None:
    """Another process registered our id since: its instance is not ours to remove."""
    ours = dc.ServiceInstance("svc", "127.0.0.1", 5001, id="svc-1")
    theirs = dc.ServiceInstance("svc", "127.0.0.2", 5002, id="svc-1")
    registration = backend.register(ours, keepalive=False)
    backend._add(theirs)  # what another owner's register() writes
    registration.close()
    assert backend.instances("svc").instances == (theirs,)


class LostAnswer(MemoryBackend):
    """Writes the instance, then fails as a connection reset before the answer came."""

    def _add(self, instance: dc.ServiceInstance) -> None:
        super()._add(instance)
        raise dc.BackendUnavailable("connection reset by peer", backend=self.name)


def test_a_register_that_failed_in_transport_removes_what_it_wrote(caplog: pytest.LogCaptureFixture) -> None:
    inst = dc.ServiceInstance("svc", "127.0.0.1", 5001)
    with LostAnswer() as backend, caplog.at_level(logging.WARNING, logger="discovery_core"):
        with pytest.raises(dc.BackendUnavailable):
            backend.register(inst)
        assert backend.instances("svc", passing_only=False).instances == ()
    assert "removed it again" in caplog.text


class Shared(dc.Backend):
    """A backend over a store that outlives it (as a Consul agent does): another
    memory backend. ``hold_writes`` makes each write return only once this backend
    has closed its registrations, as a write in flight while another thread closes."""

    name = "shared"

    def __init__(self, store: dc.Backend) -> None:
        super().__init__()
        self.store = store
        self.hold_writes = False
        self.writing = threading.Event()
        self.registrations_closed = threading.Event()

    def _add(self, instance: dc.ServiceInstance) -> None:
        self.store._add(instance)
        if self.hold_writes:
            self.writing.set()
            assert self.registrations_closed.wait(5)

    def deregister(self, instance_id: str) -> None:
        self.store.deregister(instance_id)

    def _heartbeat(self, instance_id: str) -> None:
        self.store._heartbeat(instance_id)

    def _is_registered(self, instance: dc.ServiceInstance) -> bool:
        return self.store._is_registered(instance)

    def poll(self, query: dc.Query, index: int, stop: dc.Stop) -> dc.Snapshot:
        return self.store.poll(query, index, stop)

    def _close_resources(self) -> None:
        self.registrations_closed.set()


def test_a_register_that_ends_while_the_backend_closes_leaves_nothing(backend: dc.Backend) -> None:
    shared = Shared(backend)
    shared.hold_writes = True
    outcome: list[object] = []

    def register() -> None:
        try:
            outcome.append(shared.register(dc.ServiceInstance("svc", "127.0.0.1", 5001)))
        except dc.ClosedError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=register)
    worker.start()
    assert shared.writing.wait(5)
    shared.close()
    worker.join(5)
    (only,) = outcome
    assert isinstance(only, dc.ClosedError), only
    assert backend.instances("svc", passing_only=False).instances == ()
