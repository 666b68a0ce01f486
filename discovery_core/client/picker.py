"""Policies: which ready endpoint takes the next call.

A picker is built from the pool's endpoints after every change of the set (grpc-go's
``Picker``); each call reads the current one and ``pick()``s, with no lock. Which of
its endpoints are ready is read from their channels (C-core keeps that state, health
included): the picker keeps the ready ones for a moment and reads them again when a
chosen one is not ready any more or the moment has passed, so a pick costs one state
read and an endpoint that stops serving takes no further call, with no thread
watching anything. Policies only choose among the ready ones, which keeps each a
few lines.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, Literal

from discovery_core.client.endpoint import CONNECTING, IDLE, READY, TRANSIENT_FAILURE, C, Endpoint
from discovery_core.errors import DiscoveryError, InvalidConfig

__all__ = ["POLICIES", "LeastRequest", "Picker", "Policy", "RoundRobin", "WeightedRoundRobin", "policy_class"]

Policy = Literal["round_robin", "weighted_round_robin", "least_request"]

_MAX_SCHEDULE = 1024
# How long a picker trusts its list of ready endpoints before reading their states
# again (a newly ready endpoint waits at most this long for calls; one that stops
# being ready is seen at its next pick). Longer for big sets: reading costs ~1 µs each.
_FRESH = 0.05
_FRESH_PER_ENDPOINT = 20e-6


class Picker(Generic[C]):
    """Chooses an endpoint for one call among ``endpoints`` (the set the pool keeps).

    ``lone``: with health checking off, a single endpoint is picked before its
    connection is ready (it is the only choice; the call waits for the connection),
    while among several only connected ones are. Subclasses are the policies:
    ``_plan`` prepares their choice over the ready endpoints, ``_choose`` makes it.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        service: str,
        endpoints: Sequence[Endpoint[C]],
        *,
        resolved: bool = True,
        error: DiscoveryError | None = None,
        lone: bool = False,
    ) -> None:
        self.service = service
        self.endpoints = tuple(endpoints)
        self.known = len(self.endpoints)  # endpoints in the set, ready or not
        self.resolved = resolved  # a snapshot arrived (before it, nothing is known)
        self.error = error  # the watch's last error while it fails
        self._lone = self.endpoints[0] if lone and self.known == 1 else None
        self._fresh = _FRESH + _FRESH_PER_ENDPOINT * self.known
        self._expires = 0.0
        self._ready: tuple[Endpoint[C], ...] = ()
        self._plan_state: Any = None
        self._next = itertools.count(random.randrange(self.known or 1)).__next__  # clients start apart

    @property
    def resolving(self) -> bool:
        """No snapshot yet and no error either: the first one may come any moment."""
        return not self.resolved and self.error is None

    @property
    def ready(self) -> tuple[Endpoint[C], ...]:
        """The endpoints ready now (read afresh)."""
        self._refresh()
        return self._ready

    @property
    def connecting(self) -> bool:
        """Some endpoint is still connecting (its health not known yet)."""
        return any(ep.state() in (IDLE, CONNECTING) for ep in self.endpoints)

    def carry(self, previous: Picker[C], gone: Sequence[Endpoint[C]]) -> None:
        """Start from what ``previous`` knew was ready (less ``gone``), until it would
        have looked again: a new picker per change reads no state it already has."""
        ready = previous._ready
        if gone:
            left = set(gone)
            ready = tuple(ep for ep in ready if ep not in left)
        self._plan_state = self._plan(ready)
        self._ready = ready
        self._expires = previous._expires

    def _refresh(self) -> None:
        # connect=True: an endpoint that went IDLE (no call for a while) connects again.
        ready = tuple(ep for ep in self.endpoints if ep.state(True) == READY)
        self._plan_state = self._plan(ready)
        self._ready = ready
        self._expires = time.monotonic() + self._fresh

    def _plan(self, ready: tuple[Endpoint[C], ...]) -> Any:
        """The policy's state for choosing among ``ready`` (replaced as one value)."""
        return ready

    def _choose(self, plan: Any) -> Endpoint[C] | None:
        """One endpoint from the plan (None when nothing is ready)."""
        raise NotImplementedError

    def pick(self) -> Endpoint[C] | None:
        """An endpoint for the next call, None when none is ready."""
        if time.monotonic() >= self._expires:
            self._refresh()
        chosen = self._choose(self._plan_state)
        if chosen is not None and chosen.ready():
            return chosen
        self._refresh()  # it stopped being ready (or nothing was): look again
        chosen = self._choose(self._plan_state)
        if chosen is None and self._lone is not None and self._lone.state() != TRANSIENT_FAILURE:
            return self._lone
        return chosen

    def pick_other(self, tried: Sequence[Endpoint[C]]) -> Endpoint[C] | None:
        """Like ``pick()``, preferring an endpoint not in ``tried``."""
        chosen = self.pick()
        if chosen is None or chosen not in tried:
            return chosen
        return next((ep for ep in self._ready if ep not in tried), chosen)

    def why_none(self) -> str:
        """Why no endpoint takes a call: what the registry said, or why it said nothing.
        "Not registered" only when a snapshot from an answering watch said so."""
        service = self.service
        failing = f"the watch on {service!r} fails: {self.error}" if self.error is not None else ""
        if not self.resolved:
            return failing or f"no snapshot of service {service!r} has come from the registry yet"
        if self.known == 0:
            if failing:
                return f"{failing} (its last snapshot had no healthy instance)"
            return f"no instance of service {service!r} is registered and healthy"
        text = f"none of the {self.known} instances of service {service!r} is serving"
        if self.connecting:
            text += " yet (the health of some is not known yet)"
        return f"{text}; {failing}" if failing else text


