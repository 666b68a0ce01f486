"""Propagation latency: from ``register()`` returning to a watch subscriber holding a
snapshot with the new instance. p50 and p99 per backend, and for Consul beside the
floor measured in the same run on the same agent: a raw blocking query (http.client,
no library) seeing a raw registration.

    python bench/propagation.py                                 # memory + consul
    python bench/propagation.py --backends memory --memory-count 1000
    python bench/propagation.py --consul-address 127.0.0.1:8500 --consul-count 200

The Consul samples interleave (the floors and the backend, the order rotating each
round) after --warmup unrecorded rounds, so drift over the run falls on all of them
alike. Two floors, both the same raw blocking query: one sees registrations sent raw
(a new connection per PUT); the other sees registrations made by the backend's own
``register()``. The second is the like-for-like floor the goal is judged against: the
trigger and the moment ``register()`` returns are then identical, and only the
watcher differs. How the PUT's connection is handled moves when the call returns
relative to the agent's catalog update by about 0.1 ms, whatever reads the answer.

Consul comes from --consul-address, else ``CONSUL_HTTP_ADDR``, else a throwaway
``consul agent -dev`` when a ``consul`` binary is on PATH. Each sample registers one
instance, waits until it is seen, deregisters it and waits until it is gone, so the
set stays small and samples do not overlap. Samples are paced to the watch's token
bucket (``Watcher.poll_rate``): back to back, they would measure the rate limit that
coalesces bursts, not how fast one change travels.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import discovery_core as dc

_TIMEOUT = 10.0  # seconds one sample may take before the run fails


@dataclass(frozen=True)
class Result:
    label: str
    samples: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]

    def line(self) -> str:
        return f"{self.label:<22} n={len(self.samples):<5} p50={self.p50 * 1e3:8.3f} ms  p99={self.p99 * 1e3:8.3f} ms"


class _Seen:
    """Which instance ids the latest snapshot holds, and when each set arrived."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ids: frozenset[str] = frozenset()
        self._stamp = 0.0

    def update(self, ids: frozenset[str]) -> None:
        now = time.perf_counter()
        with self._cond:
            self._ids, self._stamp = ids, now
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[frozenset[str]], bool]) -> float:
        """When the first set satisfying ``predicate`` arrived."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._ids), _TIMEOUT):
                raise TimeoutError(f"no matching set within {_TIMEOUT} s")
            return self._stamp


def _pace(start: float, period: float) -> None:
    """Wait out the rest of ``period`` since ``start`` (a benchmark's pacing, not a test's hope)."""
    time.sleep(max(0.0, start + period - time.perf_counter()))


class _Side:
    """One watcher under test: it registers instance ``n`` of its own service and
    tells when its subscriber saw the set change."""

    label = ""
    seen: _Seen

    def register(self, n: int) -> str:
        raise NotImplementedError

    def deregister(self, instance_id: str) -> None:
        raise NotImplementedError

    def sample(self, n: int) -> float:
        """Seconds from register() returning to the subscriber holding the instance;
        then deregister and wait until it is gone, so samples never overlap."""
        instance_id = self.register(n)
        returned = time.perf_counter()
        seen = self.seen.wait_for(lambda ids: instance_id in ids) - returned
        self.deregister(instance_id)
        self.seen.wait_for(lambda ids: instance_id not in ids)
        return seen


class _BackendSide(_Side):
    def __init__(self, backend: dc.Backend, label: str) -> None:
        self.label = label
        self.backend = backend
        self.service = f"bench-{uuid.uuid4().hex[:10]}"
        self.seen = _Seen()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self.backend.watch(self.service) as watch:
            watch.subscribe(lambda snapshot: self.seen.update(frozenset(inst.id for inst in snapshot.instances)))
            self.seen.wait_for(lambda ids: not ids)
            yield

    def register(self, n: int) -> str:
        inst = dc.ServiceInstance(self.service, "127.0.0.1", 10000 + n % 50000)
        self.backend.register(inst, keepalive=False)
        return inst.id

    def deregister(self, instance_id: str) -> None:
        self.backend.deregister(instance_id)


def measure_backend(backend: dc.Backend, label: str, count: int, period: float) -> Result:
    side = _BackendSide(backend, label)
    samples: list[float] = []
    with side.running():
        for n in range(count):
            _pace(time.perf_counter(), period)
            samples.append(side.sample(n))
    return Result(label, samples)


class _Raw:
    """Consul's HTTP API through http.client, a new connection per request: no library
    in the way."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)

    def request(self, method: str, path: str, body: object = None, timeout: float = 70.0) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body))
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"{method} {path}: {response.status} {data!r}")
            return int(response.getheader("X-Consul-Index") or 0), data
        finally:
            connection.close()


