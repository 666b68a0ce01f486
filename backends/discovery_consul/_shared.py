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

What an answer cannot be compared with its last: a service or node the check
detector's last query was not narrowed to (watched, or found by a read, since). Such
a one is compared with the checks its last read showed instead. A service the answer
does not cover at all (watched since its query was sent; any, at the catalog
detector's first answer) is read again when the index moved: a read sent before an
answer arrived may predate a change that answer holds, and the next answer would not
show it again. A read sent after the answer arrived shows all it holds, so it is
never sent again for it. At start-up the reader waits for both detectors' first
answers (one round trip) before its first reads: each service is read once. An answer
whose index did not move (its wait ran out) holds no change.

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
from typing import Any

from discovery_core import DiscoveryError, Feed, Query, Snapshot, Stop

__all__ = ["Detector", "Fingerprints", "Read", "SharedFeeds", "Watched"]

log = logging.getLogger("discovery_consul")

_MIN_SPACING = 0.02  # seconds between a detector's requests: at most 50 a second
_RETRY_BASE, _RETRY_CAP = 0.1, 2.0
_FOLLOW_UP = 1.0  # seconds after a change before a service is read once more

Fingerprints = Mapping[str, Hashable]


def check_key(check: Mapping[str, Any]) -> tuple[str, ...]:
    """A check as the check detector fingerprints it, in its answer and in reads alike."""
    return tuple(str(check.get(k)) for k in ("Node", "CheckID", "Status", "ServiceID"))


@dataclass(frozen=True)
class Read:
    """A plain read of one query: the snapshot, the nodes its instances run on,
    whether any of them (or none at all) has no check of its own, and the checks it
    showed, fingerprinted as the narrowed detector does: the service's, and each
    node's (a filtered read shows only some: a difference then costs a read)."""

    snapshot: Snapshot
    nodes: frozenset[str]
    unchecked: bool
    checks: frozenset[Hashable]  # empty: none (the detector's answer holds no entry then)
    node_checks: Mapping[str, frozenset[Hashable]]  # nodes with node checks only


@dataclass(frozen=True)
class Watched:
    """What a narrowed detector narrows its query to: the watched services and the
    nodes their instances run on."""

    services: frozenset[str]
    nodes: frozenset[str]


@dataclass(frozen=True)
class Detector:
    """One datacenter-wide blocking query: ``fetch(index, watched, stop)`` returns its
    index, a fingerprint per service and one per node (node checks).

    ``narrowed``: its answer holds only the services and nodes of ``watched``, else
    every service of the datacenter. ``unchecked``: a move of its index may be an
    instance without a check, so it has the services that may hold one read again.
    ``critical``: its failure is the backend's (feeds turn stale), else it is only
    logged and the reader's resync covers for it."""

    name: str
    fetch: Callable[[int, Watched, Stop], tuple[int, Fingerprints, Fingerprints]]
    critical: bool
    narrowed: bool
    unchecked: bool


@dataclass(frozen=True)
class _Answer:
    """A detector's answer, what its query was narrowed to, and when that was taken."""

    watched: Watched
    taken: float
    services: Fingerprints
    nodes: Fingerprints


class SharedFeeds:
    """The feeds of one backend that hold no connection of their own."""

    def __init__(self, detectors: Iterable[Detector], read: Callable[[Query], Read], wait: float) -> None:
        self._detectors = tuple(detectors)
        self._read = read
        self._wait = wait
        self._lock = threading.Condition()
        self._feeds: dict[str, set[Feed]] = defaultdict(set)
        self._added: dict[str, float] = {}  # service -> since when it is watched (monotonic)
        self._nodes: dict[str, frozenset[str]] = {}  # service -> nodes of its instances
        self._unchecked: set[str] = set()  # services that may hold an instance without a check
        self._checks: dict[str, frozenset[Hashable]] = {}  # service -> its checks, as its last read showed
        self._node_checks: dict[str, Mapping[str, frozenset[Hashable]]] = {}  # service -> its nodes' checks, same
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
            self._added.setdefault(feed.query.service, time.monotonic())
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
                    service = feed.query.service
                    del self._feeds[service]
                    for known in (self._added, self._nodes, self._checks, self._node_checks, self._planned):
                        known.pop(service, None)
                    self._unchecked.discard(service)
                    self._read_at.pop(service, None)

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

    def _watched(self) -> tuple[Watched, float]:
        """What the detectors are narrowed to now, and when that was taken."""
        with self._lock:
            while not self._feeds and not self._stop.is_set():
                self._lock.wait()
            nodes = frozenset().union(*self._nodes.values()) if self._nodes else frozenset()
            return Watched(frozenset(self._feeds), nodes), time.monotonic()

    def _run_detector(self, detector: Detector) -> None:
        index = 0
        last: _Answer | None = None  # None: nothing to compare with yet
        delay = _RETRY_BASE
        outage = False
        while not self._stop.is_set():
            watched, taken = self._watched()
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
                outage, index, last = True, 0, None
                if detector.critical:
                    self._fail_all(exc)
                if self._stop.wait(random.uniform(delay / 2, delay)):
                    return
                delay = min(delay * 2, _RETRY_CAP)
                continue
            if outage:
                log.info("Consul %s detector: the agent answers again", detector.name)
                outage, delay = False, _RETRY_BASE
            answer = _Answer(watched, taken, by_service, by_node)
            moved = last is None or returned != index  # unmoved: its wait ran out, nothing changed
            changed = self._changes(detector, last, answer, moved=moved, received=received)
            last = answer
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

    def _changes(
        self, detector: Detector, last: _Answer | None, answer: _Answer, *, moved: bool, received: float
    ) -> set[str]:
        """The services to read after ``answer``, none read since it was ``received``
        (such a read shows all it holds): those whose fingerprint differs from the last
        answer's, or from their last read's if the last answer did not cover them; when
        the index ``moved``, those it does not cover, and those that may hold an
        instance without a check if the detector says so."""
        with self._lock:
            changed: set[str] = set()
            for service, added in self._added.items():
                fingerprint = answer.services.get(service)
                if last is not None and (added < last.taken or not detector.narrowed):  # both answers cover it
                    before: Hashable = last.services.get(service)
                elif detector.narrowed and service in answer.watched.services:
                    before = self._checks.get(service) or None  # no check: no entry in the answer
                elif moved:  # not covered: it may have changed unseen
                    changed.add(service)
                    continue
                else:
                    continue
                if before != fingerprint:
                    changed.add(service)
            if detector.narrowed and (nodes := self._nodes_changed(last, answer)):
                changed.update(service for service, where in self._nodes.items() if where & nodes)
            if moved and detector.unchecked:
                changed.update(service for service in self._feeds if service in self._unchecked)
            return {service for service in changed if self._read_at.get(service, -1.0) < received}

    def _nodes_changed(self, last: _Answer | None, answer: _Answer) -> set[str]:
        """The nodes whose checks differ from the last answer's, or, for a node it did
        not cover (found by a read since), from what the last read on it showed."""
        covered = last.watched.nodes if last is not None else frozenset()
        before: dict[str, Hashable] = {node: last.nodes.get(node) for node in covered} if last is not None else {}
        if fresh := answer.watched.nodes - covered:
            for shown in self._node_checks.values():
                before.update((node, checks) for node, checks in shown.items() if node in fresh)
        return {node for node in answer.watched.nodes if before.get(node) != answer.nodes.get(node)}

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
            checks: set[Hashable] = set()
            node_checks: dict[str, frozenset[Hashable]] = {}
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
                checks |= read.checks
                node_checks.update(read.node_checks)
                changed |= feed.deliver(read.snapshot) and not first
            with self._lock:
                if service in self._feeds:
                    self._nodes[service] = frozenset(nodes)
                    self._checks[service] = frozenset(checks)
                    self._node_checks[service] = node_checks
                    if unchecked:
                        self._unchecked.add(service)
                    else:
                        self._unchecked.discard(service)
            # A change is often followed by another the detectors may not tell apart
            # (an instance replaced under the same id, a restore): read again soon.
            # Otherwise resync once per wait period, jittered: what shows in no check.
            delay = _FOLLOW_UP if changed else random.uniform(0.9, 1.0) * self._wait
            self._schedule((service,), at_once=False, delay=delay)
