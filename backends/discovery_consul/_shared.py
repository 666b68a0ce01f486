"""Many watched services over a few connections: datacenter-wide change detectors.

A blocking query per watched service would need a connection each, and Consul allows
200 per client address for every process on the node. Past the backend's direct
share, feeds are driven from here instead, by three threads on three connections
whatever their number:

- the check detector holds one blocking query on ``/v1/health/state/any``, narrowed by
  a ``filter`` to the checks of the watched services and the node checks of the nodes
  they run on. Its index moves on any check change in the datacenter, so it sees every
  registration and deregistration of an instance with a check, every health change and
  every node failure, naming the very checks;
- the catalog detector holds one on ``/v1/catalog/services``, whose index moves on any
  registration or deregistration in the datacenter (not on health changes). An
  instance without a check shows in no check, so on each move it has the watched
  services that may hold one read again: those whose last read showed an instance
  without a check of its own, or no instance at all. (Consul 1.8 applies no filter to
  this endpoint: its answer lists every service name of the datacenter, about 30 bytes
  a name. ``/v1/internal/ui/services`` would tell which services changed, but Consul
  builds it from every instance of the datacenter: 60 ms an answer with 10,000.);
- each detector compares its answer with its last, service by service, and hands the
  services that changed to the reader, which reads each once (a plain read) and
  delivers it to its feeds; core's feed drops answers that change nothing. The reader
  also reads a service once more a second after it changed (a change often comes in
  pairs the summaries cannot tell apart: an instance replaced or restored under the
  same id), and every service once per ``wait`` period, for what neither detector
  shows (a changed address or meta).

A read sent before a detector's answer arrived may predate a change that answer
already holds, and the next answer, compared with it, would not show that change
again. So an answer with nothing to compare with (a detector's first, or the first
for a service watched since its query was sent) has every service it could not
compare read again, unless read since it arrived. At start-up the reader waits for
both detectors' first answers (one round trip) before its first reads, so each
service is read once; and an answer whose index did not move (its wait ran out)
holds no change at all, so it reads nothing.

Consul's cost: a request per detector per change anywhere in the datacenter (each
answer holds only what concerns the watched services), a read per change of a watched
service (two: the follow-up), and at idle a request per detector and a read per feed
per ``wait`` period.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass

from discovery_core import DiscoveryError, Feed, Query, Snapshot, Stop

__all__ = ["Detector", "Fingerprints", "Read", "SharedFeeds", "Watched"]

log = logging.getLogger("discovery_consul")

_MIN_SPACING = 0.02  # seconds between a detector's requests: at most 50 a second
_RETRY_BASE, _RETRY_CAP = 0.1, 2.0
_FOLLOW_UP = 1.0  # seconds after a change before a service is read once more

Fingerprints = Mapping[str, Hashable]


@dataclass(frozen=True)
class Read:
    """A plain read of one query: the snapshot, the nodes its instances run on, and
    whether any of them (or none at all) has no check of its own."""

    snapshot: Snapshot
    nodes: frozenset[str]
    unchecked: bool


@dataclass(frozen=True)
class Watched:
    """What the detectors narrow their queries to: the watched services, the nodes
    their instances run on, and the services that may hold an instance without a
    check (an instance without one, or none at all, at their last read)."""

    services: frozenset[str]
    nodes: frozenset[str]
    unchecked: frozenset[str]


@dataclass(frozen=True)
class Detector:
    """One datacenter-wide blocking query: ``fetch(index, watched, stop)`` returns its
    index, a fingerprint per watched service and one per node (node checks);
    ``critical``: its failure is the backend's (feeds turn stale), else it is only
    logged and the reader's resync covers for it."""

    name: str
    fetch: Callable[[int, Watched, Stop], tuple[int, Fingerprints, Fingerprints]]
    critical: bool


