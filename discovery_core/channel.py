"""A ``grpc.Channel`` that follows a service's healthy instances.

grpcio channels never share connections, so rebuilding one C-core channel per change
would reconnect to every instance. Instead (grpc-go's shape): one grpc channel per
endpoint, kept by instance id while the instance stays in the set; each snapshot
(and each health change) builds a new immutable ``Picker``; every call reads the
current picker and ``pick()``s, with no I/O and no lock. The pick happens inside this
channel's multicallables, per call, so stubs made before the first instance exists
work once it does.

Health per endpoint comes from a grpc.health.v1 ``Watch`` stream on that endpoint's
own channel: an instance that says NOT_SERVING (or whose connection breaks) leaves the
picker at once, well before the backend's next check.

``wait_for_ready`` is the channel's: a call waits for *an instance* to be ready; the
call on the chosen endpoint itself fails fast, so a dead endpoint costs a transparent
retry elsewhere rather than the call's whole deadline.

The pool, pickers, retry rules and health verdicts are shared with the asyncio
channel in ``discovery_core.aio``; only the I/O differs.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery_core.errors import ClosedError, InvalidConfig
from discovery_core.model import GrpcCheck, HealthStatus, ServiceInstance, Snapshot
from discovery_core.watcher import Watch, Watcher

__all__ = ["DiscoveryChannel", "Picker", "RetryPolicy", "discovery_channel"]

log = logging.getLogger("discovery_core.channel")

C = TypeVar("C")
P = TypeVar("P", bound="Pool[Any]")
Policy = Literal["round_robin", "weighted_round_robin", "least_request"]

_CONNECTING, _READY, _DOWN = "connecting", "ready", "down"
# Details grpc core gives an RPC that never left the client (no connection to send it on).
_NEVER_SENT = ("failed to connect", "connections to all backends failing", "connection refused", "dns resolution")
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_MAX_SCHEDULE = 1024
_MAX_TRANSPARENT = 5  # attempts for calls that never reached a server
_HEALTH_RETRY_BASE = 0.05
_HEALTH_RETRY_CAP = 1.0


@dataclass(frozen=True)
class RetryPolicy:
    """Opt-in retries of calls that may have reached a server, so for idempotent
    methods only. ``methods``: full names (``/pkg.Service/Method``) it applies to, or
    None for every unary-unary method of the channel. Each retry prefers an instance
    not tried yet and stays within the call's deadline.

    Calls that failed with UNAVAILABLE before reaching any server are retried on
    another instance whatever this policy says.
    """

    methods: frozenset[str] | None = None
    max_attempts: int = 3
    codes: frozenset[grpc.StatusCode] = field(default_factory=lambda: frozenset({_UNAVAILABLE}))

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise InvalidConfig("retry.max_attempts", self.max_attempts, "must be an int >= 1")
        if self.methods is not None:
            object.__setattr__(self, "methods", frozenset(self.methods))
        object.__setattr__(self, "codes", frozenset(self.codes))

    def applies(self, method: str) -> bool:
        return self.methods is None or method in self.methods


class _Endpoint(Generic[C]):
    """One instance's own grpc channel, kept while the instance stays in the set."""

    __slots__ = ("_lock", "calls", "channel", "closed", "inflight", "instance", "monitor", "retired", "state")

    def __init__(self, instance: ServiceInstance, channel: C, state: str) -> None:
        self.instance = instance
        self.channel = channel
        self.state = state
        self.inflight = 0
        self.retired = False  # out of the set: closed once its last call ends
        self.closed = False  # its channel is closed (or closing): no new call may start
        # Underlying multicallables, keyed by this channel's multicallable object.
        self.calls: dict[object, Any] = {}
        self.monitor: Any = None  # the health Watch call or task, to cancel
        self._lock = threading.Lock()

    def begin(self) -> bool:
        """Count a call started; False if the channel is closed (a picker read just
        before the endpoint left): pick again."""
        with self._lock:
            if self.closed:
                return False
            self.inflight += 1
            return True

    def end(self) -> bool:
        """Count a call done; True when a retired endpoint just became idle (close it)."""
        with self._lock:
            self.inflight -= 1
            self.closed = self.retired and self.inflight == 0
            return self.closed

    def retire(self, *, now: bool = False) -> bool:
        """Leave the set; True when it is to be closed now (idle, or ``now``), else its
        last call closes it."""
        with self._lock:
            self.retired = True
            self.closed = now or self.inflight == 0
            return self.closed

    def __repr__(self) -> str:
        return f"<endpoint {self.instance.id} {self.state} inflight={self.inflight}>"


