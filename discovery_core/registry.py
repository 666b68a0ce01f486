"""Registering instances: the backend's primitives and the live Registration built on them.

A backend implements four small primitives (write, remove, pass a TTL check, tell
whether it still has an instance). ``Registration``, written once here, turns them
into what a server wants: heartbeats for TTL checks, and restoring the instance when
the backend lost its state (a restarted Consul agent), until it is closed.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from types import TracebackType
from typing import Self

from discovery_core.errors import ClosedError, DiscoveryError, InvalidInstance
from discovery_core.model import ServiceInstance, TtlCheck

__all__ = ["Registration", "Registry"]

log = logging.getLogger("discovery_core.registry")


class Registry(abc.ABC):
    """Where instances are registered. ``keepalive_interval``: how often (seconds) a
    live Registration makes sure the backend still has its instance."""

    keepalive_interval: float = 1.0
    _closed = False

    def __init__(self) -> None:
        self._live: dict[str, Registration] = {}
        self._live_lock = threading.Lock()

    @abc.abstractmethod
    def add(self, instance: ServiceInstance) -> None:
        """Write the instance, replacing any with the same id. No heartbeats, no
        restoring: ``register()`` is the call for servers."""

    @abc.abstractmethod
    def deregister(self, instance_id: str) -> None:
        """Remove the instance; an unknown id is not an error."""

    @abc.abstractmethod
    def heartbeat(self, instance_id: str) -> None:
        """Pass the instance's TTL check now."""

    @abc.abstractmethod
    def is_registered(self, instance: ServiceInstance) -> bool:
        """Whether the backend still holds this instance (whatever its health)."""

    def register(self, instance: ServiceInstance, *, keepalive: bool = True) -> Registration:
        """Register ``instance`` and keep it registered until the Registration closes.

        ``keepalive=False`` writes it once and leaves it to its checks: no
        heartbeats, no restoring (that is how a process that died looks).
        """
        self._check_open()
        if not isinstance(instance, ServiceInstance):
            raise InvalidInstance("instance", instance, "must be a ServiceInstance")
        self.add(instance)
        registration = Registration(self, instance, keepalive=keepalive)
        with self._live_lock:
            previous = self._live.pop(instance.id, None)
            self._live[instance.id] = registration
        if previous is not None:
            previous._supersede()
        return registration

    def _forget(self, registration: Registration) -> None:
        with self._live_lock:
            if self._live.get(registration.instance.id) is registration:
                del self._live[registration.instance.id]

    def _close_registrations(self) -> None:
        with self._live_lock:
            live, self._live = list(self._live.values()), {}
        for registration in live:
            try:
                registration.deregister()
            except DiscoveryError as exc:
                log.warning("could not deregister %r on close: %s", registration.instance.id, exc)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")


class Registration:
    """A registered instance, kept registered until ``deregister()``/``close()``.

    A context manager. For a ``TtlCheck`` it passes the check at once and then every
    third of the TTL; every ``keepalive_interval`` it checks that the backend still
    has the instance and registers it again if not.
    """

    def __init__(self, registry: Registry, instance: ServiceInstance, *, keepalive: bool) -> None:
        self.instance = instance
        self._registry = registry
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._ttl = instance.check.ttl if isinstance(instance.check, TtlCheck) else None
        self._thread: threading.Thread | None = None
        if keepalive:
            if self._ttl is not None:
                registry.heartbeat(instance.id)
            self._thread = threading.Thread(target=self._run, name=f"discovery-keepalive:{instance.id}", daemon=True)
            self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def heartbeat(self) -> None:
        """Pass the TTL check now (a live Registration also does it by itself)."""
        if self._closed:
            raise ClosedError(f"the registration of {self.instance.id!r} is closed", service=self.instance.name)
        self._registry.heartbeat(self.instance.id)

    def _run(self) -> None:
        tick = self._registry.keepalive_interval
        if self._ttl is not None:
            tick = min(tick, self._ttl / 3)
        next_beat = time.monotonic() + (self._ttl / 3 if self._ttl else 0)
        failing = False
        while not self._stop.wait(tick):
            try:
                restored = not self._registry.is_registered(self.instance)
                if restored:
                    self._registry.add(self.instance)
                    log.warning("%r was missing from the backend: registered it again", self.instance.id)
                if self._ttl is not None and (restored or time.monotonic() >= next_beat):
                    self._registry.heartbeat(self.instance.id)
                    next_beat = time.monotonic() + self._ttl / 3
            except DiscoveryError as exc:
                if not failing:
                    log.warning("keeping %r registered failed: %s; retrying", self.instance.id, exc)
                failing = True
                continue
            if failing:
                log.info("%r is registered again", self.instance.id)
                failing = False

    def _supersede(self) -> None:
        """A newer registration of the same id took over: stop without deregistering."""
        with self._lock:
            self._closed = True
        self._stop_keepalive()

    def _stop_keepalive(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def deregister(self) -> None:
        """Stop the keepalive and remove the instance. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop_keepalive()
        self._registry._forget(self)
        self._registry.deregister(self.instance.id)

    close = deregister

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.deregister()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "live"
        return f"<Registration {self.instance.id!r} {state}>"
