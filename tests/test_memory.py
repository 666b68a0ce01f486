"""The memory backend's own store: indexed by service, deadlines on one clock.

The contract suite covers what every backend shares; these cover what the memory
store's layout could get wrong: an id moving between services, many deadlines on
one clock, polls of one service while others change.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import discovery_core as dc

SETTLE = 5.0


def _until(watch: dc.Watch, predicate: Callable[[dc.Snapshot], bool], timeout: float = SETTLE) -> dc.Snapshot:
    deadline = time.monotonic() + timeout
    while True:
        current = watch.current
        if current is not None and predicate(current):
            return current
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no matching snapshot within {timeout} s; last: {current}")
        with contextlib.suppress(dc.WatchTimeout):
            watch.wait(timeout=remaining)


def _ids(snapshot: dc.Snapshot) -> set[str]:
    return {inst.id for inst in snapshot.instances}


def test_an_id_registered_again_under_another_service_moves_to_it() -> None:
    with (
        dc.connect("memory://") as backend,
        backend.watch("first", passing_only=False) as first,
        backend.watch("second", passing_only=False) as second,
    ):
        backend.register(dc.ServiceInstance("first", "127.0.0.1", 1, id="moving"), keepalive=False)
        _until(first, lambda s: _ids(s) == {"moving"})
        backend.register(dc.ServiceInstance("second", "127.0.0.1", 1, id="moving"), keepalive=False)
        _until(second, lambda s: _ids(s) == {"moving"})
        _until(first, lambda s: not s.instances)
        assert not backend.instances("first").instances


def test_many_ttl_deadlines_expire_and_reap_on_one_clock_while_heartbeats_move_theirs() -> None:
    """Half the instances are kept alive by their registrations' heartbeats (each
    moving its deadline later), half are left to expire and be reaped."""
    check = dc.TtlCheck(ttl=1.0, deregister_after=0.5, initial_status=dc.HealthStatus.PASSING)
    kept = [dc.ServiceInstance("ttl", "127.0.0.1", 1000 + n, check=check) for n in range(10)]
    left = [dc.ServiceInstance("ttl", "127.0.0.1", 2000 + n, check=check) for n in range(10)]
    with dc.connect("memory://") as backend, backend.watch("ttl", passing_only=False) as watch:
        registrations = [backend.register(inst) for inst in kept]
        for inst in left:
            backend.register(inst, keepalive=False)
        _until(watch, lambda s: len(s.instances) == 20)
        reaped = _until(watch, lambda s: _ids(s) == {inst.id for inst in kept}, timeout=1.5 + SETTLE)
        assert all(reaped.status(inst.id) is dc.HealthStatus.PASSING for inst in kept)
        for registration in registrations:
            registration.deregister()
        _until(watch, lambda s: not s.instances)


def test_a_poll_returns_with_its_own_service_while_others_change() -> None:
    with dc.connect("memory://") as backend:
        query = dc.Query.build("watched", passing_only=False)
        index = backend.poll(query, 0, dc.Stop()).index
        answer: list[dc.Snapshot] = []
        poller = threading.Thread(target=lambda: answer.append(backend.poll(query, index, dc.Stop())))
        poller.start()
        for n in range(50):
            backend.register(dc.ServiceInstance(f"other-{n}", "127.0.0.1", 1), keepalive=False)
        backend.register(dc.ServiceInstance("watched", "127.0.0.1", 1, id="mine"), keepalive=False)
        poller.join(SETTLE)
        assert not poller.is_alive()
        assert [_ids(snapshot) for snapshot in answer] == [{"mine"}]
        assert answer[0].index > index
