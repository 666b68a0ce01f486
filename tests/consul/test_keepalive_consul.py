"""The keepalive against real agents: what it costs at idle, and an agent that cannot sync.

Requests are counted by a TCP proxy between the backend and a real agent (it reads
the request lines going through). The unsynced state is the one measured in the
field: a client agent killed and started again with a fresh data dir under the
same node name, which the servers refuse ("Node name ... is reserved") while the
catalog keeps the old node's entries.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from discovery_consul import ConsulBackend
from discovery_consul.devagent import DevAgent, free_port
from discovery_consul.devproxy import CountingProxy

import discovery_core as dc

pytestmark = pytest.mark.consul

Until = Callable[[Callable[[], bool], float, str], None]


def tuned(**attributes: Any) -> type[ConsulBackend]:
    """The Consul backend with other keepalive time scales (a test cannot wait 20 s)."""
    return type("TunedConsul", (ConsulBackend,), attributes)


def test_an_idle_sweep_costs_one_agent_read_and_one_catalog_read_per_service(
    consul_agent: Any, service: str, until: Until
) -> None:
    services = (f"{service}-a", f"{service}-b")
    insts = [dc.ServiceInstance(name, "127.0.0.1", 5000 + i) for name in services for i in range(5)]
    with CountingProxy(consul_agent.address) as proxy, tuned(keepalive_interval=0.3)(address=proxy.address) as backend:
        registrations = [backend.register(inst) for inst in insts]
        until(lambda: all(r.status().catalog_visible for r in registrations), 10, "all verified visible")
        before = proxy.counts()
        until(lambda: proxy.counts()["GET /v1/agent/services"] - before["GET /v1/agent/services"] >= 5, 10, "sweeps")
        idle = proxy.counts() - before
        sweeps = idle.pop("GET /v1/agent/services")
        for name in services:
            # Each sweep reads each service once after the agent; one may be under way.
            assert sweeps - 1 <= idle.pop(f"GET /v1/catalog/service/{name}") <= sweeps
        assert idle == Counter()  # no per-instance reads, no agent/self (the node is known)
        per_sweep = 1 + len(services)
        print(
            f"\nidle keepalive, {len(insts)} registrations in {len(services)} services: {per_sweep} requests a sweep;"
            f" at the default {ConsulBackend.keepalive_interval:g} s,"
            f" {per_sweep / len(insts) * 10 / ConsulBackend.keepalive_interval:.3f} requests per registration per 10 s"
            f" (a thread polling each every 0.5 s: 20)"
        )


class ClientAgent:
    """A client agent (not -dev) joined to a server; started again with a fresh data
    dir under the same node name and ports, as a replaced machine would be."""

    def __init__(self, server: DevAgent, directory: Path) -> None:
        self.node = f"keepalive-{uuid.uuid4().hex[:8]}"
        self.ports = {"http": free_port(), "serf_lan": free_port()}
        self.address = f"127.0.0.1:{self.ports['http']}"
        self._server = server
        self._directory = directory
        self._runs = 0
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._runs += 1
        data_dir = self._directory / f"data-{self._runs}"
        binary = shutil.which("consul") or "consul"
        ports = f"ports {{ http = {self.ports['http']} serf_lan = {self.ports['serf_lan']} dns = -1 grpc = -1 }}"
        command = [binary, "agent", f"-node={self.node}", f"-data-dir={data_dir}", "-bind=127.0.0.1"]
        command += ["-client=127.0.0.1", f"-retry-join=127.0.0.1:{self._server.ports['serf_lan']}"]
        command += ["-retry-interval=1s", f"-hcl={ports}"]
        with (self._directory / f"consul-{self._runs}.log").open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self._answers_with_leader():
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise AssertionError(f"the client agent did not join its server; log in {self._directory}")
            time.sleep(0.05)  # polling a process we started; no event to wait on

    def _answers_with_leader(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/v1/status/leader", timeout=1) as response:
                return bool(json.loads(response.read()))
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)


@pytest.fixture
def server_and_client(
    dev_agent: DevAgent, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DevAgent, ClientAgent]]:
    """The test's own -dev agent as the server, and a client agent joined to it."""
    client = ClientAgent(dev_agent, tmp_path_factory.mktemp("consul-client"))
    try:
        client.start()
        yield dev_agent, client
    finally:
        client.kill()


def _catalog_deregister_node(server: DevAgent, node: str) -> None:
    request = urllib.request.Request(
        f"http://{server.address}/v1/catalog/deregister", data=json.dumps({"Node": node}).encode(), method="PUT"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read()) is True


def test_an_agent_that_cannot_sync_is_one_warning_and_registered_again_only_when_the_catalog_shows_it(
    server_and_client: tuple[DevAgent, ClientAgent], service: str, until: Until, caplog: pytest.LogCaptureFixture
) -> None:
    server, client = server_and_client
    inst = dc.ServiceInstance(service, "127.0.0.1", 5001)
    backend = tuned(keepalive_interval=0.5, sync_grace=1.0)(address=client.address)
    with backend, caplog.at_level(logging.INFO, "discovery_core.registry"):
        registration = backend.register(inst)
        until(lambda: registration.status().catalog_visible is True, 10, "visible through the first agent")

        client.kill()
        client.start()  # fresh data dir, same node name: its node sync is refused
        until(lambda: "the agent cannot sync to the servers" in caplog.text, 30, "the warning naming the cause")
        assert registration.status().catalog_visible is False
        assert "registered again" not in caplog.text  # the agent has it back; no client can see it

        # The old node leaves the catalog: the agent's next sync goes through.
        _catalog_deregister_node(server, client.node)
        until(lambda: "registered again" in caplog.text, 60, "the catalog shows it")
        assert registration.status().catalog_visible is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    unsynced = [w for w in warnings if "cannot sync" in w]
    assert len(unsynced) == 1, warnings
    assert f"agent {client.address} holds {inst.id!r} but the catalog does not" in unsynced[0]
