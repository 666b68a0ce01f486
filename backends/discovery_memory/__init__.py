"""The in-memory backend: the embedded default and the test double.

A real implementation, not a mock: a thread-safe store with a monotonic index,
blocking polls on a condition, real health checks (``discovery_core.health`` probes
for gRPC, HTTP and TCP; TTL checks that expire), and ``deregister_after`` reaping.
Its state belongs to the backend object: two ``connect("memory://")`` calls see
nothing of each other. Uses only discovery_core's public API.

Costs follow what changed: the store is indexed by service, each service's instances
kept sorted by id (a poll copies them, never scans or sorts the store), and a change
wakes only the polls of its own service; TTL and reaping deadlines wait in a heap for
one clock thread, which sleeps until the earliest.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import operator
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


@dataclass(eq=False)
class _Entry:
    instance: ServiceInstance
    status: HealthStatus
    critical_since: float | None = None
    ttl_deadline: float | None = None
    prober: Prober | None = None
    due: float | None = None  # when the clock looks at it next (its entry in the heap)


class _Service:
    """One service's instances, sorted by id, and their health, kept as a poll hands
    them to a snapshot (copied whole, never scanned or sorted); and the condition its
    polls wait on (it shares the store's lock)."""

    def __init__(self, lock: threading.Lock, index: int) -> None:
        self.changed = threading.Condition(lock)
        self.index = index  # the store's index at the service's last change
        self.polls = 0  # polls waiting on ``changed``
        self._ids: list[str] = []
        self._instances: list[ServiceInstance] = []
        self._health: dict[str, HealthStatus] = {}
        self._unhealthy: set[str] = set()  # ids not passing

    def __bool__(self) -> bool:
        return bool(self._ids)

    def put(self, instance: ServiceInstance, status: HealthStatus) -> None:
        at = bisect.bisect_left(self._ids, instance.id)
        if at < len(self._ids) and self._ids[at] == instance.id:
            self._instances[at] = instance
        else:
            self._ids.insert(at, instance.id)
            self._instances.insert(at, instance)
        self._health[instance.id] = status
        if status is HealthStatus.PASSING:
            self._unhealthy.discard(instance.id)
        else:
            self._unhealthy.add(instance.id)

    def remove(self, instance_id: str) -> None:
        at = bisect.bisect_left(self._ids, instance_id)
        if at < len(self._ids) and self._ids[at] == instance_id:
            del self._ids[at], self._instances[at], self._health[instance_id]
            self._unhealthy.discard(instance_id)

    def snapshot(self, query: Query) -> Snapshot:
        """The query's instances and their health (the caller holds the lock)."""
        instances, health = self._instances, self._health
        if query.passing_only and self._unhealthy:
            passing = map(operator.not_, map(self._unhealthy.__contains__, self._ids))
            instances = list(itertools.compress(instances, passing))
            health = health.copy()
            for instance_id in self._unhealthy:
                del health[instance_id]
        if query.tags or query.meta:
            instances = [instance for instance in instances if query.matches(instance, health[instance.id])]
            health = {instance.id: health[instance.id] for instance in instances}
        return Snapshot(query.service, tuple(instances), index=self.index, health=health)


class MemoryBackend(Backend):
    """Registrations and watches inside this process (``memory://``)."""

    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._index = 1  # Consul-like: a real index is never below 1
        self._entries: dict[str, _Entry] = {}
        self._services: dict[str, _Service] = {}
        self._stopped = False
        self._deadlines: list[tuple[float, int, _Entry]] = []  # the clock's heap
        self._seq = itertools.count()
        self._tick = threading.Condition(self._lock)  # wakes the clock: an earlier deadline, or closing
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
        with self._lock:
            old = self._entries.get(instance.id)
            if old is not None and old.instance.name != instance.name:
                self._unlist(old)
            self._entries[instance.id] = entry
            self._service(instance.name).put(instance, status)
            self._changed(instance.name)
            self._schedule(entry, self._next_deadline(entry))
        if old is not None and old.prober is not None:
            old.prober.stop()
        if entry.prober is not None:
            entry.prober.start()

    def deregister(self, instance_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(instance_id, None)
            if entry is not None:
                self._unlist(entry)
        if entry is not None and entry.prober is not None:
            entry.prober.stop()

    def _heartbeat(self, instance_id: str) -> None:
        self._check_open()
        with self._lock:
            entry = self._entries.get(instance_id)
            if entry is None or not isinstance(entry.instance.check, TtlCheck):
                raise DiscoveryError(f"no instance {instance_id!r} with a TTL check", backend=self.name)
            entry.ttl_deadline = time.monotonic() + entry.instance.check.ttl
            self._set_status(entry, HealthStatus.PASSING)
            self._schedule(entry, entry.ttl_deadline)

    def _is_registered(self, instance: ServiceInstance) -> bool:
        self._check_open()
        with self._lock:
            entry = self._entries.get(instance.id)
            return entry is not None and entry.instance == instance

    # -- Watcher ----------------------------------------------------------------------

    def poll(self, query: Query, index: int, stop: Stop) -> Snapshot:
        self._check_open()
        remove = stop.on_set(lambda: self._wake(query.service))
        try:
            with self._lock:
                service = self._services.get(query.service)
                if index > 0 and (service is None or service.index <= index):
                    service = self._wait(query.service, index, stop)
                if service is None:
                    return Snapshot(query.service, (), index=self._index)
                return service.snapshot(query)
        finally:
            remove()

    def _wake(self, name: str) -> None:
        with self._lock:
            service = self._services.get(name)
            if service is not None:
                service.changed.notify_all()

    # -- internals (the caller holds the lock) ---------------------------------------

    def _wait(self, name: str, index: int, stop: Stop) -> _Service | None:
        """Wait until the service changes past ``index``, the poll's bound passes, or
        the poll is stopped; returns the service (None if nothing holds it)."""
        service = self._service(name)
        service.polls += 1
        try:
            deadline = time.monotonic() + _POLL_BOUND
            while service.index <= index and not stop.is_set() and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                service.changed.wait(remaining)
        finally:
            service.polls -= 1
        self._forget_if_unused(service, name)
        return self._services.get(name)

    def _service(self, name: str) -> _Service:
        service = self._services.get(name)
        if service is None:
            service = self._services[name] = _Service(self._lock, self._index)
        return service

    def _forget_if_unused(self, service: _Service, name: str) -> None:
        """Drop a service that holds no instance and that no poll waits on (a new
        record starts at the store's index, so no poll can miss a change)."""
        if not service and not service.polls and self._services.get(name) is service:
            del self._services[name]

    def _unlist(self, entry: _Entry) -> None:
        """Take the entry out of its service (it already left ``_entries``, or is
        about to be replaced there)."""
        name = entry.instance.name
        service = self._services.get(name)
        if service is not None:
            service.remove(entry.instance.id)
            self._changed(name)
            self._forget_if_unused(service, name)

    def _changed(self, name: str) -> None:
        """Bump the index of one service and wake its polls alone."""
        self._index += 1
        service = self._services.get(name)
        if service is not None:
            service.index = self._index
            service.changed.notify_all()

    def _set_status(self, entry: _Entry, status: HealthStatus) -> None:
        if entry.status is status:
            return
        entry.status = status
        entry.critical_since = time.monotonic() if status is HealthStatus.CRITICAL else None
        self._service(entry.instance.name).put(entry.instance, status)
        self._changed(entry.instance.name)
        self._schedule(entry, self._next_deadline(entry))

    def _report(self, entry: _Entry, status: HealthStatus) -> None:
        with self._lock:
            if self._entries.get(entry.instance.id) is entry:
                self._set_status(entry, status)

    # -- the clock: TTL expiry and reaping ---------------------------------------------

    @staticmethod
    def _next_deadline(entry: _Entry) -> float | None:
        """When the entry's TTL expires or it is due to be reaped, whichever is first."""
        check = entry.instance.check
        deadlines = []
        if entry.ttl_deadline is not None and entry.status is not HealthStatus.CRITICAL:
            deadlines.append(entry.ttl_deadline)
        if entry.critical_since is not None and check is not None and check.deregister_after is not None:
            deadlines.append(entry.critical_since + check.deregister_after)
        return min(deadlines, default=None)

    def _schedule(self, entry: _Entry, when: float | None) -> None:
        """Have the clock look at the entry at ``when`` (unless it will sooner); a
        deadline that moved later is found when the earlier one comes."""
        if when is None or (entry.due is not None and entry.due <= when):
            return
        entry.due = when
        heapq.heappush(self._deadlines, (when, next(self._seq), entry))
        if self._deadlines[0][2] is entry:
            self._tick.notify()

    def _keep_time(self) -> None:
        """Expire TTL checks and reap instances critical past ``deregister_after``,
        sleeping until the earliest deadline."""
        with self._lock:
            while not self._stopped:
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    when, _, entry = heapq.heappop(self._deadlines)
                    if entry.due == when and self._entries.get(entry.instance.id) is entry:
                        entry.due = None
                        self._expire(entry, now)
                reaped = [e.prober for e in self._reaped if e.prober is not None]
                self._reaped.clear()
                if reaped:
                    self._lock.release()
                    try:
                        for prober in reaped:
                            prober.stop()
                    finally:
                        self._lock.acquire()
                    continue
                self._tick.wait(self._deadlines[0][0] - now if self._deadlines else None)

    def _expire(self, entry: _Entry, now: float) -> None:
        """Apply what is due for one entry, then schedule what comes next."""
        if entry.ttl_deadline is not None and entry.status is not HealthStatus.CRITICAL and now >= entry.ttl_deadline:
            entry.ttl_deadline = None
            self._set_status(entry, HealthStatus.CRITICAL)
        check = entry.instance.check
        reap_after = check.deregister_after if check is not None else None
        if entry.critical_since is not None and reap_after is not None and now >= entry.critical_since + reap_after:
            del self._entries[entry.instance.id]
            self._unlist(entry)
            self._reaped.append(entry)
            return
        self._schedule(entry, self._next_deadline(entry))

    def _close_resources(self) -> None:
        with self._lock:
            self._stopped = True
            entries, self._entries = list(self._entries.values()), {}
            self._tick.notify()
            for service in self._services.values():
                service.changed.notify_all()
        self._clock.join()
        for entry in entries:
            if entry.prober is not None:
                entry.prober.stop()
