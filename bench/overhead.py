"""Per-call overhead of the discovery channel: unary calls per second through it and
through a plain grpc channel to the same server, side by side.

    python bench/overhead.py                       # 10 rounds of 3000 calls each way
    python bench/overhead.py --rounds 20 --calls 5000
    python bench/overhead.py --instances 2 --aio   # against ipv4:a,b round_robin, asyncio

The add server runs in another process (this script with ``--serve``), on one port
per instance. The client registers each port as an instance in an in-memory backend
and opens both channels: the discovery channel, and a plain channel to the same
ports (``grpc.insecure_channel(target)`` for one instance; for several, the C-core
balancer over them, ``ipv4:a,b`` with ``round_robin``). Each round runs the plain
and the discovery channel back to back (the order alternating per round) on one
thread, after a warm-up; ``--aio`` does the same with ``grpc.aio`` channels on one
event loop. Printed: calls/s per round, and the median ratio (discovery / plain). The
goal is a ratio of at least 0.98 (at most 2% slower).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
from discovery_examples.addservice import add_pb2, add_pb2_grpc
from discovery_examples.addservice.server import Adder
from grpc_health.v1 import health, health_pb2_grpc

import discovery_core as dc
from discovery_core import aio

_START_TIMEOUT = 30.0
_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def serve_forever(ports: int) -> int:
    """The server process: add + health on ``ports`` ephemeral ports, printed on one
    line of stdout; exits when stdin closes (the parent went away)."""
    with futures.ThreadPoolExecutor(max_workers=4) as executor:
        server = grpc.server(executor)
        add_pb2_grpc.add_AdderServicer_to_server(Adder(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        bound = [server.add_insecure_port("127.0.0.1:0") for _ in range(ports)]
        server.start()
        print(*bound, flush=True)
        sys.stdin.read()
        server.stop(0).wait()
    return 0


@contextlib.contextmanager
def server_process(ports: int = 1) -> Iterator[list[str]]:
    """The add server in another process; yields its ``127.0.0.1:port`` targets."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--instances", str(ports)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        bound = server.stdout.readline().split()
        if len(bound) != ports:
            raise SystemExit("the server process did not start")
        yield [f"127.0.0.1:{port}" for port in bound]
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=_START_TIMEOUT)


def plain_target(targets: list[str]) -> tuple[str, list[tuple[str, Any]]]:
    """The plain channel's target and options: the one address, or C-core's
    round_robin over ``ipv4:a,b``."""
    if len(targets) == 1:
        return targets[0], []
    return "ipv4:" + ",".join(targets), [("grpc.service_config", _ROUND_ROBIN)]


def register(backend: dc.Backend, targets: list[str]) -> None:
    for target in targets:
        host, port = target.rsplit(":", 1)
        backend.register(dc.ServiceInstance("add", host, int(port)), keepalive=False)


def rate(call: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return calls / (time.perf_counter() - started)


async def rate_async(call: Callable[[], Awaitable[object]], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    return calls / (time.perf_counter() - started)


def interleave(
    plain: Callable[[int], float], discovery: Callable[[int], float], *, rounds: int, calls: int, warmup: int
) -> list[tuple[float, float]]:
    """(plain, discovery) calls per second, per round, the order alternating."""
    plain(warmup)
    discovery(warmup)
    results = []
    for n in range(rounds):
        if n % 2 == 0:
            plain_rate = plain(calls)
            discovery_rate = discovery(calls)
        else:
            discovery_rate = discovery(calls)
            plain_rate = plain(calls)
        results.append((plain_rate, discovery_rate))
        print(
            f"round {n + 1:2d}: plain {plain_rate:8.0f}/s  discovery {discovery_rate:8.0f}/s"
            f"  ratio {discovery_rate / plain_rate:.4f}",
            flush=True,
        )
    return results


def measure(targets: list[str], *, rounds: int, calls: int, warmup: int) -> list[tuple[float, float]]:
    """(plain, discovery) calls per second, per round, on sync channels."""
    request = add_pb2.AddRequest(a=1, b=2)
    target, options = plain_target(targets)
    with (
        dc.connect("memory://") as backend,
        grpc.insecure_channel(target, options) as plain,
        dc.discovery_channel(backend, "add") as discovered,
    ):
        register(backend, targets)
        if not discovered.wait_ready(timeout=_START_TIMEOUT):
            raise SystemExit("the discovery channel never became ready")
        grpc.channel_ready_future(plain).result(timeout=_START_TIMEOUT)
        plain_add = add_pb2_grpc.AdderStub(plain).Add
        discovered_add = add_pb2_grpc.AdderStub(discovered).Add
        return interleave(
            lambda n: rate(lambda: plain_add(request, timeout=5), n),
            lambda n: rate(lambda: discovered_add(request, timeout=5), n),
            rounds=rounds,
            calls=calls,
            warmup=warmup,
        )


def measure_aio(targets: list[str], *, rounds: int, calls: int, warmup: int) -> list[tuple[float, float]]:
    """(plain, discovery) calls per second, per round, on grpc.aio channels (one loop)."""
    request = add_pb2.AddRequest(a=1, b=2)
    target, options = plain_target(targets)
    with dc.connect("memory://") as backend, asyncio.Runner() as runner:

        async def open_both() -> tuple[grpc.aio.Channel, aio.AioDiscoveryChannel]:
            plain = grpc.aio.insecure_channel(target, options)
            discovered = aio.discovery_channel(backend, "add")
            register(backend, targets)
            await asyncio.wait_for(discovered.channel_ready(), _START_TIMEOUT)
            await asyncio.wait_for(plain.channel_ready(), _START_TIMEOUT)
            return plain, discovered

        plain, discovered = runner.run(open_both())
        try:
            plain_add = add_pb2_grpc.AdderStub(plain).Add
            discovered_add = add_pb2_grpc.AdderStub(discovered).Add
            return interleave(
                lambda n: runner.run(rate_async(lambda: plain_add(request, timeout=5), n)),
                lambda n: runner.run(rate_async(lambda: discovered_add(request, timeout=5), n)),
                rounds=rounds,
                calls=calls,
                warmup=warmup,
            )
        finally:
            runner.run(discovered.close())
            runner.run(plain.close(None))


def summary(results: list[tuple[float, float]]) -> str:
    ratios = [d / p for p, d in results]
    median = statistics.median(ratios)
    return (
        f"{len(results)} rounds: median ratio discovery/plain = {median:.4f}"
        f" ({(1 - median) * 100:+.2f}% slower; min {min(ratios):.4f}, max {max(ratios):.4f})"
        f"; plain median {statistics.median(p for p, _ in results):.0f}/s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=3000, help="calls per channel per round")
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=1, help="server ports, each an instance")
    parser.add_argument("--aio", action="store_true", help="grpc.aio channels instead of sync ones")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_forever(args.instances)
    how = measure_aio if args.aio else measure
    with server_process(args.instances) as targets:
        results = how(targets, rounds=args.rounds, calls=args.calls, warmup=args.warmup)
    print(f"\n{args.calls} calls a round, {summary(results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
