"""The in-memory backend: the embedded default and the test double.

A real implementation, not a mock: a thread-safe store with a monotonic index,
blocking polls on a condition, real health checks (``discovery_core.health`` probes
for gRPC, HTTP and TCP; TTL checks that expire), and ``deregister_after`` reaping.
Its state belongs to the backend object: two ``connect("memory://")`` calls see
nothing of each other. Uses only discovery_core's public API.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from discovery_core import (
    Backend,
    DiscoveryError,
    HealthStatus,
    ProbeCheck,
    Query,
    ServiceInstance,
    Snapshot,
    Stop,
    TtlCheck,
)
from discovery_core.health import Prober

logging.getLogger("discovery_memory").addHandler(logging.NullHandler())  # prints nothing by itself

__all__ = ["MemoryBackend"]

# A poll returns at least this often even when nothing changed (the feed dedupes).
_POLL_BOUND = 60.0


@dataclass
class _Entry:
    instance: ServiceInstance
    status: HealthStatus
    critical_since: float | None = None
    ttl_deadline: float | None = None
    prober: Prober | None = None


class MemoryBackend(Backend):
    """Registrations and watches inside this process (``memory://``)."""

    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition()
        self._index = 1  # Consul-like: a real index is never below 1
        self._entries: dict[str, _Entry] = {}
        self._service_index: dict[str, int] = {}
        self._stopped = False
        self._reaped: list[_Entry] = []
        self._clock = threading.Thread(target=self._keep_time, name="discovery-memory-clock", daemon=True)
        self._clock.start()

    # -- Registry ---------------------------------------------------------------------

    def _add(self, instance: ServiceInstance) -> None:
        self._check_open()
        check = instance.check
        status = check.initial_status if check is not None else HealthStatus.PASSING
        now = time.monotonic()
        entry = _Entry(instance, status)
        if status is HealthStatus.CRITICAL:
            entry.critical_since = now
        elif isinstance(check, TtlCheck):
            entry.ttl_deadline = now + check.ttl
        if isinstance(check, ProbeCheck):
            entry.prober = Prober(check, instance, lambda result: self._report(entry, result))
        with self._cond:
            old = self._entries.get(instance.id)
            self._entries[instance.id] = entry
            self._changed(instance.name, old.instance.name if old else None)
        if old is not None and old.prober is not None:
            old.prober.stop()
        if entry.prober is not None:
            entry.prober.start()

    def deregister(self, instance_id: str) -> None:
        with self._cond:
            entry = self._entries.pop(instance_id, None)
            if entry is not None:
                self._changed(entry.instance.name)
        if entry is not None and entry.prober is not None:
            entry.prober.stop()

    def _heartbeat(self, instance_id: str) -> None:
        self._check_open()
        with self._cond:
            entry = self._entries.get(instance_id)
            if entry is None or not isinstance(entry.instance.check, TtlCheck):
                raise DiscoveryError(f"no instance {instance_id!r} with a TTL check", backend=self.name)
            entry.ttl_deadline = time.monotonic() + entry.instance.check.ttl
            self._set_status(entry, HealthStatus.PASSING)

    def _is_registered(self, instance: ServiceInstance) -> bool:
        self._check_open()
        with self._cond:
            entry = self._entries.get(instance.id)
            return entry is not None and entry.instance == instance

    # -- Watcher ----------------------------------------------------------------------

    def poll(self, query: Query, index: int, stop: Stop) -> Snapshot:
        self._check_open()
        remove = stop.on_set(self._wake)
        try:
            with self._cond:
                deadline = time.monotonic() + _POLL_BOUND
                while index > 0 and self._service_index.get(query.service, 0) <= index and not stop.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stopped:
                        break
                    self._cond.wait(remaining)
                matching = [
                    (e.instance, e.status) for e in self._entries.values() if query.matches(e.instance, e.status)
                ]
                return Snapshot(
                    query.service,
                    tuple(inst for inst, _ in matching),
                    index=self._service_index.get(query.service, self._index),
                    health={inst.id: status for inst, status in matching},
                )
        finally:
            remove()

    # -- internals --------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _changed(self, *services: str | None) -> None:
        """Bump the index for the services touched (the caller holds the lock)."""
        self._index += 1
        for service in services:
            if service is not None:
                self._service_index[service] = self._index
        self._cond.notify_all()

    def _set_status(self, entry: _Entry, status: HealthStatus) -> None:
        if entry.status is status:
            return
        entry.status = status
        entry.critical_since = time.monotonic() if status is HealthStatus.CRITICAL else None
        self._changed(entry.instance.name)

    def _report(self, entry: _Entry, status: HealthStatus) -> None:
        with self._cond:
            if self._entries.get(entry.instance.id) is entry:
                self._set_status(entry, status)

    def _keep_time(self) -> None:
        """Expire TTL checks and reap instances critical past ``deregister_after``."""
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                due: list[float] = []
                for entry in list(self._entries.values()):
                    due.extend(self._expire(entry, now))
                timeout = max(min(due) - now, 0.0) if due else None
                reaped = [e.prober for e in self._reaped if e.prober is not None]
                self._reaped.clear()
                if reaped:
                    self._cond.release()
                    try:
                        for prober in reaped:
                            prober.stop()
                    finally:
                        self._cond.acquire()
                    continue
                self._cond.wait(timeout)

    def _expire(self, entry: _Entry, now: float) -> list[float]:
        """Apply what is due for one entry; return its next deadlines."""
        check = entry.instance.check
        if entry.ttl_deadline is not None and entry.status is not HealthStatus.CRITICAL:
            if now >= entry.ttl_deadline:
                entry.ttl_deadline = None
                self._set_status(entry, HealthStatus.CRITICAL)
            else:
                return [entry.ttl_deadline]
        if entry.critical_since is not None and check is not None and check.deregister_after is not None:
            reap_at = entry.critical_since + check.deregister_after
            if now < reap_at:
                return [reap_at]
            del self._entries[entry.instance.id]
            self._reaped.append(entry)
            self._changed(entry.instance.name)
        return []

    def _close_resources(self) -> None:
        with self._cond:
            self._stopped = True
            entries, self._entries = list(self._entries.values()), {}
            self._cond.notify_all()
        self._clock.join()
        for entry in entries:
            if entry.prober is not None:
                entry.prober.stop()