class RoundRobin(Picker[C]):
    """Each ready endpoint in turn, starting at a random one (so clients spread)."""

    name = "round_robin"

    def _choose(self, plan: Any) -> Endpoint[C] | None:
        ready: tuple[Endpoint[C], ...] = plan or ()
        return ready[self._next() % len(ready)] if ready else None


class WeightedRoundRobin(Picker[C]):
    """Ready endpoints in proportion to their instance's ``weight``: a smooth schedule
    (each endpoint's picks spread evenly, earliest deadline first) computed when the
    ready set is read, walked round robin."""

    name = "weighted_round_robin"

    def _plan(self, ready: tuple[Endpoint[C], ...]) -> Any:
        weights = [ep.instance.weight for ep in ready]
        total = sum(weights)
        if total > _MAX_SCHEDULE:  # keep the schedule small; proportions survive
            weights = [max(1, round(w * _MAX_SCHEDULE / total)) for w in weights]
            total = sum(weights)
        # Endpoint i's k-th pick is due at (k + 0.5) / w_i: taking them in order
        # interleaves heavy and light endpoints smoothly, in O(total log n).
        due = [(0.5 / w, i) for i, w in enumerate(weights)]
        heapq.heapify(due)
        schedule = []
        for _ in range(total):
            at, i = heapq.heappop(due)
            schedule.append(ready[i])
            heapq.heappush(due, (at + 1 / weights[i], i))
        return tuple(schedule)

    def _choose(self, plan: Any) -> Endpoint[C] | None:
        schedule: tuple[Endpoint[C], ...] = plan or ()
        return schedule[self._next() % len(schedule)] if schedule else None


class LeastRequest(Picker[C]):
    """The less busy of two random ready endpoints (grpc's least_request: power of
    two choices on outstanding calls), which a plain round robin cannot see."""

    name = "least_request"

    def _choose(self, plan: Any) -> Endpoint[C] | None:
        ready: tuple[Endpoint[C], ...] = plan or ()
        n = len(ready)
        if n < 2:
            return ready[0] if ready else None
        i = random.randrange(n)
        j = random.randrange(n - 1)
        j += j >= i
        a, b = ready[i], ready[j]
        return a if a.inflight <= b.inflight else b


POLICIES: dict[str, type[Picker[Any]]] = {p.name: p for p in (RoundRobin, WeightedRoundRobin, LeastRequest)}


def policy_class(policy: str) -> type[Picker[Any]]:
    """The picker class a policy name stands for (InvalidConfig naming the known ones)."""
    try:
        return POLICIES[policy]
    except KeyError:
        raise InvalidConfig("policy", policy, f"known policies: {', '.join(POLICIES)}") from None