class SharedFeeds:
    """The feeds of one backend that hold no connection of their own."""

    def __init__(self, detectors: Iterable[Detector], read: Callable[[Query], Read], wait: float) -> None:
        self._detectors = tuple(detectors)
        self._read = read
        self._wait = wait
        self._lock = threading.Condition()
        self._feeds: dict[str, set[Feed]] = defaultdict(set)
        self._nodes: dict[str, frozenset[str]] = {}  # service -> nodes of its instances
        self._unchecked: set[str] = set()  # services that may hold an instance without a check
        self._due: list[tuple[float, int, str]] = []  # (when, seq, service): the reader's schedule
        self._planned: dict[str, float] = {}  # service -> its one planned read (older heap entries are void)
        self._read_at: dict[str, float] = {}  # service -> when its last read was sent (monotonic)
        self._now: set[str] = set()  # services to read at once
        self._unanswered = {d.name for d in self._detectors}  # first reads wait for these detectors' first answers
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
                self._threads = [
                    threading.Thread(target=self._run_reader, name="discovery-consul-read", daemon=True),
                    *(
                        threading.Thread(target=self._run_detector, args=(d,), name=f"discovery-consul-{d.name}")
                        for d in self._detectors
                    ),
                ]
                for thread in self._threads:
                    thread.daemon = True
                    thread.start()

    def remove(self, feed: Feed) -> None:
        with self._lock:
            feeds = self._feeds.get(feed.query.service)
            if feeds is not None:
                feeds.discard(feed)
                if not feeds:
                    del self._feeds[feed.query.service]
                    self._nodes.pop(feed.query.service, None)
                    self._unchecked.discard(feed.query.service)
                    self._planned.pop(feed.query.service, None)
                    self._read_at.pop(feed.query.service, None)

    def close(self, timeout: float) -> None:
        """Stop the threads (their queries are cut short) within ``timeout``."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- the detectors ------------------------------------------------------------------

    def _watched(self, *, block: bool = True) -> Watched:
        with self._lock:
            while block and not self._feeds and not self._stop.is_set():
                self._lock.wait()
            nodes = frozenset().union(*self._nodes.values()) if self._nodes else frozenset()
            # A service not read yet may hold anything.
            unchecked = frozenset(name for name in self._feeds if name in self._unchecked or name not in self._nodes)
            return Watched(frozenset(self._feeds), nodes, unchecked)

    def _run_detector(self, detector: Detector) -> None:
        index = 0
        known: Fingerprints | None = None  # None: nothing to compare with yet
        node_known: Fingerprints = {}
        delay = _RETRY_BASE
        outage = False
        while not self._stop.is_set():
            watched = self._watched()
            services = watched.services
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                returned, by_service, by_node = detector.fetch(index, watched, self._stop)
                received = time.monotonic()
            except DiscoveryError as exc:
                if self._stop.is_set():
                    return
                self._answered(detector)  # the reads fail on their own now
                if not outage:
                    log.warning("Consul %s detector: %s; retrying", detector.name, exc)
                outage, index, known = True, 0, None
                if detector.critical:
                    self._fail_all(exc)
                if self._stop.wait(random.uniform(delay / 2, delay)):
                    return
                delay = min(delay * 2, _RETRY_CAP)
                continue
            if outage:
                log.info("Consul %s detector: the agent answers again", detector.name)
                outage, delay = False, _RETRY_BASE
            if known is not None and returned == index:
                changed: set[str] = set()  # its wait ran out: nothing it watches changed
            else:
                watching = self._watched(block=False).services
                if known is None:  # nothing to compare with: any service may have changed
                    changed = set(watching)
                else:
                    # And services watched since this query was sent: a change to them
                    # was invisible to its filter.
                    changed = _changed(services, known, by_service) | (watching - services)
                changed |= self._services_on(_changed(node_known.keys() | by_node.keys(), node_known, by_node))
                changed = self._read_before(changed, received)
            known, node_known = by_service, by_node
            index = 0 if returned < index else max(returned, 1)
            self._answered(detector)
            self._schedule(changed, at_once=True)
            spent = time.monotonic() - started
            if spent < _MIN_SPACING and self._stop.wait(_MIN_SPACING - spent):
                return

    def _answered(self, detector: Detector) -> None:
        with self._lock:
            if detector.name in self._unanswered:
                self._unanswered.discard(detector.name)
                self._lock.notify_all()

    def _read_before(self, services: Iterable[str], when: float) -> set[str]:
        """Those of ``services`` not read since ``when``: a read sent after an answer
        arrived shows every change that answer holds."""
        with self._lock:
            return {name for name in services if self._read_at.get(name, -1.0) < when}

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
                    when = self._planned[service] = time.monotonic() + delay
                    heapq.heappush(self._due, (when, self._seq, service))
            self._lock.notify_all()

    def _next_service(self) -> str | None:
        """The next service to read: one asked for now, else the earliest resync due;
        none before every detector's first answer (a read sent earlier may miss a
        change that answer holds, and would have to be sent again)."""
        with self._lock:
            while not self._stop.is_set():
                if self._unanswered:
                    self._lock.wait()
                    continue
                if self._now:
                    return self._now.pop()
                timeout = None
                if self._due:
                    when, _, service = self._due[0]
                    timeout = when - time.monotonic()
                    if timeout <= 0:
                        heapq.heappop(self._due)
                        if service in self._feeds and self._planned.get(service) == when:
                            return service
                        continue
                self._lock.wait(timeout)
        return None

    def _run_reader(self) -> None:
        while (service := self._next_service()) is not None:
            with self._lock:
                feeds = list(self._feeds.get(service, ()))
                self._read_at[service] = time.monotonic()
            nodes: set[str] = set()
            changed = unchecked = False
            for feed in feeds:
                if feed.closed:
                    continue
                first = feed.current is None
                try:
                    read = self._read(feed.query)
                except DiscoveryError as exc:
                    if self._stop.is_set():
                        return
                    feed.fail(exc)
                    self._schedule((service,), at_once=False, delay=_RETRY_CAP)
                    continue
                nodes |= read.nodes
                unchecked |= read.unchecked
                changed |= feed.deliver(read.snapshot) and not first
            with self._lock:
                if service in self._feeds:
                    self._nodes[service] = frozenset(nodes)
                    if unchecked:
                        self._unchecked.add(service)
                    else:
                        self._unchecked.discard(service)
            # A change is often followed by another the detectors may not tell apart
            # (an instance replaced under the same id, a restore): read again soon.
            # Otherwise resync once per wait period, jittered: what shows in no check.
            delay = _FOLLOW_UP if changed else random.uniform(0.9, 1.0) * self._wait
            self._schedule((service,), at_once=False, delay=delay)


def _changed(names: Iterable[str], before: Fingerprints, after: Fingerprints) -> set[str]:
    return {name for name in names if before.get(name) != after.get(name)}
