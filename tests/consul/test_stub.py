"""What a real agent cannot be made to do on demand, against a local HTTP stub:
an index that goes backwards, a wakeup with an unchanged index, and status codes."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from discovery_consul.devagent import free_port

import discovery_core as dc

Until = Callable[[Callable[[], bool], float, str], None]
Answer = tuple[int, int | None, object]  # status, X-Consul-Index (None: no header), body


def _entry(service: str, port: int) -> dict[str, Any]:
    return {
        "Node": {"Node": "n1", "Address": "10.0.0.1"},
        "Service": {"ID": f"{service}-{port}", "Service": service, "Port": port, "Address": "", "Tags": None},
        "Checks": [{"Status": "passing"}],
    }


class Stub(http.server.ThreadingHTTPServer):
    """Answers requests with the scripted answers in order, then holds each further
    request like a blocking query that sees no change, until closed."""

    daemon_threads = True

    def __init__(self, answers: list[Answer]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers = answers
        self.requests: list[dict[str, str]] = []
        self.tokens: list[str | None] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def next_answer(self, path: str, token: str | None = None) -> Answer | None:
        with self.lock:
            self.tokens.append(token)
            self.requests.append(
                {
                    "path": urllib.parse.urlsplit(path).path,
                    **dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query, keep_blank_values=True)),
                }
            )
            return self.answers.pop(0) if self.answers else None

    def close(self) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()
        self.thread.join()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Stub

    def _answer(self) -> None:
        answer = self.server.next_answer(self.path, self.headers.get("X-Consul-Token"))
        if answer is None:
            self.server.closing.wait(30)
            return
        status, index, body = answer
        payload = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        if index is not None:
            self.send_header("X-Consul-Index", str(index))
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def stub_factory() -> Iterator[Callable[[list[Answer]], Stub]]:
    stubs: list[Stub] = []

    def make(answers: list[Answer]) -> Stub:
        stubs.append(Stub(answers))
        return stubs[-1]

    yield make
    for stub in stubs:
        stub.close()


def _indexes(stub: Stub) -> list[str | None]:
    with stub.lock:
        return [request.get("index") for request in stub.requests]


def test_index_going_backwards_resets_to_zero_and_never_below_one(
    stub_factory: Callable[[list[Answer]], Stub], until: Until
) -> None:
    a, b = _entry("svc", 1), _entry("svc", 2)
    stub = stub_factory([(200, 10, [a]), (200, 5, [a, b]), (200, 0, [a, b]), (200, 3, [a])])
    seen: list[dc.Snapshot] = []
    with dc.connect(f"consul://{stub.address}?wait=30s") as backend, backend.watch("svc") as watch:
        watch.subscribe(seen.append)
        until(lambda: len(_indexes(stub)) == 5, 10, "five requests")
    # 10, then 5 went backwards: read at once (no index); 0 is never sent: 1 instead.
    assert _indexes(stub) == [None, "10", None, "1", "3"]
    assert [len(s.instances) for s in seen] == [1, 2, 1]
    assert all(request["wait"] == "30s" for request in stub.requests if "index" in request)
    assert all(request["passing"] == "1" for request in stub.requests)


def test_wakeup_with_an_unchanged_index_delivers_nothing(
    stub_factory: Callable[[list[Answer]], Stub], until: Until
) -> None:
    a = _entry("svc", 1)
    stub = stub_factory([(200, 7, [a]), (200, 7, [a]), (200, 7, [a])])
    seen: list[dc.Snapshot] = []
    with dc.connect(f"consul://{stub.address}") as backend, backend.watch("svc") as watch:
        watch.subscribe(seen.append)
        until(lambda: len(_indexes(stub)) == 4, 10, "four requests")
        assert _indexes(stub) == [None, "7", "7", "7"]
        assert len(seen) == 1
        assert seen[0].instances[0].address == "10.0.0.1"  # the node's address when the service has none


def test_filters_dc_and_stale_reach_consul(stub_factory: Callable[[list[Answer]], Stub]) -> None:
    stub = stub_factory([(200, 3, [])])
    with dc.connect(f"consul://{stub.address}?dc=east&stale=true") as backend:
        backend.instances("svc", passing_only=False, tags=("v1",), meta={"zone": 'a"b'})
    (request,) = stub.requests
    assert request["path"] == "/v1/health/service/svc"
    assert request["dc"] == "east"
    assert request["stale"] == ""
    assert "passing" not in request
    assert request["filter"] == '"v1" in Service.Tags and Service.Meta["zone"] == "a\\u0022b"'


@pytest.mark.parametrize(
    ("status", "body", "error", "text"),
    [
        (400, "Invalid check: Interval and TTL cannot both be specified", dc.DiscoveryError, "Invalid check"),
        (403, "Permission denied", dc.PermissionDenied, "Permission denied"),
        (500, "No cluster leader", dc.BackendUnavailable, "No cluster leader"),
        (500, "No path to datacenter", dc.DiscoveryError, "No path to datacenter"),
    ],
)
def test_consul_status_codes_become_typed_errors(
    stub_factory: Callable[[list[Answer]], Stub], status: int, body: str, error: type[dc.DiscoveryError], text: str
) -> None:
    stub = stub_factory([(status, 1, body)])
    with dc.connect(f"consul://{stub.address}") as backend, pytest.raises(error) as raised:
        backend.register(dc.ServiceInstance("svc", "127.0.0.1", 1))
    assert text in str(raised.value)
    assert stub.address in str(raised.value)
    if error is dc.DiscoveryError:
        assert type(raised.value) is dc.DiscoveryError


def _watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("discovery-watch:")]


def test_closing_a_watch_returns_at_once_and_its_query_ends_with_the_backend(
    stub_factory: Callable[[list[Answer]], Stub], until: Until
) -> None:
    # Consul 1.8 keeps serving a blocking query whose socket closed, and counts its
    # connection, until the wait runs out: so closing a watch does not cut its query
    # (the poll finishes in the background, inside the budget); closing the backend does.
    stub = stub_factory([(200, 5, [_entry("svc", 1)])])
    with dc.connect(f"consul://{stub.address}?wait=10m") as backend:  # closed again on a failure
        watch = backend.watch("svc")
        watch.wait(timeout=5)
        until(lambda: len(_indexes(stub)) == 2, 5, "the blocking query")  # held by the stub
        started = time.monotonic()
        watch.close()
        assert time.monotonic() - started < 0.5
        assert len(_watch_threads()) == 1  # still reading the held query
        started = time.monotonic()
        backend.close()
        until(lambda: not _watch_threads(), 1.0, "the watch thread to end")
        assert time.monotonic() - started < 1.0


def test_the_watch_sends_the_token(stub_factory: Callable[[list[Answer]], Stub], until: Until) -> None:
    stub = stub_factory([(200, 5, [_entry("svc", 1)])])
    with dc.connect("consul", address=stub.address, token="s3cret-token") as backend, backend.watch("svc") as watch:
        watch.wait(timeout=5)
        until(lambda: len(_indexes(stub)) == 2, 5, "the blocking query")
    assert stub.tokens[:2] == ["s3cret-token", "s3cret-token"]


@pytest.mark.parametrize(
    ("status", "index", "body", "error", "text"),
    [
        (403, 1, "Permission denied: token s3cret-token", dc.PermissionDenied, "Permission denied"),
        (401, 1, "ACL support disabled", dc.PermissionDenied, "refused the request (401)"),
        (404, 1, "no such thing", dc.DiscoveryError, "no such thing"),
        (500, 1, "No cluster leader", dc.BackendUnavailable, "No cluster leader"),
        (502, 1, "Bad gateway", dc.BackendUnavailable, "502"),
        (500, 1, "No path to datacenter", dc.DiscoveryError, "No path to datacenter"),
        (200, 1, "not json", dc.DiscoveryError, "Failed to decode JSON"),
        (200, None, [], dc.DiscoveryError, "Missing index header"),
        (200, 1, {"not": "a list"}, dc.DiscoveryError, "non-list"),
        (200, "x", [], dc.DiscoveryError, "bad index"),
    ],
)
def test_the_watch_query_maps_answers_to_typed_errors(
    stub_factory: Callable[[list[Answer]], Stub],
    status: int,
    index: int | None,
    body: object,
    error: type[dc.DiscoveryError],
    text: str,
) -> None:
    stub = stub_factory([(status, index, body)])
    with dc.connect("consul", address=stub.address, token="s3cret-token") as backend, pytest.raises(error) as raised:
        backend.instances("svc")
    message = str(raised.value)
    assert text in message
    assert stub.address in message
    assert "s3cret-token" not in message
    if error is dc.DiscoveryError:
        assert type(raised.value) is dc.DiscoveryError


def test_an_unreachable_agent_is_backend_unavailable_on_the_watch_query() -> None:
    address = f"127.0.0.1:{free_port()}"
    backend = dc.connect("consul", address=address, token="s3cret-token")
    with backend, pytest.raises(dc.BackendUnavailable) as raised:
        backend.instances("svc")
    assert f"Consul at http://{address} is unreachable: connection refused" in str(raised.value)
    assert "s3cret-token" not in str(raised.value)


def test_an_agent_that_never_answers_times_out_on_the_watch_query(
    stub_factory: Callable[[list[Answer]], Stub],
) -> None:
    stub = stub_factory([])  # holds every request
    with dc.connect("consul", address=stub.address, timeout=0.3) as backend:
        started = time.monotonic()
        with pytest.raises(dc.BackendUnavailable) as raised:
            backend.instances("svc")
    assert time.monotonic() - started < 5
    assert "did not answer in time" in str(raised.value)
