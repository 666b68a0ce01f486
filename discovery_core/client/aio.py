"""The asyncio face: a discovery ``grpc.aio.Channel``.

The decisions are the shared ones (the pool, pickers, ``Attempts``, health verdicts);
only the I/O is async, on the loop that built the channel (C-core follows each
endpoint's health, as for the sync channel: no task per endpoint). The watch feeds
snapshots on its own thread: they are handed to the event loop, which owns the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc
import grpc.aio

from discovery_core.client.base import EndpointMethod, connectivity, pauses, unpicked, usable, waits
from discovery_core.client.endpoint import Endpoint, channel_options
from discovery_core.client.picker import Picker
from discovery_core.client.pool import Pool
from discovery_core.client.retry import Attempts, RetryPolicy
from discovery_core.client.select import DEFAULT_PANIC_THRESHOLD
from discovery_core.client.subset import DEFAULT_SUBSET_SIZE
from discovery_core.errors import DiscoveryError
from discovery_core.model import ServiceInstance, Snapshot
from discovery_core.watcher import Watch, Watcher

__all__ = ["AioDiscoveryChannel", "discovery_channel"]

log = logging.getLogger("discovery_core.aio")


class _AioPool(Pool[grpc.aio.Channel]):
    """Endpoints on grpc.aio channels; everything runs on the loop."""

    def __init__(
        self,
        service: str,
        policy: str,
        *,
        health_check: bool,
        panic_threshold: float,
        subset_size: int | None,
        client_index: int | None,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        super().__init__(
            service, policy, health_check=health_check, panic_threshold=panic_threshold,
            subset_size=subset_size, client_index=client_index,
        )  # fmt: skip
        self._credentials = credentials
        self._options = list(options)
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def open(self, instance: ServiceInstance) -> grpc.aio.Channel:
        options = channel_options(self._options, instance, health_check=self.health_check)
        if self._credentials is not None:
            return grpc.aio.secure_channel(instance.target, self._credentials, options)
        return grpc.aio.insecure_channel(instance.target, options)

    def release(self, endpoint: Endpoint[grpc.aio.Channel]) -> None:
        self._spawn(endpoint.channel.close(None))

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, accept: Callable[[Picker[Any]], bool], deadline: float | None) -> Picker[grpc.aio.Channel]:
        """The first picker ``accept`` takes (or the last one at the deadline), looking
        again at each new picker and after each of ``pauses()``."""
        pause = pauses()
        while not accept(self.picker) and not self.closed:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            wait = next(pause) if remaining is None else min(next(pause), remaining)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)
        return self.picker

    async def aclose(self, grace: float | None) -> None:
        endpoints = self.close_all()  # closing channels finish
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(ep.channel.close(grace) for ep in endpoints), return_exceptions=True)


def _options(
    timeout: float | None,
    metadata: Any,
    credentials: grpc.CallCredentials | None,
    wait_for_ready: bool | None,
    compression: grpc.Compression | None,
) -> dict[str, Any]:
    """A call's options as grpc.aio multicallables take them (keywords)."""
    return {
        "timeout": timeout,
        "metadata": metadata,
        "credentials": credentials,
        "wait_for_ready": wait_for_ready,
        "compression": compression,
    }


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


class _AioCall(EndpointMethod[_AioPool]):
    """What every multicallable of the aio discovery channel shares: the pick."""

    def __init__(
        self,
        channel: AioDiscoveryChannel,
        kind: str,
        method: str,
        request_serializer: Callable[..., Any] | None,
        response_deserializer: Callable[..., Any] | None,
    ) -> None:
        super().__init__(channel._pool, kind, method, request_serializer, response_deserializer)
        retry = channel._retry
        self._retry = retry if retry is not None and retry.applies(method) else None

    async def _pick(self, attempts: Attempts, wait_for_ready: bool | None) -> Endpoint[grpc.aio.Channel]:
        pool = self._pool
        picker = pool.picker
        endpoint = picker.pick_other(attempts.tried)
        if endpoint is not None:
            return endpoint
        waited = waits(picker, wait_for_ready) and not pool.closed
        if waited:
            picker = await pool.wait(usable(wait_for_ready), attempts.deadline)
            endpoint = picker.pick()
            if endpoint is not None:
                return endpoint
        raise _error(*unpicked(pool, picker, wait_for_ready, waited=waited))

    def _stream(self, request: Any, kwargs: dict[str, Any]) -> Any:
        """Streams pick when the call is made: a ready endpoint or an error at once."""
        while True:
            picker = self._pool.picker
            endpoint = picker.pick()
            if endpoint is None:
                raise _error(*unpicked(self._pool, picker, kwargs["wait_for_ready"], waited=False))
            if endpoint.begin():
                break
        kwargs["wait_for_ready"] = None
        try:
            call = self._target(endpoint)(request, **kwargs)
        except BaseException:
            self._pool.finished(endpoint)
            raise
        call.add_done_callback(lambda _: self._pool.finished(endpoint))
        return call


