"""Which instances a channel connects to: the healthy ones, or, when the registry's
healthy set collapsed, every registered one (fail-open).

Envoy's panic threshold is the anchor: healthy% = healthy / (all - excluded), and
below the threshold Envoy balances over every host, blind. Ours is better placed in
two ways. What is excluded needs no guess: an instance that left gracefully
(``serve()``'s drain, a deregistration) is gone from the registry, while one whose
node failed or was cut off stays listed with a critical check; so the denominator is
the instances the registry still lists. And in panic the channel still asks each
endpoint's own grpc.health.v1 stream: an instance re-admitted here takes calls only
while it says SERVING itself, and leaves the moment it does not.

Pure: a snapshot and a threshold in, a choice out.
"""

from __future__ import annotations

from dataclasses import dataclass

from discovery_core.errors import InvalidConfig
from discovery_core.model import HealthStatus, ServiceInstance, Snapshot

__all__ = ["DEFAULT_PANIC_THRESHOLD", "Selection", "check_threshold", "select"]

DEFAULT_PANIC_THRESHOLD = 0.5


@dataclass(frozen=True)
class Selection:
    """The instances to keep endpoints for; ``panicked``: the registry's healthy set is
    below the threshold, so instances it marks critical are kept as well."""

    instances: tuple[ServiceInstance, ...]
    panicked: bool
    healthy: int
    listed: int


def check_threshold(threshold: object) -> float:
    """The panic threshold as a fraction in [0, 1] (0 disables fail-open)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
        raise InvalidConfig("panic_threshold", threshold, "must be a fraction from 0 (off) to 1")
    return float(threshold)


def select(snapshot: Snapshot, threshold: float) -> Selection:
    """The healthy instances (passing or warning), or every listed one in panic.
    Costs a scan of the health map; the instances are only walked when some is
    critical (a set of 10,000 changes often)."""
    listed = snapshot.instances
    health = snapshot.health
    if HealthStatus.CRITICAL not in health.values():
        return Selection(listed, False, len(listed), len(listed))
    healthy = tuple(inst for inst in listed if health.get(inst.id) is not HealthStatus.CRITICAL)
    panicked = bool(listed) and len(healthy) < threshold * len(listed)
    return Selection(listed if panicked else healthy, panicked, len(healthy), len(listed))
