"""Many watched services over two connections: a datacenter-wide change detector.

A blocking query per watched service would need a connection each, and Consul allows
200 per client address for every process on the node. Past the backend's direct
share, feeds are driven from here instead, with two threads and two connections
whatever their number:

- the detector holds one blocking query on ``/v1/health/state/any``, narrowed by a
  ``filter`` to the checks of the watched services and the node checks of the nodes
  they run on. Its index moves on any check change in the datacenter, so it sees
  every registration and deregistration of an instance with a check, every health
  change and every node failure; it compares each answer with the last one, service
  by service, and hands the services whose checks changed to the reader;
- the reader reads each such service once (a plain, non-blocking read) and delivers
  the answer to its feeds; core's feed drops answers that change nothing. It also
  re-reads every service once per ``wait`` period, which catches what has no check
  to show (an instance registered without one, a changed address).

Consul's cost: one request per change of a check anywhere in the datacenter (its
answer holds only the watched services' checks), one read per change of a watched
service, and one request per ``wait`` period per feed at idle.
"""

from __future__ import annotations

import heapq
import logging
import random
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from discovery_core import DiscoveryError, Feed, Query, Snapshot, Stop

__all__ = ["SharedFeeds"]

log = logging.getLogger("discovery_consul")

_MIN_SPACING = 0.02  # seconds between detector requests: at most 50 a second
_RETRY_BASE, _RETRY_CAP = 0.1, 2.0

CheckKey = tuple[str, str, str, str]  # node, check id, status, service id


