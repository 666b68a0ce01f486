"""A ``grpc.Channel`` that follows a service's healthy instances.

grpcio channels never share connections, so rebuilding one C-core channel per change
would reconnect to every instance. Instead (grpc-go's shape): one grpc channel per
endpoint, kept by instance id while the instance stays in the set; each snapshot
(and each health change) builds a new immutable ``Picker``; every call reads the
current picker and ``pick()``s, with no I/O and no lock. The pick happens inside this
channel's multicallables, per call, so stubs made before the first instance exists
work once it does.

Health per endpoint comes from a grpc.health.v1 ``Watch`` stream on that endpoint's
own channel, which C-core runs itself (no Python thread): an instance that says
NOT_SERVING (or whose connection breaks) takes no further call, well before the
backend's next check.

``wait_for_ready`` is the channel's: a call waits for *an instance* to be ready; the
call on the chosen endpoint itself fails fast, so a dead endpoint costs a transparent
retry elsewhere rather than the call's whole deadline.

The pool, pickers, retry rules and health verdicts are shared with the asyncio
channel (``discovery_core.client.aio``); only the I/O differs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc

from discovery_core.client.base import STATE_POLL, EndpointMethod, connectivity, pauses, unpicked, usable, waits
from discovery_core.client.endpoint import Endpoint, channel_options
from discovery_core.client.errors import NoInstanceError
from discovery_core.client.picker import Picker, Policy
from discovery_core.client.pool import Pool
from discovery_core.client.retry import Attempts, RetryPolicy
from discovery_core.client.select import DEFAULT_PANIC_THRESHOLD
from discovery_core.client.subset import DEFAULT_SUBSET_SIZE
from discovery_core.errors import DiscoveryError
from discovery_core.model import ServiceInstance, Snapshot
from discovery_core.watcher import Watch, Watcher

__all__ = ["DiscoveryChannel", "discovery_channel"]

log = logging.getLogger("discovery_core.channel")


class _SyncPool(Pool[grpc.Channel]):
    """Endpoints on grpc channels, and callers waiting for a usable picker."""

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
        self.lock = threading.Condition(threading.Lock())
        self._credentials = credentials
        self._options = list(options)

    def open(self, instance: ServiceInstance) -> grpc.Channel:
        options = channel_options(self._options, instance, health_check=self.health_check)
        if self._credentials is not None:
            return grpc.secure_channel(instance.target, self._credentials, options)
        return grpc.insecure_channel(instance.target, options)

    def release(self, endpoint: Endpoint[grpc.Channel]) -> None:
        endpoint.channel.close()

    def notify(self) -> None:
        self.lock.notify_all()

    def wait(self, usable: Callable[[Picker[grpc.Channel]], bool], deadline: float | None) -> Picker[grpc.Channel]:
        """The first picker ``usable`` accepts (or the last one at the deadline),
        looking again at each new picker and after each of ``pauses()``."""
        pause = pauses()
        with self.lock:
            while not usable(self.picker) and not self.closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self.lock.wait(next(pause) if remaining is None else min(next(pause), remaining))
            return self.picker


class _Call(EndpointMethod["_SyncPool"]):
    """What every multicallable of the discovery channel shares: the pick."""

    __slots__ = ()

    def __init__(
        self,
        channel: DiscoveryChannel,
        kind: str,
        method: str,
        request_serializer: Callable[..., Any] | None,
        response_deserializer: Callable[..., Any] | None,
    ) -> None:
        super().__init__(channel._pool, kind, method, request_serializer, response_deserializer)

    def _pick(self, attempts: Attempts, wait_for_ready: bool | None) -> Endpoint[Any]:
        """The slow path: an endpoint not tried yet, waiting for one if the call waits."""
        pool = self._pool
        picker = pool.picker
        endpoint = picker.pick_other(attempts.tried)
        if endpoint is not None:
            return endpoint
        waited = waits(picker, wait_for_ready) and not pool.closed
        if waited:
            picker = pool.wait(usable(wait_for_ready), attempts.deadline)
            endpoint = picker.pick()
            if endpoint is not None:
                return endpoint
        code, details = unpicked(pool, picker, wait_for_ready, waited=waited)
        raise NoInstanceError(details, code)

    def _start(self, wait_for_ready: bool | None, timeout: float | None) -> Endpoint[Any]:
        """Pick for a call that is not retried, and count it started."""
        endpoint = self._pool.picker.pick()
        attempts = None
        while endpoint is None or not endpoint.begin():
            attempts = attempts or Attempts(timeout, None)
            endpoint = self._pick(attempts, wait_for_ready)
        return endpoint

    def _watch_end(self, endpoint: Endpoint[Any], call: grpc.Call) -> None:
        pool = self._pool
        if not call.add_callback(lambda: pool.finished(endpoint)):
            pool.finished(endpoint)


if TYPE_CHECKING:  # grpc-stubs makes these generic; grpcio's classes are not subscriptable
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable[Any, Any]
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable[Any, Any]
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable[Any, Any]
    _StreamStreamBase = grpc.StreamStreamMultiCallable[Any, Any]
else:
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable
    _StreamStreamBase = grpc.StreamStreamMultiCallable


class _UnaryUnary(_Call, _UnaryUnaryBase):
    __slots__ = ("_retry",)

    def __init__(self, channel: DiscoveryChannel, *args: Any) -> None:
        super().__init__(channel, "unary_unary", *args)
        retry = channel._retry
        self._retry = retry if retry is not None and retry.applies(self._method) else None

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(False, request, timeout, metadata, credentials, wait_for_ready, compression)

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(True, request, timeout, metadata, credentials, wait_for_ready, compression)

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        """A future on one instance (no retries: the caller owns the outcome)."""
        endpoint = self._start(wait_for_ready, timeout)
        try:
            call = self._target(endpoint).future(request, timeout, metadata, credentials, None, compression)
        except BaseException:
            self._pool.finished(endpoint)
            raise
        self._watch_end(endpoint, call)
        return call

    def _invoke(
        self,
        with_call: bool,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        pool = self._pool
        started = time.monotonic()
        endpoint = pool.picker.pick()
        attempts = None  # the fast path keeps no bookkeeping until a pick or a call fails
        while True:
            if endpoint is None or not endpoint.begin():
                attempts = attempts or Attempts(timeout, self._retry, started)
                endpoint = self._pick(attempts, wait_for_ready)
                timeout = attempts.left()
                continue
            try:
                target = self._target(endpoint)
                if with_call:
                    return target.with_call(request, timeout, metadata, credentials, None, compression)
                return target(request, timeout, metadata, credentials, None, compression)
            except grpc.RpcError as error:
                if not isinstance(error, grpc.Call):
                    raise
                code, details = error.code(), error.details()
                attempts = attempts or Attempts(timeout, self._retry, started)
                if not attempts.again(endpoint, code, details):
                    raise
                log.debug("%s on %s failed (%s); retrying", self._method, endpoint.instance.id, code)
            finally:
                pool.finished(endpoint)
            timeout = attempts.left()
            endpoint = None


class _UnaryStream(_Call, _UnaryStreamBase):
    __slots__ = ()

    def __init__(self, channel: DiscoveryChannel, *args: Any) -> None:
        super().__init__(channel, "unary_stream", *args)

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        endpoint = self._start(wait_for_ready, timeout)
        try:
            call = self._target(endpoint)(request, timeout, metadata, credentials, None, compression)
        except BaseException:
            self._pool.finished(endpoint)
            raise
        self._watch_end(endpoint, call)
        return call


class _StreamUnary(_Call, _StreamUnaryBase):
    """Request streams cannot be replayed: one instance per call, no retries."""

    __slots__ = ()

    def __init__(self, channel: DiscoveryChannel, *args: Any) -> None:
        super().__init__(channel, "stream_unary", *args)

    def _run(self, how: str, request_iterator: Iterator[Any], *args: Any) -> Any:
        timeout, metadata, credentials, wait_for_ready, compression = args
        endpoint = self._start(wait_for_ready, timeout)
        try:
            target = getattr(self._target(endpoint), how)
            result = target(request_iterator, timeout, metadata, credentials, None, compression)
        except BaseException:
            self._pool.finished(endpoint)
            raise
        if how == "future":
            self._watch_end(endpoint, result)
        else:
            self._pool.finished(endpoint)
        return result

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._run("__call__", request_iterator, timeout, metadata, credentials, wait_for_ready, compression)

    def with_call(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._run("with_call", request_iterator, timeout, metadata, credentials, wait_for_ready, compression)

    def future(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._run("future", request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamStream(_Call, _StreamStreamBase):
    __slots__ = ()

    def __init__(self, channel: DiscoveryChannel, *args: Any) -> None:
        super().__init__(channel, "stream_stream", *args)

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        endpoint = self._start(wait_for_ready, timeout)
        try:
            call = self._target(endpoint)(request_iterator, timeout, metadata, credentials, None, compression)
        except BaseException:
            self._pool.finished(endpoint)
            raise
        self._watch_end(endpoint, call)
        return call


class DiscoveryChannel(grpc.Channel):
    """A ``grpc.Channel`` over a service's healthy instances (see the module doc).

    Generated stubs, ``grpc.intercept_channel`` and ``with`` work unchanged. Closing
    it unsubscribes from the watch and closes every endpoint's channel.
    """

    def __init__(self, watch: Watch, pool: _SyncPool, *, retry: RetryPolicy | None) -> None:
        self._watch = watch
        self._pool = pool
        self._retry = retry
        # Each subscriber with the last state it was told (None: not told yet).
        self._subscribers: list[list[Any]] = []
        self._follower: threading.Thread | None = None
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
        with self._pool.lock:
            self._pool.apply(snapshot)

    def _on_error(self, error: DiscoveryError) -> None:
        with self._pool.lock:
            self._pool.failed(error)

    def _follow_state(self) -> None:
        """Tell subscribers the channel's connectivity as it changes. Endpoint states
        are read, not pushed, so this looks every 50 ms, on one thread per channel
        that runs while anyone is subscribed (grpc's own channels do the same)."""
        pool = self._pool
        while True:
            with pool.lock:
                if pool.closed or not self._subscribers:
                    self._follower = None
                    return
                state = connectivity(pool.picker)
                due = [entry for entry in self._subscribers if entry[1] is not state]
                for entry in due:
                    entry[1] = state
            for callback, _ in due:
                try:
                    callback(state)
                except Exception:
                    log.exception("%s: a connectivity subscriber failed", pool.service)
            with pool.lock:
                pool.lock.wait(STATE_POLL)

    def instances(self) -> dict[str, str]:
        """Each endpoint's instance id and state (idle, connecting, ready, down): for
        diagnostics and tests."""
        with self._pool.lock:
            return {inst_id: ep.state_name() for inst_id, ep in self._pool.endpoints.items()}

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until some instance is ready; False at the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return bool(self._pool.wait(lambda p: bool(p.ready), deadline).ready)

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[..., Any] | None = None,
        response_deserializer: Callable[..., Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _UnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[..., Any] | None = None,
        response_deserializer: Callable[..., Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _UnaryStream(self, method, request_serializer, response_deserializer)

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[..., Any] | None = None,
        response_deserializer: Callable[..., Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _StreamUnary(self, method, request_serializer, response_deserializer)

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[..., Any] | None = None,
        response_deserializer: Callable[..., Any] | None = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _StreamStream(self, method, request_serializer, response_deserializer)

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        """Call ``callback`` (on another thread) with the channel's connectivity now
        and on each change."""
        with self._pool.lock:
            self._subscribers.append([callback, None])
            self._pool.lock.notify_all()
            if self._follower is None and not self._pool.closed:
                self._follower = threading.Thread(
                    target=self._follow_state, name=f"discovery-connectivity:{self.service}", daemon=True
                )
                self._follower.start()

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._pool.lock:
            self._subscribers = [entry for entry in self._subscribers if entry[0] is not callback]

    def close(self) -> None:
        """Unsubscribe from the watch, close every endpoint. Idempotent."""
        self._unsubscribe()  # not under the pool lock: the watch callback takes it
        self._watch.close()
        with self._pool.lock:
            if self._pool.closed:
                return
            endpoints = self._pool.close_all()
        for endpoint in endpoints:
            endpoint.channel.close()
        follower = self._follower
        if follower is not None and follower is not threading.current_thread():
            follower.join(timeout=1.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self.close()
        return None

    def __repr__(self) -> str:
        return f"<DiscoveryChannel {self.service!r} {connectivity(self._pool.picker).name}>"


def discovery_channel(
    watcher: Watcher,
    service: str,
    *,
    policy: Policy | str = "round_robin",
    retry: RetryPolicy | None = None,
    health_check: bool = True,
    panic_threshold: float = DEFAULT_PANIC_THRESHOLD,
    subset_size: int | None = DEFAULT_SUBSET_SIZE,
    client_index: int | None = None,
    tags: tuple[str, ...] = (),
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> DiscoveryChannel:
    """A ``grpc.Channel`` to ``service``'s healthy instances, following a shared Watch.

    ``policy``: ``round_robin`` (default), ``weighted_round_robin`` (by instance
    ``weight``) or ``least_request`` (fewest outstanding calls of two random picks).
    ``retry``: retries for idempotent methods (calls that never reached a server are
    retried on another instance anyway). ``health_check``: follow each instance's
    grpc.health.v1 ``Watch`` so NOT_SERVING drops it at once. ``panic_threshold``:
    when fewer than this fraction of the instances the registry lists are healthy (a
    failed or partitioned agent, not a drain: drained instances leave the list), keep
    calling the listed ones while their own health stream says SERVING (0: never).
    ``subset_size``: connect to at most this many instances (None: all), a subset
    chosen per client so a fleet of clients spreads evenly and an instance coming or
    going changes one member; ``client_index`` (the client's number in its fleet,
    0, 1, 2, ...) spreads a fleet more evenly than the default random place.
    A call waits within its deadline for the watch's first snapshot and for a new
    instance's health to be known. With no instance it fails at once with
    UNAVAILABLE naming the service (and the watch's error when the watch fails), or
    with ``wait_for_ready`` waits up to its deadline for one.
    """
    pool = _SyncPool(
        service, policy, health_check=health_check, panic_threshold=panic_threshold,
        subset_size=subset_size, client_index=client_index, credentials=credentials, options=options,
    )  # fmt: skip
    # Every listed instance with its health: the pool chooses (and fails open).
    watch = watcher.watch(service, passing_only=False, tags=tags)
    try:
        return DiscoveryChannel(watch, pool, retry=retry)
    except BaseException:
        watch.close()
        raise
