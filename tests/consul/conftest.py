"""Real Consul agents for the Consul backend's tests (never a mock).

The session agent comes from the way ``discovery_consul.devselect.choose()`` picks:
``DISCOVERY_TEST_CONSUL=docker|binary|HOST:PORT`` explicitly; unset, an address in
``DISCOVERY_TEST_CONSUL_ADDR``, else Docker through pytest-docker
(``tests/docker-compose.yml``) when a Docker engine *and* compose v2 answer, else a
``consul`` binary on PATH started as ``agent -dev`` on free ports. A way that cannot
be had skips the Consul tests saying why; with ``CI`` set it fails the run. Agents
with ACLs or HTTPS are started from the binary.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import trustme
from discovery_consul import devselect
from discovery_consul.devagent import DevAgent, DevAgentError

HOW_TO_GET_CONSUL = (
    "These tests need a real Consul agent. Either set "
    f"{devselect.VARIABLE}=host:port to an agent you run, {devselect.VARIABLE}=docker with a Docker "
    "engine and compose v2 (tests/docker-compose.yml runs hashicorp/consul), or put a `consul` binary on PATH: "
    "https://developer.hashicorp.com/consul/install (release zip or HashiCorp's apt/yum "
    "repository), or Debian 11's `consul` package."
)
MASTER_TOKEN = "acl-master-" + uuid.uuid4().hex


class Agent(Protocol):
    @property
    def address(self) -> str: ...


class ExternalAgent:
    """An agent this test run did not start and cannot restart."""

    def __init__(self, address: str) -> None:
        self.address = address

    def __repr__(self) -> str:
        return f"<ExternalAgent {self.address}>"


def unavailable(message: str) -> None:
    """Fail under CI (a missing agent is a broken CI), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _leader(address: str, scheme: str = "http") -> bool:
    try:
        with urllib.request.urlopen(f"{scheme}://{address}/v1/status/leader", timeout=2) as response:
            return bool(json.loads(response.read()))
    except (OSError, ValueError):
        return False


def start_dev_agent(tmp_path_factory: pytest.TempPathFactory, label: str, **options: Any) -> DevAgent:
    if shutil.which("consul") is None:
        unavailable(f"no `consul` on PATH for the {label} agent. {HOW_TO_GET_CONSUL}")
    log_path = tmp_path_factory.mktemp(f"consul-{label}") / "consul.log"
    agent = DevAgent(log_path=log_path, **options)
    try:
        agent.start()
    except DevAgentError as exc:
        agent.close()
        pytest.fail(f"the {label} Consul agent did not start: {exc}", pytrace=False)
    return agent


@pytest.fixture(scope="session")
def consul_agent(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    try:
        choice = devselect.choose()
    except ValueError as exc:
        pytest.fail(str(exc), pytrace=False)
    if choice.missing is not None:
        unavailable(f"{choice.why}, but {choice.missing}. {HOW_TO_GET_CONSUL}")
    if choice.address is not None:
        if not _leader(choice.address):
            pytest.fail(f"{choice.why} does not answer as a Consul agent with a leader", pytrace=False)
        yield ExternalAgent(choice.address)
        return
    if choice.way == "docker":
        docker_services = request.getfixturevalue("docker_services")
        port = docker_services.port_for("consul", 8500)
        address = f"127.0.0.1:{port}"
        docker_services.wait_until_responsive(check=lambda: _leader(address), timeout=60.0, pause=0.2)
        yield ExternalAgent(address)
        return
    agent = start_dev_agent(tmp_path_factory, "session")
    yield agent
    agent.close()


@pytest.fixture
def dev_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevAgent]:
    """An agent of this test alone, which it may kill and restart."""
    agent = start_dev_agent(tmp_path_factory, "restartable")
    yield agent
    agent.close()


def _api(address: str, method: str, path: str, body: object, token: str) -> Any:
    request = urllib.request.Request(
        f"http://{address}{path}",
        data=json.dumps(body).encode(),
        method=method,
        headers={"X-Consul-Token": token},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


class AclAgent:
    """A dev agent with ACLs on (default deny) and a helper to mint tokens."""

    def __init__(self, agent: DevAgent) -> None:
        self.agent = agent
        self.address = agent.address

    def token(self, rules: str) -> str:
        """A new token (its SecretID) holding one policy with these rules."""
        name = "p-" + uuid.uuid4().hex[:8]
        _api(self.address, "PUT", "/v1/acl/policy", {"Name": name, "Rules": rules}, MASTER_TOKEN)
        created = _api(self.address, "PUT", "/v1/acl/token", {"Policies": [{"Name": name}]}, MASTER_TOKEN)
        secret: str = created["SecretID"]
        return secret


@pytest.fixture(scope="module")
def acl_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclAgent]:
    hcl = (
        'acl { enabled = true, default_policy = "deny", down_policy = "extend-cache", '
        f'tokens {{ master = "{MASTER_TOKEN}" }} }}'
    )
    agent = start_dev_agent(tmp_path_factory, "acl", hcl=hcl)
    yield AclAgent(agent)
    agent.close()


class TlsAgent:
    """A dev agent serving HTTPS with a certificate from a CA made for the test."""

    def __init__(self, agent: DevAgent, ca_file: Path, client_cert: Path, client_key: Path) -> None:
        self.agent = agent
        self.address = agent.address
        self.ca_file = ca_file
        self.client_cert = client_cert
        self.client_key = client_key


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsAgent]:
    directory = tmp_path_factory.mktemp("consul-tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("discovery-client")
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    client_cert, client_key = directory / "client.pem", directory / "client-key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server.cert_chain_pems[0].write_to_path(str(cert_file))
    server.private_key_pem.write_to_path(str(key_file))
    client.cert_chain_pems[0].write_to_path(str(client_cert))
    client.private_key_pem.write_to_path(str(client_key))
    hcl = f'ca_file = "{ca_file}" cert_file = "{cert_file}" key_file = "{key_file}" verify_incoming_https = true'
    agent = start_dev_agent(tmp_path_factory, "tls", https=True, hcl=hcl)
    yield TlsAgent(agent, ca_file, client_cert, client_key)
    agent.close()


@pytest.fixture
def service() -> str:
    return f"consul-test-{uuid.uuid4().hex[:12]}"


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


@pytest.fixture
def until() -> Callable[[Callable[[], bool], float, str], None]:
    """``until(predicate, timeout, what)``: wait for a condition with a deadline."""
    return _until


CROWDED_SERVICES = 1000
CROWDED_INSTANCES = 10


@pytest.fixture(scope="module")
def crowded_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevAgent]:
    """An agent holding 1,000 services of 10 instances each (no checks), loaded from
    its config in about a second rather than registered one by one."""
    config = tmp_path_factory.mktemp("crowded") / "services.json"
    services = [
        {"id": f"budget-{s:04d}-{n}", "name": f"budget-{s:04d}", "address": "127.0.0.1", "port": 10000 + n}
        for s in range(CROWDED_SERVICES)
        for n in range(CROWDED_INSTANCES)
    ]
    config.write_text(json.dumps({"services": services}))
    # Its own loopback address: connections counted to it are the test's alone.
    agent = start_dev_agent(tmp_path_factory, "crowded", config_files=(config,), host="127.0.0.77")
    yield agent
    agent.close()
