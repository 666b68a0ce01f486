"""Failover: failed calls and time until the client's traffic followed, per event, for
a rolling restart, an abrupt kill (with and without retries) and a health flip, on
each backend, under a steady load of unary calls through the discovery channel.

    python bench/failover.py                                   # memory + consul
    python bench/failover.py --backends memory --threads 4
    python bench/failover.py --consul-address 127.0.0.1:8500

Consul comes from --consul-address, else ``CONSUL_HTTP_ADDR``, else a throwaway
``consul agent -dev`` when a ``consul`` binary is on PATH (else it is skipped).
"time to follow" is, for an instance leaving, the time from the event to the last
call it answered or that failed; for one joining, to the first call it answered.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from collections.abc import Iterator

from discovery_examples.addservice.fleet import Outcome, Scenario

import discovery_core as dc


@contextlib.contextmanager
def _consul_address(explicit: str | None) -> Iterator[str | None]:
    address = explicit or os.environ.get("CONSUL_HTTP_ADDR")
    if address:
        yield address
        return
    if shutil.which("consul") is None:
        yield None
        return
    from discovery_consul.devagent import DevAgent  # noqa: PLC0415 - only when a throwaway agent is needed

    with DevAgent() as agent:
        agent.start()
        yield agent.address


def rolling_restart(backend: dc.Backend, threads: int) -> list[Outcome]:
    scenario = Scenario(backend, threads=threads, retry=False)
    try:
        for old in list(scenario.instances):
            scenario.start()
            scenario.drain(old)
    finally:
        outcomes = scenario.close()
    return outcomes


def kill(backend: dc.Backend, threads: int, *, retry: bool) -> list[Outcome]:
    scenario = Scenario(backend, threads=threads, retry=retry)
    try:
        time.sleep(0.5)
        scenario.kill(scenario.instances[0])
    finally:
        outcomes = scenario.close()
    return outcomes


def health_flip(backend: dc.Backend, threads: int) -> list[Outcome]:
    scenario = Scenario(backend, threads=threads, retry=False)
    try:
        time.sleep(0.5)
        scenario.flip(scenario.instances[0], serving=False)
        time.sleep(0.5)
        scenario.flip(scenario.instances[0], serving=True)
    finally:
        outcomes = scenario.close()
    return outcomes


def run(url: str, label: str, threads: int) -> None:
    print(f"\n{label} ({url}), {threads} client threads")
    print(f"{'event':<30} {'time to follow':>16} {'failed calls':>13}")
    with dc.connect(url) as backend:
        for title, outcomes in (
            ("rolling restart of 3", rolling_restart(backend, threads)),
            ("abrupt kill, no retry policy", kill(backend, threads, retry=False)),
            ("abrupt kill, with retries", kill(backend, threads, retry=True)),
            ("health flip", health_flip(backend, threads)),
        ):
            print(f"{title}  (failed in total: {sum(o.failed for o in outcomes)})")
            for outcome in outcomes:
                follow = f"{outcome.follow * 1000:.1f} ms" if outcome.follow is not None else "never"
                print(f"{outcome.label:<30} {follow:>16} {outcome.failed:>13}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="memory,consul", help="comma-separated: memory, consul")
    parser.add_argument("--threads", type=int, default=4, help="client threads calling Add")
    parser.add_argument("--consul-address", default=None)
    args = parser.parse_args(argv)
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if "memory" in backends:
        run("memory://", "memory", args.threads)
    if "consul" in backends:
        with _consul_address(args.consul_address) as address:
            if address is None:
                print("\nconsul: skipped (no --consul-address, CONSUL_HTTP_ADDR or consul binary)")
            else:
                run(f"consul://{address}", "consul", args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
