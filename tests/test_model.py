"""The model: defaults, immutability, hashing, validation and snapshot diffs."""

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

import discovery_core as dc
from discovery_core.testing.invalid import bad_fields

names = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)
ports = st.integers(min_value=1, max_value=65535)
tags = st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), unique=True, max_size=4).map(tuple)
metas = st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.text(max_size=10), max_size=4)


@given(name=names, port=ports, tags=tags, meta=metas)
def test_valid_instances_are_equal_and_hash_alike_when_built_twice(
    name: str, port: int, tags: tuple[str, ...], meta: dict[str, str]
) -> None:
    a = dc.ServiceInstance(name, "10.0.0.5", port, tags=tags, meta=meta)
    b = dc.ServiceInstance(name, "10.0.0.5", port, tags=tags, meta=dict(meta))
    assert a == b
    assert hash(a) == hash(b)
    assert a.id == f"{name}-10.0.0.5-{port}"


@given(build=bad_fields)
def test_every_bad_field_raises_invalid_instance_naming_it(build: object) -> None:
    with pytest.raises(dc.InvalidInstance) as raised:
        build("svc")  # type: ignore[operator]
    assert isinstance(raised.value, ValueError)
    assert raised.value.field in str(raised.value)


def test_instances_are_frozen_and_meta_is_read_only() -> None:
    inst = dc.ServiceInstance("add", "127.0.0.1", 1, meta={"zone": "a"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        inst.port = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        inst.meta["zone"] = "b"  # type: ignore[index]


def test_a_single_string_as_tags_is_refused() -> None:
    with pytest.raises(dc.InvalidInstance, match="tags"):
        dc.ServiceInstance("add", "127.0.0.1", 1, tags="v1")  # type: ignore[arg-type]


def test_target_brackets_ipv6() -> None:
    assert dc.ServiceInstance("add", "::1", 50051).target == "[::1]:50051"
    assert dc.ServiceInstance("add", "db.internal", 5).target == "db.internal:5"


def test_snapshot_sorts_and_diffs_by_id() -> None:
    a = dc.ServiceInstance("add", "127.0.0.1", 1, id="a")
    b = dc.ServiceInstance("add", "127.0.0.1", 2, id="b")
    b2 = dc.ServiceInstance("add", "127.0.0.1", 3, id="b")
    c = dc.ServiceInstance("add", "127.0.0.1", 4, id="c")
    before = dc.Snapshot("add", (b, a), index=1)
    assert [i.id for i in before.instances] == ["a", "b"]
    after = dc.Snapshot("add", (c, b2), index=2)
    diff = after.diff(before)
    assert (diff.added, diff.removed, diff.changed) == ((c,), (a,), (b2,))
    assert not before.diff(before)
    assert after.diff(None).added == (b2, c)


def test_a_health_change_is_a_change_and_index_and_staleness_are_not() -> None:
    a = dc.ServiceInstance("add", "127.0.0.1", 1, id="a")
    passing = dc.Snapshot("add", (a,), index=1)
    warning = dc.Snapshot("add", (a,), index=2, health={"a": dc.HealthStatus.WARNING})
    assert warning.diff(passing).changed == (a,)
    assert not passing.same_content(warning)
    assert passing.same_content(dc.Snapshot("add", (a,), index=9, stale=True))


def test_checks_validate_and_coerce_initial_status() -> None:
    check = dc.TtlCheck(ttl=3, initial_status="passing")  # type: ignore[arg-type]
    assert check.initial_status is dc.HealthStatus.PASSING
    with pytest.raises(dc.InvalidInstance, match=r"check\.interval"):
        dc.GrpcCheck(interval=0)
    with pytest.raises(dc.InvalidInstance, match=r"check\.tls"):
        dc.GrpcCheck(tls="yes")  # type: ignore[arg-type]


def test_invalid_config_never_shows_a_token() -> None:
    error = dc.InvalidConfig("token", "s3cr3t-token", "bad", backend="consul")
    assert "s3cr3t" not in str(error)


def test_status_of_an_id_the_snapshot_does_not_hold_is_a_key_error() -> None:
    up = dc.ServiceInstance("add", "127.0.0.1", 5001)
    down = dc.ServiceInstance("add", "127.0.0.1", 5002)
    snapshot = dc.Snapshot("add", (up, down), health={down.id: dc.HealthStatus.CRITICAL})
    assert snapshot.status(up.id) is dc.HealthStatus.PASSING  # not named in health: passing
    assert snapshot.status(down.id) is dc.HealthStatus.CRITICAL
    with pytest.raises(KeyError):
        snapshot.status("no-such-id")


def _naive_diff(after: dc.Snapshot, before: dc.Snapshot) -> tuple[set[str], set[str], set[str]]:
    """Added, removed and changed ids by definition: field by field, status by status."""
    was = {inst.id: inst for inst in before.instances}
    now = {inst.id: inst for inst in after.instances}
    changed = {i for i in now.keys() & was.keys() if now[i] != was[i] or after.status(i) != before.status(i)}
    return now.keys() - was.keys(), was.keys() - now.keys(), changed


statuses = st.sampled_from([None, *dc.HealthStatus])  # None: not named in health (passing)


@st.composite
def snapshot_pairs(draw: st.DrawFn) -> tuple[dc.Snapshot, dc.Snapshot]:
    """Two snapshots of overlapping ids whose instances are shared objects, equal
    rebuilt ones or changed ones, in any health (named or not)."""
    ids = draw(st.lists(st.sampled_from([f"i{n:02d}" for n in range(40)]), unique=True, max_size=40))
    before, after = [], []
    health_before: dict[str, dc.HealthStatus] = {}
    health_after: dict[str, dc.HealthStatus] = {}
    for inst_id in ids:
        inst = dc.ServiceInstance("add", "127.0.0.1", 1, id=inst_id)
        where = draw(st.sampled_from(["before", "after", "shared", "rebuilt", "changed"]))
        if where != "after":
            before.append(inst)
        if where in ("after", "shared"):
            after.append(inst)
        elif where in ("rebuilt", "changed"):
            after.append(dc.ServiceInstance("add", "127.0.0.1", 2 if where == "changed" else 1, id=inst_id))
        for health in (health_before, health_after):
            status = draw(statuses)
            if status is not None:
                health[inst_id] = status
    order = draw(st.permutations(range(len(after))))
    return (
        dc.Snapshot("add", tuple(before), health=health_before),
        dc.Snapshot("add", tuple(after[k] for k in order), health=health_after),
    )


@given(pair=snapshot_pairs())
def test_diff_and_same_content_agree_with_the_definition(pair: tuple[dc.Snapshot, dc.Snapshot]) -> None:
    before, after = pair
    diff = after.diff(before)
    added, removed, changed = _naive_diff(after, before)
    assert [i.id for i in diff.added] == sorted(added)
    assert [i.id for i in diff.removed] == sorted(removed)
    assert [i.id for i in diff.changed] == sorted(changed)
    same = after.instances == before.instances and all(
        after.status(i.id) == before.status(i.id) for i in after.instances
    )
    assert after.same_content(before) is same


def test_snapshots_sort_once_and_restamping_shares_what_they_hold() -> None:
    a, b = (dc.ServiceInstance("add", "127.0.0.1", 1, id=i) for i in "ab")
    snapshot = dc.Snapshot("add", (b, a), health={"b": dc.HealthStatus.WARNING, "a": dc.HealthStatus.PASSING})
    assert snapshot.instances == (a, b)
    again = dc.Snapshot("add", snapshot.instances, health=snapshot.health)
    assert again.instances is snapshot.instances  # sorted input is taken as it is
    restamped = snapshot._restamped(index=7, stale=True)
    assert (restamped.index, restamped.stale) == (7, True)
    assert restamped.instances is snapshot.instances
    assert restamped.same_content(snapshot)
    assert restamped == dataclasses.replace(snapshot, index=7, stale=True)
    assert restamped.status("b") is dc.HealthStatus.WARNING


def test_target_is_computed_once() -> None:
    inst = dc.ServiceInstance("add", "::1", 50051)
    assert inst.target is inst.target
