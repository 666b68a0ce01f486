"""Two owners of one explicit instance id, as two processes on one agent."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from discovery_consul import ConsulBackend

import discovery_core as dc

pytestmark = pytest.mark.consul

Until = Callable[[Callable[[], bool], float, str], None]


class Quick(ConsulBackend):
    keepalive_interval = 0.2  # a test cannot wait the default 20 s for a sweep


def ports(backend: dc.Backend, service: str) -> list[int]:
    return [inst.port for inst in backend.instances(service, passing_only=False).instances]


def test_closing_leaves_the_instance_another_process_registered_under_our_id(
    consul_agent: Any, service: str, until: Until, caplog: pytest.LogCaptureFixture
) -> None:
    a = Quick(address=consul_agent.address)
    b = Quick(address=consul_agent.address)
    ours = dc.ServiceInstance(service, "127.0.0.1", 5001, id=f"{service}-1")
    theirs = dc.ServiceInstance(service, "127.0.0.1", 5002, id=f"{service}-1")
    try:
        with caplog.at_level(logging.WARNING, logger="discovery_core"):
            registration = a.register(ours)
            until(lambda: registration.status().last_verified is not None, 10, "a's first sweep")
            b.register(theirs)
            until(lambda: "another owner" in caplog.text, 10, "a notices the id taken")
            verified = registration.status().last_verified
            until(lambda: registration.status().last_verified != verified, 10, "a sweeps again")
            until(lambda: registration.status().last_verified != verified, 10, "and again")
        assert ports(b, service) == [5002]  # a does not fight b for the id
        assert caplog.text.count("another owner") == 1  # warned once
        assert registration.status().last_error == "registered by another owner"
        a.close()
        assert ports(b, service) == [5002]  # a's close left b's instance alone
    finally:
        a.close()
        b.close()
    with dc.connect(f"consul://{consul_agent.address}") as reader:
        assert ports(reader, service) == []
