"""Scale in one process (issue 10): what a change, a channel and an idle endpoint cost
with 10,000 instances, 1,000 watched services and a Consul answer of 1,000 instances.

    python bench/scale.py                                 # every row (Consul: a dev agent)
    python bench/scale.py --rows picker,build --sizes 1,1000
    python bench/scale.py --sizes 1,20 --services 2,20 --samples 5 --idle 1 --warmup 0.5 \\
        --consul-instances 20 --rounds 2 --calls 50      # a smoke run

Prints the issue's table (measure | goal | figure | ratio), each row measured through
the public API on the memory backend unless named:

- ``picker``: ``register()`` returning -> the channel's picker holding the new
  instance, for a service of 1 and of N instances (the first and last of
  ``--sizes``), p50/p99 and the ratio against N=1. Every instance is an address of one
  health server in another process (``grpc.aio``, so its Watch streams need no thread
  each); the channel is the default one (health checking on). Printed beside it per
  size: ``register()`` -> a watch subscriber holding it (the backend and ``Watch``
  alone, no channel).
- ``build``: ``discovery_channel()`` over N instances until it holds an endpoint for
  each (and, printed beside, closing it).
- ``idle``: N instances on loopback addresses nothing listens on, health checking on:
  OS threads, CPU and RSS the channel adds, over ``--idle`` seconds after
  ``--warmup`` seconds.
- ``services``: services watched (2 instances each, one Watch each), the first and
  last of ``--services``, each on a backend of its own: register -> subscriber on the
  last service, samples of both interleaved; the p99 against the first figure's.
- ``consul``: the decoder of a health answer of a 1,000-instance service, captured
  from a real agent, against the decoder as it was before issue 10 (kept below, for
  this comparison only). Decodes alternate between two answers one instance apart,
  as polls after a change do.
- ``calls``: per-call cost of the discovery channel against ``ipv4:a,b`` with
  round_robin over the same two ports of a server in another process, sync and
  grpc.aio (``bench/overhead.py``).

Samples are paced to the watch's token bucket, as in ``propagation.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import functools
import gc
import http.client
import json
import operator
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
import overhead
from propagation import Result, _pace, consul_address

import discovery_core as dc

ROWS = ("picker", "build", "idle", "services", "consul", "calls")
EXTRA = ("subscriber",)  # printed figures, no row of the table
_TIMEOUT = 120.0  # seconds a wait may take before the run fails (old code builds slowly)
_POLL = 1e-4  # seconds between two looks at a channel's picker
_BY_ID = operator.attrgetter("id")


@dataclass(frozen=True)
class Row:
    measure: str
    goal: str
    figure: str
    ratio: str = ""


def table(rows: Sequence[Row]) -> str:
    lines = ["| measure | goal | figure | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {row.measure} | {row.goal} | {row.figure} | {row.ratio} |" for row in rows]
    return "\n".join(lines)


def _ms(result: Result) -> str:
    return f"p50 {result.p50 * 1e3:.3f} ms, p99 {result.p99 * 1e3:.3f} ms"


# -- what this bench reads of the channel's insides (one place, to adapt) --------------


def picker_holds(channel: dc.DiscoveryChannel, instance_id: str) -> bool:
    """Whether the channel's current picker holds the instance's endpoint (it takes
    calls once its connection is READY: a connection setup, the same at any N)."""
    pool = channel._pool
    # The pool adds the endpoint, then builds the picker over all of them: a picker
    # as big as the pool came after it (O(1), so polling it slows nothing down).
    return instance_id in pool.endpoints and pool.picker.known == len(pool.endpoints)


def endpoint_count(channel: dc.DiscoveryChannel) -> int:
    """How many endpoints the channel keeps (opened for the instances it follows)."""
    return len(channel._pool.endpoints)


def open_channel(backend: dc.Backend, service: str, subset: int | None = None) -> dc.DiscoveryChannel:
    """The channel measured: health checking on, a subset of ``subset`` instances
    (None: every instance, so every registration reaches the picker)."""
    return dc.discovery_channel(backend, service, subset_size=subset)


def kept(instances: int, subset: int | None) -> int:
    """How many endpoints a channel over ``instances`` keeps."""
    return instances if subset is None else min(instances, subset)


# -- waiting ------------------------------------------------------------------------------


def _until(predicate: Callable[[], bool], *, held: bool = True, timeout: float = _TIMEOUT) -> float:
    """When ``predicate()`` first was ``held`` (perf_counter), looking every ``_POLL``
    seconds."""
    deadline = time.perf_counter() + timeout
    while predicate() is not held:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"not within {timeout} s")
        time.sleep(_POLL)
    return time.perf_counter()


def _holds(snapshot: dc.Snapshot, instance_id: str) -> bool:
    """Whether the snapshot holds the instance (its instances are sorted by id)."""
    instances = snapshot.instances
    at = bisect.bisect_left(instances, instance_id, key=_BY_ID)
    return at < len(instances) and instances[at].id == instance_id


class _Holder:
    """A watch subscriber that notes when its snapshots first held (or lost) one
    instance; it costs a bisection per snapshot, whatever the size."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._latest: dc.Snapshot | None = None
        self._stamp = 0.0

    def update(self, snapshot: dc.Snapshot) -> None:
        now = time.perf_counter()
        with self._cond:
            self._latest, self._stamp = snapshot, now
            self._cond.notify_all()

    def wait_for(self, instance_id: str, *, held: bool) -> float:
        """When the first snapshot with (``held``) or without the instance arrived."""
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._latest is not None and _holds(self._latest, instance_id) is held, _TIMEOUT
            ):
                raise TimeoutError(f"no snapshot {'with' if held else 'without'} {instance_id} in {_TIMEOUT} s")
            return self._stamp


