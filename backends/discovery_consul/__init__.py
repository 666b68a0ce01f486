"""The Consul backend: registration through the local agent, watches as blocking queries.

``connect("consul://127.0.0.1:8500?dc=dc1&token_file=/run/consul-token")`` or
``connect("consul", address="127.0.0.1:8500", token=...)``. Instances go to the local
agent with their check (gRPC, TTL, HTTP, TCP) in Consul's CamelCase JSON, which every
Consul from 1.8 on accepts; Consul's agent runs the probes. A watch is a blocking
query on ``/v1/health/service/<name>``; core's feed keeps the index, dedupes, rate
limits and backs off. Uses only discovery_core's public API, and py-consul only
through the adapter in ``_client``.

The catalog does not give an instance's check back: instances in snapshots have
``check=None``; their health is in ``Snapshot.health``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from discovery_consul._client import ConsulClient, HealthResult, Settings
from discovery_consul._decode import Decoder
from discovery_consul._shared import Detector, Fingerprints, Read, SharedFeeds, Watched, check_key
from discovery_core import (
    Backend,
    Check,
    Feed,
    GrpcCheck,
    HttpCheck,
    InvalidConfig,
    InvalidInstance,
    Presence,
    Query,
    ServiceInstance,
    Snapshot,
    Stop,
    TcpCheck,
    TtlCheck,
)

__all__ = ["ConsulBackend"]

log = logging.getLogger("discovery_consul")
log.addHandler(logging.NullHandler())  # a library prints nothing by itself

_DEFAULT_ADDRESS = "127.0.0.1:8500"
_MAX_WAIT = 600.0  # Consul caps a blocking query's wait at 10 minutes
_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ms|s|m)?\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}
_CONTROL = 2  # connections kept for writes and one-shot reads
_SHARED = 3  # the shared feeds': two change detectors and a reader
_MIN_CONNECTIONS = _CONTROL + _SHARED
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _go_duration(seconds: float) -> str:
    """Seconds as a Go duration string: 1.5 -> "1.5s", 0.25 -> "250ms"."""
    millis = max(round(seconds * 1000), 1)
    return f"{millis}ms" if millis % 1000 else f"{millis // 1000}s"


def _bexpr_string(value: str) -> str:
    """A string literal for Consul's filter language (its parser takes \\uXXXX but
    not \\" inside double quotes)."""
    escaped = []
    for char in value:
        if char in '"\\' or not char.isprintable():
            escaped.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _alternatives(names: frozenset[str]) -> str:
    """An RE2 pattern matching exactly these names."""
    return "^(" + "|".join(re.escape(name) for name in sorted(names)) + ")$"


def _frozen(groups: Mapping[str, set[tuple[str, ...]]]) -> dict[str, frozenset[Hashable]]:
    return {name: frozenset(keys) for name, keys in groups.items()}


def _filter_expression(query: Query) -> str:
    terms = [f"{_bexpr_string(tag)} in Service.Tags" for tag in query.tags]
    terms += [f"Service.Meta[{_bexpr_string(key)}] == {_bexpr_string(value)}" for key, value in query.meta]
    return " and ".join(terms)