class Picker(Generic[C]):
    """Chooses an endpoint for one call. Immutable: a new one is built from every
    change of the set or of an endpoint's health; ``pick()`` takes no lock and does
    no I/O. Subclasses are the policies."""

    name: ClassVar[str] = ""

    def __init__(self, service: str, ready: Sequence[_Endpoint[C]], *, connecting: bool, known: int) -> None:
        self.service = service
        self.ready = tuple(ready)
        self.connecting = connecting  # some endpoint's health is not known yet
        self.known = known  # endpoints in the set, ready or not

    def pick(self) -> _Endpoint[C] | None:
        """An endpoint for the next call, None when none is ready."""
        raise NotImplementedError

    def pick_other(self, tried: Sequence[_Endpoint[C]]) -> _Endpoint[C] | None:
        """Like ``pick()``, preferring an endpoint not in ``tried``."""
        chosen = self.pick()
        if chosen is None or chosen not in tried:
            return chosen
        return next((ep for ep in self.ready if ep not in tried), chosen)

    def why_none(self) -> str:
        if self.known == 0:
            return f"no instance of service {self.service!r} is registered and healthy"
        return f"none of the {self.known} instances of service {self.service!r} is serving"


class RoundRobin(Picker[C]):
    """Each ready endpoint in turn, starting at a random one (so clients spread)."""

    name = "round_robin"

    def __init__(self, service: str, ready: Sequence[_Endpoint[C]], *, connecting: bool, known: int) -> None:
        super().__init__(service, ready, connecting=connecting, known=known)
        self._next = itertools.count(random.randrange(len(self.ready) or 1)).__next__

    def pick(self) -> _Endpoint[C] | None:
        ready = self.ready
        return ready[self._next() % len(ready)] if ready else None


class WeightedRoundRobin(Picker[C]):
    """Ready endpoints in proportion to their instance's ``weight``: a smooth
    (nginx-style) schedule computed once per picker, walked round robin."""

    name = "weighted_round_robin"

    def __init__(self, service: str, ready: Sequence[_Endpoint[C]], *, connecting: bool, known: int) -> None:
        super().__init__(service, ready, connecting=connecting, known=known)
        self._schedule = self._smooth([ep.instance.weight for ep in self.ready])
        self._next = itertools.count(random.randrange(len(self._schedule) or 1)).__next__

    def _smooth(self, weights: list[int]) -> tuple[_Endpoint[C], ...]:
        total = sum(weights)
        if total > _MAX_SCHEDULE:  # keep the schedule small; proportions survive
            weights = [max(1, round(w * _MAX_SCHEDULE / total)) for w in weights]
            total = sum(weights)
        current = [0] * len(weights)
        schedule = []
        for _ in range(total):
            current = [c + w for c, w in zip(current, weights, strict=True)]
            best = max(range(len(current)), key=current.__getitem__)
            current[best] -= total
            schedule.append(self.ready[best])
        return tuple(schedule)

    def pick(self) -> _Endpoint[C] | None:
        schedule = self._schedule
        return schedule[self._next() % len(schedule)] if schedule else None


class LeastRequest(Picker[C]):
    """The less busy of two random ready endpoints (grpc's least_request: power of
    two choices on outstanding calls), which a plain round robin cannot see."""

    name = "least_request"

    def pick(self) -> _Endpoint[C] | None:
        ready = self.ready
        n = len(ready)
        if n < 2:
            return ready[0] if ready else None
        i = random.randrange(n)
        j = random.randrange(n - 1)
        j += j >= i
        a, b = ready[i], ready[j]
        return a if a.inflight <= b.inflight else b


