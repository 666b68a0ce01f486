"""ACLs (default deny) and HTTPS on real agents; tokens never show."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from discovery_consul.devagent import free_port

import discovery_core as dc

pytestmark = pytest.mark.consul

RULES = 'service_prefix "" { policy = "write" } node_prefix "" { policy = "read" }'


def _round_trip(backend: dc.Backend, service: str) -> None:
    inst = dc.ServiceInstance(service, "127.0.0.1", 5001, check=dc.TtlCheck(ttl=30))
    with backend.register(inst), backend.watch(service) as watch:
        snapshot = watch.wait(timeout=10)
        while inst.id not in {i.id for i in snapshot.instances}:
            snapshot = watch.wait(timeout=10)


def test_acl_without_token_is_permission_denied(acl_agent: Any, service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    with dc.connect(f"consul://{acl_agent.address}") as backend, pytest.raises(dc.PermissionDenied) as raised:
        backend.register(dc.ServiceInstance(service, "127.0.0.1", 5001))
    message = str(raised.value)
    assert acl_agent.address in message
    assert "no ACL token was given" in message


def test_acl_token_with_the_right_policy_works(acl_agent: Any, service: str) -> None:
    token = acl_agent.token(RULES)
    with dc.connect("consul", address=acl_agent.address, token=token) as backend:
        _round_trip(backend, service)


def test_acl_token_file_works(acl_agent: Any, service: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(acl_agent.token(RULES) + "\n")
    with dc.connect(f"consul://{acl_agent.address}?token_file={token_file}") as backend:
        _round_trip(backend, service)


def test_explicit_token_beats_consul_http_token(acl_agent: Any, service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "00000000-0000-0000-0000-000000000000")
    with dc.connect("consul", address=acl_agent.address, token=acl_agent.token(RULES)) as backend:
        _round_trip(backend, service)
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", acl_agent.token(RULES))
    with dc.connect("consul", address=acl_agent.address) as backend:
        _round_trip(backend, service)


def test_token_without_write_is_denied_and_never_shown(
    acl_agent: Any, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = acl_agent.token('service_prefix "" { policy = "read" } node_prefix "" { policy = "read" }')
    shown: list[str] = []
    with dc.connect("consul", address=acl_agent.address, token=token) as backend:
        shown.append(repr(backend))
        with pytest.raises(dc.PermissionDenied) as denied:
            backend.register(dc.ServiceInstance(service, "127.0.0.1", 5001))
        shown.append(str(denied.value))
    invalid_options: list[dict[str, Any]] = [
        {"token": token, "wait": "-1"},
        {"tokn": token},  # a misspelled option holding the secret
        {"token": token, "token_file": "/nonexistent"},
    ]
    for options in invalid_options:
        with pytest.raises(dc.InvalidConfig) as invalid:
            dc.connect("consul", address=acl_agent.address, **options)
        shown.append(str(invalid.value))
    for url in (f"consul://user:{token}@{acl_agent.address}", f"consul://{acl_agent.address}/x?token={token}"):
        with pytest.raises(dc.InvalidConfig) as invalid:
            dc.connect(url)
        shown += [str(invalid.value), repr(invalid.value.value)]
    with dc.connect("consul", address=f"127.0.0.1:{free_port()}", token=token) as unreachable:
        shown.append(repr(unreachable))
        with pytest.raises(dc.BackendUnavailable) as down:
            unreachable.instances(service)
        shown.append(str(down.value))
        with unreachable.watch(service) as watch, pytest.raises(dc.BackendUnavailable):
            watch.wait(timeout=2)
    shown.append(caplog.text)
    leaked = [text for text in shown if token in text]
    assert not leaked, "the token leaked"


def test_https_with_the_ca_and_a_client_certificate_works(tls_agent: Any, service: str) -> None:
    url = (
        f"consul://{tls_agent.address}?scheme=https&ca_file={tls_agent.ca_file}"
        f"&cert_file={tls_agent.client_cert}&key_file={tls_agent.client_key}"
    )
    with dc.connect(url) as backend:
        _round_trip(backend, service)


def test_https_without_the_ca_is_a_clear_tls_error(tls_agent: Any, service: str) -> None:
    backend = dc.connect("consul", address=tls_agent.address, scheme="https", timeout=5)
    with backend, pytest.raises(dc.BackendUnavailable) as raised:
        backend.instances(service)
    message = str(raised.value)
    assert "TLS" in message
    assert "certificate verify failed" in message
    assert "ca_file" in message


def test_https_without_a_client_certificate_is_a_tls_error(tls_agent: Any, service: str) -> None:
    backend = dc.connect("consul", address=tls_agent.address, scheme="https", ca_file=str(tls_agent.ca_file), timeout=5)
    with backend, pytest.raises(dc.BackendUnavailable) as raised:
        backend.instances(service)
    assert f"TLS with Consul at https://{tls_agent.address} failed" in str(raised.value)
