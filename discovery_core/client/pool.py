"""The endpoint pool: one channel's endpoints, kept by instance id, and its picker.

grpc-go's base balancer: ``apply(snapshot)`` is the resolver update (keep endpoints
whose instance stays, open new ones, retire the rest once their calls finish),
``rebuild`` makes a new picker over the endpoints, ``finished`` is a call's ``Done``.
Endpoint health needs no handling here: C-core follows it on each endpoint's
channel, and pickers read it. The decisions are made here once; each face (sync,
aio) subclasses it with the I/O.
"""

from __future__ import annotations

import abc
import logging
import time
from typing import Generic

from discovery_core.client.endpoint import C, Endpoint
from discovery_core.client.picker import Picker, policy_class
from discovery_core.client.select import check_threshold, select
from discovery_core.client.subset import Position, Ring, check_subset_size
from discovery_core.errors import DiscoveryError
from discovery_core.model import ServiceInstance, Snapshot, common_ends

__all__ = ["Pool"]

log = logging.getLogger("discovery_core.channel")


def _changes(
    held: tuple[ServiceInstance, ...], instances: tuple[ServiceInstance, ...]
) -> tuple[list[ServiceInstance], list[ServiceInstance]]:
    """From ``held`` to ``instances`` (each in a stable order, e.g. by id): those that
    arrived (new, or changed) and those that left (no instance of their id arrived).
    Backends hand unchanged instances on as the same objects, so the ends both share
    are skipped at C speed and the cost follows the change, not the set."""
    head, tail = common_ends((held, instances))
    before, after = held[head : len(held) - tail], instances[head : len(instances) - tail]
    stayed = {id(instance) for instance in before}.intersection(map(id, after))
    arrived = [instance for instance in after if id(instance) not in stayed]
    arrived_ids = {instance.id for instance in arrived}
    left = [inst for inst in before if id(inst) not in stayed and inst.id not in arrived_ids]
    return arrived, left


class Pool(Generic[C], abc.ABC):
    """The endpoints of one channel and the picker built from them.

    ``apply(snapshot)`` chooses the instances (``select``: the healthy ones, or all
    listed when failing open; then this client's subset of them, ``subset``), keeps
    endpoints whose instance stays (same id and target), opens new ones and retires
    the rest (closed once their calls finish), touching only instances that changed.
    A subclass
    supplies the I/O: opening and closing endpoint channels, and waking callers that
    wait for a usable picker.
    """

    def __init__(
        self,
        service: str,
        policy: str,
        *,
        health_check: bool,
        panic_threshold: float,
        subset_size: int | None,
        client_index: int | None,
    ) -> None:
        self.service = service
        self.policy = policy_class(policy)
        self.health_check = health_check
        self.panic_threshold = check_threshold(panic_threshold)
        self.subset_size = check_subset_size(subset_size)
        self.position = Position.random() if client_index is None else Position.of_index(client_index)
        self._ring = Ring()  # the selected instances, when the channel keeps a subset of them
        self._selected: tuple[ServiceInstance, ...] = ()  # what the ring holds
        #: Wall time since when the registry's healthy set is below the panic threshold
        #: and the channel keeps its critical instances (None: not failing open).
        self.fail_open_since: float | None = None
        self.closed = False
        self.resolved = False  # a snapshot was applied
        self.error: DiscoveryError | None = None  # the watch's last error while it fails
        self.picker: Picker[C] = self.policy(service, (), resolved=False)
        self.endpoints: dict[str, Endpoint[C]] = {}
        self._held: tuple[ServiceInstance, ...] = ()  # the instances with endpoints

    @abc.abstractmethod
    def open(self, instance: ServiceInstance) -> C:
        """A new channel to one instance."""

    @abc.abstractmethod
    def release(self, endpoint: Endpoint[C]) -> None:
        """Close a retired endpoint's channel (its calls are done)."""

    def notify(self) -> None:
        """A new picker is in place: wake waiters (the caller holds the pool's lock)."""

    def apply(self, snapshot: Snapshot) -> None:
        if self.closed:
            return
        self.resolved = True
        if not snapshot.stale:
            self.error = None
        selection = select(snapshot, self.panic_threshold)
        self._fail_open(selection.panicked, selection.healthy, selection.listed)
        chosen = selection.instances
        if self.subset_size is not None:
            arrived, left = _changes(self._selected, chosen)
            self._selected = chosen
            for instance in left:
                self._ring.remove(instance.id)
            for instance in arrived:
                self._ring.add(instance)
            chosen = self._ring.subset(self.subset_size, self.position)
        arrived, left = _changes(self._held, chosen)
        self._held = chosen
        gone = [self.endpoints.pop(instance.id) for instance in left]
        for instance in arrived:
            endpoint = self.endpoints.get(instance.id)
            if endpoint is not None and endpoint.instance.target == instance.target:
                endpoint.instance = instance  # weight or meta changed
                continue
            if endpoint is not None:
                gone.append(endpoint)  # moved to another address: a new connection
            self.endpoints[instance.id] = Endpoint(instance, self.open(instance))
        if arrived or gone or self.picker.resolving or self.picker.error is not self.error:
            self.rebuild(gone)  # before closing anything, so no new pick lands on a closed endpoint
        for endpoint in gone:
            self._retire(endpoint)

    def _fail_open(self, panicked: bool, healthy: int, listed: int) -> None:
        if panicked and self.fail_open_since is None:
            self.fail_open_since = time.time()
            how = "while each one's own health stream says SERVING" if self.health_check else "as last known"
            log.warning(
                "%s: the registry shows %d of %d instances healthy (below %.0f%%): failing open, "
                "keeping calls on every listed instance %s",
                self.service, healthy, listed, self.panic_threshold * 100, how,
            )  # fmt: skip
        elif not panicked and self.fail_open_since is not None:
            self.fail_open_since = None
            log.info("%s: the registry shows %d of %d instances healthy: fail-open ends", self.service, healthy, listed)

    def failed(self, error: DiscoveryError) -> None:
        """The watch failed: calls that find no endpoint say so (and before a first
        snapshot stop waiting for one)."""
        if not self.closed:
            self.error = error
            self.rebuild()

    def rebuild(self, gone: list[Endpoint[C]] | None = None) -> None:
        """A new picker over the endpoints, trusting what the old one knew was ready
        (except ``gone``): a change of one instance reads no other's state."""
        previous = self.picker
        self.picker = self.policy(
            self.service,
            tuple(self.endpoints.values()),
            resolved=self.resolved,
            error=self.error,
            lone=not self.health_check,
        )
        self.picker.carry(previous, gone or ())
        self.notify()

    def _retire(self, endpoint: Endpoint[C]) -> None:
        if endpoint.retire():
            self.release(endpoint)

    def finished(self, endpoint: Endpoint[C]) -> None:
        """A call on ``endpoint`` ended (close the endpoint if it was the last of a retired one)."""
        if endpoint.end():
            self.release(endpoint)

    def close_all(self) -> list[Endpoint[C]]:
        """Retire every endpoint; returns them (the caller closes their channels)."""
        self.closed = True
        endpoints, self.endpoints = list(self.endpoints.values()), {}
        for endpoint in endpoints:
            endpoint.retire(now=True)
        self.picker = self.policy(self.service, ())
        self.notify()
        return endpoints
