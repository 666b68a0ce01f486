"""Subsetting: validation, stability across changes, determinism, and the ring's diffs."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

import discovery_core as dc
from discovery_core.client.subset import DEFAULT_SUBSET_SIZE, Position, Ring, check_subset_size, subset


def instances(count: int, start: int = 0) -> list[dc.ServiceInstance]:
    return [dc.ServiceInstance("svc", "10.0.0.1", 1000 + i, id=f"svc-{i}") for i in range(start, start + count)]


def ids(chosen: tuple[dc.ServiceInstance, ...]) -> set[str]:
    return {inst.id for inst in chosen}


positions = st.one_of(st.binary(max_size=16).map(Position.of_seed), st.integers(0, 10_000).map(Position.of_index))


@given(
    size=st.one_of(
        st.integers(max_value=0), st.booleans(), st.floats(), st.text(max_size=3), st.lists(st.integers(), max_size=2)
    )
)
def test_a_bad_subset_size_raises_invalid_config_naming_it(size: object) -> None:
    with pytest.raises(dc.InvalidConfig) as raised:
        check_subset_size(size)
    assert raised.value.option == "subset_size"
    assert f"subset_size={size!r}"[:40] in str(raised.value)
    with pytest.raises(dc.InvalidConfig, match="subset_size"):
        subset(instances(3), size, Position.of_index(0))  # type: ignore[arg-type]


@given(size=st.one_of(st.none(), st.integers(min_value=1)))
def test_a_good_subset_size_is_kept(size: int | None) -> None:
    assert check_subset_size(size) == size


@given(index=st.one_of(st.integers(max_value=-1), st.integers(min_value=2**64), st.booleans(), st.floats()))
def test_a_bad_client_index_raises_invalid_config_naming_it(index: object) -> None:
    with pytest.raises(dc.InvalidConfig, match="client_index") as raised:
        Position.of_index(index)
    assert raised.value.option == "client_index"


def test_the_first_clients_of_a_fleet_stand_evenly_apart() -> None:
    quarter = 2**62
    assert [Position.of_index(i).point for i in range(4)] == [0, 2 * quarter, quarter, 3 * quarter]


def test_none_or_a_size_not_below_the_count_keeps_every_instance() -> None:
    every = instances(10)
    at = Position.of_seed("client-a")
    assert ids(subset(every, None, at)) == ids(tuple(every))
    assert ids(subset(every, 10, at)) == ids(tuple(every))
    assert ids(subset(every, 50, at)) == ids(tuple(every))
    assert subset([], DEFAULT_SUBSET_SIZE, at) == ()


@given(count=st.integers(1, 60), size=st.integers(1, 70), at=positions)
def test_a_subset_holds_size_distinct_instances(count: int, size: int, at: Position) -> None:
    chosen = subset(instances(count), size, at)
    assert len(ids(chosen)) == len(chosen) == min(size, count)


@given(count=st.integers(1, 40), size=st.integers(1, 40), at=positions, order=st.randoms())
def test_a_client_chooses_the_same_subset_whatever_order_the_instances_come_in(
    count: int, size: int, at: Position, order: random.Random
) -> None:
    every = instances(count)
    shuffled = every[:]
    order.shuffle(shuffled)
    assert subset(every, size, at) == subset(shuffled, size, at)


def test_different_clients_choose_different_subsets() -> None:
    every = instances(1000)
    by_index = [ids(subset(every, 100, Position.of_index(i))) for i in range(4)]
    by_seed = [ids(subset(every, 100, Position.of_seed(f"host-{i}"))) for i in range(4)]
    for chosen in (by_index, by_seed):
        assert len({frozenset(s) for s in chosen}) == 4
    # The first two clients of a fleet stand half the ring apart: nothing in common.
    assert not by_index[0] & by_index[1]


@given(count=st.integers(2, 40), size=st.integers(1, 39), at=positions, data=st.data())
def test_a_member_leaving_is_replaced_by_exactly_one_instance(
    count: int, size: int, at: Position, data: st.DataObject
) -> None:
    every = instances(count)
    before = ids(subset(every, size, at))
    leaving = data.draw(st.sampled_from(sorted(before)))
    after = ids(subset([inst for inst in every if inst.id != leaving], size, at))
    assert before - after == {leaving}
    assert len(after - before) == (1 if size < count else 0)


@given(count=st.integers(2, 40), size=st.integers(1, 39), at=positions, data=st.data())
def test_an_instance_outside_the_subset_leaving_changes_nothing(
    count: int, size: int, at: Position, data: st.DataObject
) -> None:
    every = instances(count)
    before = ids(subset(every, size, at))
    outside = sorted(ids(tuple(every)) - before)
    if not outside:
        return
    leaving = data.draw(st.sampled_from(outside))
    assert ids(subset([inst for inst in every if inst.id != leaving], size, at)) == before


@given(count=st.integers(1, 40), size=st.integers(1, 40), at=positions, joiner=st.integers(40, 10_000))
def test_an_instance_joining_displaces_at_most_one_member(count: int, size: int, at: Position, joiner: int) -> None:
    every = instances(count)
    before = ids(subset(every, size, at))
    after = ids(subset([*every, *instances(1, start=joiner)], size, at))
    displaced = before - after
    assert len(displaced) <= 1
    if displaced or count < size:  # whoever left made room for the newcomer, and only for it
        assert after - before == {f"svc-{joiner}"}
    else:
        assert after == before


@given(
    first=st.sets(st.integers(0, 60), max_size=40),
    second=st.sets(st.integers(0, 60), max_size=40),
    moved=st.sets(st.integers(0, 60)),
    size=st.one_of(st.none(), st.integers(1, 50)),
    at=positions,
)
def test_a_ring_following_diffs_chooses_as_one_built_afresh(
    first: set[int], second: set[int], moved: set[int], size: int | None, at: Position
) -> None:
    def build(numbers: set[int], port: int) -> tuple[dc.ServiceInstance, ...]:
        return tuple(dc.ServiceInstance("svc", "10.0.0.1", port if n in moved else 1, id=f"svc-{n}") for n in numbers)

    before, after = dc.Snapshot("svc", build(first, 1)), dc.Snapshot("svc", build(second, 2))
    ring = Ring(before.instances)
    ring.apply(after.diff(before))
    assert len(ring) == len(second)
    assert ring.subset(size, at) == subset(after.instances, size, at)  # the changed ports too


def test_removing_an_unknown_id_is_not_an_error() -> None:
    ring = Ring(instances(3))
    ring.remove("svc-99")
    assert len(ring) == 3


def test_random_positions_are_fresh_and_on_the_ring() -> None:
    drawn = [Position.random().point for _ in range(8)]
    assert len(set(drawn)) == 8
    assert all(0 <= point < 2**64 for point in drawn)