if TYPE_CHECKING:
    _UnaryUnaryCallBase = grpc.aio.UnaryUnaryCall[Any, Any]
else:
    _UnaryUnaryCallBase = grpc.aio.UnaryUnaryCall


class _UnaryUnaryCall(_UnaryUnaryCallBase):
    """One unary call: picks, retries on another instance when allowed, and answers
    ``code()``/metadata from the attempt that settled it."""

    def __init__(self, multicallable: _AioUnaryUnary, request: Any, kwargs: dict[str, Any]) -> None:
        self._multicallable = multicallable
        self._call: Any = None
        self._error: grpc.aio.AioRpcError | None = None
        self._task = asyncio.ensure_future(self._run(request, kwargs))
        # The error is the caller's to await (or read from code()); never log it as unretrieved.
        self._task.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _run(self, request: Any, kwargs: dict[str, Any]) -> Any:
        mc = self._multicallable
        pool = mc._pool
        wait_for_ready = kwargs["wait_for_ready"]  # the channel's to honour (see discovery_core.client.sync)
        kwargs["wait_for_ready"] = None
        attempts = Attempts(kwargs.get("timeout"), mc._retry)
        try:
            while True:
                endpoint = await mc._pick(attempts, wait_for_ready)
                if not endpoint.begin():
                    continue  # it closed after the pick: the picker no longer holds it
                kwargs["timeout"] = attempts.left()
                try:
                    self._call = mc._target(endpoint)(request, **kwargs)
                    return await self._call
                except grpc.aio.AioRpcError as error:
                    if not attempts.again(endpoint, error.code(), error.details()):
                        raise
                finally:
                    pool.finished(endpoint)
        except grpc.aio.AioRpcError as error:
            self._error = error
            raise

    def __await__(self) -> Any:
        return self._task.__await__()

    async def _settled(self) -> Any:
        await asyncio.wait([self._task])
        return self._call

    def cancelled(self) -> bool:
        return self._task.cancelled()

    def done(self) -> bool:
        return self._task.done()

    def time_remaining(self) -> float | None:
        return self._call.time_remaining() if self._call is not None else None

    def cancel(self) -> bool:
        if self._call is not None:
            self._call.cancel()
        return self._task.cancel()

    def add_done_callback(self, callback: Any) -> None:
        self._task.add_done_callback(lambda _: callback(self))

    async def initial_metadata(self) -> Any:
        call = await self._settled()
        return grpc.aio.Metadata() if self._error is not None or call is None else await call.initial_metadata()

    async def trailing_metadata(self) -> Any:
        call = await self._settled()
        if self._error is not None:
            return self._error.trailing_metadata()
        return grpc.aio.Metadata() if call is None else await call.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        call = await self._settled()
        if self._error is not None:
            return self._error.code()
        return grpc.StatusCode.CANCELLED if call is None else await call.code()

    async def details(self) -> str:
        call = await self._settled()
        if self._error is not None:
            return self._error.details() or ""
        return "" if call is None else str(await call.details())

    async def wait_for_connection(self) -> None:
        await self._settled()


