"""Faults in a real Consul cluster under an add-service fleet's load: the scenarios of
the cluster tests and of ``bench/faults.py``.

The fleet registers through agent A with gRPC checks every second; the client watches
through agent B; retries are off, so every call the registry's trouble breaks counts.
Each scenario records its fault as a "hold" event (traffic should ride it out) and
notes what Consul did and when. Needs what ``DevCluster`` needs: root in a private
network namespace (``discovery_consul.devcluster.netns_problem``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from discovery_consul.devcluster import ClusterError, DevCluster
from discovery_examples.addservice.fleet import Outcome, Scenario

import discovery_core as dc

__all__ = ["SCENARIOS", "Durations", "Result", "run"]

CHECK = 1.0  # seconds between Consul's gRPC checks of each instance


@dataclass(frozen=True)
class Durations:
    """How long each fault lasts (the tests' and the bench's defaults; the smoke run
    shrinks them) and how long traffic is watched once Consul has recovered."""

    a_down: float = 15.0
    partition: float = 30.0
    quorum_lost: float = 10.0
    b_down: float = 5.0
    settle: float = 3.0


@dataclass
class Result:
    """One scenario's figures: every call of the run, an outcome per event, notes."""

    title: str
    calls: int
    failed: int
    outcomes: list[Outcome]
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"{self.title}  (failed: {self.failed} of {self.calls} calls)"]
        for outcome in self.outcomes:
            follow = f"{outcome.follow * 1000:.1f} ms" if outcome.follow is not None else "never"
            lines.append(f"{outcome.label:<44} {follow:>14} {outcome.failed:>13}")
        lines += [f"    {note}" for note in self.notes]
        return "\n".join(lines)


class Run:
    """A cluster, the fleet registered through agent A, a channel watching through B."""

    def __init__(self, cluster: DevCluster, *, size: int, threads: int) -> None:
        self.cluster = cluster
        self.registry = dc.connect(f"consul://{cluster.a.http_address}")
        self.watcher = dc.connect(f"consul://{cluster.b.http_address}")
        check = dc.GrpcCheck(interval=CHECK, timeout=CHECK, initial_status=dc.HealthStatus.PASSING)
        try:
            self.scenario = Scenario(
                self.registry, self.watcher, threads=threads, retry=False, size=size, check=check, backoff=0.001
            )
        except BaseException:
            self.registry.close()
            self.watcher.close()
            raise
        self.notes: list[str] = []

    def wait(self, condition: Callable[[], bool], what: str, since: float, timeout: float | None = None) -> None:
        """Wait for ``condition`` (ClusterError at the deadline) and note when it held."""
        self.cluster.wait(condition, what, timeout)
        self.notes.append(f"{what}: {time.monotonic() - since:.1f} s")

    def within(self, condition: Callable[[], bool], what: str, since: float, until: float) -> None:
        """Note whether and when ``condition`` held before ``until`` (monotonic time)."""
        try:
            self.wait(condition, what, since, timeout=max(0.0, until - time.monotonic()))
        except ClusterError:
            self.notes.append(f"{what}: not within {until - since:.1f} s")

    def hold(self, until: float) -> None:
        """Keep the fault (and the load) on until ``until`` (monotonic time)."""
        time.sleep(max(0.0, until - time.monotonic()))

    def all_passing(self) -> bool:
        """Every live instance of the fleet passing, as the client's agent B answers."""
        wanted = {i.id for i in self.scenario.fleet.instances if not i.killed}
        try:
            seen = {i.id for i in self.watcher.instances(self.scenario.service).instances}
        except dc.DiscoveryError:
            return False
        return seen == wanted

    def recovered(self, since: float) -> None:
        """Wait until the cluster is whole and the client's agent sees every instance passing."""
        self.wait(self.cluster.healthy, "cluster healthy again", since)
        self.wait(self.all_passing, "every instance passing through agent B", since)

    def close(self, title: str, settle: float) -> Result:
        """Watch traffic for ``settle`` more seconds, then stop everything; the figures."""
        time.sleep(settle)
        outcomes = self.scenario.close()
        self.registry.close()
        self.watcher.close()
        records = self.scenario.load.snapshot()
        failures = [t for t, _, code in records if code != "OK"]
        if failures and self.scenario.events:
            at = self.scenario.events[0].at
            self.notes.append(f"calls failed from {failures[0] - at:.1f} s to {failures[-1] - at:.1f} s")
        return Result(title, len(records), len(failures), outcomes, self.notes)


