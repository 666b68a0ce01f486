"""The asyncio (``grpc.aio``) side: ``serve()`` for aio servers, and the discovery
``grpc.aio.Channel`` (``discovery_channel``, from ``discovery_core.client.aio``).

The decisions are the sync server's (``server._plan``); only the I/O is async.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Coroutine, Generator, Mapping
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2_grpc

from discovery_core.client.aio import AioDiscoveryChannel, discovery_channel
from discovery_core.errors import DiscoveryError, InvalidConfig
from discovery_core.model import Check
from discovery_core.registry import Registration, Registry
from discovery_core.server import NOT_SERVING, SERVING, _has_health_service, _Plan, _plan

__all__ = ["AioDiscoveryChannel", "AioServed", "AioServing", "discovery_channel", "serve"]

log = logging.getLogger("discovery_core.aio")


class AioServed:
    """A served grpc.aio instance; ``await stop()`` or ``async with``."""

    def __init__(self, server: grpc.aio.Server, plan: _Plan, port: int, health: Any, *, owns_health: bool) -> None:
        self.server = server
        self.port = port
        self.health = health
        self.instance = plan.instance(port)
        self.registration: Registration | None = None
        self._plan = plan
        self._owns_health = owns_health
        self._stopping: asyncio.Task[None] | None = None
        self._signals: list[int] = []

    @property
    def target(self) -> str:
        return self.instance.target

    async def set_serving(self, serving: bool) -> None:
        """Flip the service's grpc.health.v1 status."""
        status = SERVING if serving else NOT_SERVING
        for name in ("", self._plan.service):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None, *, drain: float | None = None) -> None:
        """NOT_SERVING, deregister, wait ``drain`` seconds, ``server.stop(grace)``. Idempotent."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace, drain))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None, drain: float | None) -> None:
        self._remove_signals()
        if self._owns_health:
            await self.health.enter_graceful_shutdown()
        else:
            await self.set_serving(False)
        if self.registration is not None:
            try:
                await asyncio.to_thread(self.registration.deregister)
            except DiscoveryError as exc:  # leave anyway: the check will find it gone
                log.warning("%s: could not deregister (%s); stopping anyway", self.instance.id, exc)
        wait = self._plan.drain if drain is None else drain
        if wait > 0:
            log.info("%s: draining %.1f s before stopping", self.instance.id, wait)
            await asyncio.sleep(wait)
        await self.server.stop(self._plan.grace if grace is None else grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Wait until the server stopped; True means the timeout passed first (as grpc)."""
        return await self.server.wait_for_termination(timeout)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(self.stop()))
            self._signals.append(signum)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in self._signals:
            loop.remove_signal_handler(signum)
        self._signals.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        stopping = self._stopping
        state = "serving" if stopping is None else "stopped" if stopping.done() else "stopping"
        return f"<AioServed {self.instance.name!r} {self.instance.id!r} at {self.target} {state}>"


class AioServing:
    """What ``serve()`` returns, as grpc.aio's objects do: ``await`` it for the
    ``AioServed``, or ``async with`` it (the block's end stops the server)."""

    def __init__(self, starting: Coroutine[Any, Any, AioServed]) -> None:
        self._starting = starting
        self._served: AioServed | None = None

    def __await__(self) -> Generator[Any, None, AioServed]:
        return self._starting.__await__()

    async def __aenter__(self) -> AioServed:
        self._served = await self._starting
        return self._served

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._served is not None:
            await self._served.stop()


def serve(
    server: grpc.aio.Server,
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
    health_servicer: Any = None,
    drain: float = 1.0,
    grace: float = 5.0,
    handle_signals: bool = True,
) -> AioServing:
    """``discovery_core.serve`` for a ``grpc.aio.Server`` (same arguments; the health
    servicer is grpc_health's asyncio one). Registry calls run in a worker thread.

    ``served = await serve(...)`` or ``async with serve(...) as served:``.
    """
    plan = _plan(
        service, port=port, host=host, advertise=advertise, check=check, tags=tags, meta=meta,
        weight=weight, instance_id=instance_id, drain=drain, grace=grace,
    )  # fmt: skip
    return AioServing(_start(server, registry, plan, port, health_servicer, handle_signals=handle_signals))


async def _start(
    server: grpc.aio.Server, registry: Registry, plan: _Plan, port: int, health_servicer: Any, *, handle_signals: bool
) -> AioServed:
    owns_health = health_servicer is None
    if health_servicer is None:
        if _has_health_service(server):
            raise InvalidConfig(
                "health_servicer", None, "the server already has a grpc.health.v1 service: pass its servicer"
            )
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(plan.bind)
    if bound == 0:
        raise InvalidConfig("port", port, f"cannot bind {plan.bind}")
    await server.start()
    served = AioServed(server, plan, bound, health_servicer, owns_health=owns_health)
    await served.set_serving(True)
    try:
        served.registration = await asyncio.to_thread(registry.register, served.instance)
    except BaseException:
        await server.stop(0)
        raise
    if handle_signals:
        served._install_signals()
    log.info("serving %s at %s", plan.service, served.target)
    return served