class SharedFeeds:
    """The feeds of one backend that hold no connection of their own."""

    def __init__(
        self,
        *,
        detect: Callable[[int, str, Stop], tuple[int, list[dict[str, Any]]]],
        read: Callable[[Query], tuple[Snapshot, frozenset[str]]],
        quote: Callable[[str], str],
        wait: float,
    ) -> None:
        self._detect = detect  # (index, filter, stop) -> (index, check entries)
        self._read = read  # query -> (snapshot, nodes its instances run on)
        self._quote = quote  # a string literal of Consul's filter language
        self._wait = wait
        self._lock = threading.Condition()
        self._feeds: dict[str, set[Feed]] = defaultdict(set)
        self._nodes: dict[str, frozenset[str]] = {}  # service -> nodes of its instances
        self._due: list[tuple[float, int, str]] = []  # (when, seq, service): the reader's schedule
        self._now: set[str] = set()  # services to read at once
        self._seq = 0
        self._stop = Stop()
        self._threads: list[threading.Thread] = []

    def __len__(self) -> int:
        with self._lock:
            return sum(len(feeds) for feeds in self._feeds.values())

    def add(self, feed: Feed) -> None:
        with self._lock:
            self._feeds[feed.query.service].add(feed)
            self._now.add(feed.query.service)
            self._lock.notify_all()
            if not self._threads:
                for name, target in (("detect", self._run_detector), ("read", self._run_reader)):
                    thread = threading.Thread(target=target, name=f"discovery-consul-{name}", daemon=True)
                    self._threads.append(thread)
                    thread.start()

    def remove(self, feed: Feed) -> None:
        with self._lock:
            feeds = self._feeds.get(feed.query.service)
            if feeds is not None:
                feeds.discard(feed)
                if not feeds:
                    del self._feeds[feed.query.service]
                    self._nodes.pop(feed.query.service, None)

    def close(self, timeout: float) -> None:
        """Stop both threads (their queries are cut short) within ``timeout``."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- the detector -------------------------------------------------------------------

    def _filter(self) -> tuple[frozenset[str], str]:
        """The watched services and a filter for their checks and their nodes' checks."""
        with self._lock:
            services = frozenset(self._feeds)
            nodes = frozenset().union(*self._nodes.values()) if self._nodes else frozenset()
        terms = [f"ServiceName matches {self._quote(_alternatives(services))}"]
        if nodes:
            terms.append(f'(ServiceID == "" and Node matches {self._quote(_alternatives(nodes))})')
        return services, " or ".join(terms)

    def _run_detector(self) -> None:
        index = 0
        known: dict[str, frozenset[CheckKey]] | None = None  # None: nothing trusted yet
        node_checks: dict[str, frozenset[CheckKey]] = {}
        delay = _RETRY_BASE
        outage = False
        while not self._stop.is_set():
            with self._lock:
                while not self._feeds and not self._stop.is_set():
                    self._lock.wait()
            services, expression = self._filter()
            started = time.monotonic()
            try:
                returned, entries = self._detect(index, expression, self._stop)
            except DiscoveryError as exc:
                if self._stop.is_set():
                    return
                if not outage:
                    log.warning("Consul change detector: %s; serving the last known sets and retrying", exc)
                outage, index, known = True, 0, None
                self._fail_all(exc)
                if self._stop.wait(random.uniform(delay / 2, delay)):
                    return
                delay = min(delay * 2, _RETRY_CAP)
                continue
            if outage:
                log.info("Consul change detector: the agent answers again")
                outage, delay = False, _RETRY_BASE
            by_service, by_node = _group(entries)
            changed = set(services) if known is None else _changed(services, known, by_service)
            changed |= self._services_on(_changed(node_checks.keys() | by_node.keys(), node_checks, by_node))
            known, node_checks = by_service, by_node
            index = 0 if returned < index else max(returned, 1)
            self._schedule(changed, at_once=True)
            spent = time.monotonic() - started
            if spent < _MIN_SPACING and self._stop.wait(_MIN_SPACING - spent):
                return

    def _services_on(self, nodes: Iterable[str]) -> set[str]:
        nodes = set(nodes)
        if not nodes:
            return set()
        with self._lock:
            return {service for service, where in self._nodes.items() if where & nodes}

    def _fail_all(self, error: DiscoveryError) -> None:
        with self._lock:
            feeds = [feed for group in self._feeds.values() for feed in group]
        for feed in feeds:
            feed.fail(error)

    # -- the reader ---------------------------------------------------------------------

    def _schedule(self, services: Iterable[str], *, at_once: bool, delay: float = 0.0) -> None:
        with self._lock:
            if at_once:
                self._now.update(services)
            else:
                for service in services:
                    self._seq += 1
                    heapq.heappush(self._due, (time.monotonic() + delay, self._seq, service))
            self._lock.notify_all()

    def _next_service(self) -> str | None:
        """The next service to read: one asked for now, else the earliest resync due."""
        with self._lock:
            while not self._stop.is_set():
                if self._now:
                    return self._now.pop()
                timeout = None
                if self._due:
                    when, _, service = self._due[0]
                    timeout = when - time.monotonic()
                    if timeout <= 0:
                        heapq.heappop(self._due)
                        if service in self._feeds:
                            return service
                        continue
                self._lock.wait(timeout)
        return None

    def _run_reader(self) -> None:
        while (service := self._next_service()) is not None:
            with self._lock:
                feeds = list(self._feeds.get(service, ()))
            nodes: set[str] = set()
            for feed in feeds:
                if feed.closed:
                    continue
                try:
                    snapshot, where = self._read(feed.query)
                except DiscoveryError as exc:
                    if self._stop.is_set():
                        return
                    feed.fail(exc)
                    self._schedule((service,), at_once=False, delay=_RETRY_CAP)
                    continue
                nodes |= where
                feed.deliver(snapshot)
            with self._lock:
                if service in self._feeds:
                    self._nodes[service] = frozenset(nodes)
            # Resync once per wait period, jittered: catches what shows in no check.
            self._schedule((service,), at_once=False, delay=random.uniform(0.5, 1.0) * self._wait)


def _alternatives(names: Iterable[str]) -> str:
    """An RE2 pattern matching exactly these names."""
    return "^(" + "|".join(re.escape(name) for name in sorted(names)) + ")$"


def _group(entries: list[dict[str, Any]]) -> tuple[dict[str, frozenset[CheckKey]], dict[str, frozenset[CheckKey]]]:
    """Checks by service name, and node checks by node."""
    services: dict[str, set[CheckKey]] = defaultdict(set)
    nodes: dict[str, set[CheckKey]] = defaultdict(set)
    for entry in entries:
        key = (str(entry.get("Node")), str(entry.get("CheckID")), str(entry.get("Status")), str(entry.get("ServiceID")))
        if entry.get("ServiceID"):
            services[str(entry.get("ServiceName"))].add(key)
        else:
            nodes[key[0]].add(key)
    return (
        {name: frozenset(keys) for name, keys in services.items()},
        {name: frozenset(keys) for name, keys in nodes.items()},
    )


Checks = Mapping[str, frozenset[CheckKey]]


def _changed(names: Iterable[str], before: Checks, after: Checks) -> set[str]:
    empty: frozenset[CheckKey] = frozenset()
    return {name for name in names if before.get(name, empty) != after.get(name, empty)}
