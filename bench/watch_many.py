"""Watching many services on one Consul agent: what it costs the agent, and how fast a
change still travels.

For each size (10, 100, 1,000 watched services) one backend watches that many
services through a counting proxy in front of the agent, whose catalog also holds
10,000 instances of 1,000 other services on other nodes (so a datacenter-wide answer
that was not narrowed would show). Reported per size:

- connections the process holds to the agent (the budget is ``max_connections``);
- how many times each watched service was read from its watch's start until the
  first idle window (start-up: once is the goal);
- requests and bytes per idle minute (nothing changes), and how many times each
  watched service was read, in windows of ``--idle`` seconds that start
  ``--idle-after`` seconds after the first snapshots (``2,62``: the first minute,
  then the steady state once every feed's first ``wait`` period has passed);
- requests and bytes per change (a registration or a deregistration of an instance
  with a check in the last service), beyond the change's own write, including the
  follow-up read a second later;
- register() returning -> subscriber holding the instance (registered with a check,
  as serve() does), p50/p99, against a raw blocking query (http.client, no library)
  on the same service seeing the same event: both follow the last service watched,
  which past the direct share goes through the shared change detectors.

Every watched service starts with two instances with passing checks, in the catalog
on other nodes.

    python bench/watch_many.py                     # a throwaway dev agent
    python bench/watch_many.py --sizes 10,100 --count 100 --idle 60 --idle-after 2,62
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from propagation import Result, _FloorSide, _pace, _Seen

import discovery_core as dc

if TYPE_CHECKING:
    from discovery_consul.devproxy import CountingProxy

OTHER_SERVICES, OTHER_INSTANCES = 1000, 10
WATCHED_INSTANCES = 2  # each watched service starts with two instances, checked


@dataclass(frozen=True)
class Idle:
    """One idle window: when it started (seconds after the first snapshots), what it
    cost per minute, and how many services were read how many times (reads -> services)."""

    start: float
    requests_per_minute: float
    bytes_per_minute: float
    reads: Counter[int]

    def line(self, services: int) -> str:
        return (
            f"{services:>6} {self.start:>7.0f} {self.requests_per_minute:>10.1f} "
            f"{self.bytes_per_minute / 1024:>9.1f}  {_histogram(self.reads)}"
        )


def _histogram(reads: Counter[int]) -> str:
    return ", ".join(f"{n}x{reads[n]}" for n in sorted(reads))


def _reads(counts: Counter[str], services: list[str]) -> Counter[int]:
    """How many services were read how many times (every service: 0 counts too)."""
    return Counter(counts[f"GET /v1/health/service/{service}"] for service in services)


@dataclass(frozen=True)
class Size:
    services: int
    connections: int
    startup: Counter[int]
    idle: tuple[Idle, ...]
    requests_per_change: float
    bytes_per_change: float
    ours: Result
    floor: Result

    def line(self) -> str:
        return (
            f"{self.services:>6} {self.connections:>6} {self.requests_per_change:>8.2f} "
            f"{self.bytes_per_change / 1024:>8.2f} {self.ours.p50 * 1e3:>8.3f} {self.ours.p99 * 1e3:>8.3f} "
            f"{self.floor.p50 * 1e3:>8.3f} {self.floor.p99 * 1e3:>8.3f} {self.ours.p50 / self.floor.p50:>6.2f}x"
        )


HEADER = (
    "  size  conns  req/chg  KiB/chg  p50 ms   p99 ms  raw p50  raw p99  ratio\n"
    "------ ------ -------- -------- -------- -------- -------- -------- ------"
)
IDLE_HEADER = (
    "  size  from s  idle req/m idle KiB/m  reads x services in the window (start: from the first watch)\n"
    "------ ------- ----------- ----------  ----------------------------------------------------"
)


class _Target:
    """The backend's view of the one service that changes."""

    def __init__(self, watch: dc.Watch) -> None:
        self.seen = _Seen()
        watch.subscribe(lambda snapshot: self.seen.update(frozenset(i.id for i in snapshot.instances)))
        self.seen.wait_for(lambda ids: len(ids) == WATCHED_INSTANCES)


def _sample(backend: dc.Backend, service: str, floor: _FloorSide, ours: _Seen, n: int) -> tuple[float, float]:
    """One change seen by both: seconds from register() returning to each holding it."""
    check = dc.TtlCheck(ttl=600, initial_status=dc.HealthStatus.PASSING)  # a check, as serve() registers
    inst = dc.ServiceInstance(service, "127.0.0.1", 10000 + n % 50000, id=f"{service}-sample-{n}", check=check)
    backend.register(inst, keepalive=False)
    returned = time.perf_counter()
    ours_at = ours.wait_for(lambda ids: inst.id in ids)
    floor_at = floor.seen.wait_for(lambda ids: inst.id in ids)
    backend.deregister(inst.id)
    ours.wait_for(lambda ids: inst.id not in ids)
    floor.seen.wait_for(lambda ids: inst.id not in ids)
    return ours_at - returned, floor_at - returned


def _watching(backend: dc.Backend, services: list[str]) -> list[dc.Watch]:
    watches = [backend.watch(service) for service in services]
    for watch in watches:
        watch.wait(timeout=60)
    return watches


