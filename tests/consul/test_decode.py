"""Decoding health answers: what did not change is the very instance of the last
answer, what changed is built (and validated) anew, bad entries are skipped.

Entries are shaped as Consul 1.8 answers ``/v1/health/service/<name>`` (see
bench/scale.py, which decodes real ones); the decoder needs no agent.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
from discovery_consul._client import HealthResult
from discovery_consul._decode import Decoder

import discovery_core as dc


def entry(n: int, *, status: str = "passing", own_check: bool = True, **service: Any) -> dict[str, Any]:
    instance_id = f"web-{n}"
    checks = [{"Node": "node-1", "CheckID": "serfHealth", "Status": "passing", "ServiceID": ""}]
    if own_check:
        checks.append(
            {"Node": "node-1", "CheckID": f"service:{instance_id}", "Status": status, "ServiceID": instance_id}
        )
    return {
        "Node": {"Node": "node-1", "Address": "10.0.0.1"},
        "Service": {
            "ID": instance_id,
            "Service": "web",
            "Tags": ["v1"],
            "Address": "",
            "Meta": {"zone": "a"},
            "Port": 8000 + n,
            "Weights": {"Passing": 1, "Warning": 1},
            **service,
        },
        "Checks": checks,
    }


def answer(*entries: dict[str, Any], index: int = 10) -> HealthResult:
    return HealthResult(index, [copy.deepcopy(e) for e in entries])  # each answer parsed anew


def decoder() -> Decoder:
    return Decoder(dc.Query.build("web", passing_only=False))


def test_an_entry_that_did_not_change_is_the_same_instance_and_a_changed_one_is_new() -> None:
    decode = decoder()
    first = decode.read(answer(entry(1), entry(2), entry(3))).snapshot
    second = decode.read(answer(entry(1), entry(2, Port=9999), entry(4), index=11)).snapshot
    one, two, _ = first.instances
    assert second.instances[0] is one
    assert second.instances[1] is not two
    assert second.instances[1].port == 9999
    assert [i.id for i in second.instances] == ["web-1", "web-2", "web-4"]
    diff = second.diff(first)
    assert ([i.id for i in diff.added], [i.id for i in diff.removed], [i.id for i in diff.changed]) == (
        ["web-4"],
        ["web-3"],
        ["web-2"],
    )
    assert (
        second.instances
        == Decoder(decode.query).read(answer(entry(1), entry(2, Port=9999), entry(4))).snapshot.instances
    )


def test_instances_take_the_node_address_and_every_field() -> None:
    (inst,) = decoder().read(answer(entry(1, Weights={"Passing": 5, "Warning": 1}))).snapshot.instances
    assert inst == dc.ServiceInstance("web", "10.0.0.1", 8001, id="web-1", tags=("v1",), meta={"zone": "a"}, weight=5)


def test_health_is_the_worst_check_and_unknown_states_are_critical() -> None:
    read = decoder().read(
        answer(entry(1), entry(2, status="warning"), entry(3, status="critical"), entry(4, status="maintenance"))
    )
    states = {i.id: read.snapshot.status(i.id) for i in read.snapshot.instances}
    assert states == {
        "web-1": dc.HealthStatus.PASSING,
        "web-2": dc.HealthStatus.WARNING,
        "web-3": dc.HealthStatus.CRITICAL,
        "web-4": dc.HealthStatus.CRITICAL,
    }
    assert read.nodes == {"node-1"}
    assert not read.unchecked
    assert decoder().read(answer(entry(1), entry(2, own_check=False))).unchecked
    assert decoder().read(answer()).unchecked  # no instance at all: one without a check may come


def test_a_bad_entry_is_skipped_and_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    decode = decoder()
    bad = entry(2, Tags=["v1", "v1"])  # a repeated tag: the model refuses it
    unhashable = entry(3, Tags=[{"not": "a tag"}])
    with caplog.at_level(logging.WARNING, logger="discovery_consul"):
        for index in (10, 11):
            snapshot = decode.read(answer(entry(1), bad, unhashable, index=index)).snapshot
            assert [i.id for i in snapshot.instances] == ["web-1"]
    warned = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert sum("web-2" in w for w in warned) == 1
    assert sum("web-3" in w for w in warned) == 2  # cannot be remembered: built every time


def test_an_entry_of_another_service_is_left_out() -> None:
    read = decoder().read(answer(entry(1), entry(2, Service="other")))
    assert [i.id for i in read.snapshot.instances] == ["web-1"]