class _AioUnaryUnary(_AioCall, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        kwargs = _options(timeout, metadata, credentials, wait_for_ready, compression)
        return _UnaryUnaryCall(self, request, kwargs)


class _AioUnaryStream(_AioCall, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[type-arg]
    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        kwargs = _options(timeout, metadata, credentials, wait_for_ready, compression)
        return self._stream(request, kwargs)


class _AioStreamUnary(_AioCall, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[type-arg]
    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        kwargs = _options(timeout, metadata, credentials, wait_for_ready, compression)
        return self._stream(request_iterator, kwargs)


class _AioStreamStream(_AioCall, grpc.aio.StreamStreamMultiCallable):  # type: ignore[type-arg]
    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        kwargs = _options(timeout, metadata, credentials, wait_for_ready, compression)
        return self._stream(request_iterator, kwargs)


class AioDiscoveryChannel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` over a service's healthy instances.

    Unary-unary calls pick (and wait, retry) when awaited; streaming calls pick when
    made and fail at once if no instance is ready. ``await close()`` (or ``async
    with``) unsubscribes from the watch and closes every endpoint.
    """

    def __init__(self, watch: Watch, pool: _AioPool, *, retry: RetryPolicy | None) -> None:
        self._watch = watch
        self._pool = pool
        self._retry = retry
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = watch.subscribe(self._on_snapshot, on_error=self._on_error)

    @property
    def service(self) -> str:
        return self._pool.service

    @property
    def fail_open_since(self) -> float | None:
        """Since when (wall time) the registry's healthy set is below the panic
        threshold and the channel keeps calling instances it marks critical that still
        answer SERVING themselves; None when it is not failing open."""
        return self._pool.fail_open_since

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        self._to_loop(self._pool.apply, snapshot)

    def _on_error(self, error: DiscoveryError) -> None:
        self._to_loop(self._pool.failed, error)

    def _to_loop(self, handle: Callable[[Any], None], value: Snapshot | DiscoveryError) -> None:
        """The pool is the loop's: hand it what the watch's thread brings."""
        try:
            self._loop.call_soon_threadsafe(handle, value)
        except RuntimeError:  # the loop is closed: the channel went with it
            log.debug("%s: %r after the event loop closed", self.service, value)

    def instances(self) -> dict[str, str]:
        """Each endpoint's instance id and state (idle, connecting, ready, down): for
        diagnostics and tests."""
        return {inst_id: ep.state_name() for inst_id, ep in self._pool.endpoints.items()}

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[..., Any] | None = None,
        response_deserializer: Callable[..., Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _AioUnaryUnary(self, "unary_unary", method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[..., Any] | None = None,
        response_deserializer: Callable[..., Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _AioUnaryStream(self, "unary_stream", method, request_serializer, response_deserializer)

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[..., Any] | None = None,
        response_deserializer: Callable[..., Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _AioStreamUnary(self, "stream_unary", method, request_serializer, response_deserializer)

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[..., Any] | None = None,
        response_deserializer: Callable[..., Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _AioStreamStream(self, "stream_stream", method, request_serializer, response_deserializer)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return connectivity(self._pool.picker)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._pool.wait(lambda p: connectivity(p) is not last_observed_state, None)

    async def channel_ready(self) -> None:
        """Wait until some instance is ready."""
        await self._pool.wait(lambda p: bool(p.ready), None)

    async def close(self, grace: float | None = None) -> None:
        """Unsubscribe from the watch, close every endpoint. Idempotent."""
        self._unsubscribe()
        self._watch.close()
        if not self._pool.closed:
            await self._pool.aclose(grace)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AioDiscoveryChannel {self.service!r} {connectivity(self._pool.picker).name}>"


def discovery_channel(
    watcher: Watcher,
    service: str,
    *,
    policy: str = "round_robin",
    retry: RetryPolicy | None = None,
    health_check: bool = True,
    panic_threshold: float = DEFAULT_PANIC_THRESHOLD,
    subset_size: int | None = DEFAULT_SUBSET_SIZE,
    client_index: int | None = None,
    tags: tuple[str, ...] = (),
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> AioDiscoveryChannel:
    """``discovery_core.discovery_channel`` for asyncio; call it inside the event loop."""
    pool = _AioPool(
        service, policy, health_check=health_check, panic_threshold=panic_threshold,
        subset_size=subset_size, client_index=client_index, credentials=credentials, options=options,
    )  # fmt: skip
    # Every listed instance with its health: the pool chooses (and fails open).
    watch = watcher.watch(service, passing_only=False, tags=tags)
    try:
        return AioDiscoveryChannel(watch, pool, retry=retry)
    except BaseException:
        watch.close()
        raise
