"""Watching a service: the one delivery mechanism every backend shares.

A backend supplies one primitive, ``Watcher.poll`` (a blocking query: return the
service's snapshot once it is newer than an index). Everything else is written once
here: one feed per (backend, service, filter) however many subscribers there are
(a thread polling it, unless the backend drives its feeds itself); dedupe by
content; coalescing (a slow reader sees the latest set, never a backlog); a token
bucket against a feed that spins; capped exponential backoff with
jitter and the last known set marked ``stale`` while the backend is down; and the
``Watch`` handle with ``wait``, iteration, ``async for`` and ``subscribe``.

Before the first snapshot there is no last known set to serve: ``wait()`` raises a
permanent error (a denied token, an unknown datacenter, a rejected request) at once,
and ``BackendUnavailable`` once the backend has not answered for
``Watcher.first_snapshot_patience`` seconds (5 by default) since the feed started.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar

from discovery_core.errors import BackendUnavailable, ClosedError, DiscoveryError, InvalidInstance, WatchTimeout
from discovery_core.model import HealthStatus, ServiceInstance, Snapshot

__all__ = ["Feed", "Query", "Stop", "Watch", "Watcher"]

log = logging.getLogger("discovery_core.watch")

Subscriber = Callable[[Snapshot], None]
ErrorSubscriber = Callable[[DiscoveryError], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Query:
    """What a watch asks for: one service, optionally only passing instances carrying
    all of ``tags`` and all of the ``meta`` pairs. Hashable: it keys the shared feed."""

    service: str
    passing_only: bool = True
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(
        cls,
        service: str,
        *,
        passing_only: bool = True,
        tags: tuple[str, ...] | list[str] = (),
        meta: Mapping[str, str] | None = None,
    ) -> Query:
        """Validate a filter the same way instances are validated."""
        # A throwaway instance runs the model's validation of name, tags and meta.
        probe = ServiceInstance(service, "127.0.0.1", 1, tags=tuple(tags), meta=dict(meta or {}))
        if not isinstance(passing_only, bool):
            raise InvalidInstance("passing_only", passing_only, "must be True or False")
        return cls(service, passing_only, tuple(sorted(probe.tags)), tuple(probe.meta.items()))

    def matches(self, instance: ServiceInstance, status: HealthStatus) -> bool:
        """Whether an instance in this health belongs to the query's result."""
        return (
            instance.name == self.service
            and (status is HealthStatus.PASSING or not self.passing_only)
            and all(tag in instance.tags for tag in self.tags)
            and all(instance.meta.get(key) == value for key, value in self.meta)
        )