def leader_killed(run: Run, durations: Durations) -> None:
    cluster = run.cluster
    old = cluster.leader()
    if old is None:
        raise ClusterError("no leader to kill")
    at = run.scenario.fault(f"kill the leader ({old.name})")
    cluster.kill(old)
    run.wait(lambda: cluster.leader() not in (None, old), "a new leader", at)
    old.start()
    run.recovered(at)


def quorum_lost(run: Run, durations: Durations) -> None:
    cluster = run.cluster
    leader = cluster.leader()
    victims = sorted(cluster.servers, key=lambda server: server is not leader)[:2]  # the leader and one more
    at = run.scenario.fault(f"kill 2 of 3 servers for {durations.quorum_lost:g} s")
    for server in victims:
        cluster.kill(server)
    run.within(lambda: cluster.leader() is None, "no leader", at, at + durations.quorum_lost)
    run.hold(at + durations.quorum_lost)
    for server in victims:
        server.start()
    run.recovered(at)


def agent_b_restarted(run: Run, durations: Durations) -> None:
    cluster = run.cluster
    at = run.scenario.fault(f"kill agent B for {durations.b_down:g} s")
    cluster.kill(cluster.b)
    run.hold(at + durations.b_down)
    cluster.b.start()
    run.recovered(at)
    run.scenario.start()  # the watch through B follows changes again


def agent_a_killed(run: Run, durations: Durations) -> None:
    cluster = run.cluster
    at = run.scenario.fault(f"kill agent A for {durations.a_down:g} s")
    cluster.kill(cluster.a)
    run.within(lambda: cluster.node_health(cluster.a) == "critical", "A's node failed", at, at + durations.a_down)
    run.hold(at + durations.a_down)
    cluster.a.start()
    run.recovered(at)


def agent_a_fresh(run: Run, durations: Durations) -> None:
    cluster = run.cluster
    at = run.scenario.fault("restart agent A with a fresh data dir")
    cluster.restart(cluster.a, fresh=True)
    ids = {i.id for i in run.scenario.fleet.instances}
    run.wait(lambda: ids <= set(cluster.services(cluster.a)), "the fleet registered again in agent A", at)
    run.recovered(at)
    # Consul 1.8.7 refuses the new node ID of a name it knows alive ("Node name ... is
    # reserved"): A's old entries stay in the catalog, A's changes do not reach it.
    until = time.monotonic() + durations.settle
    run.within(lambda: cluster.in_catalog(cluster.a), "the catalog took A's new node ID", at, until)


def agent_a_partitioned(run: Run, durations: Durations) -> None:
    cluster = run.cluster
    at = run.scenario.fault(f"partition agent A for {durations.partition:g} s")
    cluster.partition(cluster.a)
    run.within(lambda: cluster.node_health(cluster.a) == "critical", "A's node failed", at, at + durations.partition)
    run.hold(at + durations.partition)
    cluster.heal(cluster.a)
    run.recovered(at)


def rolling_restart(run: Run, durations: Durations) -> None:
    for old in list(run.scenario.instances):
        run.scenario.start()
        run.scenario.drain(old)


#: name -> (title, scenario), in the order the bench runs them.
SCENARIOS: dict[str, tuple[str, Callable[[Run, Durations], None]]] = {
    "leader": ("leader killed", leader_killed),
    "quorum": ("quorum lost, then restored", quorum_lost),
    "agent-b": ("agent B (the client's) killed and restarted", agent_b_restarted),
    "agent-a": ("agent A (the fleet's) killed, then restarted", agent_a_killed),
    "agent-a-fresh": ("agent A restarted with a fresh data dir", agent_a_fresh),
    "partition": ("agent A partitioned, then healed", agent_a_partitioned),
    "rolling": ("rolling restart of every instance", rolling_restart),
}


def run(
    name: str,
    *,
    size: int = 3,
    threads: int = 4,
    durations: Durations = Durations(),
    logs: str | Path | None = None,
) -> Result:
    """Run scenario ``name`` on a cluster of its own; its figures. ``logs``: a directory
    to keep the agents' logs in."""
    title, scenario = SCENARIOS[name]
    with DevCluster(directory=logs) as cluster:
        fleet_run = Run(cluster, size=size, threads=threads)
        try:
            scenario(fleet_run, durations)
        finally:
            result = fleet_run.close(title, durations.settle)
    return result
