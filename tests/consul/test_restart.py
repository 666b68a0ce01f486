"""A killed and restarted agent (a -dev agent comes back knowing nothing)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from discovery_consul.devagent import DevAgent

import discovery_core as dc

pytestmark = pytest.mark.consul

Until = Callable[[Callable[[], bool], float, str], None]


def _agent_has(agent: DevAgent, instance_id: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{agent.address}/v1/agent/service/{instance_id}", timeout=2) as response:
            return bool(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise


def _next(watch: dc.Watch, predicate: Callable[[dc.Snapshot], bool], timeout: float) -> dc.Snapshot:
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            snapshot = watch.wait(timeout=remaining)
        except TimeoutError:
            break
        if predicate(snapshot):
            return snapshot
    raise AssertionError(f"no matching snapshot within {timeout} s; last: {watch.current}")


def test_registrations_come_back_and_the_watch_serves_stale_then_resumes(
    dev_agent: DevAgent, service: str, until: Until
) -> None:
    plain = dc.ServiceInstance(service, "127.0.0.1", 5001)
    ttl = dc.ServiceInstance(service, "127.0.0.1", 5002, check=dc.TtlCheck(ttl=3))
    ids = {plain.id, ttl.id}
    with dc.connect(f"consul://{dev_agent.address}") as backend:
        first, second = backend.register(plain), backend.register(ttl)
        with backend.watch(service) as watch:
            _next(watch, lambda s: {i.id for i in s.instances} == ids and not s.stale, 10)

            dev_agent.kill()
            stale = _next(watch, lambda s: s.stale, 10)
            assert {i.id for i in stale.instances} == ids  # the last known set, marked stale

            dev_agent.start()  # returns once the agent answers and has a leader
            # The watch's recovery wakes the keepalive (and its failed heartbeats already
            # retry): both back off at most 2 s, so the restore comes within about 2 s.
            until(lambda: _agent_has(dev_agent, plain.id) and _agent_has(dev_agent, ttl.id), 3.0, "re-registered")

            resumed = _next(watch, lambda s: {i.id for i in s.instances} == ids and not s.stale, 15)
            assert resumed.status(ttl.id) is dc.HealthStatus.PASSING  # heartbeats resumed too

        first.close()
        second.close()
        assert not _agent_has(dev_agent, plain.id)
        assert not _agent_has(dev_agent, ttl.id)
