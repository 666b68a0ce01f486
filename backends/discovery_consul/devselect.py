"""Which real Consul a test run uses: an agent at an address, a container, or a binary.

Not used by the backend itself: the Consul tests (``tests/consul/conftest.py``) ask
``choose()``, so the choice is explicit and can be tested. ``DISCOVERY_TEST_CONSUL``
selects: ``docker`` (pytest-docker and ``tests/docker-compose.yml``: needs a Docker
engine *and* compose v2, since pytest-docker runs ``docker compose ... up --wait``),
``binary`` (a ``consul`` on PATH started ``-dev``), or ``HOST:PORT`` (an agent you
run). Unset: ``DISCOVERY_TEST_CONSUL_ADDR`` if set, else Docker when both the engine
and compose v2 answer, else the binary. A Docker engine alone is not enough: without
compose v2 every Consul test would error ("unknown shorthand flag: 'f'").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["ADDRESS_VARIABLE", "VARIABLE", "Choice", "choose", "consul_missing", "docker_missing"]

VARIABLE = "DISCOVERY_TEST_CONSUL"
ADDRESS_VARIABLE = "DISCOVERY_TEST_CONSUL_ADDR"
_ADDRESS = re.compile(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}\Z")
_COMPOSE_VERSION = re.compile(r"version\s+v?(\d+)\.", re.I)
_PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Choice:
    """The way chosen, and why. ``missing``: the way cannot be had (the reason);
    ``requested``: it was asked for by name, not chosen automatically."""

    way: Literal["address", "docker", "binary"]
    why: str
    address: str | None = None
    missing: str | None = None
    requested: bool = False


def _run(*command: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=_PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def docker_missing() -> str | None:
    """None when a Docker engine and compose v2 both answer, else what is missing."""
    if shutil.which("docker") is None:
        return "no `docker` on PATH"
    info = _run("docker", "info")
    if info is None or info.returncode != 0:
        return "the Docker engine does not answer (`docker info` failed)"
    compose = _run("docker", "compose", "version")
    if compose is None or compose.returncode != 0:
        return "no compose v2 (`docker compose version` failed)"
    match = _COMPOSE_VERSION.search(compose.stdout + compose.stderr)
    if match is None or int(match[1]) < 2:
        return f"compose is not v2 (`docker compose version` says {compose.stdout.strip()!r})"
    return None


def consul_missing() -> str | None:
    """None when a ``consul`` binary is on PATH, else the reason."""
    return None if shutil.which("consul") else "no `consul` on PATH"


def choose(
    environ: Mapping[str, str] | None = None,
    *,
    docker: Callable[[], str | None] = docker_missing,
    binary: Callable[[], str | None] = consul_missing,
) -> Choice:
    """The way to a real Consul for this run; ``ValueError`` for a value of
    ``DISCOVERY_TEST_CONSUL`` that names none."""
    env = os.environ if environ is None else environ
    asked = env.get(VARIABLE, "").strip()
    if asked == "docker":
        return Choice("docker", f"{VARIABLE}=docker", missing=docker(), requested=True)
    if asked == "binary":
        return Choice("binary", f"{VARIABLE}=binary", missing=binary(), requested=True)
    if asked:
        if not _ADDRESS.match(asked):
            raise ValueError(f"{VARIABLE}={asked!r}: expected docker, binary or HOST:PORT")
        return Choice("address", f"{VARIABLE}={asked}", address=asked, requested=True)
    if address := env.get(ADDRESS_VARIABLE, "").strip():
        return Choice("address", f"{ADDRESS_VARIABLE}={address}", address=address, requested=True)
    no_docker = docker()
    if no_docker is None:
        return Choice("docker", "a Docker engine and compose v2 answer")
    return Choice("binary", f"Docker not used: {no_docker}", missing=binary())
