"""A backend from another distribution: delegates to a memory backend it opens
through discovery_core's public ``connect()``, as any third party could."""

from __future__ import annotations

from discovery_core import Backend, Query, ServiceInstance, Snapshot, Stop, connect


class WrappedBackend(Backend):
    """``wrapped://``: the memory backend behind a third party's entry point."""

    name = "wrapped"

    def __init__(self) -> None:
        super().__init__()
        self._inner = connect("memory://")

    def _add(self, instance: ServiceInstance) -> None:
        self._check_open()
        self._inner._add(instance)

    def deregister(self, instance_id: str) -> None:
        self._inner.deregister(instance_id)

    def _heartbeat(self, instance_id: str) -> None:
        self._inner._heartbeat(instance_id)

    def _is_registered(self, instance: ServiceInstance) -> bool:
        return self._inner._is_registered(instance)

    def poll(self, query: Query, index: int, stop: Stop) -> Snapshot:
        return self._inner.poll(query, index, stop)

    def _close_resources(self) -> None:
        self._inner.close()