class _FloorSide(_Side):
    """A raw blocking query (http.client, no library). Its registrations are raw PUTs,
    or, given ``registrar``, that backend's own ``register()`` calls."""

    def __init__(
        self,
        address: str,
        *,
        registrar: dc.Backend | None = None,
        label: str = "floor (raw PUT)",
        service: str | None = None,
        initial: frozenset[str] = frozenset(),
        passing_only: bool = False,
    ) -> None:
        self.label = label
        self.raw = _Raw(address)
        self.registrar = registrar
        self.service = service or f"bench-floor-{uuid.uuid4().hex[:10]}"
        self.initial = initial  # the instance ids the service holds before the first sample
        self.filter = "passing=1&" if passing_only else ""  # the same view as the watch beside it
        self.seen = _Seen()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        done = threading.Event()

        def follow() -> None:
            index = 0
            while not done.is_set():
                query = f"?{self.filter}index={index}&wait=2s" if index else f"?{self.filter}"
                index, body = self.raw.request("GET", f"/v1/health/service/{self.service}{query}")
                self.seen.update(frozenset(entry["Service"]["ID"] for entry in json.loads(body)))

        follower = threading.Thread(target=follow, name="bench-floor", daemon=True)
        follower.start()
        try:
            self.seen.wait_for(lambda ids: ids == self.initial)
            yield
        finally:
            done.set()
            follower.join(timeout=5)

    def register(self, n: int) -> str:
        instance_id = f"{self.service}-{n}"
        if self.registrar is not None:
            inst = dc.ServiceInstance(self.service, "127.0.0.1", 10000 + n % 50000, id=instance_id)
            self.registrar.register(inst, keepalive=False)
        else:
            body = {"ID": instance_id, "Name": self.service, "Port": 10000 + n % 50000}
            self.raw.request("PUT", "/v1/agent/service/register", body)
        return instance_id

    def deregister(self, instance_id: str) -> None:
        if self.registrar is not None:
            self.registrar.deregister(instance_id)
        else:
            self.raw.request("PUT", f"/v1/agent/service/deregister/{instance_id}")


def measure_interleaved(sides: list[_Side], count: int, period: float, warmup: int) -> list[Result]:
    """Samples of every side in turn (the order rotating each round), after
    ``warmup`` unrecorded rounds: drift in the machine or the agent over the run
    then falls on every side alike, and no side always goes first."""
    samples: list[list[float]] = [[] for _ in sides]
    for n in range(warmup + count):
        for k in range(len(sides)):
            i = (n + k) % len(sides)
            _pace(time.perf_counter(), period)
            sample = sides[i].sample(n)
            if n >= warmup:
                samples[i].append(sample)
    return [Result(side.label, taken) for side, taken in zip(sides, samples, strict=True)]


def _period(backend: dc.Backend) -> float:
    """Time per sample that keeps the watch's token bucket from emptying: each sample
    costs two polls (seen, gone), and a third for slack."""
    return 3 / backend.poll_rate


@contextlib.contextmanager
def consul_address(given: str | None) -> Iterator[str]:
    """The agent to measure: given, CONSUL_HTTP_ADDR, or a throwaway dev agent."""
    address = given or os.environ.get("CONSUL_HTTP_ADDR")
    if address:
        yield address.removeprefix("http://")
        return
    # Imported here: a memory-only run needs neither py-consul nor Consul.
    from discovery_consul.devagent import DevAgent, DevAgentError  # noqa: PLC0415

    try:
        agent = DevAgent()
        agent.start()
    except DevAgentError as exc:
        raise SystemExit(
            f"no Consul agent: {exc}. Give --consul-address, set CONSUL_HTTP_ADDR, or put a `consul` binary on PATH"
        ) from None
    try:
        yield agent.address
    finally:
        agent.close()


def run(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backends", default="memory,consul", help="comma-separated: memory, consul")
    parser.add_argument("--memory-count", type=int, default=1000, help="registrations measured on memory")
    parser.add_argument("--consul-count", type=int, default=200, help="registrations measured on Consul (and floor)")
    parser.add_argument("--warmup", type=int, default=20, help="unrecorded rounds before Consul's samples")
    parser.add_argument("--consul-address", help="host:port of the agent (default: CONSUL_HTTP_ADDR or a dev agent)")
    args = parser.parse_args(argv)
    backends = {name.strip() for name in args.backends.split(",") if name.strip()}
    unknown = backends - {"memory", "consul"}
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    results: list[Result] = []
    if "memory" in backends:
        with dc.connect("memory://") as backend:
            results.append(measure_backend(backend, "memory", args.memory_count, _period(backend)))
        print(results[-1].line(), flush=True)
    if "consul" in backends:
        with consul_address(args.consul_address) as address:
            with dc.connect("consul", address=address) as backend:
                raw_side = _FloorSide(address)
                same_side = _FloorSide(address, registrar=backend, label="floor (same register())")
                consul_side = _BackendSide(backend, "consul")
                with raw_side.running(), same_side.running(), consul_side.running():
                    raw, same, consul = measure_interleaved(
                        [raw_side, same_side, consul_side], args.consul_count, _period(backend), args.warmup
                    )
            for result in (raw, same, consul):
                print(result.line(), flush=True)
        results += [raw, same, consul]
        print(f"consul p50 / floor (same register()) p50 = {consul.p50 / same.p50:.2f}x  (goal: <= 1.5x)")
        print(f"consul p99 / floor (same register()) p99 = {consul.p99 / same.p99:.2f}x")
        print(f"consul p50 / floor (raw PUT) p50 = {consul.p50 / raw.p50:.2f}x  (the trigger differs too)")
    return results


if __name__ == "__main__":
    run(sys.argv[1:])
