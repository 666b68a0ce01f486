"""TCP proxies in front of a Consul agent, for tests and benchmarks (not used by the
backend itself): one that counts HTTP requests and bytes, what a client costs the
agent; and the base a test extends to break a connection on cue."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections import Counter
from types import TracebackType
from typing import Any, Self

__all__ = ["CountingProxy", "Proxy"]

_REQUEST_LINE = re.compile(rb"(GET|PUT|POST|DELETE) (/v1/[^ ?]*)\S* HTTP/1\.[01]")


class Proxy:
    """Forwards TCP connections to an agent, a thread each way; a subclass sees every
    chunk (``_forward``) with per-connection state (``_pair``)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="discovery-proxy-accept", daemon=True)]
        self._threads[0].start()

    def _pair(self) -> Any:
        """State shared by the two directions of one connection."""
        return None

    def _forward(self, data: bytes, sink: socket.socket, *, up: bool, pair: Any) -> bool:
        """Pass ``data`` on (``up``: client to agent); False ends this direction."""
        sink.sendall(data)
        return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream, timeout=10)
            upstream.settimeout(None)
            with self._lock:
                if self._closed:  # accepted as the proxy closed: nothing may outlive it
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            pair = self._pair()
            for source, sink, up in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(
                    target=self._pump, args=(source, sink, up, pair), name="discovery-proxy-pump", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, up: bool, pair: Any) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self._forward(data, sink, up=up, pair=pair):
                    return
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        # shutdown, not only close: a close does not wake the thread blocked in accept
        # (it would wait forever, its listener open).
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)


class _Lines:
    """What is left of a connection's request stream after its last full line."""

    def __init__(self) -> None:
        self.pending = b""


class CountingProxy(Proxy):
    """Counts each HTTP request by method and path, and the bytes each way: what a
    client costs the agent, seen from outside the client."""

    def __init__(self, upstream: str) -> None:
        self.requests: Counter[str] = Counter()
        self.bytes_up = 0  # client -> agent
        self.bytes_down = 0  # agent -> client
        super().__init__(upstream)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.requests)

    def _pair(self) -> _Lines:
        return _Lines()

    def _forward(self, data: bytes, sink: socket.socket, *, up: bool, pair: Any) -> bool:
        with self._lock:
            if up:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
        if up:
            *lines, pair.pending = (pair.pending + data).split(b"\r\n")
            for line in lines:
                if match := _REQUEST_LINE.fullmatch(line):
                    with self._lock:
                        self.requests[f"{match[1].decode()} {match[2].decode()}"] += 1
        return super()._forward(data, sink, up=up, pair=pair)
