"""A fleet of in-process add-service instances and a client load on them.

The demo, the failover benchmark and the tests tell the same story with these: start
instances, drain one, kill one, flip one's health, and measure per event how long the
client's traffic took to follow and how many calls failed.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from discovery_examples.addservice import add_pb2, add_pb2_grpc
from discovery_examples.addservice.server import SERVICE, Adder, make_server

import discovery_core as dc

#: Retries for the idempotent Add when instances are killed in this process. A killed
#: process drops its connections (UNAVAILABLE); an in-process kill, ``server.stop(0)``,
#: cancels the calls in flight instead (CANCELLED, sent by the server), so both are
#: retried here. RetryPolicy's default retries UNAVAILABLE only.
KILL_RETRY = dc.RetryPolicy(codes=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}))


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


@dataclass
class Instance:
    """One add-service instance of the fleet."""

    name: str
    adder: Adder
    executor: futures.ThreadPoolExecutor
    served: dc.Served
    killed: bool = False

    @property
    def id(self) -> str:
        return self.served.instance.id


class Fleet:
    """Add-service instances on ephemeral ports of 127.0.0.1, registered in ``registry``."""

    def __init__(
        self,
        registry: dc.Registry,
        *,
        service: str = SERVICE,
        drain: float = 0.5,
        grace: float = 2.0,
        workers: int = 8,
        check: dc.Check | bool = True,
    ) -> None:
        self.registry = registry
        self.service = service
        self.drain_seconds = drain
        self.grace = grace
        self.workers = workers
        self.check = check
        self.instances: list[Instance] = []
        self._names = (f"add-{n}" for n in itertools.count(1))

    def start(self) -> Instance:
        name = next(self._names)
        adder = Adder(name)
        executor = futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=name)
        served = dc.serve(
            make_server(adder, executor),
            self.registry,
            self.service,
            advertise="127.0.0.1",
            instance_id=name,
            check=self.check,
            drain=self.drain_seconds,
            grace=self.grace,
            handle_signals=False,
        )
        instance = Instance(name, adder, executor, served)
        self.instances.append(instance)
        return instance

    def drain(self, instance: Instance) -> None:
        """Leave gracefully: NOT_SERVING, deregister, drain, stop."""
        instance.served.stop()
        instance.executor.shutdown(wait=False)

    def kill(self, instance: Instance) -> None:
        """Stop at once without deregistering, as a crashed process would."""
        instance.killed = True
        instance.served.server.stop(0).wait()

    def flip(self, instance: Instance, serving: bool) -> None:
        instance.served.set_serving(serving)

    def close(self) -> None:
        """Stop everything; a killed instance's registration is removed now."""
        for instance in self.instances:
            if instance.killed and instance.served.registration is not None:
                instance.served.registration.deregister()
            instance.served.stop(grace=0, drain=0)
            instance.executor.shutdown(wait=True)
        self.instances.clear()


@dataclass(frozen=True)
class Event:
    """What happened to the fleet at ``at`` (monotonic seconds), for measuring."""

    label: str
    instance: str
    at: float
    kind: str  # "leave": traffic should stop reaching it; "join": traffic should reach it;
    # "hold" (instance ""): a fault outside the fleet that traffic should ride out


@dataclass
class Outcome:
    label: str
    follow: float | None  # seconds until traffic followed; None: it never did
    failed: int


class Traffic:
    """Who answered each call and when: counts, failures and time-to-follow."""

    def __init__(self) -> None:
        self._records: list[tuple[float, str | None, str]] = []  # (monotonic time, instance, code)
        self._lock = threading.Lock()

    def record(self, answered: str | None, code: str) -> None:
        with self._lock:
            self._records.append((time.monotonic(), answered, code))

    def snapshot(self) -> list[tuple[float, str | None, str]]:
        with self._lock:
            return list(self._records)

    def counts(self, since: float = 0.0) -> Counter[str]:
        """Calls answered per instance since ``since``; failures under "failed"."""
        return Counter(who or "failed" for t, who, _ in self.snapshot() if t >= since)

    def failures(self) -> int:
        return sum(1 for _, _, code in self.snapshot() if code != "OK")

    def followed(self, kind: str, instance: str, since: float) -> bool:
        """Whether traffic followed a "join" or "leave" of ``instance`` at ``since``."""
        return self.outcome(Event(kind, instance, since, kind), until=time.monotonic()).follow is not None

    def outcome(self, event: Event, until: float, *, quiet: float = 0.3) -> Outcome:
        """Time to follow ``event`` and the calls failed between it and ``until``.

        leave: from the event to the last call the instance answered or that failed
        (followed once ``quiet`` seconds of calls passed without either). join: to the
        first call the instance answered. hold: to the last call that failed (0 if none).
        """
        window = [r for r in self.snapshot() if event.at <= r[0] <= until]
        failed = sum(1 for _, _, code in window if code != "OK")
        mine = [t for t, who, _ in window if who == event.instance]
        if event.kind == "join":
            return Outcome(event.label, mine[0] - event.at if mine else None, failed)
        last = max([event.at, *mine, *(t for t, _, code in window if code != "OK")])
        followed = until - last >= quiet and any(t > last for t, who, _ in window if who)
        return Outcome(event.label, last - event.at if followed else None, failed)