class ConsulBackend(Backend):
    """Registrations and watches through a Consul agent (``consul://host:port``).

    Options (keyword arguments or URL query parameters):

    ``address`` host:port of the agent (``CONSUL_HTTP_ADDR``, else 127.0.0.1:8500);
    ``scheme`` http or https; ``dc`` datacenter to read from; ``token`` or
    ``token_file`` ACL token (``CONSUL_HTTP_TOKEN`` when neither is given);
    ``ca_file``, ``cert_file``, ``key_file``, ``verify`` TLS; ``wait`` seconds a
    blocking query may wait (at most 600); ``stale`` let any server answer reads;
    ``timeout`` seconds for a plain request (a blocking query gets ``wait`` and its
    jitter on top); ``max_connections`` the most connections this backend opens to
    the agent (default 16, at least 5), whatever it watches or registers.

    Consul allows 200 connections per client address, shared by every process on the
    node. Of the budget, 2 connections are kept for writes and one-shot reads, so
    watches never starve a registration; each of the first ``max_connections - 5``
    watched queries holds a blocking query of its own (the fastest path); the rest
    share 3 connections through datacenter-wide change detectors (see ``_shared``).
    """

    name = "consul"
    # A sweep costs 1 + (distinct services) requests, at most 2 per registration:
    # every 20 s keeps the idle cost under one request per registration per 10 s.
    # A watch that sees the agent come back, or a failed heartbeat, sweeps sooner.
    keepalive_interval = 20.0
    # A blocking query is never cut short when its watch closes (Consul 1.8 would keep
    # serving it, and counting its connection, until its wait ran out): the poll
    # finishes in the background, still inside the budget.
    close_timeout = 0.0

    def __init__(
        self,
        *,
        address: str | None = None,
        scheme: str | None = None,
        dc: str | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        verify: bool | str = True,
        wait: float | str = 60.0,
        stale: bool | str = False,
        timeout: float | str = 10.0,
        max_connections: int | str = 16,
    ) -> None:
        host, port, scheme = _resolve_address(address, scheme)
        if token is not None and token_file is not None:
            raise InvalidConfig("token_file", token_file, "give token or token_file, not both", backend=self.name)
        if token_file is not None:
            token = _read_token(token_file)
        elif token is None:
            token = os.environ.get("CONSUL_HTTP_TOKEN") or None
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise InvalidConfig("token", token, "must be a non-empty string", backend=self.name)
        for option, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
            if path is not None and not Path(path).is_file():
                raise InvalidConfig(option, path, "no such file", backend=self.name)
        if key_file is not None and cert_file is None:
            raise InvalidConfig("key_file", key_file, "needs cert_file", backend=self.name)
        if dc is not None and (not isinstance(dc, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", dc)):
            raise InvalidConfig("dc", dc, "must be a datacenter name", backend=self.name)
        self.address = f"{host}:{port}"
        self.dc = dc
        self.wait = _seconds("wait", wait, maximum=_MAX_WAIT)
        self.stale = _boolean("stale", stale)
        self._settings = Settings(
            host=host,
            port=port,
            scheme=scheme,
            token=token.strip() if token else None,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            verify=_boolean("verify", verify),
            timeout=_seconds("timeout", timeout, maximum=_MAX_WAIT),
        )
        self.max_connections = _count("max_connections", max_connections, minimum=_MIN_CONNECTIONS)
        super().__init__()
        direct = self.max_connections - _MIN_CONNECTIONS
        self._client = ConsulClient(self._settings, control=_CONTROL, queries=direct + _SHARED)
        self._direct = threading.BoundedSemaphore(direct) if direct else None
        detectors = (
            Detector("check", self._detect_checks, critical=True, narrowed=True, unchecked=False),
            Detector("catalog", self._detect_registrations, critical=False, narrowed=False, unchecked=True),
        )
        self._shared = SharedFeeds(detectors, self._read, self.wait)
        self._node: tuple[str, str] | None = None  # the agent's (name, id), read again after a loss
        # The decoder of each watched query (a feed stopping while its successor
        # starts shares it: counted).
        self._decoders: dict[Query, tuple[int, Decoder]] = {}
        self._decoders_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """``consul://host:port?dc=...&token_file=...``; an empty host means
        ``CONSUL_HTTP_ADDR`` (or 127.0.0.1:8500). Keyword options win over the URL's."""
        parts = urllib.parse.urlsplit(url)
        if parts.path not in ("", "/") or parts.fragment or parts.username or parts.password:
            raise InvalidConfig("url", url, "expected consul://host:port?option=value", backend=cls.name)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        if parts.netloc:
            query["address"] = parts.netloc
        return cls.create(**{**query, **options})

    # -- Registry ---------------------------------------------------------------------

    def _add(self, instance: ServiceInstance) -> None:
        self._check_open()
        payload: dict[str, Any] = {
            "ID": instance.id,
            "Name": instance.name,
            "Address": instance.address,
            "Port": instance.port,
            "Tags": list(instance.tags),
            "Meta": dict(instance.meta),
            "Weights": {"Passing": instance.weight, "Warning": 1},
        }
        if instance.check is not None:
            payload["Check"] = _check_definition(instance, instance.check)
        self._client.register(payload)

    def deregister(self, instance_id: str) -> None:
        # Unknown ids are fine: Consul 1.8 answers 200 for them.
        self._client.deregister(instance_id)

    def _heartbeat(self, instance_id: str) -> None:
        self._check_open()
        self._client.pass_ttl(f"service:{instance_id}")

    def _is_registered(self, instance: ServiceInstance) -> bool:
        self._check_open()
        return _as_written(self._client.agent_service(instance.id), instance)

    def registered(self, instances: Sequence[ServiceInstance]) -> dict[str, Presence]:
        """The local agent's services in one read, then the catalog per service name,
        narrowed to this agent's node: the agent may hold an instance the servers
        never got (it cannot sync: a restarted agent whose node name the catalog
        still reserves for its old node id)."""
        self._check_open()
        services = self._client.agent_services()
        held = {instance.id for instance in instances if _as_written(services.get(instance.id), instance)}
        if self._node is None or any(instance.id not in services for instance in instances):
            self._node = self._client.agent_node()  # a lost instance: maybe a new agent
        _, node_id = self._node
        visible: set[str] = set()
        for name in sorted({instance.name for instance in instances if instance.id in held}):
            entries = self._client.catalog_service(name, [("filter", f"ID == {_bexpr_string(node_id)}")])
            visible.update(str(entry.get("ServiceID")) for entry in entries if entry.get("ID") == node_id)
        answer: dict[str, Presence] = {}
        for instance in instances:
            if instance.id in services and instance.id not in held:
                answer[instance.id] = Presence(held=False, visible=False, replaced=True)
            elif instance.id not in held:
                answer[instance.id] = Presence(held=False, visible=False)
            elif instance.id in visible:
                answer[instance.id] = Presence(held=True, visible=True)
            else:
                cause = (
                    f"agent {self.address} holds {instance.id!r} but the catalog does not:"
                    " the agent cannot sync to the servers"
                )
                answer[instance.id] = Presence(held=True, visible=False, cause=cause)
        return answer

    # -- Watcher ----------------------------------------------------------------------

    def start_feed(self, feed: Feed) -> None:
        """A blocking query of its own while the direct share lasts, else the shared
        change detector; and a decoder for the query's answers while it is watched."""
        with self._decoders_lock:
            refs, decoder = self._decoders.get(feed.query, (0, None))
            self._decoders[feed.query] = (refs + 1, decoder or Decoder(feed.query))
        if self._direct is not None and self._direct.acquire(blocking=False):
            feed.poll_in_thread(on_exit=self._direct.release)
        else:
            self._shared.add(feed)

    def stop_feed(self, feed: Feed) -> None:
        self._shared.remove(feed)
        with self._decoders_lock:
            refs, decoder = self._decoders.pop(feed.query, (1, None))
            if refs > 1 and decoder is not None:
                self._decoders[feed.query] = (refs - 1, decoder)

    def poll(self, query: Query, index: int, stop: Stop) -> Snapshot:
        self._check_open()
        params = self._params(query)
        if index <= 0:  # a one-shot read: on a control connection, never behind a blocking query
            return self._snapshot(query, self._client.read_health(query.service, params)).snapshot
        params += [("index", str(index)), ("wait", _go_duration(self.wait))]
        return self._snapshot(query, self._client.health(query.service, params)).snapshot

    def _params(self, query: Query) -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = []
        if query.passing_only:
            params.append(("passing", "1"))
        expression = _filter_expression(query)
        if expression:
            params.append(("filter", expression))
        return params + self._read_options()

    def _read_options(self) -> list[tuple[str, str]]:
        options: list[tuple[str, str]] = []
        if self.dc:
            options.append(("dc", self.dc))
        if self.stale:
            options.append(("stale", ""))
        return options

    def _read(self, query: Query) -> Read:
        """The shared reader's read: non-blocking, on a query connection."""
        self._check_open()
        return self._snapshot(query, self._client.health(query.service, self._params(query)))

    def _blocking(self, index: int) -> list[tuple[str, str]]:
        """A detector's read options, and its index and wait once it has an index."""
        params = self._read_options()
        if index > 0:
            params += [("index", str(index)), ("wait", _go_duration(self.wait))]
        return params

    def _detect_checks(self, index: int, watched: Watched, stop: Stop) -> tuple[int, Fingerprints, Fingerprints]:
        """Every check of the watched services and of their nodes, by service and by node."""
        self._check_open()
        expression = f"ServiceName matches {_bexpr_string(_alternatives(watched.services))}"
        if watched.nodes:
            expression += f' or (ServiceID == "" and Node matches {_bexpr_string(_alternatives(watched.nodes))})'
        params = [("filter", expression), *self._blocking(index)]
        result = self._client.get_list("/v1/health/state/any", params, stop=stop)
        by_service: dict[str, set[tuple[str, ...]]] = {}
        by_node: dict[str, set[tuple[str, ...]]] = {}
        for check in result.entries:
            if check.get("ServiceID"):
                by_service.setdefault(str(check.get("ServiceName")), set()).add(check_key(check))
            else:
                by_node.setdefault(str(check.get("Node")), set()).add(check_key(check))
        return result.index, _frozen(by_service), _frozen(by_node)

    def _detect_registrations(self, index: int, watched: Watched, stop: Stop) -> tuple[int, Fingerprints, Fingerprints]:
        """Every service of the datacenter and its tags (Consul 1.8 filters nothing
        here): its index moves on any registration change in the datacenter."""
        self._check_open()
        returned, names = self._client.get_object("/v1/catalog/services", self._blocking(index), stop=stop)
        return returned, {name: tuple(tags or ()) for name, tags in names.items()}, {}

    def _snapshot(self, query: Query, result: HealthResult) -> Read:
        """The answer decoded by the query's decoder while it is watched (it reuses
        the instances of the last answer), else by a new one."""
        with self._decoders_lock:
            held = self._decoders.get(query)
        return (held[1] if held is not None else Decoder(query)).read(result)

    def _close_resources(self) -> None:
        self._shared.close(timeout=0.1)  # first: its threads then take a closed client quietly
        self._client.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<ConsulBackend {self._settings.base_url}{f' dc={self.dc}' if self.dc else ''}{state}>"


# -- options ------------------------------------------------------------------------


def _resolve_address(address: str | None, scheme: str | None) -> tuple[str, int, str]:
    """host, port and scheme from the option, else ``CONSUL_HTTP_ADDR``, else the default.
    The address may carry a scheme (``https://host:8501``), as CONSUL_HTTP_ADDR may."""
    given = address if address is not None else os.environ.get("CONSUL_HTTP_ADDR") or _DEFAULT_ADDRESS
    option = "address" if address is not None else "CONSUL_HTTP_ADDR"
    if not isinstance(given, str):
        raise InvalidConfig(option, given, "must be host:port", backend=ConsulBackend.name)
    parts = urllib.parse.urlsplit(given if "://" in given else f"//{given}")
    try:
        port = parts.port or (8501 if parts.scheme == "https" else 8500)
    except ValueError:
        raise InvalidConfig(option, given, "bad port", backend=ConsulBackend.name) from None
    if not parts.hostname or parts.path or parts.query or parts.username:
        raise InvalidConfig(option, given, "must be host:port", backend=ConsulBackend.name)
    resolved = scheme or parts.scheme or "http"
    if resolved not in ("http", "https"):
        raise InvalidConfig("scheme", resolved, "must be http or https", backend=ConsulBackend.name)
    return parts.hostname, port, resolved


def _read_token(path: str | os.PathLike[str]) -> str:
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidConfig("token_file", path, f"cannot be read ({type(exc).__name__})", backend="consul") from None
    if not token:
        raise InvalidConfig("token_file", path, "is empty", backend="consul")
    return token


def _boolean(option: str, value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE | {""}:
        return value.lower() in _TRUE or value == ""  # "?stale" alone means on
    raise InvalidConfig(option, value, "must be true or false", backend="consul")


def _count(option: str, value: int | str, *, minimum: int) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if number is None or number < minimum:
        raise InvalidConfig(option, value, f"must be a whole number, at least {minimum}", backend="consul")
    return number


def _seconds(option: str, value: float | str, *, maximum: float) -> float:
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value.strip())):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds is None or not 0 < seconds <= maximum:
        raise InvalidConfig(
            option, value, f"must be seconds (or 500ms, 30s, 2m) above 0, at most {maximum:g}", backend="consul"
        )
    return seconds


# -- checks ---------------------------------------------------------------------------


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _check_definition(instance: ServiceInstance, check: Check) -> dict[str, Any]:
    """The check as Consul's CamelCase JSON; its id is ``service:<instance id>``."""
    definition: dict[str, Any] = {
        "CheckID": f"service:{instance.id}",
        "Name": f"{instance.name} {type(check).__name__}",
        "Status": check.initial_status.value,
    }
    if check.deregister_after is not None:
        definition["DeregisterCriticalServiceAfter"] = _go_duration(check.deregister_after)
    if isinstance(check, TtlCheck):
        definition["TTL"] = _go_duration(check.ttl)
        return definition
    if isinstance(check, GrpcCheck):
        target = instance.target + (f"/{check.service}" if check.service else "")
        definition.update(GRPC=target, GRPCUseTLS=check.tls, TLSSkipVerify=check.tls_skip_verify)
    elif isinstance(check, HttpCheck):
        scheme = "https" if check.tls else "http"
        definition["HTTP"] = f"{scheme}://{_host(instance.address)}:{check.port or instance.port}{check.path}"
        definition["TLSSkipVerify"] = check.tls_skip_verify
    elif isinstance(check, TcpCheck):
        definition["TCP"] = f"{_host(instance.address)}:{check.port or instance.port}"
    else:
        raise InvalidInstance("check", check, "the Consul backend supports gRPC, TTL, HTTP and TCP checks")
    definition["Interval"] = _go_duration(check.interval)
    definition["Timeout"] = _go_duration(check.timeout)
    return definition


# -- what the agent holds -------------------------------------------------------------


def _as_written(service: Mapping[str, Any] | None, instance: ServiceInstance) -> bool:
    """Whether the agent's service (``/v1/agent/service(s)``) is ``instance`` as we
    wrote it, not another owner's instance under the same id."""
    if service is None:
        return False
    weights = service.get("Weights") or {}
    return (
        service.get("Service") == instance.name
        and service.get("Address") == instance.address
        and service.get("Port") == instance.port
        and tuple(service.get("Tags") or ()) == instance.tags
        and dict(service.get("Meta") or {}) == dict(instance.meta)
        and weights.get("Passing", 1) == instance.weight
    )
