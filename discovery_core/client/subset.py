"""Which instances of a large service one client connects to: a subset of them, the
same one across updates, spread evenly over a fleet of clients.

gRFC A68 (random subsetting) is the anchor: rank the instances by a hash and keep the
first ``size``, so one instance leaving or joining changes at most one member of any
client's subset (rendezvous hashing). A68 salts the hash per client, which makes the
clients' choices independent: an instance is then held by Binomial(clients,
size/instances) clients, and with 100 clients over 1,000 instances the busiest one
takes about twice the mean at ``size`` 100 (1.5 needs ``size`` near 300).

Ours keeps the rendezvous property with one ring shared by every client: each
instance sits at the hash of its id, each client at a ``Position``, and a client's
subset is the ``size`` instances clockwise from its position. That is still "sort by
a per-client key (the distance from the position), keep the first ``size``", so an
instance leaving changes only the subsets that held it (each gets the next instance
on the ring) and one joining displaces at most the last member of the subsets it
lands in. Where the positions come from decides the spread:

- ``Position.of_index(i)``: a fleet that numbers its clients 0, 1, 2, ... (a
  StatefulSet ordinal, a job's task index) places them by the bit-reversed index (the
  van der Corput sequence), evenly spaced for any number of clients with no one
  knowing how many there are. What is left uneven is the spacing of the instances'
  hashes (about 1/sqrt(size) relative): at 100 clients x 1,000 instances the busiest
  instance takes about 1.3x the mean at ``size`` 100, the idlest about 0.7x.
- ``Position.random()`` (or ``of_seed`` for a fixed one): no coordination, the clients
  are independent as in A68; neighbouring subsets overlap, so the extremes are
  milder than A68's (about 1.8x at ``size`` 100, 1.45x at 200), but no choice made
  by each client alone can do better than chance.

Pure: instances and a position in, a subset out; nothing here does I/O.
"""

from __future__ import annotations

import bisect
import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from discovery_core.errors import InvalidConfig
from discovery_core.model import ServiceInstance, SnapshotDiff

__all__ = ["DEFAULT_SUBSET_SIZE", "Position", "Ring", "check_subset_size", "subset"]

#: Connections per client by default: A68's trade (fewer connections per server,
#: enough traffic per endpoint to judge it by) at the scale issue 10 suggests; with
#: client indices the busiest instance takes about 1.3x the mean (bench/spread.py).
DEFAULT_SUBSET_SIZE = 100

_BITS = 64
_RING = 1 << _BITS


def check_subset_size(size: object) -> int | None:
    """``size`` as the number of instances a client keeps (None: all of them)."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise InvalidConfig("subset_size", size, "must be an int of at least 1, or None for every instance")
    return size


def _hash(data: bytes) -> int:
    """A point on the ring, the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=_BITS // 8).digest(), "big")


@dataclass(frozen=True)
class Position:
    """Where one client stands on the ring, in [0, 2**64)."""

    point: int

    @classmethod
    def of_index(cls, index: object) -> Position:
        """The ``index``-th client of a fleet numbered from 0: its index bit-reversed,
        so the first 2**k clients stand 2**-k of the ring apart."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < _RING:
            raise InvalidConfig("client_index", index, "must be an int in [0, 2**64): the client's number in its fleet")
        return cls(int(f"{index:0{_BITS}b}"[::-1], 2))

    @classmethod
    def of_seed(cls, seed: str | bytes) -> Position:
        """A position fixed by ``seed`` (a client's own identity), anywhere on the ring."""
        return cls(_hash(seed.encode() if isinstance(seed, str) else seed))

    @classmethod
    def random(cls) -> Position:
        """A fresh random position (A68's per-channel salt)."""
        return cls(secrets.randbits(_BITS))


class Ring:
    """One service's instances in ring order, kept by id across updates.

    Built once, then ``apply`` each change (cost: the change, not the service);
    ``subset`` reads ``size`` entries from the position on.
    """

    def __init__(self, instances: Iterable[ServiceInstance] = ()) -> None:
        self._instances = {inst.id: inst for inst in instances}
        self._order = sorted((_hash(inst_id.encode()), inst_id) for inst_id in self._instances)

    def __len__(self) -> int:
        return len(self._instances)

    def add(self, instance: ServiceInstance) -> None:
        """Add an instance, or replace the one of the same id (its place stays)."""
        if instance.id not in self._instances:
            bisect.insort(self._order, (_hash(instance.id.encode()), instance.id))
        self._instances[instance.id] = instance

    def remove(self, instance_id: str) -> None:
        """Remove an instance by id (an unknown id is not an error)."""
        if self._instances.pop(instance_id, None) is not None:
            del self._order[bisect.bisect_left(self._order, (_hash(instance_id.encode()), instance_id))]

    def apply(self, diff: SnapshotDiff) -> None:
        """Follow a change of the set this ring holds."""
        for inst in diff.removed:
            self.remove(inst.id)
        for inst in (*diff.added, *diff.changed):
            self.add(inst)

    def subset(self, size: int | None, position: Position) -> tuple[ServiceInstance, ...]:
        """The ``size`` instances clockwise from ``position`` (all of them when
        ``size`` is None or not below their number), in ring order."""
        size = check_subset_size(size)
        count = len(self._order) if size is None else min(size, len(self._order))
        order = self._order
        start = bisect.bisect_left(order, (position.point, ""))
        taken = order[start : start + count] + order[: max(0, start + count - len(order))]
        return tuple(self._instances[inst_id] for _, inst_id in taken)


def subset(instances: Sequence[ServiceInstance], size: int | None, position: Position) -> tuple[ServiceInstance, ...]:
    """The instances a client at ``position`` keeps: ``Ring(instances).subset(...)``."""
    return Ring(instances).subset(size, position)