POLICIES: dict[str, type[Picker[Any]]] = {p.name: p for p in (RoundRobin, WeightedRoundRobin, LeastRequest)}


def connectivity(picker: Picker[Any]) -> grpc.ChannelConnectivity:
    """The channel's state as grpc would name it, from the current picker."""
    if picker.ready:
        return grpc.ChannelConnectivity.READY
    if picker.connecting:
        return grpc.ChannelConnectivity.CONNECTING
    return grpc.ChannelConnectivity.TRANSIENT_FAILURE if picker.known else grpc.ChannelConnectivity.IDLE


def _policy(policy: str) -> type[Picker[Any]]:
    try:
        return POLICIES[policy]
    except KeyError:
        raise InvalidConfig("policy", policy, f"known policies: {', '.join(POLICIES)}") from None


def health_service_name(instance: ServiceInstance) -> str:
    """The name a client asks the instance's health service about: what its gRPC
    check asks, else the server as a whole."""
    return instance.check.service if isinstance(instance.check, GrpcCheck) else ""


class Backoff:
    """Delay before re-opening a failed health watch: doubles up to a cap, jittered."""

    def __init__(self) -> None:
        self.delay = _HEALTH_RETRY_BASE

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, _HEALTH_RETRY_CAP)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.delay = _HEALTH_RETRY_BASE


class HealthFollower(Generic[C]):
    """What one endpoint's health watch loop does with each outcome; the sync thread
    and the aio task only do the I/O (and hold the pool's lock around these calls)."""

    def __init__(self, pool: Pool[C], endpoint: _Endpoint[C]) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.request = health_pb2.HealthCheckRequest(service=health_service_name(endpoint.instance))
        self._backoff = Backoff()

    def reply(self, status: int) -> None:
        self._backoff.reset()
        serving = status == health_pb2.HealthCheckResponse.SERVING
        self.pool.set_state(self.endpoint, _READY if serving else _DOWN)

    def ended(self, code: grpc.StatusCode | None) -> float | None:
        """The watch ended (``code`` None: the server closed it). Returns seconds to
        wait before watching again, or None to stop watching.

        UNIMPLEMENTED: no health service, so serving for good. CANCELLED: a failed call
        marked the endpoint down and restarted the watch: watch again at once, still
        down. Anything else: down, and watch again after a backoff.
        """
        endpoint = self.endpoint
        if code is grpc.StatusCode.UNIMPLEMENTED:
            log.info("%s has no health service: treated as serving", endpoint.instance.id)
            self.pool.set_state(endpoint, _READY)
            return None
        if code is grpc.StatusCode.CANCELLED:
            if endpoint.state != _DOWN:
                self.pool.set_state(endpoint, _CONNECTING)
            return 0.0
        self.pool.set_state(endpoint, _DOWN)
        return self._backoff.next()


