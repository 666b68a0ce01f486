"""Registering instances: the backend's primitives and the Registration built on them.

A backend implements four small primitives: ``_add`` (write), ``deregister``
(remove), ``_heartbeat`` (pass a TTL check) and ``_is_registered`` (whether it still
holds an instance as written), and may answer for many instances at once
(``registered``). The writing primitives are underscored, as fsspec's hooks are: a
user registers through ``register()``, which returns a Registration that owns what
it wrote. ``Registration``, written once here, turns them into what a server wants:
heartbeats for TTL checks, restoring the instance when the backend lost its state
(a restarted Consul agent), and removing only what is still its own, until it is
closed. One keepalive loop per Registry does this for all of them
(``discovery_core.keepalive``).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from discovery_core.errors import BackendUnavailable, ClosedError, DiscoveryError, InvalidInstance
from discovery_core.keepalive import Keepalive
from discovery_core.model import ServiceInstance, TtlCheck

__all__ = ["Presence", "Registration", "RegistrationStatus", "Registry"]

log = logging.getLogger("discovery_core.registry")


@dataclass(frozen=True)
class Presence:
    """What a backend knows of one instance a live Registration keeps.

    ``held``: the backend still has it as written (False: the keepalive adds it
    again). ``visible``: clients can see it. A backend that holds an instance it
    cannot publish (a Consul agent that cannot sync to its servers) answers
    ``Presence(held=True, visible=False, cause="...")``, the cause in words for the log.
    ``replaced``: the backend holds *another* instance under this id (someone else
    registered it): the keepalive warns once and leaves it alone instead of fighting.
    """

    held: bool
    visible: bool
    cause: str = ""
    replaced: bool = False

    def __post_init__(self) -> None:
        if self.visible and not self.held:
            raise ValueError("an instance the backend does not hold cannot be visible")
        if self.replaced and self.held:
            raise ValueError("an instance held as written cannot be replaced")


@dataclass(frozen=True)
class RegistrationStatus:
    """A Registration's state, for introspection.

    ``live``: kept alive now (False once closed, or written once with
    ``keepalive=False``). ``last_verified``: ``time.time()`` of the backend's last
    answer about it (None before the first). ``catalog_visible``: whether clients
    could see it then. ``last_error``: the last keepalive failure, cleared by the
    next success.
    """

    id: str
    service: str
    live: bool
    last_verified: float | None = None
    catalog_visible: bool | None = None
    last_error: str | None = None


class Registry(abc.ABC):
    """Where instances are registered.

    Class attributes a backend may tune: ``keepalive_interval`` (seconds between
    the idle sweeps that verify every live Registration), ``keepalive_retry_base``/
    ``keepalive_retry_cap`` (the fast backoff after a failed keepalive request or a
    restore not yet confirmed), ``sync_grace`` (how long an instance the backend
    holds may stay invisible to clients before one warning says so),
    ``close_deregister_timeout`` (how long closing waits for its deregistrations: a
    backend that does not answer must not hold up a process that is leaving).
    """

    keepalive_interval: float = 10.0
    keepalive_retry_base: float = 0.25
    keepalive_retry_cap: float = 2.0
    sync_grace: float = 5.0
    close_deregister_timeout: float = 0.8
    _closed = False
    _closing = False  # set (under _live_lock) once closing took the live registrations

    def __init__(self) -> None:
        self._live: dict[str, Registration] = {}
        self._live_lock = threading.Lock()
        self._keepalive = Keepalive(self)
        self._unchecked_noted: set[str] = set()  # services told "never expires" (once each)

    # -- the backend's primitives (hooks for backend authors, not for users) ----------

    @abc.abstractmethod
    def _add(self, instance: ServiceInstance) -> None:
        """Write the instance, replacing any with the same id. Only ``register()``
        and the keepalive call it: what it writes has an owner."""

    @abc.abstractmethod
    def deregister(self, instance_id: str) -> None:
        """Remove the instance, whoever wrote it; an unknown id is not an error."""

    @abc.abstractmethod
    def _heartbeat(self, instance_id: str) -> None:
        """Pass the instance's TTL check now."""

    @abc.abstractmethod
    def _is_registered(self, instance: ServiceInstance) -> bool:
        """Whether the backend still holds this instance as written (whatever its
        health): False when the id is gone or holds another instance."""

    def registered(self, instances: Sequence[ServiceInstance]) -> Mapping[str, Presence]:
        """What the backend knows of each instance, by id: one call for a whole sweep.

        The default asks ``_is_registered`` once per instance and takes what the
        backend holds as visible. A backend that can answer for many instances in
        one request, tell held from visible, or tell an id replaced by another
        owner (``Presence.replaced``) overrides it.
        """
        answer: dict[str, Presence] = {}
        for instance in instances:
            held = self._is_registered(instance)
            answer[instance.id] = Presence(held=held, visible=held)
        return answer

    # -- what users call --------------------------------------------------------------

    def register(self, instance: ServiceInstance, *, keepalive: bool = True) -> Registration:
        """Register ``instance`` and keep it registered until the Registration closes.

        ``keepalive=False`` writes it once and leaves it to its checks: no
        heartbeats, no restoring (that is how a process that died looks); closing
        the backend leaves it too, only the Registration's own ``deregister()``
        removes it. Without a check an instance never expires: it stays until
        deregistered (logged once per service at INFO).
        """
        self._check_open()
        if not isinstance(instance, ServiceInstance):
            raise InvalidInstance("instance", instance, "must be a ServiceInstance")
        if instance.check is None:
            self._note_unchecked(instance)
        try:
            self._add(instance)
        except BackendUnavailable as exc:
            self._undo_add(instance, exc)
            raise
        registration = Registration(self, instance, keepalive=keepalive)
        with self._live_lock:
            closing = self._closing
            previous = self._live.pop(instance.id, None)
            if keepalive and not closing:
                self._live[instance.id] = registration
        if closing:  # the write ended after close() took the live ones: nobody would remove it
            registration._stop_keepalive()
            try:
                self._deregister_own(instance)
            except DiscoveryError as exc:
                log.warning("could not remove %r, registered while closing: %s", instance.id, exc)
            raise ClosedError(f"{type(self).__name__} closed while registering {instance.id!r}")
        if previous is not None:
            previous._supersede()
        return registration

    def _note_unchecked(self, instance: ServiceInstance) -> None:
        with self._live_lock:
            if instance.name in self._unchecked_noted:
                return
            self._unchecked_noted.add(instance.name)
        log.info(
            "instances of %r registered without a check never expire: one whose process dies without "
            "deregistering stays listed until deregistered (give a check with deregister_after)",
            instance.name,
        )

    def _undo_add(self, instance: ServiceInstance, exc: BackendUnavailable) -> None:
        """A write that failed in transport may still have reached the backend (the
        answer was lost): remove what it wrote, if it holds exactly that and no live
        Registration of ours wrote the same before. Best effort."""
        with self._live_lock:
            ours = self._live.get(instance.id)
        if ours is not None and ours.instance == instance:
            return
        try:
            written = self._is_registered(instance)
            if written:
                self.deregister(instance.id)
        except DiscoveryError as cleanup:
            log.warning(
                "registering %r failed (%s); it may have been written and could not be checked (%s)",
                instance.id, exc, cleanup,
            )  # fmt: skip
            return
        if written:
            log.warning("registering %r failed (%s) after it was written: removed it again", instance.id, exc)

    def _deregister_own(self, instance: ServiceInstance) -> None:
        """Deregister ``instance`` only if the backend still holds it as we wrote it:
        another owner's instance under the same id is not ours to remove."""
        if self._is_registered(instance):
            self.deregister(instance.id)
        else:
            log.info("%r is no longer ours (gone, or registered by another owner): left as it is", instance.id)

    def _forget(self, registration: Registration) -> None:
        with self._live_lock:
            if self._live.get(registration.instance.id) is registration:
                del self._live[registration.instance.id]

    def _close_registrations(self) -> None:
        """Stop the keepalive (so it restores nothing), then deregister every live
        Registration; give up once the backend has confirmed none for
        ``close_deregister_timeout`` (a backend that answers gets them all)."""
        with self._live_lock:
            self._closing = True
            live, self._live = list(self._live.values()), {}
        self._keepalive.close(timeout=self.close_deregister_timeout / 2)
        if not live:
            return
        progress = threading.Semaphore(0)
        worker = threading.Thread(
            target=self._deregister_all, args=(live, progress.release), name="discovery-close", daemon=True
        )
        worker.start()
        done = 0
        while done < len(live) and progress.acquire(timeout=self.close_deregister_timeout):
            done += 1
        if done < len(live):
            log.warning(
                "closing: the backend confirmed no deregistration for %.1f s (%d of %d left); "
                "instances it still holds leave when their checks fail",
                self.close_deregister_timeout, len(live) - done, len(live),
            )  # fmt: skip

    @staticmethod
    def _deregister_all(live: list[Registration], confirmed: Callable[[], None]) -> None:
        for registration in live:
            try:
                registration.deregister()
            except DiscoveryError as exc:
                log.warning("could not deregister %r on close: %s", registration.instance.id, exc)
            confirmed()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")