def _latency(address: str, services: list[str], count: int, period: float) -> tuple[list[float], list[float]]:
    """Register -> subscriber on the last service, ours beside the raw blocking query;
    the backend talks to the agent directly (no proxy in the way)."""
    with dc.connect("consul", address=address) as backend:
        watches = _watching(backend, services)
        try:
            target = _Target(watches[-1])
            initial = frozenset(f"{services[-1]}-{n}" for n in range(WATCHED_INSTANCES))
            floor = _FloorSide(
                address, registrar=backend, label="raw", service=services[-1], initial=initial, passing_only=True
            )
            ours: list[float] = []
            raw: list[float] = []
            with floor.running():
                for n in range(count):
                    _pace(time.perf_counter(), period)
                    mine, theirs = _sample(backend, services[-1], floor, target.seen, n)
                    ours.append(mine)
                    raw.append(theirs)
            return ours, raw
        finally:
            for watch in watches:
                watch.close()


def _idle(proxy: CountingProxy, services: list[str], start: float, after: float, length: float) -> Idle:
    """The idle window of ``length`` seconds from ``after`` seconds past ``start``."""
    time.sleep(max(0.0, start + after - time.monotonic()))
    before, bytes_before = proxy.counts(), proxy.bytes_up + proxy.bytes_down
    time.sleep(length)
    counts, spent = proxy.counts() - before, proxy.bytes_up + proxy.bytes_down - bytes_before
    return Idle(after, counts.total() * 60 / length, spent * 60 / length, _reads(counts, services))


def measure(address: str, size: int, count: int, idle: float, idle_after: list[float], period: float) -> Size:
    from discovery_consul.devagent import connections_to, populate  # noqa: PLC0415 (imported when measured)
    from discovery_consul.devproxy import CountingProxy  # noqa: PLC0415

    prefix = f"wm{size}-{uuid.uuid4().hex[:6]}"
    services = [f"{prefix}-{i:04d}" for i in range(size)]
    populate(address, prefix, size, WATCHED_INSTANCES)
    # What it costs the agent: through the counting proxy.
    with CountingProxy(address) as proxy, dc.connect("consul", address=proxy.address) as backend:
        watches = _watching(backend, services)
        try:
            start = time.monotonic()
            connections = connections_to(proxy.address)
            time.sleep(max(0.0, start + idle_after[0] - time.monotonic()))
            startup = _reads(proxy.counts(), services)
            windows = tuple(_idle(proxy, services, start, after, idle) for after in idle_after)
            after = proxy.counts(), proxy.bytes_up + proxy.bytes_down
            changes = 0
            for n in range(min(count, 20)):
                _pace(time.perf_counter(), period)
                inst = dc.ServiceInstance(services[-1], "127.0.0.1", 20000 + n, check=dc.TtlCheck(ttl=600))
                backend.register(inst, keepalive=False)
                backend.deregister(inst.id)
                changes += 2
            time.sleep(2)  # the reads the changes set off (and their follow-ups) finish
            end = proxy.counts(), proxy.bytes_up + proxy.bytes_down
        finally:
            for watch in watches:
                watch.close()
    delta = end[0] - after[0]
    reads = sum(v for k, v in delta.items() if not k.startswith("PUT"))
    ours, raw = _latency(address, services, count, period)
    return Size(
        size,
        connections,
        startup,
        windows,
        reads / changes,
        (end[1] - after[1]) / changes,  # the writes' own bytes are in: an upper bound
        Result(f"ours ({size})", ours),
        Result(f"raw ({size})", raw),
    )


@contextlib.contextmanager
def crowded_agent(given: str | None, others: int) -> Iterator[str]:
    """The agent (given, or a throwaway dev agent), its catalog holding ``others``
    other services of 10 instances each, on other nodes."""
    from discovery_consul.devagent import DevAgent, DevAgentError, populate  # noqa: PLC0415

    prefix = f"other-{uuid.uuid4().hex[:6]}"
    if given:
        address = given.removeprefix("http://")
        populate(address, prefix, others, OTHER_INSTANCES)
        yield address
        return
    try:
        agent = DevAgent()
        agent.start()
    except DevAgentError as exc:
        raise SystemExit(f"no Consul agent: {exc}. Give --consul-address or put `consul` on PATH") from None
    try:
        populate(agent.address, prefix, OTHER_SERVICES, OTHER_INSTANCES)
        yield agent.address
    finally:
        agent.close()


def run(argv: list[str] | None = None) -> list[Size]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="10,100,1000", help="comma-separated numbers of watched services")
    parser.add_argument("--count", type=int, default=100, help="changes measured per size")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of each idle window")
    parser.add_argument(
        "--idle-after",
        default="2",
        help="comma-separated seconds after the first snapshots at which idle windows start (2,62: the first "
        "minute, then the steady state)",
    )
    parser.add_argument(
        "--others", type=int, default=OTHER_SERVICES, help="other services in the catalog (x10 instances)"
    )
    parser.add_argument("--consul-address", help="host:port of an agent (default: a throwaway dev agent)")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    idle_after = sorted(float(after) for after in args.idle_after.split(",") if after.strip())
    if any(later - earlier < args.idle for earlier, later in itertools.pairwise(idle_after)):
        parser.error("idle windows overlap: --idle-after starts must be at least --idle apart")
    period = 3 / dc.Watcher.poll_rate
    results = []
    with crowded_agent(args.consul_address, args.others) as address:
        print(IDLE_HEADER, flush=True)
        for size in sizes:
            results.append(measure(address, size, args.count, args.idle, idle_after, period))
            print(f"{size:>6}   start {'':>10} {'':>9}  {_histogram(results[-1].startup)}", flush=True)
            print(*(window.line(size) for window in results[-1].idle), sep="\n", flush=True)
    print(HEADER, *(result.line() for result in results), sep="\n")
    print("ratio: our p50 / the raw blocking query's p50 on the same event (goal: <= 1.1x)")
    return results


if __name__ == "__main__":
    run(sys.argv[1:])