class Pool(Generic[C], abc.ABC):
    """The endpoints of one channel and the picker built from them.

    ``apply(snapshot)`` keeps endpoints whose instance stays (same id and target),
    opens new ones and retires the rest (closed once their calls finish). A subclass
    supplies the I/O: opening and closing endpoint channels, health monitoring, and
    waking callers that wait for a usable picker.
    """

    def __init__(self, service: str, policy: str, *, health_check: bool) -> None:
        self.service = service
        self.policy = _policy(policy)
        self.health_check = health_check
        self.closed = False
        self.picker: Picker[C] = self.policy(service, (), connecting=False, known=0)
        self.endpoints: dict[str, _Endpoint[C]] = {}

    @abc.abstractmethod
    def open(self, instance: ServiceInstance) -> C:
        """A new channel to one instance."""

    @abc.abstractmethod
    def release(self, endpoint: _Endpoint[C]) -> None:
        """Close a retired endpoint's channel (its calls are done)."""

    @abc.abstractmethod
    def monitor(self, endpoint: _Endpoint[C]) -> None:
        """Start following the endpoint's health."""

    @abc.abstractmethod
    def unmonitor(self, endpoint: _Endpoint[C]) -> None:
        """Stop following it (cancel the stream; never blocks)."""

    def notify(self) -> None:
        """A new picker is in place: wake waiters (the caller holds the pool's lock)."""

    def apply(self, snapshot: Snapshot) -> None:
        if self.closed:
            return
        wanted = {inst.id: inst for inst in snapshot.instances if snapshot.status(inst.id) is not HealthStatus.CRITICAL}
        gone = []
        for instance_id, endpoint in list(self.endpoints.items()):
            instance = wanted.get(instance_id)
            if instance is None or instance.target != endpoint.instance.target:
                gone.append(self.endpoints.pop(instance_id))
            else:
                endpoint.instance = instance  # weight or meta may have changed
        for instance_id, instance in wanted.items():
            if instance_id not in self.endpoints:
                state = _CONNECTING if self.health_check else _READY
                endpoint = self.endpoints[instance_id] = _Endpoint(instance, self.open(instance), state)
                if self.health_check:
                    self.monitor(endpoint)
        self.rebuild()  # before closing anything, so no new pick lands on a closed endpoint
        for endpoint in gone:
            self._retire(endpoint)

    def set_state(self, endpoint: _Endpoint[C], state: str) -> None:
        if endpoint.state == state or endpoint.retired or self.closed:
            return
        log.debug("%s: %s is %s", self.service, endpoint.instance.id, state)
        endpoint.state = state
        self.rebuild()

    def rebuild(self) -> None:
        endpoints = list(self.endpoints.values())
        ready = [ep for ep in endpoints if ep.state == _READY]
        connecting = any(ep.state == _CONNECTING for ep in endpoints)
        self.picker = self.policy(self.service, ready, connecting=connecting, known=len(endpoints))
        self.notify()

    def _retire(self, endpoint: _Endpoint[C]) -> None:
        if endpoint.monitor is not None:
            self.unmonitor(endpoint)
        if endpoint.retire():
            self.release(endpoint)

    def mark_down(self, endpoint: _Endpoint[C]) -> None:
        """A call found the endpoint unreachable: out of the picker until its health
        watch, restarted now, says it serves. Without health checking nothing would
        bring it back, so it stays (calls landing on it are retried elsewhere)."""
        if self.health_check and not endpoint.retired:
            self.set_state(endpoint, _DOWN)
            self.restart_monitor(endpoint)

    @abc.abstractmethod
    def restart_monitor(self, endpoint: _Endpoint[C]) -> None:
        """Re-open the endpoint's health watch now."""

    def finished(self, endpoint: _Endpoint[C]) -> None:
        """A call on ``endpoint`` ended (close the endpoint if it was the last of a retired one)."""
        if endpoint.end():
            self.release(endpoint)

    def close_all(self) -> list[_Endpoint[C]]:
        """Retire every endpoint; returns them (the caller closes their channels)."""
        self.closed = True
        endpoints, self.endpoints = list(self.endpoints.values()), {}
        for endpoint in endpoints:
            endpoint.retire(now=True)
            if endpoint.monitor is not None:
                self.unmonitor(endpoint)
        self.picker = self.policy(self.service, (), connecting=False, known=0)
        self.notify()
        return endpoints


