"""How evenly a fleet's subsets spread calls over a service's instances, and how much
the subsets change when one instance leaves or joins.

For each subset size, ``--trials`` fleets of ``--clients`` clients over
``--instances`` instances (fresh instance ids and client seeds each trial). Each
client makes ``--calls`` calls round robin over its subset, from a random member on.
Placements of the clients:

- ``index``: clients numbered 0, 1, 2, ... (``Position.of_index``), as a StatefulSet
  ordinal or a job's task index numbers them;
- ``random``: each client at a random position (``Position.of_seed``), no coordination;
- ``a68``: the reference, not ours: each client ranks the instances by a hash salted
  with its own seed and keeps the first ``size`` (gRFC A68), independent choices.

Reported per size and placement: calls per instance, max/mean and min/mean (the mean
over trials and the worst trial) and how many trials' max/mean is above ``--goal``
(issue 10 asks for 1.5); and for ours, over ``--events`` events per trial in
which a random instance leaves (and, apart, a new one joins): the most members any
client changed in one event, and the share of clients whose subset changed. Last, what
a ring costs at ``--cost-instances`` instances (informational, not a goal).

    python bench/spread.py                               # 100 clients x 1,000 instances
    python bench/spread.py --sizes 20,64,100,200,300 --trials 50
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import discovery_core as dc
from discovery_core.client.subset import Position, Ring

Instance = dc.ServiceInstance | None


@dataclass
class Tally:
    """One placement at one size, over every trial."""

    high: list[float]
    low: list[float]
    leave_most: int = 0
    leave_share: float = 0.0
    join_most: int = 0
    join_share: float = 0.0

    def line(self, size: int, placement: str, goal: float, churn: bool) -> str:
        text = (
            f"{size:>5} {placement:<7} max/mean {statistics.mean(self.high):.2f} (worst {max(self.high):.2f})"
            f"  min/mean {statistics.mean(self.low):.2f} (worst {min(self.low):.2f})"
            f"  above {goal}: {sum(high > goal for high in self.high)}/{len(self.high)}"
        )
        if churn:
            text += (
                f"  leave: {self.leave_most} changed, {self.leave_share:.1%} of clients"
                f"  join: {self.join_most} changed, {self.join_share:.1%} of clients"
            )
        return text


def service(rng: random.Random, count: int) -> list[dc.ServiceInstance]:
    tag = rng.getrandbits(32)
    return [dc.ServiceInstance("svc", "10.0.0.1", 1 + j % 65535, id=f"svc-{tag}-{j}") for j in range(count)]


def joiner(rng: random.Random) -> dc.ServiceInstance:
    return dc.ServiceInstance("svc", "10.0.0.2", 1, id=f"joiner-{rng.getrandbits(64)}")


def spread(
    instances: Sequence[dc.ServiceInstance],
    subsets: Sequence[tuple[dc.ServiceInstance, ...]],
    calls: int,
    rng: random.Random,
) -> tuple[float, float]:
    """Calls per instance, max/mean and min/mean, each client round robin over its subset."""
    per_instance = dict.fromkeys((inst.id for inst in instances), 0)
    for members in subsets:
        first = rng.randrange(len(members))
        for step, member in enumerate(members):
            # round robin from `first`: every member gets calls // k, the first calls % k one more
            per_instance[member.id] += calls // len(members) + ((step - first) % len(members) < calls % len(members))
    mean = statistics.mean(per_instance.values())
    return max(per_instance.values()) / mean, min(per_instance.values()) / mean


def churn(
    ring: Ring, size: int, positions: Sequence[Position], *, leaving: Instance = None, joining: Instance = None
) -> tuple[int, float]:
    """Members changed by one instance leaving (or joining) the ring, which is then put
    back: the most any client changed, and the share of clients whose subset changed."""
    before = [{inst.id for inst in ring.subset(size, at)} for at in positions]
    if leaving:
        ring.remove(leaving.id)
    if joining:
        ring.add(joining)
    changed = [
        len(old - {inst.id for inst in ring.subset(size, at)}) for old, at in zip(before, positions, strict=True)
    ]
    if leaving:
        ring.add(leaving)
    if joining:
        ring.remove(joining.id)
    return max(changed), sum(1 for count in changed if count) / len(changed)


def a68(instances: Sequence[dc.ServiceInstance], size: int, salt: bytes) -> tuple[dc.ServiceInstance, ...]:
    def rank(inst: dc.ServiceInstance) -> bytes:
        return hashlib.blake2b(salt + inst.id.encode(), digest_size=8).digest()

    return tuple(sorted(instances, key=rank)[:size])


def measure(args: argparse.Namespace, size: int) -> dict[str, Tally]:
    rng = random.Random(args.seed)
    tallies = {placement: Tally([], []) for placement in ("index", "random", "a68")}
    for _ in range(args.trials):
        instances = service(rng, args.instances)
        ring = Ring(instances)
        salts = [rng.randbytes(16) for _ in range(args.clients)]
        placed = {
            "index": [Position.of_index(client) for client in range(args.clients)],
            "random": [Position.of_seed(salt) for salt in salts],
        }
        for placement, positions in placed.items():
            tally = tallies[placement]
            high, low = spread(instances, [ring.subset(size, at) for at in positions], args.calls, rng)
            tally.high.append(high)
            tally.low.append(low)
            for _ in range(args.events):
                most, share = churn(ring, size, positions, leaving=rng.choice(instances))
                tally.leave_most = max(tally.leave_most, most)
                tally.leave_share += share / (args.trials * args.events)
                most, share = churn(ring, size, positions, joining=joiner(rng))
                tally.join_most = max(tally.join_most, most)
                tally.join_share += share / (args.trials * args.events)
        subsets = [a68(instances, size, salt) for salt in salts]
        high, low = spread(instances, subsets, args.calls, rng)
        tallies["a68"].high.append(high)
        tallies["a68"].low.append(low)
    return tallies


def cost(count: int, size: int) -> str:
    """What a ring costs at ``count`` instances: build, one subset, one leave and rejoin."""
    instances = service(random.Random(0), count)
    started = time.perf_counter()
    ring = Ring(instances)
    built = time.perf_counter() - started
    at, rounds = Position.of_index(7), 1000
    started = time.perf_counter()
    for _ in range(rounds):
        ring.subset(size, at)
    chosen = (time.perf_counter() - started) / rounds
    started = time.perf_counter()
    for inst in instances[:rounds]:
        ring.remove(inst.id)
        ring.add(inst)
    moved = (time.perf_counter() - started) / min(rounds, count)
    return (
        f"ring of {count} instances: build {built * 1e3:.1f} ms, subset({size}) {chosen * 1e6:.0f} us, "
        f"leave + rejoin {moved * 1e6:.0f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--sizes", default="64,100,200", help="comma-separated subset sizes")
    parser.add_argument("--trials", type=int, default=20, help="fleets per size")
    parser.add_argument("--events", type=int, default=20, help="leaves and joins per trial")
    parser.add_argument("--calls", type=int, default=10_000, help="calls per client")
    parser.add_argument("--cost-instances", type=int, default=10_000)
    parser.add_argument("--goal", type=float, default=1.5, help="counts the trials whose max/mean is above it")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(
        f"{args.clients} clients x {args.instances} instances, {args.trials} trials, "
        f"{args.calls} calls per client round robin, {args.events} leaves and joins per trial"
    )
    for size in (int(text) for text in args.sizes.split(",")):
        for placement, tally in measure(args, size).items():
            print(tally.line(size, placement, args.goal, churn=placement != "a68"))
    print(cost(args.cost_instances, int(args.sizes.split(",")[-1])))


if __name__ == "__main__":
    main()
