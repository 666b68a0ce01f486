"""A TCP proxy in front of a Consul agent that counts HTTP requests and bytes, for
tests and benchmarks that measure what a client costs the agent (not used by the
backend itself)."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections import Counter
from types import TracebackType
from typing import Self

__all__ = ["CountingProxy"]

_REQUEST_LINE = re.compile(rb"(GET|PUT|POST|DELETE) (/v1/[^ ?]*)\S* HTTP/1\.[01]")


class CountingProxy:
    """Forwards TCP to an agent and counts each HTTP request by method and path, and
    the bytes each way: what a client costs the agent, seen from outside the client."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.requests: Counter[str] = Counter()
        self.bytes_up = 0  # client -> agent
        self.bytes_down = 0  # agent -> client
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.requests)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream, timeout=10)
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink, count in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(target=self._pump, args=(source, sink, count), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        pending = b""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                with self._lock:
                    if count:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                if count:
                    *lines, pending = (pending + data).split(b"\r\n")
                    for line in lines:
                        if match := _REQUEST_LINE.fullmatch(line):
                            with self._lock:
                                self.requests[f"{match[1].decode()} {match[2].decode()}"] += 1
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)
