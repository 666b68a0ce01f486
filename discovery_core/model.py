"""The values the API trades in: instances, health checks, health states and snapshots.

They are frozen and validated on construction, so a bad name, address, port, tag,
meta entry or check raises ``InvalidInstance`` before anything reaches a backend, and
every backend can trust what it is handed. The limits follow Consul's (the strictest
backend we ship), so an instance valid here is valid everywhere.
"""

from __future__ import annotations

import bisect
import enum
import functools
import ipaddress
import math
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from types import MappingProxyType

from discovery_core.errors import InvalidInstance

__all__ = [
    "Check",
    "GrpcCheck",
    "HealthStatus",
    "HttpCheck",
    "ProbeCheck",
    "ServiceInstance",
    "Snapshot",
    "SnapshotDiff",
    "TcpCheck",
    "TtlCheck",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
# Instance ids travel in URL paths (Consul's /v1/agent/service/deregister/<id>).
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@\[\]-]{0,255}\Z")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_META_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
_GRPC_SERVICE = re.compile(r"[A-Za-z0-9._/-]{0,255}\Z")
_HTTP_PATH = re.compile(r"/[\x21-\x7e]{0,1023}\Z")
_MAX_META = 64
_MAX_META_VALUE = 512
_MAX_SECONDS = 7 * 24 * 3600.0
_MAX_WEIGHT = 65535
_BY_ID = operator.attrgetter("id")


