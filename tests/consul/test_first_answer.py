"""When no first snapshot can come from Consul, on real agents: a denied token, an
unreachable agent, an unknown datacenter. ``wait()`` with no timeout raises (a
permanent error at once, an unreachable agent after the watcher's patience) and a
channel's call names the watch's error, for feeds on a blocking query of their own
(``max_connections=16``) and for feeds driven by the shared detectors (``5``).

The test timeout is the hang guard: a ``wait()`` that never raises fails by it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from discovery_consul.devagent import free_port
from discovery_examples.addservice import add_pb2, add_pb2_grpc

import discovery_core as dc

pytestmark = [pytest.mark.consul, pytest.mark.timeout(60)]

UNKNOWN_TOKEN = "00000000-0000-4000-8000-000000000001"


@pytest.fixture(params=[16, 5], ids=["own-query", "shared"])
def max_connections(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def denied(acl_agent: Any, max_connections: int) -> Iterator[dc.Backend]:
    options = {"address": acl_agent.address, "token": UNKNOWN_TOKEN, "max_connections": max_connections}
    with dc.connect("consul", **options) as backend:
        yield backend


@pytest.fixture
def unreachable(max_connections: int) -> Iterator[dc.Backend]:
    with dc.connect("consul", address=f"127.0.0.1:{free_port()}", max_connections=max_connections) as backend:
        yield backend


@pytest.fixture
def unknown_dc(consul_agent: Any, max_connections: int) -> Iterator[dc.Backend]:
    with dc.connect("consul", address=consul_agent.address, dc="nowhere", max_connections=max_connections) as backend:
        yield backend


def test_a_denied_token_raises_from_wait_at_once(denied: dc.Backend, service: str) -> None:
    with denied.watch(service) as watch, pytest.raises(dc.PermissionDenied) as raised:
        watch.wait()
    assert "ACL not found" in str(raised.value)


def test_an_unknown_datacenter_raises_from_wait_at_once(unknown_dc: dc.Backend, service: str) -> None:
    with unknown_dc.watch(service) as watch, pytest.raises(dc.DiscoveryError) as raised:
        watch.wait()
    assert not isinstance(raised.value, dc.BackendUnavailable)
    assert "datacenter" in str(raised.value)


def test_an_unreachable_agent_raises_from_wait_after_the_patience(unreachable: dc.Backend, service: str) -> None:
    with unreachable.watch(service) as watch, pytest.raises(dc.BackendUnavailable) as raised:
        watch.wait(timeout=3600)  # the patience (5 s), not this timeout, ends the wait
    assert f"no snapshot of {service!r}" in str(raised.value)
    assert "unreachable" in str(raised.value)


def failed_call(watcher: dc.Backend, service: str) -> str:
    """The details of a call's error, checking it blames the watch, not a deployment."""
    with dc.discovery_channel(watcher, service) as channel, pytest.raises(grpc.RpcError) as raised:
        add_pb2_grpc.AdderStub(channel).Add(add_pb2.AddRequest(a=1, b=2), timeout=30)
    error = raised.value
    assert isinstance(error, dc.NoInstanceError)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    details = error.details()
    assert details.startswith(f"the watch on {service!r} fails: Consul at ")
    assert "registered" not in details
    return details


def test_a_call_on_a_denied_watch_says_so(denied: dc.Backend, service: str) -> None:
    assert "denied the request: ACL not found" in failed_call(denied, service)


def test_a_call_on_an_unreachable_agent_says_so(unreachable: dc.Backend, service: str) -> None:
    assert "is unreachable" in failed_call(unreachable, service)