class Load(Traffic):
    """Calls Add in a loop on ``threads`` threads, recording who answered each call."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        threads: int = 2,
        timeout: float = 2.0,
        wait_for_ready: bool = False,
        backoff: float = 0.0,
    ) -> None:
        super().__init__()
        self.channel = channel
        self.threads = threads
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.backoff = backoff  # seconds a thread pauses after a failed call (fail-fast calls would spin)
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self) -> Load:
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"add-load-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join()

    def _run(self) -> None:
        add = add_pb2_grpc.AdderStub(self.channel).Add
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                reply, call = add.with_call(
                    add_pb2.AddRequest(a=n, b=1), timeout=self.timeout, wait_for_ready=self.wait_for_ready
                )
            except grpc.RpcError as error:
                self.record(None, error.code().name if isinstance(error, grpc.Call) else "UNKNOWN")
                if self.backoff:
                    self._stop.wait(self.backoff)
            else:
                answered = dict(call.trailing_metadata() or ()).get("instance")
                self.record(str(answered), "OK" if reply.v == n + 1 else "WRONG")

    def wait_for(self, kind: str, instance: str, *, since: float, timeout: float) -> bool:
        """Wait until traffic followed a "join" or "leave" of ``instance``; False at the timeout."""
        return wait_until(lambda: self.followed(kind, instance, since), timeout, interval=0.02)


class FollowTimeout(TimeoutError):
    """Traffic did not follow an event of a Scenario in time."""


class Scenario:
    """A fleet of ``size`` instances registered in ``registry`` and a discovery channel
    on ``watcher`` (default: the registry itself) under load; events are measured as
    they happen. ``retry``: the channel retries with KILL_RETRY (else not at all).
    """

    def __init__(
        self,
        registry: dc.Backend,
        watcher: dc.Backend | None = None,
        *,
        threads: int,
        retry: bool,
        size: int = 3,
        check: dc.Check | bool = True,
        backoff: float = 0.0,
        follow_timeout: float = 30.0,
    ) -> None:
        self.service = f"add-{uuid.uuid4().hex[:8]}"
        self.follow_timeout = follow_timeout
        self.fleet = Fleet(registry, service=self.service, drain=1.0, check=check)
        self.events: list[Event] = []
        try:
            self.instances = [self.fleet.start() for _ in range(size)]
            self.channel = dc.discovery_channel(watcher or registry, self.service, retry=KILL_RETRY if retry else None)
        except BaseException:
            self.fleet.close()
            raise
        if not self.channel.wait_ready(timeout=follow_timeout):
            self.channel.close()
            self.fleet.close()
            raise FollowTimeout(f"{self.service}: the channel never became ready")
        self.load = Load(self.channel, threads=threads, backoff=backoff).start()

    def _followed(self, label: str, instance: Instance, kind: str, at: float) -> None:
        self.events.append(Event(f"  {label}", instance.name, at, kind))
        if not self.load.wait_for(kind, instance.name, since=at, timeout=self.follow_timeout):
            raise FollowTimeout(f"{label}: traffic did not follow within {self.follow_timeout} s")

    def start(self) -> Instance:
        at = time.monotonic()
        instance = self.fleet.start()
        self._followed(f"start {instance.name}", instance, "join", at)
        return instance

    def drain(self, instance: Instance) -> None:
        at = time.monotonic()
        self.fleet.drain(instance)
        self._followed(f"drain {instance.name}", instance, "leave", at)

    def kill(self, instance: Instance) -> None:
        at = time.monotonic()
        self.fleet.kill(instance)
        self._followed(f"kill {instance.name}", instance, "leave", at)

    def flip(self, instance: Instance, serving: bool) -> None:
        at = time.monotonic()
        self.fleet.flip(instance, serving)
        state = "SERVING" if serving else "NOT_SERVING"
        self._followed(f"{instance.name} {state}", instance, "join" if serving else "leave", at)

    def fault(self, label: str) -> float:
        """Mark a fault outside the fleet (its "hold" event) starting now; its time."""
        at = time.monotonic()
        self.events.append(Event(f"  {label}", "", at, "hold"))
        return at

    def close(self) -> list[Outcome]:
        """Stop the load, the channel and the fleet; an outcome per event."""
        time.sleep(0.3)  # a last quiet stretch so the final event's window holds calls
        self.load.stop()
        self.channel.close()
        self.fleet.close()
        end = time.monotonic()
        ends = [e.at for e in self.events[1:]] + [end]  # each event's window ends where the next begins
        return [self.load.outcome(event, until=until) for event, until in zip(self.events, ends, strict=False)]
