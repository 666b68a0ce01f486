"""What the sync and aio channels share above the pool: the channel's connectivity,
when a call without a ready endpoint waits, the status it gets when none comes, and
a method's multicallable made once per endpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import grpc

from discovery_core.client.endpoint import Endpoint
from discovery_core.client.picker import Picker
from discovery_core.client.pool import Pool
from discovery_core.errors import ClosedError

__all__ = ["STATE_POLL", "EndpointMethod", "connectivity", "pauses", "unpicked", "usable", "waits"]

# Endpoint states are read, not pushed (C-core keeps them; no thread per endpoint
# watches them): whoever waits for a change looks again after a pause that doubles
# from 1 ms up to this.
STATE_POLL = 0.05

P = TypeVar("P", bound="Pool[Any]")


def connectivity(picker: Picker[Any]) -> grpc.ChannelConnectivity:
    """The channel's state as grpc would name it, from the current picker."""
    if picker.ready:
        return grpc.ChannelConnectivity.READY
    if picker.connecting or picker.resolving:
        return grpc.ChannelConnectivity.CONNECTING
    if picker.known or picker.error is not None:
        return grpc.ChannelConnectivity.TRANSIENT_FAILURE
    return grpc.ChannelConnectivity.IDLE


def pauses() -> Iterator[float]:
    """The pauses between two looks of a caller waiting for a usable picker."""
    pause = 0.001
    while True:
        yield pause
        pause = min(pause * 2, STATE_POLL)


def waits(picker: Picker[Any], wait_for_ready: bool | None) -> bool:
    """Whether a call without a ready endpoint waits (rather than failing fast), as
    grpc's calls wait for a first resolution and connection: with ``wait_for_ready``,
    until the watch's first snapshot (unless the watch fails), or while some
    endpoint's health is still unknown."""
    return bool(wait_for_ready) or picker.resolving or picker.connecting


def usable(wait_for_ready: bool | None) -> Callable[[Picker[Any]], bool]:
    """What a waiting call waits for: a ready endpoint, or a reason to stop waiting."""
    return lambda picker: bool(picker.ready) or not waits(picker, wait_for_ready)


def unpicked(
    pool: Pool[Any], picker: Picker[Any], wait_for_ready: bool | None, *, waited: bool
) -> tuple[grpc.StatusCode, str]:
    """The status of a call that found no endpoint (ClosedError if the channel is closed)."""
    if pool.closed:
        raise ClosedError("the discovery channel is closed", service=pool.service)
    if waited and waits(picker, wait_for_ready):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"{picker.why_none()} (deadline exceeded while waiting)"
    return grpc.StatusCode.UNAVAILABLE, picker.why_none()


class EndpointMethod(Generic[P]):
    """One RPC method of a discovery channel, sync or aio: it makes the method's
    multicallable once per endpoint, on that endpoint's own grpc channel."""

    __slots__ = ("_deserializer", "_kind", "_method", "_pool", "_serializer")

    def __init__(
        self,
        pool: P,
        kind: str,
        method: str,
        request_serializer: Callable[..., Any] | None,
        response_deserializer: Callable[..., Any] | None,
    ) -> None:
        self._pool = pool
        self._kind = kind
        self._method = method
        self._serializer = request_serializer
        self._deserializer = response_deserializer

    def _target(self, endpoint: Endpoint[Any]) -> Any:
        target = endpoint.calls.get(self)
        if target is None:
            factory = getattr(endpoint.channel, self._kind)
            target = endpoint.calls[self] = factory(
                self._method, self._serializer, self._deserializer, _registered_method=True
            )
        return target
