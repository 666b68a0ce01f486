"""Retries: which failed calls run again, on another instance.

A call that never left the client (no connection to send it on) is retried whatever
the method; one that may have reached a server only under an opt-in
``RetryPolicy``, for idempotent methods. ``Attempts`` is one call's bookkeeping,
shared by the sync and aio channels, which only do the I/O.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from discovery_core.errors import InvalidConfig

__all__ = ["Attempts", "RetryPolicy", "never_sent"]

# Details grpc core gives an RPC that never left the client (no connection to send it on).
_NEVER_SENT = ("failed to connect", "connections to all backends failing", "connection refused", "dns resolution")
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_MAX_TRANSPARENT = 5  # attempts for calls that never reached a server
# A full method name as grpc sends it: /package.Service/Method (a proto without a
# package gives /Service/Method).
_METHOD = re.compile(r"/(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*/[A-Za-z_]\w*\Z")


@dataclass(frozen=True)
class RetryPolicy:
    """Opt-in retries of calls that may have reached a server, so for idempotent
    methods only. ``methods``: full names (``/pkg.Service/Method``) it applies to, or
    None for every unary-unary method of the channel. Each retry prefers an instance
    not tried yet and stays within the call's deadline.

    Calls that failed with UNAVAILABLE before reaching any server are retried on
    another instance whatever this policy says.
    """

    methods: frozenset[str] | None = None
    max_attempts: int = 3
    codes: frozenset[grpc.StatusCode] = field(default_factory=lambda: frozenset({_UNAVAILABLE}))

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise InvalidConfig("retry.max_attempts", self.max_attempts, "must be an int >= 1")
        if self.methods is not None:
            object.__setattr__(self, "methods", _method_names(self.methods))
        object.__setattr__(self, "codes", frozenset(self.codes))

    def applies(self, method: str) -> bool:
        return self.methods is None or method in self.methods


def _method_names(methods: Iterable[str]) -> frozenset[str]:
    """The names, each shaped ``/package.Service/Method``; a str (a set of characters
    once iterated) or a bare method name would silently never match."""
    if isinstance(methods, str | bytes) or not isinstance(methods, Iterable):
        raise InvalidConfig("retry.methods", methods, "must be a collection of names such as {'/pkg.Service/Method'}")
    names = frozenset(methods)
    for name in names:
        if not isinstance(name, str) or not _METHOD.match(name):
            raise InvalidConfig("retry.methods", name, "is not a full method name such as '/pkg.Service/Method'")
    return names


def never_sent(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a failed call never reached a server (so any method may be retried)."""
    text = (details or "").lower()
    return code is _UNAVAILABLE and any(marker in text for marker in _NEVER_SENT)


class Attempts:
    """The retry bookkeeping of one call, shared by the sync and asyncio paths."""

    __slots__ = ("count", "deadline", "policy", "tried")

    def __init__(self, timeout: float | None, policy: RetryPolicy | None, started: float | None = None) -> None:
        self.deadline = None if timeout is None else (started or time.monotonic()) + timeout
        self.policy = policy
        self.tried: list[Any] = []
        self.count = 0

    def left(self) -> float | None:
        """The timeout of the next attempt: what remains of the call's deadline."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def again(self, endpoint: object, code: grpc.StatusCode, details: str | None) -> bool:
        """Record a failed attempt; True if another one is allowed."""
        self.count += 1
        self.tried.append(endpoint)
        if self.expired():
            return False
        if never_sent(code, details):
            return self.count < _MAX_TRANSPARENT
        policy = self.policy
        return policy is not None and code in policy.codes and self.count < policy.max_attempts
