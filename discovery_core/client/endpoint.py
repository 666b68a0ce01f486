"""One endpoint: an instance's own grpc channel and its state (grpc-go's SubConn).

The pool keeps an endpoint by instance id while the instance stays in the set, so an
update that leaves the instance alone reconnects nothing. Its state (connecting,
ready, down) is what health following sets and what pickers are built from; its
in-flight count is what ``least_request`` compares and what lets a retired endpoint
close only after its last call.
"""

from __future__ import annotations

import threading
from typing import Any, Generic, TypeVar

from discovery_core.model import ServiceInstance

__all__ = ["CONNECTING", "DOWN", "READY", "C", "Endpoint"]

C = TypeVar("C")  # an endpoint's channel: grpc.Channel (sync) or grpc.aio.Channel

CONNECTING, READY, DOWN = "connecting", "ready", "down"


class Endpoint(Generic[C]):
    """One instance's own grpc channel, kept while the instance stays in the set."""

    __slots__ = ("_lock", "calls", "channel", "closed", "inflight", "instance", "monitor", "retired", "state")

    def __init__(self, instance: ServiceInstance, channel: C, state: str) -> None:
        self.instance = instance
        self.channel = channel
        self.state = state
        self.inflight = 0
        self.retired = False  # out of the set: closed once its last call ends
        self.closed = False  # its channel is closed (or closing): no new call may start
        # Underlying multicallables, keyed by this channel's multicallable object.
        self.calls: dict[object, Any] = {}
        self.monitor: Any = None  # the health Watch call or task, to cancel
        self._lock = threading.Lock()

    def begin(self) -> bool:
        """Count a call started; False if the channel is closed (a picker read just
        before the endpoint left): pick again."""
        with self._lock:
            if self.closed:
                return False
            self.inflight += 1
            return True

    def end(self) -> bool:
        """Count a call done; True when a retired endpoint just became idle (close it)."""
        with self._lock:
            self.inflight -= 1
            self.closed = self.retired and self.inflight == 0
            return self.closed

    def retire(self, *, now: bool = False) -> bool:
        """Leave the set; True when it is to be closed now (idle, or ``now``), else its
        last call closes it."""
        with self._lock:
            self.retired = True
            self.closed = now or self.inflight == 0
            return self.closed

    def __repr__(self) -> str:
        return f"<endpoint {self.instance.id} {self.state} inflight={self.inflight}>"
