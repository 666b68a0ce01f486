"""The error a sync discovery channel raises itself when no instance takes a call.

Callers of a ``grpc.Channel`` catch ``grpc.RpcError`` and read ``code()``; a call
that finds no instance must look the same (UNAVAILABLE, or DEADLINE_EXCEEDED after
waiting), so this is a ``grpc.RpcError`` and a ``grpc.Call``, not a
``DiscoveryError``. The aio channel raises grpc's own ``AioRpcError`` instead.
Public as ``discovery_core.NoInstanceError``.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

__all__ = ["NoInstanceError"]


class NoInstanceError(grpc.RpcError, grpc.Call):
    """UNAVAILABLE raised by the channel itself: no instance to send the call to."""

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False
