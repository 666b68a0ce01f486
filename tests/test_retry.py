"""RetryPolicy: which methods it names, checked when it is built."""

from __future__ import annotations

import pytest

import discovery_core as dc


@pytest.mark.parametrize(
    "methods",
    [
        "/pkg.S/M",  # a str is a set of characters
        ("Add",),
        ("/addservice.Adder",),
        ("addservice.Adder/Add",),
        ("/addservice.Adder/Add/",),
        ("/addservice.Adder/",),
        ("/addservice.Adder/Add", 3),
    ],
)
def test_methods_must_be_full_method_names(methods: object) -> None:
    with pytest.raises(dc.InvalidConfig) as raised:
        dc.RetryPolicy(methods=methods)  # type: ignore[arg-type]
    assert raised.value.option == "retry.methods"


def test_full_method_names_are_kept() -> None:
    names = {"/addservice.Adder/Add", "/a.b.c.Svc/Do_It2", "/Bare/Method"}
    policy = dc.RetryPolicy(methods=frozenset(names))
    assert policy.methods == frozenset(names)
    assert policy.applies("/addservice.Adder/Add")
    assert not policy.applies("/addservice.Adder/Sub")