def _period() -> float:
    """Time per sample that keeps the watch's token bucket from emptying (two polls a
    sample, a third for slack)."""
    return 3 / dc.Watcher.poll_rate


# -- picker and build: one health server, N instances on it ---------------------------


async def _serve_health() -> None:
    """The health server process: grpc.aio, SERVING, its port on stdout; ends when
    stdin closes."""
    import grpc.aio  # noqa: PLC0415 (the server process alone needs these)
    from grpc_health.v1 import _async as health_aio  # noqa: PLC0415
    from grpc_health.v1 import health_pb2_grpc  # noqa: PLC0415

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


@contextlib.contextmanager
def health_server() -> Iterator[int]:
    """The health server in another process; yields its port."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve-health"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        port = process.stdout.readline().strip()
        if not port:
            raise SystemExit("the health server did not start")
        yield int(port)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        process.wait(timeout=30)


def _residents(backend: dc.Backend, service: str, count: int, address: Callable[[int], tuple[str, int]]) -> None:
    for n in range(count):
        host, port = address(n)
        backend.register(dc.ServiceInstance(service, host, port, id=f"{service}-{n}"), keepalive=False)


@dataclass(frozen=True)
class Size:
    instances: int
    subscriber: Result
    picker: Result | None
    build: float | None = None
    close: float | None = None


def measure_size(port: int, size: int, samples: int, *, picker: bool, build: bool, subset: int | None) -> Size:
    """One service of ``size`` instances (``size - 1`` resident, the sampled one
    coming and going), all on the health server."""
    service = f"scale-{size}"
    with dc.connect("memory://") as backend:
        _residents(backend, service, size - 1, lambda n: ("127.0.0.1", port))
        subscriber = _sample_subscriber(backend, service, port, samples, f"subscriber, N={size:,}")
        held = None
        if picker:
            with open_channel(backend, service) as channel:
                _until(lambda: endpoint_count(channel) == size - 1)
                held = _sample_picker(backend, channel, service, port, samples, f"picker, N={size:,}")
        built = closed = None
        if build:
            backend.register(dc.ServiceInstance(service, "127.0.0.1", port, id=f"{service}-last"), keepalive=False)
            started = time.perf_counter()
            channel = open_channel(backend, service, subset)
            built = _until(lambda: endpoint_count(channel) == kept(size, subset)) - started
            started = time.perf_counter()
            channel.close()
            closed = time.perf_counter() - started
    return Size(size, subscriber, held, built, closed)


def _sample_subscriber(backend: dc.Backend, service: str, port: int, samples: int, label: str) -> Result:
    holder = _Holder()
    taken = []
    with backend.watch(service, passing_only=False) as watch:
        watch.subscribe(holder.update)
        for n in range(samples):
            _pace(time.perf_counter(), _period())
            inst = dc.ServiceInstance(service, "127.0.0.1", port, id=f"{service}-sample-{n}")
            backend.register(inst, keepalive=False)
            returned = time.perf_counter()
            taken.append(holder.wait_for(inst.id, held=True) - returned)
            backend.deregister(inst.id)
            holder.wait_for(inst.id, held=False)
    return Result(label, taken)


def _sample_picker(
    backend: dc.Backend, channel: dc.DiscoveryChannel, service: str, port: int, samples: int, label: str
) -> Result:
    taken = []
    for n in range(samples):
        _pace(time.perf_counter(), _period())
        inst = dc.ServiceInstance(service, "127.0.0.1", port, id=f"{service}-picked-{n}")
        holds = functools.partial(picker_holds, channel, inst.id)
        backend.register(inst, keepalive=False)
        returned = time.perf_counter()
        taken.append(_until(holds) - returned)
        backend.deregister(inst.id)
        _until(holds, held=False)
    return Result(label, taken)


def picker_rows(sizes: list[Size], subset: int | None) -> list[Row]:
    rows = []
    first, last = sizes[0], sizes[-1]
    if first.picker is not None and last.picker is not None:
        rows.append(
            Row(
                f"register → picker holds it, N = {last.instances:,} instances",
                "p50 ≤ 2 ms, p99 ≤ 10 ms (≤ 10x the N=1 figure)",
                f"{_ms(last.picker)} (N={first.instances:,}: {_ms(first.picker)})",
                f"p50 {last.picker.p50 / first.picker.p50:.1f}x, p99 {last.picker.p99 / first.picker.p99:.1f}x",
            )
        )
    if last.build is not None and last.close is not None:
        rows.append(
            Row(
                f"channel build over {last.instances:,} instances, {_subset(subset)}",
                "≤ 0.5 s",
                f"{last.build:.3f} s (closing it: {last.close:.3f} s)",
            )
        )
    return rows


# -- idle: N endpoints nobody answers -------------------------------------------------


def _free_port() -> int:
    """A port nothing listens on, on any address (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def _unreachable(n: int, port: int) -> tuple[str, int]:
    """Instance ``n``'s address: one of 127.2.0.0/15 (all loopback), nothing listening."""
    return f"127.{2 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}", port


def _proc_status(field: str) -> int:
    """A number from /proc/self/status (Threads, VmRSS in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(field)


@dataclass(frozen=True)
class Idle:
    instances: int
    threads: int
    cpu: float
    rss_mib: float
    build: float
    close: float


def measure_idle(instances: int, warmup: float, idle: float, subset: int | None) -> Idle:
    service = "scale-idle"
    port = _free_port()
    with dc.connect("memory://") as backend:
        _residents(backend, service, instances, lambda n: _unreachable(n, port))
        gc.collect()
        threads, rss = _proc_status("Threads"), _proc_status("VmRSS")
        started = time.perf_counter()
        channel = open_channel(backend, service, subset)
        try:
            build = _until(lambda: endpoint_count(channel) == kept(instances, subset)) - started
            time.sleep(warmup)
            most_threads, most_rss = threads, rss
            cpu, wall = time.process_time(), time.perf_counter()
            while time.perf_counter() - wall < idle:
                time.sleep(min(0.5, idle))
                most_threads = max(most_threads, _proc_status("Threads"))
                most_rss = max(most_rss, _proc_status("VmRSS"))
            cpu_share = (time.process_time() - cpu) / (time.perf_counter() - wall)
        finally:
            closing = time.perf_counter()
            channel.close()
            close = time.perf_counter() - closing
    return Idle(instances, most_threads - threads, cpu_share * 100, (most_rss - rss) / 1024, build, close)


def _subset(subset: int | None) -> str:
    return "every instance connected" if subset is None else f"subset_size={subset}"


def idle_row(result: Idle, subset: int | None) -> Row:
    return Row(
        f"{result.instances:,} instances, health on, all unreachable, idle, {_subset(subset)}",
        "threads ≤ 20 more than baseline, CPU ≤ 5%, RSS ≤ 150 MiB added",
        f"+{result.threads:,} threads, CPU {result.cpu:.1f}%, +{result.rss_mib:.0f} MiB"
        f" (built in {result.build:.2f} s, closed in {result.close:.2f} s)",
    )


# -- many services watched --------------------------------------------------------------


@contextlib.contextmanager
def _watching(count: int) -> Iterator[Callable[[int], float]]:
    """A backend with ``count`` services of 2 instances, each watched; yields a
    sampler: register -> subscriber on the last service (seconds)."""
    prefix = f"svc{count}-{uuid.uuid4().hex[:6]}"
    services = [f"{prefix}-{i:04d}" for i in range(count)]
    holder = _Holder()
    with dc.connect("memory://") as backend, contextlib.ExitStack() as stack:
        for service in services:
            for n in range(2):
                backend.register(dc.ServiceInstance(service, "127.0.0.1", 10000 + n), keepalive=False)
        watches = [stack.enter_context(backend.watch(service, passing_only=False)) for service in services]
        for watch in watches:
            watch.wait(timeout=_TIMEOUT)
        watches[-1].subscribe(holder.update)

        def sample(n: int) -> float:
            inst = dc.ServiceInstance(services[-1], "127.0.0.1", 20000 + n % 40000)
            backend.register(inst, keepalive=False)
            returned = time.perf_counter()
            seen = holder.wait_for(inst.id, held=True) - returned
            backend.deregister(inst.id)
            holder.wait_for(inst.id, held=False)
            return seen

        yield sample


def measure_services(counts: list[int], samples: int) -> list[Result]:
    """Register -> subscriber with each count of services watched, one backend per
    count, their samples interleaved (the order rotating) so that drift in the
    machine falls on all alike."""
    taken: list[list[float]] = [[] for _ in counts]
    with contextlib.ExitStack() as stack:
        samplers = [stack.enter_context(_watching(count)) for count in counts]
        for n in range(samples):
            for k in range(len(counts)):
                at = (n + k) % len(counts)
                _pace(time.perf_counter(), _period())
                taken[at].append(samplers[at](n))
    return [Result(f"{count:,} services", seconds) for count, seconds in zip(counts, taken, strict=True)]


def services_row(few: Result, many: Result) -> Row:
    return Row(
        f"memory backend, {many.label} watched",
        f"register → subscriber p99 ≤ 2x the {few.label.split()[0]}-service figure",
        f"{_ms(many)} ({few.label}: {_ms(few)})",
        f"p99 {many.p99 / few.p99:.2f}x",
    )


# -- Consul: decoding a health answer -------------------------------------------------


def _decode_before(service: str, index: int, entries: list[dict[str, Any]]) -> dc.Snapshot:
    """The Consul decoder as it was before issue 10 (discovery_consul at 9928c78),
    kept only to measure against: every instance of every answer built and validated
    anew, health read check by check."""
    severity = {dc.HealthStatus.PASSING: 0, dc.HealthStatus.WARNING: 1, dc.HealthStatus.CRITICAL: 2}
    instances: list[dc.ServiceInstance] = []
    health: dict[str, dc.HealthStatus] = {}
    nodes: set[str] = set()
    unchecked = not entries
    for entry in entries:
        raw = entry.get("Service") or {}
        node = entry.get("Node") or {}
        weights = raw.get("Weights") or {}
        try:
            instance = dc.ServiceInstance(
                raw.get("Service", ""),
                raw.get("Address") or node.get("Address", ""),
                raw.get("Port", 0),
                id=raw.get("ID", ""),
                tags=tuple(raw.get("Tags") or ()),
                meta=raw.get("Meta") or {},
                weight=weights.get("Passing") or 1,
            )
        except (dc.InvalidInstance, TypeError):
            continue
        if instance.name != service:
            continue
        instances.append(instance)
        checks = entry.get("Checks") or []
        worst = dc.HealthStatus.PASSING
        for check in checks:
            try:
                status = dc.HealthStatus(str(check.get("Status")))
            except ValueError:
                status = dc.HealthStatus.CRITICAL
            if severity[status] > severity[worst]:
                worst = status
        health[instance.id] = worst
        nodes.add(str(node.get("Node", "")))
        unchecked |= not any(check.get("ServiceID") == instance.id for check in checks)
    return dc.Snapshot(service, tuple(instances), index=index, health=health)


def _get(address: str, path: str) -> tuple[int, bytes]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body!r}")
        return int(response.getheader("X-Consul-Index") or 0), body
    finally:
        connection.close()


def _put(address: str, path: str, payload: object) -> None:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("PUT", path, body=json.dumps(payload))
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"PUT {path}: {response.status} {response.read()!r}")
        response.read()
    finally:
        connection.close()


def _depopulate(address: str, prefix: str) -> None:
    """Remove the nodes ``populate`` made (and their instances and checks)."""
    _, body = _get(address, "/v1/catalog/nodes")
    for node in json.loads(body):
        if node["Node"].startswith(f"{prefix}-node-"):
            _put(address, "/v1/catalog/deregister", {"Node": node["Node"]})


@dataclass(frozen=True)
class Decoding:
    instances: int
    parse: float  # seconds to parse the answer's JSON, for scale
    before: float  # seconds per decode, the decoder before issue 10
    now: float  # seconds per decode, today's


def measure_consul(address: str, instances: int, rounds: int, decodes: int) -> Decoding:
    """Two answers of a service of ``instances`` instances (on nodes of 100, each with
    a passing check), the second with one instance more; each decoder decodes them in
    turn, ``decodes`` a round, the decoders' order alternating per round."""
    from discovery_consul._client import HealthResult  # noqa: PLC0415 (only this row needs Consul's)
    from discovery_consul._decode import Decoder  # noqa: PLC0415
    from discovery_consul.devagent import populate  # noqa: PLC0415

    prefix = f"decode-{uuid.uuid4().hex[:6]}"
    service = f"{prefix}-0000"
    populate(address, prefix, 1, instances)
    try:
        index_a, body_a = _get(address, f"/v1/health/service/{service}")
        extra = {"ID": f"{service}-extra", "Name": service, "Address": "127.0.0.9", "Port": 9}
        _put(address, "/v1/agent/service/register", extra)
        try:
            index_b, body_b = _get(address, f"/v1/health/service/{service}")
        finally:
            _put(address, f"/v1/agent/service/deregister/{extra['ID']}", None)
    finally:
        _depopulate(address, prefix)
    started = time.perf_counter()
    answers = [(index_a, json.loads(body_a)), (index_b, json.loads(body_b))]
    parse = (time.perf_counter() - started) / 2
    query = dc.Query.build(service, passing_only=False)
    decoder = Decoder(query)
    results = [HealthResult(index, entries) for index, entries in answers]
    if decoder.read(results[1]).snapshot.instances != _decode_before(service, *answers[1]).instances:
        raise SystemExit("the two decoders disagree")

    def before(k: int) -> object:
        return _decode_before(service, *answers[k % 2])

    def now(k: int) -> object:
        return decoder.read(results[k % 2])

    timed: dict[str, list[float]] = {"before": [], "now": []}
    for n in range(rounds):
        for name, decode in (("before", before), ("now", now))[:: 1 if n % 2 == 0 else -1]:
            started = time.perf_counter()
            for k in range(decodes):
                decode(k)
            timed[name].append((time.perf_counter() - started) / decodes)
    return Decoding(instances, parse, statistics.median(timed["before"]), statistics.median(timed["now"]))


def consul_row(result: Decoding) -> Row:
    return Row(
        f"Consul poll of a {result.instances:,}-instance service",
        "decode cost ≤ 0.5x today's (profile it)",
        f"decode {result.now * 1e3:.2f} ms, before issue 10 {result.before * 1e3:.2f} ms"
        f" (parsing the answer's JSON: {result.parse * 1e3:.2f} ms)",
        f"{result.now / result.before:.2f}x",
    )


# -- calls --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calls:
    plain: float  # calls per second, median of the rounds
    discovery: float
    cost: float  # median per-call cost ratio, discovery / plain


def measure_calls(rounds: int, calls: int, warmup: int) -> dict[str, Calls]:
    """Per-call cost of the discovery channel against a plain ``ipv4:a,b``
    round_robin channel, sync and aio, over two ports of one server in another process."""
    measured = {}
    with overhead.server_process(2) as targets:
        for face, how in (("sync", overhead.measure), ("aio", overhead.measure_aio)):
            results = how(targets, rounds=rounds, calls=calls, warmup=warmup)
            measured[face] = Calls(
                statistics.median(plain for plain, _ in results),
                statistics.median(discovery for _, discovery in results),
                statistics.median(plain / discovery for plain, discovery in results),
            )
    return measured


def calls_row(measured: Mapping[str, Calls]) -> Row:
    return Row(
        "per-call cost after the split",
        "unchanged vs `ipv4:` round_robin (≤ 1.02x, sync and aio)",
        "; ".join(f"{face}: {c.discovery:,.0f} calls/s vs {c.plain:,.0f}/s" for face, c in measured.items()),
        ", ".join(f"{face} {c.cost:.3f}x" for face, c in measured.items()),
    )


# -- the run --------------------------------------------------------------------------


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def run(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--rows", default=",".join(EXTRA + ROWS), help=f"comma-separated, of: {', '.join(EXTRA + ROWS)}"
    )
    parser.add_argument("--sizes", default="1,1000,10000", help="instances of the service (picker, build, idle)")
    parser.add_argument("--samples", type=int, default=200, help="registrations measured per figure")
    parser.add_argument("--services", default="10,1000", help="services watched: the baseline, then the measure")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the idle window")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of the idle window")
    parser.add_argument("--consul-instances", type=int, default=1000)
    parser.add_argument("--decodes", type=int, default=20, help="decodes per round (consul)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds (consul, calls)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per channel per round (calls)")
    parser.add_argument("--consul-address", help="host:port of an agent (default: CONSUL_HTTP_ADDR or a dev agent)")
    parser.add_argument(
        "--subset",
        default="none",
        help="subset_size of the channels built for the build and idle rows (none: every instance; the "
        "picker row always connects every instance, so every registration reaches the picker)",
    )
    args = parser.parse_args(argv)
    subset = None if args.subset == "none" else int(args.subset)
    chosen = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = set(chosen) - set(EXTRA + ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    sizes = sorted(_numbers(args.sizes))
    rows: list[Row] = []
    if {"subscriber", "picker", "build"} & set(chosen):
        measured = []
        with health_server() as port:
            for size in sizes:
                build = "build" in chosen and size == sizes[-1]
                picker = "picker" in chosen
                measured.append(measure_size(port, size, args.samples, picker=picker, build=build, subset=subset))
                for result in (measured[-1].subscriber, measured[-1].picker):
                    if result is not None:
                        print(result.line(), flush=True)
        rows += picker_rows(measured, subset)
    if "idle" in chosen:
        idle = measure_idle(sizes[-1], args.warmup, args.idle, subset)
        rows.append(idle_row(idle, subset))
        print(rows[-1].figure, flush=True)
    if "services" in chosen:
        few, many = measure_services(_numbers(args.services), args.samples)
        print(few.line(), many.line(), sep="\n", flush=True)
        rows.append(services_row(few, many))
    if "consul" in chosen:
        with consul_address(args.consul_address) as address:
            rows.append(consul_row(measure_consul(address, args.consul_instances, args.rounds, args.decodes)))
        print(rows[-1].figure, flush=True)
    if "calls" in chosen:
        rows.append(calls_row(measure_calls(args.rounds, args.calls, min(args.calls, 1000))))
    print()
    print(table(rows), flush=True)
    return rows


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-health"]:
        asyncio.run(_serve_health())
    else:
        run(sys.argv[1:])