class Stop:
    """Set once, when the watch feeding a ``poll`` closes.

    A backend whose poll blocks registers, with ``on_set``, how to wake it (notify a
    condition, shut a socket), so closing never waits for a blocking query to time out.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._keys = itertools.count()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True if stopped meanwhile."""
        return self._event.wait(timeout)

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` when stopped (at once if already); returns a remover."""
        with self._lock:
            if not self._event.is_set():
                key = next(self._keys)
                self._callbacks[key] = callback
                return lambda: self._remove(key)
        callback()
        return lambda: None

    def set(self) -> None:
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = list(self._callbacks.values()), {}
        for callback in callbacks:
            callback()

    def _remove(self, key: int) -> None:
        with self._lock:
            self._callbacks.pop(key, None)


class _TokenBucket:
    """At most ``burst`` polls at once, refilled at ``rate`` per second: a feed that
    returns at once every time (a bug, a flapping backend) cannot spin a core."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self, stop: Stop) -> bool:
        """Wait for a token; False if stopped while waiting."""
        self._refill()
        if self._tokens < 1:
            if stop.wait((1 - self._tokens) / self._rate):
                return False
            self._refill()
        self._tokens -= 1
        return not stop.is_set()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now


class _Backoff:
    """Capped exponential backoff with jitter (each delay uniform in [d/2, d])."""

    def __init__(self, base: float, cap: float) -> None:
        self._base = base
        self._cap = cap
        self._attempt = 0

    def next(self) -> float:
        delay = min(self._cap, self._base * 2**self._attempt)
        self._attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._attempt = 0


def _next_index(previous: int, returned: int) -> int:
    """The index for the next blocking poll: reset to 0 (read at once) when the
    backend's index went backwards, and never below 1 otherwise (0 does not block)."""
    return 0 if returned < previous else max(returned, 1)


class Feed:
    """One query's shared state: its subscribers, the current snapshot and the last
    error, fanned out to every ``Watch`` handle of the query.

    Something drives it: by default a thread calling the backend's ``poll`` in a loop
    (``Watcher.start_feed``); a backend that watches many queries over few connections
    overrides ``start_feed``/``stop_feed`` and calls ``deliver``/``fail`` itself.
    """

    def __init__(self, watcher: Watcher, query: Query) -> None:
        self.watcher = watcher
        self.query = query
        self.refs = 0
        #: The backend's last failure; None once it answers again.
        self.error: DiscoveryError | None = None
        self.current: Snapshot | None = None
        self.started = time.monotonic()
        #: Set once, when the last handle closes; a blocking poll may register a waker.
        self.stopping = Stop()
        self._deliver_lock = threading.RLock()
        self._subscribers: dict[int, Subscriber] = {}
        self._closers: dict[int, Callable[[], None]] = {}
        self._error_subscribers: dict[int, ErrorSubscriber] = {}
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None

    @property
    def closed(self) -> bool:
        return self.stopping.is_set()

    def poll_in_thread(self, on_exit: Callable[[], None] | None = None) -> None:
        """Drive this feed with a thread calling the watcher's ``poll`` in a loop;
        ``on_exit`` runs when that thread ends (after the feed stopped)."""
        self._thread = threading.Thread(
            target=self._run, args=(on_exit,), name=f"discovery-watch:{self.query.service}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        with self._deliver_lock:
            closers = list(self._closers.values())
        for closer in closers:
            closer()
        self.watcher.stop_feed(self)
        thread = self._thread
        if thread is not None and threading.current_thread() is not thread and self.watcher.close_timeout > 0:
            thread.join(timeout=self.watcher.close_timeout)
            if thread.is_alive():
                log.warning("watch on %r: the backend's poll did not return on close", self.query.service)

    def subscribe(
        self,
        callback: Subscriber,
        on_close: Callable[[], None] | None = None,
        on_error: ErrorSubscriber | None = None,
    ) -> Callable[[], None]:
        """Add a subscriber and hand it the current snapshot at once, if there is one
        (and ``on_error`` the backend's error, while it fails)."""
        with self._deliver_lock:
            key = next(self._keys)
            self._subscribers[key] = callback
            if on_close is not None:
                self._closers[key] = on_close
            if on_error is not None:
                self._error_subscribers[key] = on_error
            if self.current is not None:
                self._call(callback, self.current)
            if on_error is not None and self.error is not None:
                self._call(on_error, self.error)
        return lambda: self._unsubscribe(key)

    def _unsubscribe(self, key: int) -> None:
        with self._deliver_lock:
            self._subscribers.pop(key, None)
            self._closers.pop(key, None)
            self._error_subscribers.pop(key, None)

    def _publish(self, snapshot: Snapshot) -> None:
        with self._deliver_lock:
            self.current = snapshot
            for callback in list(self._subscribers.values()):
                self._call(callback, snapshot)

    def _call(self, callback: Callable[[T], None], value: T) -> None:
        try:
            callback(value)
        except Exception:  # a subscriber's bug must not stop the feed for the others
            log.exception("watch on %r: a subscriber raised", self.query.service)

    def deliver(self, snapshot: Snapshot) -> bool:
        """A fresh answer from the backend: published unless it changes nothing (then
        False). The index never goes backwards for subscribers, whatever the backend's did."""
        self.error = None
        current = self.current
        if current is not None and not current.stale and snapshot.same_content(current):
            return False
        index = snapshot.index if current is None else max(snapshot.index, current.index + 1)
        self._publish(snapshot._restamped(index=index, stale=False))
        if current is not None:
            gone = [inst.id for inst in snapshot.diff(current).removed]
            if gone:
                self.watcher._feed_noticed(gone=gone)
        return True

    def fail(self, error: DiscoveryError) -> None:
        """The backend could not answer: keep the last set, marked ``stale``, and tell
        the error subscribers (before a first snapshot, waiters decide with it)."""
        with self._deliver_lock:
            self.error = error
            current = self.current
            if current is not None and not current.stale:
                self._publish(current._restamped(index=current.index, stale=True))
            for on_error in list(self._error_subscribers.values()):
                self._call(on_error, error)

    def first_failure(self, now: float, deadline: float | None) -> tuple[DiscoveryError | None, float | None]:
        """What a waiter with ``deadline`` (monotonic, None: none) does now, given the
        backend's error: ``(error, None)`` to raise it (before the first snapshot: a
        permanent error at once, ``BackendUnavailable`` once ``deadline`` or the
        watcher's ``first_snapshot_patience`` passed), else ``(None, when)`` to wait
        until ``when`` (None: no bound). After a first snapshot only ``deadline`` counts."""
        error = self.error
        if self.current is not None or error is None:
            return None, deadline
        if not isinstance(error, BackendUnavailable):
            return error, None
        give_up = self.started + self.watcher.first_snapshot_patience
        if deadline is not None:
            give_up = min(give_up, deadline)
        if now < give_up:
            return None, give_up
        service = self.query.service
        message = f"no snapshot of {service!r} in {now - self.started:.1f} s: {error}"
        unavailable = BackendUnavailable(message, service=service, backend=error.backend)
        unavailable.__cause__ = error
        return unavailable, None

    def _run(self, on_exit: Callable[[], None] | None) -> None:
        try:
            self._poll_loop()
        finally:
            if on_exit is not None:
                on_exit()

    def _poll_loop(self) -> None:
        watcher, stop, service = self.watcher, self.stopping, self.query.service
        bucket = _TokenBucket(watcher.poll_rate, watcher.poll_burst)
        backoff = _Backoff(watcher.retry_base, watcher.retry_cap)
        index = 0
        outage = False
        while bucket.take(stop):
            try:
                snapshot = watcher.poll(self.query, index, stop)
            except Exception as exc:  # the top of a thread: nothing above it would see the error
                if stop.is_set():
                    break
                error = exc if isinstance(exc, DiscoveryError) else BackendUnavailable(str(exc), service=service)
                if not isinstance(exc, DiscoveryError):
                    log.error("watch on %r: the backend's poll raised %r", service, exc, exc_info=exc)
                elif not outage:
                    serving = "no snapshot yet" if self.current is None else "serving the last known set"
                    log.warning("watch on %r: %s; %s and retrying", service, exc, serving)
                outage = True
                # Read at once when the backend answers again: a restarted backend's
                # index may sit below ours, and a blocking poll would wait it out.
                index = 0
                self.fail(error)
                if stop.wait(backoff.next()):
                    break
                continue
            if stop.is_set():
                break
            if outage:
                log.info("watch on %r: the backend answers again", service)
                outage = False
                backoff.reset()
                watcher._feed_noticed(recovered=True)
            index = _next_index(index, snapshot.index)
            self.deliver(snapshot)


class Watch:
    """A handle on a service's shared feed.

    ``wait()`` and iteration return each newer snapshot, the current one first; a
    reader slower than the changes skips to the latest. ``subscribe(callback)`` calls
    ``callback(snapshot)`` on the feed's thread, with the current snapshot at once:
    keep callbacks short and do not unsubscribe while holding a lock the callback
    takes. Closing the last handle of a feed stops its thread.

    Before the first snapshot ``wait()`` gives up early when none can come (see the
    module doc); afterwards a failing backend shows as ``stale`` snapshots.
    """

    def __init__(self, feed: Feed, release: Callable[[], None]) -> None:
        self._feed = feed
        self._release = release
        self._cond = threading.Condition()
        self._latest: Snapshot | None = None
        self._seq = 0
        self._seen = 0
        self._closed = False
        self._unsubscribers: list[Callable[[], None]] = []
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._unsubscribers.append(feed.subscribe(self._on_snapshot, self._on_close, self._on_error))

    @property
    def query(self) -> Query:
        return self._feed.query

    @property
    def current(self) -> Snapshot | None:
        """The latest snapshot delivered, without waiting (None before the first)."""
        return self._feed.current

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def error(self) -> DiscoveryError | None:
        """The backend's last error while it fails (the snapshots are then ``stale``,
        or none came yet); None while it answers."""
        return self._feed.error

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        with self._cond:
            self._latest = snapshot
            self._seq += 1
            self._cond.notify_all()
        self._wake_async()

    def _on_close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._wake_async()

    def _on_error(self, error: DiscoveryError) -> None:
        with self._cond:  # a waiter before the first snapshot may give up now
            self._cond.notify_all()
        self._wake_async()

    def _wake_async(self) -> None:
        for loop, event in list(self._async_waiters):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed; its waiter is gone with it
                self._async_waiters.discard((loop, event))

    def _take(self) -> Snapshot | None:
        if self._seq > self._seen and self._latest is not None:
            self._seen = self._seq
            return self._latest
        if self._closed:
            raise ClosedError(f"the watch on {self.query.service!r} is closed", service=self.query.service)
        return None

    def _next(self, deadline: float | None, timeout: float | None) -> tuple[Snapshot | None, float | None]:
        """Under the lock: ``(snapshot, _)`` when there is one to return, else ``(None,
        seconds)`` to wait (None: no bound). Raises when waiting is over."""
        snapshot = self._take()
        if snapshot is not None:
            return snapshot, None
        now = time.monotonic()
        error, until = self._feed.first_failure(now, deadline)
        if error is not None:
            raise error.with_traceback(None)  # maybe a stored error: drop an earlier raise's frames
        if until is None:
            return None, None
        if now >= until:
            service = self.query.service
            raise WatchTimeout(f"no new snapshot of {service!r} within {timeout} s", service=service)
        return None, until - now

    def wait(self, timeout: float | None = None) -> Snapshot:
        """The next snapshot this handle has not returned yet (the current one first).

        Raises ``WatchTimeout`` (a ``TimeoutError``) after ``timeout`` seconds and
        ``ClosedError`` once the watch is closed. Before the first snapshot it raises
        the backend's error instead: a permanent one at once, ``BackendUnavailable``
        after ``timeout`` or the watcher's ``first_snapshot_patience``, whichever
        comes first (so even with no timeout).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot, remaining = self._next(deadline, timeout)
                if snapshot is not None:
                    return snapshot
                self._cond.wait(remaining)

    async def wait_async(self, timeout: float | None = None) -> Snapshot:
        """``wait()`` for asyncio code: it awaits instead of blocking the loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = asyncio.Event()
            waiter = (loop, event)
            with self._cond:
                snapshot, remaining = self._next(deadline, timeout)
                if snapshot is not None:
                    return snapshot
                self._async_waiters.add(waiter)
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                pass  # the next round raises, or returns what arrived meanwhile
            finally:
                self._async_waiters.discard(waiter)

    def __iter__(self) -> Iterator[Snapshot]:
        """Every newer snapshot, blocking between them, until the watch is closed."""
        while True:
            try:
                yield self.wait()
            except ClosedError:
                return

    async def __aiter__(self) -> AsyncIterator[Snapshot]:
        while True:
            try:
                yield await self.wait_async()
            except ClosedError:
                return

    def subscribe(self, callback: Subscriber, *, on_error: ErrorSubscriber | None = None) -> Callable[[], None]:
        """Call ``callback`` with the current snapshot and every change, and
        ``on_error`` with the backend's error now (if it fails) and on each failure;
        returns an unsubscribe function. Closing the watch unsubscribes it too."""
        if self._closed:
            raise ClosedError(f"the watch on {self.query.service!r} is closed", service=self.query.service)
        unsubscribe = self._feed.subscribe(callback, on_error=on_error)
        self._unsubscribers.append(unsubscribe)
        return unsubscribe

    def close(self) -> None:
        """Unsubscribe everything this handle added; the last handle stops the feed."""
        with self._cond:
            if self._closed and not self._unsubscribers:
                return
            self._closed = True
            unsubscribers, self._unsubscribers = self._unsubscribers, []
            self._cond.notify_all()
        self._wake_async()
        for unsubscribe in unsubscribers:
            unsubscribe()
        if unsubscribers:
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Watch {self.query.service!r} {state}>"


class Watcher(abc.ABC):
    """Where snapshots come from. A backend implements ``poll``; the rest is shared.

    Class attributes a backend may tune: ``poll_rate``/``poll_burst`` (token bucket of
    polls per second), ``retry_base``/``retry_cap`` (backoff seconds while the backend
    is down), ``close_timeout`` (how long closing waits for a poll to return; 0:
    do not wait, the poll finishes in the background) and
    ``first_snapshot_patience`` (how long ``Watch.wait()`` waits for a first snapshot
    from a backend that does not answer).
    """

    poll_rate: float = 50.0
    poll_burst: int = 10
    retry_base: float = 0.1
    retry_cap: float = 2.0
    close_timeout: float = 5.0
    first_snapshot_patience: float = 5.0
    _closed = False

    def __init__(self) -> None:
        self._feeds: dict[Query, Feed] = {}
        self._feeds_lock = threading.Lock()

    @abc.abstractmethod
    def poll(self, query: Query, index: int, stop: Stop) -> Snapshot:
        """The query's current snapshot, once its index is greater than ``index``.

        Index 0 answers at once. Otherwise block until the result changes, until the
        backend's own wait bound passes (then return the unchanged result: the feed
        dedupes), or until ``stop`` is set (wake up promptly and return anything).
        Raise ``BackendUnavailable``/``PermissionDenied`` on failure; never block
        without a timeout.
        """

    def start_feed(self, feed: Feed) -> None:
        """Start delivering ``feed``'s query. By default a thread per feed calls
        ``poll`` in a loop; a backend that multiplexes many feeds over a few
        connections overrides this (and ``stop_feed``) and calls ``feed.deliver`` and
        ``feed.fail`` itself."""
        feed.poll_in_thread()

    def stop_feed(self, feed: Feed) -> None:  # noqa: B027 (an optional hook)
        """``feed`` has no handle left (its ``stopping`` is set): forget it."""

    def instances(
        self,
        service: str,
        *,
        passing_only: bool = True,
        tags: tuple[str, ...] | list[str] = (),
        meta: Mapping[str, str] | None = None,
    ) -> Snapshot:
        """The service's instances now, in one non-blocking read."""
        self._check_open()
        return self.poll(Query.build(service, passing_only=passing_only, tags=tags, meta=meta), 0, Stop())

    def watch(
        self,
        service: str,
        *,
        passing_only: bool = True,
        tags: tuple[str, ...] | list[str] = (),
        meta: Mapping[str, str] | None = None,
    ) -> Watch:
        """A handle on the service's shared feed (started by the first handle)."""
        self._check_open()
        query = Query.build(service, passing_only=passing_only, tags=tags, meta=meta)
        with self._feeds_lock:
            feed = self._feeds.get(query)
            if feed is None:
                feed = self._feeds[query] = Feed(self, query)
                self.start_feed(feed)
            feed.refs += 1
        return Watch(feed, release=lambda: self._release(feed))

    def _feed_noticed(self, *, recovered: bool = False, gone: Collection[str] = ()) -> None:  # noqa: B027 (a hook)
        """A feed saw the backend answer again after an outage, or instances leave its
        set. Nothing here; ``Backend`` wakes its registrations' keepalive with it."""

    def _release(self, feed: Feed) -> None:
        with self._feeds_lock:
            feed.refs -= 1
            last = feed.refs == 0 and self._feeds.get(feed.query) is feed
            if last:
                del self._feeds[feed.query]
        if last:
            feed.stop()

    def _close_feeds(self) -> None:
        with self._feeds_lock:
            feeds, self._feeds = list(self._feeds.values()), {}
        for feed in feeds:
            feed.stop()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")