class Registration:
    """A registered instance, kept registered until ``deregister()``/``close()``.

    A context manager. For a ``TtlCheck`` it passes the check at once and then every
    third of the TTL; the Registry's keepalive verifies it with the others and
    registers it again if the backend lost it. ``status()`` says how that goes.
    Registered with ``keepalive=False`` it is *write-once*: nothing keeps it, closing
    the backend leaves it to its checks, and only ``deregister()`` removes it.
    """

    def __init__(self, registry: Registry, instance: ServiceInstance, *, keepalive: bool) -> None:
        self.instance = instance
        self._registry = registry
        self._lock = threading.Lock()
        self._io = threading.Lock()  # held by the keepalive while it writes for this instance
        self._closed = False
        self._live = keepalive
        self._status = RegistrationStatus(instance.id, instance.name, live=keepalive)
        if keepalive:
            if isinstance(instance.check, TtlCheck):
                registry._heartbeat(instance.id)
            registry._keepalive.track(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def status(self) -> RegistrationStatus:
        """The keepalive's view of this instance now."""
        status = self._status
        return dataclasses.replace(status, live=False) if self._closed and status.live else status

    def heartbeat(self) -> None:
        """Pass the TTL check now (a live Registration also does it by itself)."""
        if self._closed:
            raise ClosedError(f"the registration of {self.instance.id!r} is closed", service=self.instance.name)
        self._registry._heartbeat(self.instance.id)

    def _while_live(self, write: Callable[[], None]) -> bool:
        """Run the keepalive's ``write`` unless closed; closing waits for one in flight,
        so a restore can never re-add an instance just deregistered."""
        with self._io:
            if self._closed:
                return False
            write()
            return True

    # The keepalive's thread alone records what it learned (a frozen value, swapped whole).

    def _note_verified(self, visible: bool) -> None:
        status = self._status
        self._status = dataclasses.replace(status, last_verified=time.time(), catalog_visible=visible, last_error=None)

    def _note_error(self, error: str | None) -> None:
        self._status = dataclasses.replace(self._status, last_error=error)

    def _stop_keepalive(self) -> bool:
        """Close; False if it already was. Waits for a keepalive write in flight."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        self._registry._keepalive.untrack(self)
        with self._io:  # a keepalive write in flight finishes first
            pass
        return True

    def _supersede(self) -> None:
        """A newer registration of the same id took over: stop without deregistering."""
        self._stop_keepalive()

    def deregister(self) -> None:
        """Stop the keepalive and remove the instance, if the backend still holds it
        as written (another owner may have registered its id since). Idempotent."""
        if not self._stop_keepalive():
            return
        self._registry._forget(self)
        self._registry._deregister_own(self.instance)

    close = deregister

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.deregister()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "live" if self._live else "write-once"
        return f"<Registration {self.instance.id!r} {state}>"
