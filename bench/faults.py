"""Faults in a real Consul cluster: failed calls and time until traffic followed, per
scenario (leader killed, quorum lost, the client's agent restarted, the fleet's agent
killed / restarted fresh / partitioned, a rolling restart), under a steady load of
unary calls through the discovery channel with retries off.

    unshare -n -- sh -c 'ip link set lo up && python bench/faults.py'
    unshare -n -- sh -c 'ip link set lo up && python bench/faults.py --scenarios leader,partition'

It starts 3 Consul servers and 2 client agents on 127.0.0.11-13 and .21-22 and cuts
them off with iptables, so it runs only as root in a private network namespace (as
above). "time to follow" is, for a fault, the time from it to the last failed call;
for an instance joining, to the first call it answered; for one leaving, to the last
call it answered or that failed. The notes say what Consul did and when.
"""

from __future__ import annotations

import argparse

from discovery_consul.devcluster import netns_problem
from discovery_examples.addservice.faults import SCENARIOS, Durations, run


def main(argv: list[str] | None = None) -> int:
    defaults = Durations()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--instances", type=int, default=3, help="add-service instances in the fleet")
    parser.add_argument("--threads", type=int, default=4, help="client threads calling Add")
    parser.add_argument("--a-down", type=float, default=defaults.a_down, help="seconds agent A stays killed")
    parser.add_argument("--partition", type=float, default=defaults.partition, help="seconds agent A stays cut off")
    parser.add_argument("--quorum-lost", type=float, default=defaults.quorum_lost, help="seconds 2 servers stay down")
    parser.add_argument("--b-down", type=float, default=defaults.b_down, help="seconds agent B stays killed")
    parser.add_argument("--settle", type=float, default=defaults.settle, help="seconds of traffic watched after")
    parser.add_argument("--logs", default=None, help="a directory to keep the agents' logs in")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    problem = netns_problem()
    if problem:
        parser.exit(2, f"faults.py: cannot run here: {problem}\n")
    durations = Durations(args.a_down, args.partition, args.quorum_lost, args.b_down, args.settle)

    print(
        f"Consul cluster: 3 servers, agent A (fleet of {args.instances}, gRPC checks every 1 s), "
        f"agent B (client, {args.threads} threads, no retries)"
    )
    print(f"{'event':<44} {'time to follow':>14} {'failed calls':>13}")
    results = []
    for name in names:
        result = run(name, size=args.instances, threads=args.threads, durations=durations, logs=args.logs)
        results.append(result)
        print(result.report(), flush=True)
    print("\nsummary")
    for result in results:
        print(f"{result.title:<48} {result.failed:>9} failed of {result.calls} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
