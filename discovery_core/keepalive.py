"""One keepalive loop per backend, for all of its live Registrations.

A thread per Registration polling its own instance cost N threads and, on Consul,
2N requests a second. Here one thread per Registry runs a heap of due times: each
TTL registration's heartbeat every third of its TTL, and one *sweep* that asks the
backend about every registration at once (``Registry.registered``) each
``keepalive_interval``, adding back what the backend lost and noting what clients
cannot see. Speed where it matters: after a failed request (or a restore not yet
confirmed) the sweep comes back on a fast capped backoff, and ``poke()`` (a watch
feed of the same backend answering again, or an instance of ours leaving its set)
sweeps at once. The thread starts with the first live Registration and ends with
the last.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from discovery_core.errors import DiscoveryError
from discovery_core.model import TtlCheck
from discovery_core.watcher import _Backoff

if TYPE_CHECKING:
    from discovery_core.registry import Presence, Registration, Registry

__all__ = ["Keepalive"]

log = logging.getLogger("discovery_core.registry")

# How soon a new registration is first verified (one sweep covers a burst of them).
_FIRST_CHECK = 1.0
# How long close() waits for a request in flight before leaving the thread behind.
_CLOSE_TIMEOUT = 5.0


@dataclasses.dataclass(eq=False)
class _Tracked:
    """The keepalive's bookkeeping of one live Registration (its thread's alone)."""

    registration: Registration
    ttl: float | None
    beat_due: float = math.inf
    beat_overdue: bool = False  # the last heartbeat failed: the next good sweep sends one
    unseen_since: float | None = None  # held but not visible to clients since (monotonic)
    warned: bool = False  # the "clients cannot see it" warning is out
    restored: bool = False  # added back; "registered again" waits until clients see it
    replaced: bool = False  # another owner holds the id: warned once, left alone


class Keepalive:
    """The heap-driven loop behind every live Registration of one Registry."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._cond = threading.Condition()
        self._tracked: dict[str, _Tracked] = {}
        self._beats: list[tuple[float, int, _Tracked]] = []
        self._seq = itertools.count()
        self._sweep_due = math.inf
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._failing = False
        self._backoff = _Backoff(registry.keepalive_retry_base, registry.keepalive_retry_cap)

    def track(self, registration: Registration) -> None:
        """Keep ``registration`` alive from now on (replacing any of the same id)."""
        check = registration.instance.check
        ttl = check.ttl if isinstance(check, TtlCheck) else None
        tracked = _Tracked(registration, ttl)
        with self._cond:
            if self._stopped:
                return
            now = time.monotonic()
            self._tracked[registration.instance.id] = tracked
            if ttl is not None:
                self._schedule_beat(tracked, now + ttl / 3)
            self._sweep_due = min(self._sweep_due, now + _FIRST_CHECK)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="discovery-keepalive", daemon=True)
                self._thread.start()
            self._cond.notify()

    def untrack(self, registration: Registration) -> None:
        with self._cond:
            tracked = self._tracked.get(registration.instance.id)
            if tracked is not None and tracked.registration is registration:
                del self._tracked[registration.instance.id]
                self._cond.notify()

    def poke(self, instance_ids: Collection[str] | None = None) -> None:
        """Sweep now: the backend answers again (``None``), or these instances left a
        watched set (only if one of them is ours)."""
        with self._cond:
            if instance_ids is not None and not any(i in self._tracked for i in instance_ids):
                return
            if self._tracked:
                self._sweep_due = time.monotonic()
                self._cond.notify()

    def close(self, timeout: float = _CLOSE_TIMEOUT) -> None:
        with self._cond:
            self._stopped = True
            self._tracked.clear()
            thread = self._thread
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the keepalive's request to the backend did not return on close")

    # -- the loop ---------------------------------------------------------------------

    def _schedule_beat(self, tracked: _Tracked, due: float) -> None:
        tracked.beat_due = due
        heapq.heappush(self._beats, (due, next(self._seq), tracked))

    def _run(self) -> None:
        while True:
            with self._cond:
                beats = self._due_beats()
                if beats is None:
                    return
                sweep = self._sweep_due <= time.monotonic()
                if sweep:
                    self._sweep_due = math.inf
                    everything = list(self._tracked.values())
            for tracked in beats:
                self._beat(tracked)
            if sweep:
                self._sweep(everything)

    def _due_beats(self) -> list[_Tracked] | None:
        """Wait (holding the condition) until something is due; None: stop the thread."""
        while True:
            if self._stopped or not self._tracked:
                if self._thread is threading.current_thread():
                    self._thread = None
                return None
            now = time.monotonic()
            due: list[_Tracked] = []
            while self._beats and self._beats[0][0] <= now:
                when, _, tracked = heapq.heappop(self._beats)
                if self._tracked.get(tracked.registration.instance.id) is tracked and tracked.beat_due == when:
                    due.append(tracked)
            if due or self._sweep_due <= now:
                return due
            wake = min(self._sweep_due, self._beats[0][0] if self._beats else math.inf)
            self._cond.wait(None if wake == math.inf else wake - now)

    def _beat(self, tracked: _Tracked) -> None:
        instance_id = tracked.registration.instance.id
        assert tracked.ttl is not None  # only TTL registrations are scheduled
        try:
            tracked.registration._while_live(lambda: self._registry._heartbeat(instance_id))
        except DiscoveryError as exc:
            tracked.beat_overdue = True
            self._failed(f"heartbeat of {instance_id!r}", exc, [tracked])
        else:
            tracked.beat_overdue = False
            tracked.registration._note_error(None)
        with self._cond:
            self._schedule_beat(tracked, time.monotonic() + tracked.ttl / 3)

    def _sweep(self, everything: list[_Tracked]) -> None:
        registry = self._registry
        try:
            answer = registry.registered([t.registration.instance for t in everything])
        except DiscoveryError as exc:
            self._failed("verifying registrations", exc, everything)
            return
        if self._failing:
            log.info("keeping registrations alive on %s works again", _name(registry))
            self._failing = False
        unsettled = False
        for tracked in everything:
            presence = answer.get(tracked.registration.instance.id)
            try:
                unsettled |= self._settle(tracked, presence)
            except DiscoveryError as exc:
                self._failed(f"restoring {tracked.registration.instance.id!r}", exc, [tracked])
                return
        with self._cond:
            if unsettled:
                delay = self._backoff.next()
            else:
                self._backoff.reset()
                delay = registry.keepalive_interval
            self._sweep_due = min(self._sweep_due, time.monotonic() + delay)

    def _settle(self, tracked: _Tracked, presence: Presence | None) -> bool:
        """Act on what the backend said of one registration; True while it needs
        another look soon (restored, or not yet visible within the grace period)."""
        registration = tracked.registration
        instance_id = registration.instance.id
        if presence is not None and presence.replaced:
            if not tracked.replaced:
                log.warning(
                    "%r was registered by another owner on %s: leaving it to them (closing ours will not remove it)",
                    instance_id, _name(self._registry),
                )  # fmt: skip
                tracked.replaced = True
            registration._note_verified(False)
            registration._note_error("registered by another owner")
            return False
        tracked.replaced = False
        if presence is None or not presence.held:
            if registration._while_live(lambda: self._registry._add(registration.instance)):
                if not tracked.restored:
                    log.warning("%r was missing from %s: adding it again", instance_id, _name(self._registry))
                tracked.restored = True
                if tracked.ttl is not None:
                    registration._while_live(lambda: self._registry._heartbeat(instance_id))
                    tracked.beat_overdue = False
            registration._note_verified(False)
            return True
        if tracked.beat_overdue and registration._while_live(lambda: self._registry._heartbeat(instance_id)):
            tracked.beat_overdue = False
        registration._note_verified(presence.visible)
        if presence.visible:
            if tracked.restored:
                log.info("%r is registered again: clients can see it", instance_id)
            elif tracked.warned:
                log.info("%r is visible to clients again", instance_id)
            tracked.restored = tracked.warned = False
            tracked.unseen_since = None
            return False
        now = time.monotonic()
        if tracked.unseen_since is None:
            tracked.unseen_since = now
        if tracked.warned:
            return False  # already said; the idle sweep watches for it to clear
        unseen = now - tracked.unseen_since
        if unseen < self._registry.sync_grace:
            return True
        cause = presence.cause or f"{_name(self._registry)} holds it but cannot publish it"
        log.warning("%r is not visible to clients after %.0f s: %s", instance_id, unseen, cause)
        tracked.warned = True
        return False

    def _failed(self, what: str, exc: DiscoveryError, affected: list[_Tracked]) -> None:
        """A keepalive request failed: note it, log once per outage, sweep again soon."""
        for tracked in affected:
            tracked.registration._note_error(str(exc))
        if not self._failing:
            log.warning("%s on %s failed: %s; retrying", what, _name(self._registry), exc)
            self._failing = True
        with self._cond:
            now = time.monotonic()
            if self._sweep_due > now + self._registry.keepalive_retry_cap:  # not already soon
                self._sweep_due = now + self._backoff.next()


def _name(registry: Registry) -> str:
    return getattr(registry, "name", "") or type(registry).__name__
