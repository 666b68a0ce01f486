"""Per-call overhead of the discovery channel: unary calls per second through it and
through a plain ``grpc.insecure_channel`` to the same server, side by side.

    python bench/overhead.py                       # 10 rounds of 3000 calls each way
    python bench/overhead.py --rounds 20 --calls 5000

The add server runs in another process (this script with ``--serve``). The client
registers it in an in-memory backend and opens both channels; each round runs the
plain and the discovery channel back to back (the order alternating per round) on
one thread, after a warm-up. Printed: calls/s per round, and the median ratio
(discovery / plain). The goal is a ratio of at least 0.98 (at most 2% slower).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from discovery_examples.addservice import add_pb2, add_pb2_grpc
from discovery_examples.addservice.server import Adder
from grpc_health.v1 import health, health_pb2_grpc

import discovery_core as dc

_START_TIMEOUT = 30.0


def serve_forever() -> int:
    """The server process: add + health on an ephemeral port, printed on stdout; exits
    when stdin closes (the parent went away)."""
    with futures.ThreadPoolExecutor(max_workers=4) as executor:
        server = grpc.server(executor)
        add_pb2_grpc.add_AdderServicer_to_server(Adder(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(port, flush=True)
        sys.stdin.read()
        server.stop(0).wait()
    return 0


def rate(call: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return calls / (time.perf_counter() - started)


def measure(target: str, *, rounds: int, calls: int, warmup: int) -> list[tuple[float, float]]:
    """(plain, discovery) calls per second, per round."""
    host, port = target.rsplit(":", 1)
    request = add_pb2.AddRequest(a=1, b=2)
    with (
        dc.connect("memory://") as backend,
        backend.register(dc.ServiceInstance("add", host, int(port))),
        grpc.insecure_channel(target) as plain,
        dc.discovery_channel(backend, "add") as discovered,
    ):
        if not discovered.wait_ready(timeout=_START_TIMEOUT):
            raise SystemExit("the discovery channel never became ready")
        plain_add = add_pb2_grpc.AdderStub(plain).Add
        discovered_add = add_pb2_grpc.AdderStub(discovered).Add

        def via_plain() -> object:
            return plain_add(request, timeout=5)

        def via_discovery() -> object:
            return discovered_add(request, timeout=5)

        rate(via_plain, warmup)
        rate(via_discovery, warmup)
        results = []
        for n in range(rounds):
            if n % 2 == 0:
                plain_rate = rate(via_plain, calls)
                discovery_rate = rate(via_discovery, calls)
            else:
                discovery_rate = rate(via_discovery, calls)
                plain_rate = rate(via_plain, calls)
            results.append((plain_rate, discovery_rate))
            print(
                f"round {n + 1:2d}: plain {plain_rate:8.0f}/s  discovery {discovery_rate:8.0f}/s"
                f"  ratio {discovery_rate / plain_rate:.4f}",
                flush=True,
            )
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=3000, help="calls per channel per round")
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_forever()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        if not port:
            raise SystemExit("the server process did not start")
        results = measure(f"127.0.0.1:{port}", rounds=args.rounds, calls=args.calls, warmup=args.warmup)
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=_START_TIMEOUT)
    ratios = [d / p for p, d in results]
    median = statistics.median(ratios)
    print(
        f"\n{args.rounds} rounds x {args.calls} calls: median ratio discovery/plain = {median:.4f}"
        f" ({(1 - median) * 100:+.2f}% slower; min {min(ratios):.4f}, max {max(ratios):.4f})"
        f"; plain median {statistics.median(p for p, _ in results):.0f}/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
