"""The ``discovery`` command. ``discovery demo`` tells the whole story in one process.

The demo starts three add-service instances, calls them in a loop through a discovery
channel while printing live per-instance call counts, then drains one, kills one
abruptly (no deregistration) and starts a new one, and finally prints per event how
long the client's traffic took to follow and how many calls failed. Console output
is this module's job, so it prints.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from discovery_core.backend import connect
from discovery_core.client.sync import discovery_channel
from discovery_core.errors import DiscoveryError

# The example package (``discovery_examples``) is imported when the demo runs, so
# the Load and Event of discovery_examples.addservice.fleet are typed loosely here.

__all__ = ["main"]


def _reporter(load: Any, names: Callable[[], list[str]], stop: threading.Event, every: float, t0: float) -> None:
    """Print calls per instance over each interval until ``stop``."""
    since = time.monotonic()
    while not stop.wait(every):
        now = time.monotonic()
        counts = load.counts(since)
        since = now
        cells = "  ".join(f"{name}: {counts.get(name, 0):5d}" for name in names())
        print(f"t={now - t0:5.1f}s  {cells}  failed: {counts.get('failed', 0)}", flush=True)


def _demo(args: argparse.Namespace) -> int:
    example = importlib.import_module("discovery_examples.addservice.fleet")
    Event, Fleet, Load = example.Event, example.Fleet, example.Load

    steady = args.steady
    with connect(args.backend) as backend:
        fleet = Fleet(backend, drain=args.drain)
        events: list[Any] = []
        retry = example.KILL_RETRY if args.retry else None
        channel = discovery_channel(backend, "add", retry=retry)
        load: Any = None
        stop = threading.Event()
        reporter: threading.Thread | None = None
        try:
            first = [fleet.start() for _ in range(3)]
            print(f"backend {args.backend}: started {', '.join(f'{i.name} at {i.served.target}' for i in first)}")
            load = Load(channel, threads=args.threads, wait_for_ready=True).start()
            t0 = time.monotonic()
            reporter = threading.Thread(
                target=_reporter,
                args=(load, lambda: [i.name for i in fleet.instances], stop, args.every, t0),
                daemon=True,
            )
            reporter.start()
            time.sleep(steady)

            victim = first[0]
            print(f"--- draining {victim.name} (NOT_SERVING, deregister, {args.drain} s drain, stop)", flush=True)
            events.append(Event(f"drain {victim.name}", victim.name, time.monotonic(), "leave"))
            fleet.drain(victim)
            time.sleep(steady)

            victim = first[1]
            print(f"--- killing {victim.name} abruptly (no deregistration)", flush=True)
            events.append(Event(f"kill {victim.name}", victim.name, time.monotonic(), "leave"))
            fleet.kill(victim)
            time.sleep(steady)

            print("--- starting a new instance", flush=True)
            at = time.monotonic()
            fresh = fleet.start()
            events.append(Event(f"start {fresh.name}", fresh.name, at, "join"))
            time.sleep(steady)
        finally:
            stop.set()
            if reporter is not None:
                reporter.join()
            if load is not None:
                load.stop()
            channel.close()
            fleet.close()
    return _summary(load, events)


def _summary(load: Any, events: list[Any]) -> int:
    """Per event: time until traffic followed and calls failed until the next event."""
    records = load.snapshot()
    end = records[-1][0] if records else time.monotonic()
    print(f"\n{'event':<16} {'traffic followed after':>24} {'failed calls':>13}")
    missing = 0
    for event, following in zip(events, [*events[1:], None], strict=True):
        outcome = load.outcome(event, until=following.at if following else end)
        followed = f"{outcome.follow * 1000:.1f} ms" if outcome.follow is not None else "never"
        missing += outcome.follow is None
        print(f"{event.label:<16} {followed:>24} {outcome.failed:>13}")
    total = len(records)
    print(f"\n{total} calls, {load.failures()} failed")
    return 1 if missing else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="discovery", description="discovery-core command line")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the add-service story in one process and measure failover")
    demo.add_argument("--backend", default="memory://", help="backend URL (default: memory://; or consul://host:port)")
    demo.add_argument("--steady", type=float, default=2.5, help="seconds between events (default: 2.5)")
    demo.add_argument("--drain", type=float, default=0.5, help="drain period of a leaving instance (default: 0.5)")
    demo.add_argument("--threads", type=int, default=2, help="client threads calling Add (default: 2)")
    demo.add_argument("--every", type=float, default=0.5, help="seconds between live count lines (default: 0.5)")
    demo.add_argument("--retry", action="store_true", help="retry idempotent calls on another instance")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _demo(args)
    except DiscoveryError as error:
        print(f"discovery: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
