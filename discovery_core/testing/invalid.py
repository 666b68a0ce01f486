"""Hypothesis strategies for instances with exactly one bad field."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery_core import GrpcCheck, HttpCheck, ServiceInstance, TtlCheck

__all__ = ["bad_fields", "invalid_instances"]

Builder = Callable[[str], ServiceInstance]
F = TypeVar("F", bound=Callable[..., Any])

_not_str = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=4))
_bad_names = st.one_of(
    st.just(""),
    st.text(min_size=1, max_size=20).filter(
        lambda t: not t.replace("-", "").replace("_", "").replace(".", "").isalnum()
    ),
    st.text(alphabet="abc", min_size=129, max_size=140),
    st.sampled_from(["-leading", ".dot", "has space", "slash/name"]),
    _not_str,
)
_bad_addresses = st.one_of(
    st.sampled_from(["", "0.0.0.0", "::", "bad host", "-x.example", "a..b", "300.1.1.1", "x" * 254]),
    _not_str,
)
_bad_ports = st.one_of(
    st.integers(max_value=0), st.integers(min_value=65536), st.just(True), st.just("80"), st.floats()
)
_bad_tags = st.one_of(
    st.text(min_size=1, max_size=5),  # a bare string, not a tuple of them
    st.just(("",)),
    st.just(("two words",)),
    st.just(("dup", "dup")),
    st.tuples(st.integers()),
)
_bad_meta = st.one_of(
    st.just({"consul-reserved": "x"}),
    st.just({"bad key": "v"}),
    st.just({"": "v"}),
    st.dictionaries(st.just("k"), st.integers(), min_size=1),
    st.just({"k": "x" * 513}),
    st.just([("k", "v")]),
    st.dictionaries(st.text(alphabet="abcdefgh", min_size=1, max_size=8), st.just("v"), min_size=65, max_size=70),
)
_bad_weights = st.one_of(st.integers(max_value=0), st.integers(min_value=65536), st.just(True), st.just("1"))
_bad_seconds = st.one_of(
    st.floats(max_value=0), st.just(math.nan), st.just(math.inf), st.just("1s"), st.just(True), st.floats(min_value=1e7)
)
_bad_ids = st.one_of(st.sampled_from(["a b", "a/b", "a?b", "#x", "x" * 300]), _not_str)


def _with(**fields: Any) -> Builder:
    def build(service: str) -> ServiceInstance:
        kwargs: dict[str, Any] = {"name": service, "address": "127.0.0.1", "port": 5001}
        kwargs.update(fields)
        return ServiceInstance(**kwargs)

    return build


def _with_check(check: Callable[[], Any]) -> Builder:
    """Builds the check inside the builder, where its validation raises."""
    return lambda service: ServiceInstance(service, "127.0.0.1", 5001, check=check())


bad_fields: st.SearchStrategy[Builder] = st.one_of(
    _bad_names.map(lambda v: _with(name=v)),
    _bad_addresses.map(lambda v: _with(address=v)),
    _bad_ports.map(lambda v: _with(port=v)),
    _bad_ids.map(lambda v: _with(id=v)),
    _bad_tags.map(lambda v: _with(tags=v)),
    _bad_meta.map(lambda v: _with(meta=v)),
    _bad_weights.map(lambda v: _with(weight=v)),
    st.just(_with(check="grpc")),
    _bad_seconds.map(lambda v: _with_check(lambda: GrpcCheck(interval=cast(Any, v)))),
    _bad_seconds.map(lambda v: _with_check(lambda: GrpcCheck(timeout=cast(Any, v)))),
    _bad_seconds.map(lambda v: _with_check(lambda: TtlCheck(ttl=cast(Any, v)))),
    _bad_seconds.map(lambda v: _with_check(lambda: TtlCheck(deregister_after=cast(Any, v)))),
    st.sampled_from(["", "no-slash", "/a b"]).map(lambda v: _with_check(lambda: HttpCheck(path=cast(Any, v)))),
    _bad_ports.map(lambda v: _with_check(lambda: HttpCheck(port=cast(Any, v)))),
    st.sampled_from(["passing!", 3]).map(lambda v: _with_check(lambda: TtlCheck(initial_status=cast(Any, v)))),
)
"""Builders of a ServiceInstance for a given service name, each with one bad field."""


def invalid_instances(test: F) -> F:
    """Run ``test`` with a ``build`` argument drawn from ``bad_fields``."""
    # The contract is a mixin: each backend's subclass runs the same method (another
    # "executor"), and the backend fixture is only read, never changed, by an example.
    suppressed = [HealthCheck.function_scoped_fixture, HealthCheck.differing_executors]
    configured = settings(max_examples=60, deadline=None, suppress_health_check=suppressed)
    return cast(F, configured(given(build=bad_fields)(test)))
