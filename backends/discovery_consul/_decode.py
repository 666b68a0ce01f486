"""Health answers as snapshots, building only what changed.

Every answer to a blocking query on a service holds the whole set, and building and
validating each instance of it anew was a third of a poll of a 1,000-instance
service. A ``Decoder`` keeps the instances of its query's last answer by the raw
fields they were built from: an entry whose fields are the same as last time is the
very instance the last snapshot held (so ``Snapshot.diff`` skips it at C speed), and
only new or changed entries go through the model's constructor, which validates
them. An entry the model refuses (registered by another tool with, say, a repeated
tag) is skipped with a warning once, not on every answer.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any

from discovery_consul._client import HealthResult
from discovery_consul._shared import Read, check_key
from discovery_core import HealthStatus, InvalidInstance, Query, ServiceInstance, Snapshot

__all__ = ["Decoder"]

log = logging.getLogger("discovery_consul")

_STATUSES = {status.value: status for status in HealthStatus}  # anything else ("maintenance"): critical


class Decoder:
    """Decodes the health answers of one query, reusing the instances of the last."""

    def __init__(self, query: Query) -> None:
        self.query = query
        self._known: dict[Hashable, ServiceInstance | None] = {}  # raw fields -> instance (None: refused)

    def read(self, result: HealthResult) -> Read:
        """The answer as a snapshot, the nodes its instances run on, whether one of
        them (or none at all) has no check of its own, and its checks as the check
        detector fingerprints them."""
        service = self.query.service
        known = self._known
        kept: dict[Hashable, ServiceInstance | None] = {}
        instances: list[ServiceInstance] = []
        health: dict[str, HealthStatus] = {}
        nodes: set[str] = set()
        service_checks: set[Hashable] = set()
        node_checks: dict[str, set[Hashable]] = {}
        unchecked = not result.entries
        for entry in result.entries:
            checks = entry.get("Checks") or []
            for check in checks:
                if check.get("ServiceID"):
                    service_checks.add(check_key(check))
                else:
                    node_checks.setdefault(str(check.get("Node")), set()).add(check_key(check))
            raw = entry.get("Service") or {}
            node = entry.get("Node") or {}
            key = _fields(raw, node)
            try:
                instance = known[key]
            except KeyError:  # new or changed (None, an unhashable entry, is never kept)
                instance = _instance(raw, node)
            if key is not None:
                kept[key] = instance
            if instance is None or instance.name != service:
                continue
            instances.append(instance)
            health[instance.id], checked = _health(checks, instance.id)
            nodes.add(str(node.get("Node", "")))
            unchecked |= not checked
        self._known = kept
        snapshot = Snapshot(service, tuple(instances), index=result.index, health=health)
        frozen_node_checks = {node: frozenset(keys) for node, keys in node_checks.items()}
        return Read(snapshot, frozenset(nodes), unchecked, frozenset(service_checks), frozen_node_checks)


def _fields(raw: Mapping[str, Any], node: Mapping[str, Any]) -> Hashable | None:
    """What an instance is built from, hashable (None if some field is not: the entry
    is then built, and refused, every time)."""
    meta = raw.get("Meta") or {}
    weights = raw.get("Weights") or {}
    key = (
        raw.get("ID"),
        raw.get("Service"),
        raw.get("Address") or node.get("Address"),
        raw.get("Port"),
        tuple(raw.get("Tags") or ()),
        tuple(meta.items()) if isinstance(meta, dict) else meta,
        weights.get("Passing") if isinstance(weights, dict) else weights,
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _instance(raw: Mapping[str, Any], node: Mapping[str, Any]) -> ServiceInstance | None:
    """A health entry's service as a ServiceInstance (``check=None``), or None if it
    is not one this API can hold."""
    try:
        return ServiceInstance(
            raw.get("Service", ""),
            raw.get("Address") or node.get("Address", ""),
            raw.get("Port", 0),
            id=raw.get("ID", ""),
            tags=tuple(raw.get("Tags") or ()),
            meta=raw.get("Meta") or {},
            weight=(raw.get("Weights") or {}).get("Passing") or 1,
        )
    except (InvalidInstance, TypeError, AttributeError) as exc:
        log.warning("skipping Consul service %r: %s", raw.get("ID"), exc)
        return None


def _health(checks: list[Mapping[str, Any]], instance_id: str) -> tuple[HealthStatus, bool]:
    """An entry's health (its worst check: critical > warning > passing), and whether
    one of its checks is the instance's own (not only its node's)."""
    worst = HealthStatus.PASSING
    own = False
    for check in checks:
        status = _STATUSES.get(str(check.get("Status")), HealthStatus.CRITICAL)
        if status is HealthStatus.CRITICAL or (status is HealthStatus.WARNING and worst is HealthStatus.PASSING):
            worst = status
        own = own or check.get("ServiceID") == instance_id
    return worst, own
