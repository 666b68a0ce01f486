"""Which real Consul the Consul tests use (``DISCOVERY_TEST_CONSUL``), decided honestly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from discovery_consul import devselect

ROOT = Path(__file__).parent.parent
COMPOSE_V1 = "echo 'docker-compose version 1.29.2, build unknown'"
COMPOSE_V2 = "echo 'Docker Compose version v2.26.1'"
NO_COMPOSE = "echo \"unknown shorthand flag: 'f' in -f\" >&2; exit 125"


def fake_docker(directory: Path, *, info: str = "exit 0", compose: str = NO_COMPOSE) -> Path:
    """A `docker` that answers `info` and `compose ...` as told, first on a PATH."""
    directory.mkdir(exist_ok=True)
    script = directory / "docker"
    script.write_text(f'#!/bin/sh\ncase "$1" in\n  info) {info} ;;\n  compose) {compose} ;;\nesac\n')
    script.chmod(0o755)
    return directory


def probe(monkeypatch: pytest.MonkeyPatch, bin_dir: Path) -> str | None:
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return devselect.docker_missing()


def test_an_engine_without_compose_v2_is_not_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "compose v2" in str(probe(monkeypatch, fake_docker(tmp_path / "a", compose=NO_COMPOSE)))
    assert "not v2" in str(probe(monkeypatch, fake_docker(tmp_path / "b", compose=COMPOSE_V1)))
    assert "engine" in str(probe(monkeypatch, fake_docker(tmp_path / "c", info="exit 1")))
    assert probe(monkeypatch, fake_docker(tmp_path / "d", compose=COMPOSE_V2)) is None


def test_unset_picks_the_address_then_docker_then_the_binary() -> None:
    def no(reason: str) -> devselect.Choice:
        return devselect.choose({}, docker=lambda: reason, binary=lambda: None)

    assert no("no compose v2").way == "binary"
    assert "no compose v2" in no("no compose v2").why
    assert devselect.choose({}, docker=lambda: None).way == "docker"
    by_address = devselect.choose({devselect.ADDRESS_VARIABLE: "127.0.0.1:8500"}, docker=lambda: None)
    assert (by_address.way, by_address.address) == ("address", "127.0.0.1:8500")
    nothing = devselect.choose({}, docker=lambda: "no docker", binary=lambda: "no `consul` on PATH")
    assert nothing.missing == "no `consul` on PATH"


def test_an_explicit_way_is_taken_or_reported_missing_never_swapped() -> None:
    docker = devselect.choose({devselect.VARIABLE: "docker"}, docker=lambda: "no compose v2", binary=lambda: None)
    assert (docker.way, docker.missing, docker.requested) == ("docker", "no compose v2", True)
    binary = devselect.choose({devselect.VARIABLE: "binary"}, docker=lambda: None, binary=lambda: None)
    assert (binary.way, binary.missing) == ("binary", None)
    address = devselect.choose({devselect.VARIABLE: "10.0.0.5:8500", devselect.ADDRESS_VARIABLE: "x:1"})
    assert (address.way, address.address) == ("address", "10.0.0.5:8500")
    with pytest.raises(ValueError, match="docker, binary or HOST:PORT"):
        devselect.choose({devselect.VARIABLE: "dokcer"})


def run_consul_test(bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """One Consul contract test in a pytest of its own, with ``bin_dir`` first on PATH."""
    environ = {k: v for k, v in os.environ.items() if k not in (devselect.VARIABLE, devselect.ADDRESS_VARIABLE)}
    environ.update(PATH=f"{bin_dir}{os.pathsep}{environ['PATH']}", **env)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    command += [
        "tests/consul/test_contract_consul.py::TestConsulContract::test_register_then_instances_round_trips_every_field"
    ]
    return subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(shutil.which("consul") is None, reason="needs a `consul` binary on PATH")
def test_a_docker_engine_without_compose_falls_back_to_the_binary(tmp_path: Path) -> None:
    result = run_consul_test(fake_docker(tmp_path / "bin"))
    assert "1 passed" in result.stdout, result.stdout + result.stderr


def test_a_requested_way_that_cannot_be_had_fails_under_ci(tmp_path: Path) -> None:
    result = run_consul_test(fake_docker(tmp_path / "bin"), DISCOVERY_TEST_CONSUL="docker", CI="1")
    assert result.returncode != 0
    assert "DISCOVERY_TEST_CONSUL=docker, but no compose v2" in result.stdout, result.stdout
    skipped = run_consul_test(fake_docker(tmp_path / "bin"), DISCOVERY_TEST_CONSUL="docker", CI="")
    assert "1 skipped" in skipped.stdout, skipped.stdout
