"""``serve()``: a gRPC server's life in discovery, from first answer to clean exit.

Order matters for zero lost calls: the health service answers SERVING before the
instance is registered (so the backend's first check passes and a client's health
watch sees it ready), and on stop the instance turns NOT_SERVING and leaves the
registry *before* the server stops, with a drain period in between for clients to
see it. The plan (address, instance, health service) is shared with the asyncio
variant in ``discovery_core.aio``.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, Self

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from discovery_core.errors import DiscoveryError, InvalidConfig
from discovery_core.model import Check, GrpcCheck, HealthStatus, ServiceInstance
from discovery_core.registry import Registration, Registry

__all__ = ["Served", "advertise_address", "serve"]

log = logging.getLogger("discovery_core.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
# The default check's deregister_after: a server killed without leaving (kill -9, a
# lost host) is removed this long after its check turned critical. Consul's minimum is
# a minute and its reaper runs every 30 s: such an instance leaves within 60-90 s.
DEFAULT_DEREGISTER_AFTER = 60.0
# Servers serve() started: a grpc.Server can be served (started) once.
_served: weakref.WeakSet[grpc.Server] = weakref.WeakSet()
# Only used to pick the interface a default route leaves by; a UDP connect sends nothing.
_ROUTE_PROBE = ("10.254.254.254", 1)


def advertise_address() -> str:
    """The first non-loopback IPv4 address of this host (the interface of the default
    route, as Go samples pick it), else 127.0.0.1."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(0.5)
            probe.connect(_ROUTE_PROBE)
            address = str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    return "127.0.0.1" if address.startswith("127.") or address == "0.0.0.0" else address


def _has_health_service(server: object) -> bool:
    """Whether a grpc.health.v1 service was already added (best effort: grpcio keeps
    registered methods on the server's private state; unknown layouts answer False)."""
    state = getattr(server, "_state", None)
    methods = getattr(state, "registered_method_handlers", None) or {}
    return any(str(name).startswith(_HEALTH_PREFIX) for name in methods)


@dataclass(frozen=True)
class _Plan:
    """Everything serve() decides before touching the network, for sync and aio."""

    service: str
    bind: str
    advertise: str
    check: Check | None
    tags: tuple[str, ...]
    meta: Mapping[str, str]
    weight: int
    instance_id: str
    drain: float
    grace: float

    def instance(self, port: int) -> ServiceInstance:
        return ServiceInstance(
            self.service,
            self.advertise,
            port,
            id=self.instance_id,
            tags=self.tags,
            meta=self.meta,
            weight=self.weight,
            check=self.check,
        )


