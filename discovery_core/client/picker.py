"""Policies: which ready endpoint takes the next call.

A picker is immutable, built from the pool's endpoints after every change (grpc-go's
``Picker``): each call reads the current one and ``pick()``s, with no lock and no
I/O. Connections and health live in the pool and the endpoints, which keeps each
policy a few lines.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, Literal

from discovery_core.client.endpoint import C, Endpoint
from discovery_core.errors import DiscoveryError, InvalidConfig

__all__ = ["POLICIES", "LeastRequest", "Picker", "Policy", "RoundRobin", "WeightedRoundRobin", "policy_class"]

Policy = Literal["round_robin", "weighted_round_robin", "least_request"]

_MAX_SCHEDULE = 1024


class Picker(Generic[C]):
    """Chooses an endpoint for one call. Immutable: a new one is built from every
    change of the set, of an endpoint's health or of the watch's error; ``pick()``
    takes no lock and does no I/O. Subclasses are the policies (``_build`` prepares
    their schedule)."""

    name: ClassVar[str] = ""

    def __init__(
        self,
        service: str,
        ready: Sequence[Endpoint[C]],
        *,
        connecting: bool,
        known: int,
        resolved: bool = True,
        error: DiscoveryError | None = None,
    ) -> None:
        self.service = service
        self.ready = tuple(ready)
        self.connecting = connecting  # some endpoint's health is not known yet
        self.known = known  # endpoints in the set, ready or not
        self.resolved = resolved  # a snapshot arrived (before it, nothing is known)
        self.error = error  # the watch's last error while it fails
        self._build()

    @property
    def resolving(self) -> bool:
        """No snapshot yet and no error either: the first one may come any moment."""
        return not self.resolved and self.error is None

    def _build(self) -> None:
        """Prepare the policy's state from ``ready``."""

    def pick(self) -> Endpoint[C] | None:
        """An endpoint for the next call, None when none is ready."""
        raise NotImplementedError

    def pick_other(self, tried: Sequence[Endpoint[C]]) -> Endpoint[C] | None:
        """Like ``pick()``, preferring an endpoint not in ``tried``."""
        chosen = self.pick()
        if chosen is None or chosen not in tried:
            return chosen
        return next((ep for ep in self.ready if ep not in tried), chosen)

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

    def _build(self) -> None:
        self._next = itertools.count(random.randrange(len(self.ready) or 1)).__next__

    def pick(self) -> Endpoint[C] | None:
        ready = self.ready
        return ready[self._next() % len(ready)] if ready else None


class WeightedRoundRobin(Picker[C]):
    """Ready endpoints in proportion to their instance's ``weight``: a smooth
    (nginx-style) schedule computed once per picker, walked round robin."""

    name = "weighted_round_robin"

    def _build(self) -> None:
        self._schedule = self._smooth([ep.instance.weight for ep in self.ready])
        self._next = itertools.count(random.randrange(len(self._schedule) or 1)).__next__

    def _smooth(self, weights: list[int]) -> tuple[Endpoint[C], ...]:
        total = sum(weights)
        if total > _MAX_SCHEDULE:  # keep the schedule small; proportions survive
            weights = [max(1, round(w * _MAX_SCHEDULE / total)) for w in weights]
            total = sum(weights)
        current = [0] * len(weights)
        schedule = []
        for _ in range(total):
            current = [c + w for c, w in zip(current, weights, strict=True)]
            best = max(range(len(current)), key=current.__getitem__)
            current[best] -= total
            schedule.append(self.ready[best])
        return tuple(schedule)

    def pick(self) -> Endpoint[C] | None:
        schedule = self._schedule
        return schedule[self._next() % len(schedule)] if schedule else None


class LeastRequest(Picker[C]):
    """The less busy of two random ready endpoints (grpc's least_request: power of
    two choices on outstanding calls), which a plain round robin cannot see."""

    name = "least_request"

    def pick(self) -> Endpoint[C] | None:
        ready = self.ready
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