def never_sent(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a failed call never reached a server (so any method may be retried)."""
    text = (details or "").lower()
    return code is _UNAVAILABLE and any(marker in text for marker in _NEVER_SENT)


class Attempts:
    """The retry bookkeeping of one call, shared by the sync and asyncio paths."""

    __slots__ = ("count", "deadline", "policy", "tried")

    def __init__(self, timeout: float | None, policy: RetryPolicy | None, started: float | None = None) -> None:
        self.deadline = None if timeout is None else (started or time.monotonic()) + timeout
        self.policy = policy
        self.tried: list[Any] = []
        self.count = 0

    def left(self) -> float | None:
        """The timeout of the next attempt: what remains of the call's deadline."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def again(self, endpoint: object, code: grpc.StatusCode, details: str | None) -> bool:
        """Record a failed attempt; True if another one is allowed."""
        self.count += 1
        self.tried.append(endpoint)
        if self.expired():
            return False
        if never_sent(code, details):
            return self.count < _MAX_TRANSPARENT
        policy = self.policy
        return policy is not None and code in policy.codes and self.count < policy.max_attempts


class NoInstanceError(grpc.RpcError, grpc.Call):
    """UNAVAILABLE raised by the channel itself: no instance to send the call to."""

    def __init__(self, details: str, code: grpc.StatusCode = _UNAVAILABLE) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


# -- the synchronous channel ------------------------------------------------------------


class _SyncPool(Pool[grpc.Channel]):
    """Endpoints on grpc channels; health watched by a thread per endpoint."""

    def __init__(
        self,
        service: str,
        policy: str,
        *,
        health_check: bool,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        super().__init__(service, policy, health_check=health_check)
        self.lock = threading.Condition(threading.Lock())
        self._credentials = credentials
        self._options = list(options)
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()  # wakes health threads sleeping between watches
        self.state = connectivity(self.picker)
        self.on_state: Callable[[grpc.ChannelConnectivity], None] | None = None

    def open(self, instance: ServiceInstance) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(instance.target, self._credentials, self._options)
        return grpc.insecure_channel(instance.target, self._options)

    def release(self, endpoint: _Endpoint[grpc.Channel]) -> None:
        endpoint.channel.close()

    def monitor(self, endpoint: _Endpoint[grpc.Channel]) -> None:
        thread = threading.Thread(
            target=self._watch_health, args=(endpoint,), name=f"discovery-health:{endpoint.instance.id}", daemon=True
        )
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        endpoint.monitor = True  # replaced by the live call once the thread opens it
        thread.start()

    def unmonitor(self, endpoint: _Endpoint[grpc.Channel]) -> None:
        call = endpoint.monitor
        if isinstance(call, grpc.Future):
            call.cancel()

    def notify(self) -> None:
        self.lock.notify_all()
        state = connectivity(self.picker)
        if state is not self.state:
            self.state = state
            if self.on_state is not None:
                self.on_state(state)

    def _watch_health(self, endpoint: _Endpoint[grpc.Channel]) -> None:
        watch = health_pb2_grpc.HealthStub(endpoint.channel).Watch
        follower = HealthFollower(self, endpoint)
        while True:
            with self.lock:
                if endpoint.retired:
                    return
                call = endpoint.monitor = watch(follower.request)
            code = None
            try:
                for reply in call:
                    with self.lock:
                        follower.reply(reply.status)
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            except ValueError:  # the channel was closed under the stream
                return
            with self.lock:
                if endpoint.retired:
                    return
                delay = follower.ended(code)
            if delay is None or (delay and self._closing.wait(delay)):
                return

    def mark_down(self, endpoint: _Endpoint[grpc.Channel]) -> None:
        with self.lock:
            super().mark_down(endpoint)

    def restart_monitor(self, endpoint: _Endpoint[grpc.Channel]) -> None:
        self.unmonitor(endpoint)  # the health thread sees CANCELLED and watches again at once

    def wait(self, usable: Callable[[Picker[grpc.Channel]], bool], deadline: float | None) -> Picker[grpc.Channel]:
        """The first picker ``usable`` accepts (or the last one at the deadline)."""
        with self.lock:
            while not usable(self.picker) and not self.closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self.lock.wait(remaining)
            return self.picker

    def join(self, timeout: float) -> None:
        self._closing.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def waits(picker: Picker[Any], wait_for_ready: bool | None) -> bool:
    """Whether a call without a ready endpoint waits (rather than failing fast): with
    ``wait_for_ready``, or while some endpoint's health is still unknown."""
    return bool(wait_for_ready) or picker.connecting


def usable(wait_for_ready: bool | None) -> Callable[[Picker[Any]], bool]:
    """What a waiting call waits for: a ready endpoint, or a reason to stop waiting."""
    return lambda picker: bool(picker.ready) or not waits(picker, wait_for_ready)


def unpicked(
    pool: Pool[Any], picker: Picker[Any], wait_for_ready: bool | None, *, waited: bool
) -> tuple[grpc.StatusCode, str]:
    """The status of a call that found no endpoint (ClosedError if the channel is closed)."""
    if pool.closed:
        raise ClosedError("the discovery channel is closed", service=pool.service)
    if waited and waits(picker, wait_for_ready):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"{picker.why_none()} (deadline exceeded while waiting)"
    return _UNAVAILABLE, picker.why_none()


class EndpointMethod(Generic[P]):
    """One RPC method of a discovery channel, sync or aio: it makes the method's
    multicallable once per endpoint, on that endpoint's own grpc channel."""

    __slots__ = ("_deserializer", "_kind", "_method", "_pool", "_serializer")

    def __init__(
        self,
        pool: P,
        kind: str,
        method: str,
        request_serializer: Callable[..., Any] | None,
        response_deserializer: Callable[..., Any] | None,
    ) -> None:
        self._pool = pool
        self._kind = kind
        self._method = method
        self._serializer = request_serializer
        self._deserializer = response_deserializer

    def _target(self, endpoint: _Endpoint[Any]) -> Any:
        target = endpoint.calls.get(self)
        if target is None:
            factory = getattr(endpoint.channel, self._kind)
            target = endpoint.calls[self] = factory(
                self._method, self._serializer, self._deserializer, _registered_method=True
            )
        return target


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

    def _pick(self, attempts: Attempts, wait_for_ready: bool | None) -> _Endpoint[Any]:
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

    def _start(self, wait_for_ready: bool | None, timeout: float | None) -> _Endpoint[Any]:
        """Pick for a call that is not retried, and count it started."""
        endpoint = self._pool.picker.pick()
        attempts = None
        while endpoint is None or not endpoint.begin():
            attempts = attempts or Attempts(timeout, None)
            endpoint = self._pick(attempts, wait_for_ready)
        return endpoint

    def _watch_end(self, endpoint: _Endpoint[Any], call: grpc.Call) -> None:
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
                if never_sent(code, details):
                    pool.mark_down(endpoint)
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
        self._subscribers: list[Callable[[grpc.ChannelConnectivity], None]] = []
        pool.on_state = self._on_state
        self._unsubscribe = watch.subscribe(self._on_snapshot)

    @property
    def service(self) -> str:
        return self._pool.service

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        with self._pool.lock:
            self._pool.apply(snapshot)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        # Called under the pool's lock: subscribers run on their own thread, as grpc's do.
        for callback in list(self._subscribers):
            threading.Thread(target=callback, args=(state,), name="discovery-connectivity", daemon=True).start()

    def instances(self) -> dict[str, str]:
        """Each endpoint's instance id and state (connecting, ready, down): for
        diagnostics and tests."""
        with self._pool.lock:
            return {inst_id: ep.state for inst_id, ep in self._pool.endpoints.items()}

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
            self._subscribers.append(callback)
            threading.Thread(target=callback, args=(self._pool.state,), daemon=True).start()

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._pool.lock, contextlib.suppress(ValueError):
            self._subscribers.remove(callback)

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
        self._pool.join(timeout=5.0)
        self._subscribers.clear()

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
    tags: tuple[str, ...] = (),
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> DiscoveryChannel:
    """A ``grpc.Channel`` to ``service``'s healthy instances, following a shared Watch.

    ``policy``: ``round_robin`` (default), ``weighted_round_robin`` (by instance
    ``weight``) or ``least_request`` (fewest outstanding calls of two random picks).
    ``retry``: retries for idempotent methods (calls that never reached a server are
    retried on another instance anyway). ``health_check``: follow each instance's
    grpc.health.v1 ``Watch`` so NOT_SERVING drops it at once. With no instance a call
    fails at once with UNAVAILABLE naming the service, or with ``wait_for_ready``
    waits up to its deadline for one.
    """
    pool = _SyncPool(service, policy, health_check=health_check, credentials=credentials, options=options)
    watch = watcher.watch(service, tags=tags)
    try:
        return DiscoveryChannel(watch, pool, retry=retry)
    except BaseException:
        watch.close()
        raise