def _plan(
    service: str,
    *,
    port: int,
    host: str,
    advertise: str | None,
    check: Check | bool | None,
    tags: tuple[str, ...],
    meta: Mapping[str, str] | None,
    weight: int,
    instance_id: str,
    drain: float,
    grace: float,
) -> _Plan:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidConfig("port", port, "must be an int from 0 (ephemeral) to 65535")
    for name, value in (("drain", drain), ("grace", grace)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise InvalidConfig(name, value, "must be a number of seconds >= 0")
    if check is True:
        check = GrpcCheck(
            service=service, initial_status=HealthStatus.PASSING, deregister_after=DEFAULT_DEREGISTER_AFTER
        )
    bind = f"{host}:{port}"
    plan = _Plan(
        service,
        bind,
        advertise or advertise_address(),
        check or None,
        tuple(tags),
        dict(meta or {}),
        weight,
        instance_id,
        float(drain),
        float(grace),
    )
    plan.instance(port or 1)  # validate name, address, tags, meta and weight before binding
    return plan


class Served:
    """A served instance: stop it (or use ``with``), or wait for it to terminate.

    ``stop()`` and SIGTERM/SIGINT (when serve() installed handlers) run the same
    sequence: NOT_SERVING, deregister, drain, ``server.stop(grace)``.
    """

    def __init__(
        self,
        server: grpc.Server,
        plan: _Plan,
        port: int,
        health_servicer: health.HealthServicer,
        *,
        owns_health: bool,
    ) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.instance = plan.instance(port)
        self.registration: Registration | None = None
        self._plan = plan
        self._owns_health = owns_health
        self._lock = threading.Lock()
        self._stopping = False
        self._done = threading.Event()
        self._previous_handlers: dict[int, Any] = {}

    @property
    def target(self) -> str:
        """``host:port`` as registered."""
        return self.instance.target

    def set_serving(self, serving: bool) -> None:
        """Flip the service's grpc.health.v1 status (the backend's check and every
        client's health watch follow it)."""
        status = SERVING if serving else NOT_SERVING
        for name in ("", self._plan.service):
            self.health.set(name, status)

    def stop(self, grace: float | None = None, *, drain: float | None = None) -> None:
        """NOT_SERVING, deregister, wait ``drain`` seconds, then ``server.stop(grace)``.

        Idempotent; a second caller waits for the first to finish.
        """
        with self._lock:
            stopping, self._stopping = self._stopping, True
        if stopping:
            self._done.wait()
            return
        try:
            self._leave()
            wait = self._plan.drain if drain is None else drain
            if wait > 0:
                log.info("%s: draining %.1f s before stopping", self.instance.id, wait)
                self._done.wait(wait)
            self.server.stop(self._plan.grace if grace is None else grace).wait()
        finally:
            self._restore_signals()
            self._done.set()

    def _leave(self) -> None:
        if self._owns_health:
            self.health.enter_graceful_shutdown()
        else:
            self.set_serving(False)
        if self.registration is not None:
            try:
                self.registration.deregister()
            except DiscoveryError as exc:  # leave anyway: the check will find it gone
                log.warning("%s: could not deregister (%s); stopping anyway", self.instance.id, exc)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until stopped (by ``stop()`` or a signal); like grpc's, True means the
        timeout passed first."""
        return not self._done.wait(timeout)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes: never block it. The previous
        # handlers come back at once, so a second Ctrl-C interrupts as usual.
        log.info("%s: signal %d, stopping", self.instance.id, signum)
        self._restore_signals()
        threading.Thread(target=self.stop, name=f"discovery-serve-stop:{self.instance.id}", daemon=True).start()

    def _restore_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # restored by the main thread's own stop() or never installed
        handlers, self._previous_handlers = self._previous_handlers, {}
        for signum, previous in handlers.items():
            signal.signal(signum, previous)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._done.is_set() else "stopping" if self._stopping else "serving"
        return f"<Served {self.instance.id!r} {state}>"


def serve(
    server: grpc.Server,
    registry: Registry,
    service: str,
    *,
    port: int = 0,
    host: str = "[::]",
    advertise: str | None = None,
    check: Check | bool | None = True,
    tags: tuple[str, ...] = (),
    meta: Mapping[str, str] | None = None,
    weight: int = 1,
    instance_id: str = "",
    health_servicer: health.HealthServicer | None = None,
    drain: float = 1.0,
    grace: float = 5.0,
    handle_signals: bool = True,
    bind: Callable[[grpc.Server, str], int] | None = None,
) -> Served:
    """Start ``server`` on ``host:port`` and register it as an instance of ``service``.

    Adds a grpc.health.v1 service unless ``health_servicer`` is given (pass yours if
    the server already has one), marks ``""`` and ``service`` SERVING once the port is
    bound, then registers with ``check`` (default: a gRPC check of ``service`` that
    starts passing, since the server already answers, and removes the instance
    ``DEFAULT_DEREGISTER_AFTER`` = 60 s after it turned critical: a server killed
    without leaving does not stay listed forever). ``advertise`` is the address
    registered (default: the first non-loopback IPv4); ``port=0`` registers the
    ephemeral port bound. ``bind(server, address) -> port`` replaces
    ``add_insecure_port`` (e.g. for TLS). Signal handlers are installed only from the
    main thread and restored on stop.
    """
    plan = _plan(
        service,
        port=port,
        host=host,
        advertise=advertise,
        check=check,
        tags=tags,
        meta=meta,
        weight=weight,
        instance_id=instance_id,
        drain=drain,
        grace=grace,
    )
    if server in _served:
        raise InvalidConfig("server", server, "is already served: serve() starts a server once; make one per instance")
    owns_health = health_servicer is None
    if health_servicer is None:
        if _has_health_service(server):
            raise InvalidConfig(
                "health_servicer", None, "the server already has a grpc.health.v1 service: pass its servicer"
            )
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = (bind or _add_insecure_port)(server, plan.bind)
    except RuntimeError as exc:  # grpcio's way of saying the address is taken
        raise InvalidConfig("port", port, f"cannot bind {plan.bind}: {exc}") from exc
    server.start()
    _served.add(server)
    served = Served(server, plan, bound, health_servicer, owns_health=owns_health)
    served.set_serving(True)
    try:
        served.registration = registry.register(served.instance)
    except BaseException:
        server.stop(0).wait()
        raise
    if handle_signals:
        served._install_signals()
    log.info("serving %s at %s", service, served.target)
    return served


def _add_insecure_port(server: grpc.Server, address: str) -> int:
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError("the address is in use or invalid")
    return port