class HealthStatus(enum.StrEnum):
    """An instance's health as its backend's checks last saw it."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"


def _seconds(field_name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInstance(field_name, value, "must be a number of seconds")
    if not math.isfinite(value) or not 0 < value <= _MAX_SECONDS:
        raise InvalidInstance(field_name, value, f"must be > 0 and <= {_MAX_SECONDS:g} seconds")


def _port(field_name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidInstance(field_name, value, "must be an int from 1 to 65535")


def _flag(field_name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidInstance(field_name, value, "must be True or False")


@dataclass(frozen=True, kw_only=True)
class Check:
    """What every health check has.

    ``deregister_after``: remove the instance once it has been critical this long
    (Consul's minimum is one minute). It is meant for processes that died: a live
    ``Registration`` puts its instance back. ``initial_status``: the state before the
    first check result (Consul's default, critical, keeps an instance out of traffic
    until it proved itself; ``serve()`` starts at passing because it only registers
    once the server answers).
    """

    deregister_after: float | None = None
    initial_status: HealthStatus = HealthStatus.CRITICAL

    def __post_init__(self) -> None:
        _seconds("check.deregister_after", self.deregister_after, optional=True)
        if not isinstance(self.initial_status, HealthStatus):
            try:
                object.__setattr__(self, "initial_status", HealthStatus(self.initial_status))
            except ValueError:
                raise InvalidInstance(
                    "check.initial_status", self.initial_status, "must be passing, warning or critical"
                ) from None


@dataclass(frozen=True, kw_only=True)
class ProbeCheck(Check):
    """A check that actively probes the instance every ``interval`` seconds."""

    interval: float = 10.0
    timeout: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _seconds("check.interval", self.interval)
        _seconds("check.timeout", self.timeout)


@dataclass(frozen=True, kw_only=True)
class GrpcCheck(ProbeCheck):
    """grpc.health.v1 ``Check`` on the instance's own address; SERVING is passing.

    ``service`` is the name asked of the health service ("" asks about the server).
    """

    service: str = ""
    tls: bool = False
    tls_skip_verify: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.service, str) or not _GRPC_SERVICE.match(self.service):
            raise InvalidInstance("check.service", self.service, "must be a gRPC service name")
        _flag("check.tls", self.tls)
        _flag("check.tls_skip_verify", self.tls_skip_verify)


@dataclass(frozen=True, kw_only=True)
class HttpCheck(ProbeCheck):
    """An HTTP GET on the instance; 2xx is passing, 429 warning, anything else critical.

    ``port`` defaults to the instance's port.
    """

    path: str = "/"
    port: int | None = None
    tls: bool = False
    tls_skip_verify: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.path, str) or not _HTTP_PATH.match(self.path):
            raise InvalidInstance("check.path", self.path, "must start with / and hold no spaces")
        _port("check.port", self.port, optional=True)
        _flag("check.tls", self.tls)
        _flag("check.tls_skip_verify", self.tls_skip_verify)


@dataclass(frozen=True, kw_only=True)
class TcpCheck(ProbeCheck):
    """A TCP connect to the instance; ``port`` defaults to the instance's port."""

    port: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _port("check.port", self.port, optional=True)


@dataclass(frozen=True, kw_only=True)
class TtlCheck(Check):
    """Passing while heartbeats arrive at least every ``ttl`` seconds.

    A live ``Registration`` sends them at a third of the TTL by itself.
    """

    ttl: float = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _seconds("check.ttl", self.ttl)


def _validate_address(address: object) -> None:
    if not isinstance(address, str) or not address:
        raise InvalidInstance("address", address, "must be a non-empty IP address or host name")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        labels = address.rstrip(".").split(".")
        # An all-numeric last label is a mistyped IP address, never a host name (RFC 3696).
        if len(address) > 253 or labels[-1].isdigit() or not all(_HOST_LABEL.match(label) for label in labels):
            raise InvalidInstance("address", address, "is neither an IP address nor a host name") from None
        return
    if ip.is_unspecified:
        raise InvalidInstance("address", address, "is the unspecified address; advertise one clients can dial")


def _validate_tags(tags: object) -> tuple[str, ...]:
    if isinstance(tags, str | bytes) or not isinstance(tags, Iterable):
        raise InvalidInstance("tags", tags, "must be a tuple of strings, not a single string")
    result = tuple(tags)
    for tag in result:
        if not isinstance(tag, str) or not 1 <= len(tag) <= 255 or not tag.isprintable() or " " in tag:
            raise InvalidInstance("tag", tag, "must be 1-255 printable characters without spaces")
    if len(set(result)) != len(result):
        raise InvalidInstance("tags", tags, "must not repeat a tag")
    return result


def _validate_meta(meta: object) -> Mapping[str, str]:
    if not isinstance(meta, Mapping):
        raise InvalidInstance("meta", meta, "must be a mapping of str to str")
    if len(meta) > _MAX_META:
        raise InvalidInstance("meta", meta, f"must hold at most {_MAX_META} entries")
    for key, value in meta.items():
        if not isinstance(key, str) or not _META_KEY.match(key):
            raise InvalidInstance("meta key", key, "must be 1-128 characters of A-Z a-z 0-9 _ -")
        if key.startswith("consul-"):
            raise InvalidInstance("meta key", key, "the consul- prefix is reserved")
        if not isinstance(value, str) or len(value) > _MAX_META_VALUE:
            raise InvalidInstance(f"meta[{key!r}]", value, f"must be a str of at most {_MAX_META_VALUE} characters")
    return MappingProxyType(dict(sorted(meta.items())))


@dataclass(frozen=True)
class ServiceInstance:
    """One network endpoint of a service, as a server registers it.

    ``id`` defaults to ``name-address-port``; registering the same id again replaces
    the earlier registration. ``weight`` is a relative share of traffic for
    policies that use it.
    """

    name: str
    address: str
    port: int
    _: KW_ONLY
    id: str = ""
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    weight: int = 1
    check: Check | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InvalidInstance(
                "name", self.name, "must be 1-128 characters of A-Z a-z 0-9 . _ - starting alphanumeric"
            )
        _validate_address(self.address)
        _port("port", self.port)
        if self.id == "":
            object.__setattr__(self, "id", f"{self.name}-{self.address}-{self.port}")
        if not isinstance(self.id, str) or not _ID.match(self.id):
            raise InvalidInstance("id", self.id, "must be 1-256 characters of A-Z a-z 0-9 . _ : @ [ ] -")
        object.__setattr__(self, "tags", _validate_tags(self.tags))
        object.__setattr__(self, "meta", _validate_meta(self.meta))
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or not 1 <= self.weight <= _MAX_WEIGHT:
            raise InvalidInstance("weight", self.weight, f"must be an int from 1 to {_MAX_WEIGHT}")
        if self.check is not None and not isinstance(self.check, Check):
            raise InvalidInstance("check", self.check, "must be a GrpcCheck, TtlCheck, HttpCheck, TcpCheck or None")

    def __hash__(self) -> int:
        return hash(
            (self.id, self.name, self.address, self.port, self.tags, tuple(self.meta.items()), self.weight, self.check)
        )

    @functools.cached_property
    def target(self) -> str:
        """``host:port`` as gRPC dials it (IPv6 literals bracketed)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class SnapshotDiff:
    """What changed between two snapshots, by instance id."""

    added: tuple[ServiceInstance, ...]
    removed: tuple[ServiceInstance, ...]
    changed: tuple[ServiceInstance, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


@dataclass(frozen=True)
class Snapshot:
    """The whole set of a service's instances at one moment, never a delta.

    ``instances`` is sorted by id. ``health`` maps each instance id to its status
    (ids it does not name are passing), in the order it was given. ``index`` grows
    with every change a watch delivers. ``stale`` is True while the backend is
    unreachable and this is the last set known good. An empty snapshot is a real
    state: the service has no instance.
    """

    service: str
    instances: tuple[ServiceInstance, ...] = ()
    _: KW_ONLY
    index: int = 0
    stale: bool = False
    health: Mapping[str, HealthStatus] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        # Sorted once: input already sorted by id (what backends build, what a watch
        # hands on) is checked, not sorted again.
        instances = tuple(self.instances)
        ids = [inst.id for inst in instances]
        if ids != sorted(ids):
            instances = tuple(sorted(instances, key=_BY_ID))
        object.__setattr__(self, "instances", instances)
        # A dict's own copy runs at C speed whatever its history (dict() does not).
        health = self.health
        copied = health.copy() if isinstance(health, dict | MappingProxyType) else None
        object.__setattr__(self, "health", MappingProxyType(copied if type(copied) is dict else dict(health)))

    def __hash__(self) -> int:
        return hash((self.service, self.instances, self.index, self.stale))

    def _restamped(self, *, index: int, stale: bool) -> Snapshot:
        """This snapshot under another index and staleness, sharing its instances,
        health and cached lookups: ``dataclasses.replace`` without validating, sorting
        and copying again (a watch restamps every snapshot it delivers)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__, index=index, stale=stale)
        return copy

    @functools.cached_property
    def _ids(self) -> frozenset[str]:
        return frozenset([inst.id for inst in self.instances])

    @functools.cached_property
    def _health_columns(self) -> tuple[list[str], list[HealthStatus]]:
        return list(self.health), list(self.health.values())

    def status(self, instance_id: str) -> HealthStatus:
        """The health of one instance of this snapshot; ``KeyError`` for an id it
        does not hold (it says nothing of those: never "passing")."""
        if instance_id not in self._ids:
            raise KeyError(instance_id)
        return self.health.get(instance_id, HealthStatus.PASSING)

    def same_content(self, other: Snapshot | None) -> bool:
        """Same instances in the same health, whatever the index and staleness."""
        return other is not None and self.instances == other.instances and not self._health_changes(other)

    def diff(self, previous: Snapshot | None) -> SnapshotDiff:
        """Instances added, removed, and changed (fields or health) since ``previous``.

        Its cost follows what changed: what the two snapshots share at either end of
        their sorted instances (the very same objects, as backends and watches hand
        them on) is skipped at C speed; only what lies between is compared by id."""
        if previous is None:
            return SnapshotDiff(added=self.instances, removed=(), changed=())
        head, tail = common_ends((previous.instances, self.instances))
        before = {inst.id: inst for inst in previous.instances[head : len(previous.instances) - tail]}
        after = {inst.id: inst for inst in self.instances[head : len(self.instances) - tail]}
        changed = {inst_id for inst_id, inst in after.items() if inst_id in before and before[inst_id] != inst}
        changed.update(self._health_changes(previous))
        return SnapshotDiff(
            added=tuple(after[inst_id] for inst_id in sorted(after.keys() - before.keys())),
            removed=tuple(before[inst_id] for inst_id in sorted(before.keys() - after.keys())),
            changed=tuple(inst for inst_id in sorted(changed) if (inst := self._instance(inst_id)) is not None),
        )

    def _instance(self, instance_id: str) -> ServiceInstance | None:
        """The instance of this id, by bisection (they are sorted); None if none."""
        at = bisect.bisect_left(self.instances, instance_id, key=_BY_ID)
        found = self.instances[at] if at < len(self.instances) else None
        return found if found is not None and found.id == instance_id else None

    def _health_changes(self, other: Snapshot) -> set[str]:
        """Ids of instances both snapshots hold whose health differs: only the
        entries between the two healths' common ends are looked at."""
        if self.health == other.health:
            return set()
        (mine, my_states), (theirs, their_states) = self._health_columns, other._health_columns
        head, tail = common_ends((mine, theirs), (my_states, their_states))
        suspects = {*mine[head : len(mine) - tail], *theirs[head : len(theirs) - tail]}
        passing = HealthStatus.PASSING
        return {
            inst_id
            for inst_id in suspects
            if self.health.get(inst_id, passing) != other.health.get(inst_id, passing)
            and self._instance(inst_id) is not None
            and other._instance(inst_id) is not None
        }


def common_ends(*pairs: tuple[Sequence[object], Sequence[object]]) -> tuple[int, int]:
    """How many positions from the start, and then from the end, hold equal items in
    each pair of sequences (aligned rows, a sequence per column)."""
    head = min(_common_run(a, b, 0, 1) for a, b in pairs)
    tail = min(_common_run(a, b, head, -1) for a, b in pairs)
    return head, tail


def _common_run(a: Sequence[object], b: Sequence[object], skip: int, step: int) -> int:
    """How many items are equal in both from the start (``step`` 1) or from the end
    (-1), not counting the first ``skip`` of either. By halving: slices are compared
    in C (identity first), so sequences sharing their items cost a few C passes."""
    low, high = 0, min(len(a), len(b)) - skip
    while low < high:  # ``low`` items are equal; no more than ``high`` are
        middle = (low + high + 1) // 2
        if step > 0:
            equal = a[low:middle] == b[low:middle]
        else:
            equal = a[len(a) - middle : len(a) - low] == b[len(b) - middle : len(b) - low]
        if equal:
            low = middle
        else:
            high = middle - 1
    return low
