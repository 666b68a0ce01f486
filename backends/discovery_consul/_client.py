"""The thin adapter between the backend and py-consul: nothing of py-consul or
requests crosses it, neither types nor exceptions.

py-consul gives us its HTTP client (a requests session with TLS settings, and an
HTTP timeout that grows with a blocking query's ``wait`` and its jitter) and the
mapping of Consul's status codes to exceptions. We build every request ourselves:
its API methods send snake_case check definitions that Consul 1.8 rejects, read
``CONSUL_HTTP_TOKEN`` over an explicit token, and cannot ask for stale reads.

The watch's blocking query (``health``, the hot path) skips py-consul, requests and
urllib3's pool: it runs on keep-alive connections of urllib3's connection classes
(so TLS is set up as for every other call: CA file, else requests' CA bundle, client
certificate, verify), with the same timeout (``timeout`` plus the wait and its
jitter, wait/16) and token header, and reads each answer as http.client does. Why:
py-consul has no wakeable call to offer, and the layers above http.client (requests'
request preparation, session, adapter and Response; py-consul's callback; urllib3's
pool and HTTPResponse) cost about half a millisecond on every answer, which was
most of the time from a change to a subscriber holding it. Any answer but a 200
with an index and a JSON body still goes through py-consul's callback, so status
codes map to the same errors as on every other call.

A blocking query can be woken: while one runs, its socket is known to the ``Stop``
of the watch that asked, and setting that ``Stop`` shuts the socket down.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn, TypeVar

import consul
import consul.base
import consul.callback
import consul.exceptions
import consul.std
import requests
import requests.adapters
import requests.utils
import urllib3.connection
import urllib3.exceptions

from discovery_core import BackendUnavailable, DiscoveryError, PermissionDenied, Stop

__all__ = ["ConsulClient", "HealthResult", "Settings"]

_T = TypeVar("_T")

_UNAVAILABLE = re.compile(r"^50[234]\b|No cluster leader|No known Consul servers|rpc error|connection refused", re.I)


_STALE_KEEPALIVE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def _shutdown(sock: socket.socket) -> None:
    # socket.socket.shutdown, not SSLSocket.shutdown: the reading thread keeps its
    # SSL object and simply sees the connection end.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Answer(NamedTuple):
    status: int
    headers: http.client.HTTPMessage
    body: bytes


class _HTTPConnection(urllib3.connection.HTTPConnection):
    """urllib3's connection, asked a GET whose answer is read as http.client reads
    it (urllib3's HTTPResponse costs about 80 us per answer), and cut short by
    shutting the socket down when any of ``stops`` is set."""

    def ask(self, url: str, headers: Mapping[str, str], timeout: float, stops: tuple[Stop, ...]) -> _Answer:
        self.timeout = timeout  # connect, send and read
        self.request("GET", url, headers=headers)
        sock = self.sock
        if sock is None:  # cannot be after a request; typing says it could
            raise http.client.NotConnected()
        # Registered once the socket exists: a stop set before runs at once, so a
        # query that connected after its client closed is cut too.
        removers = [stop.on_set(lambda: _shutdown(sock)) for stop in stops]
        try:
            self._response_options = None  # urllib3's getresponse is not used
            sock.settimeout(timeout)
            response = http.client.HTTPConnection.getresponse(self)
            return _Answer(response.status, response.msg, response.read())
        finally:
            for remove in removers:
                remove()


class _HTTPSConnection(_HTTPConnection, urllib3.connection.HTTPSConnection):
    pass


class _Connections:
    """Keep-alive connections for blocking queries, at most ``limit`` open at once
    (idle or in use): what they need of urllib3's pool (take the latest idle one,
    reconnecting if the agent closed it; give it back), plus the bound that keeps a
    process inside its share of the agent's per-client connection limit."""

    def __init__(self, settings: Settings, limit: int) -> None:
        self._settings = settings
        self._slots = threading.BoundedSemaphore(limit)
        self._idle: list[_HTTPConnection] = []
        self._lock = threading.Lock()
        #: Set on close: cuts every query in flight, and any that connects afterwards.
        self.closing = Stop()

    def take(self) -> _HTTPConnection:
        """A connection, waiting up to the request timeout for one to be free."""
        if not self._slots.acquire(timeout=self._settings.timeout):
            raise TimeoutError("every connection of the budget stayed busy")
        with self._lock:
            if self.closing.is_set():
                self._slots.release()
                raise ConnectionAbortedError("the client is closed")
            conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._new()
        if not conn.is_connected:  # the agent closed it (a restart, an idle timeout)
            conn.close()  # the next request connects again
        return conn

    def give(self, conn: _HTTPConnection, *, reuse: bool = True) -> None:
        with self._lock:
            keep = reuse and not self.closing.is_set()
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()
        self._slots.release()

    def close(self) -> None:
        """Close idle connections and cut those in use short (their readers see the
        connection end; the agent ends the query when its wait runs out)."""
        with self._lock:  # no connection goes idle after this
            self.closing.set()
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _new(self) -> _HTTPConnection:
        """A connection with the TLS settings requests gives its own: the CA file, else
        requests' CA bundle; the client certificate; verify. No proxy, as for the
        session (``trust_env=False``)."""
        settings = self._settings
        if settings.scheme != "https":
            return _HTTPConnection(settings.host, settings.port, timeout=settings.timeout)
        return _HTTPSConnection(
            settings.host,
            settings.port,
            timeout=settings.timeout,
            cert_reqs="CERT_REQUIRED" if settings.verify else "CERT_NONE",
            ca_certs=(settings.ca_file or requests.utils.DEFAULT_CA_BUNDLE_PATH) if settings.verify else None,
            cert_file=settings.cert_file,
            key_file=settings.key_file if settings.cert_file else None,
        )


@dataclass(frozen=True)
class Settings:
    """Resolved connection settings; ``token`` is kept out of the repr."""

    host: str
    port: int
    scheme: str
    token: str | None
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    verify: bool
    timeout: float

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __repr__(self) -> str:
        return f"Settings({self.base_url}, token={'set' if self.token else 'none'})"


@dataclass(frozen=True)
class HealthResult:
    """A list answer and its ``X-Consul-Index``."""

    index: int
    entries: list[dict[str, Any]]


class ConsulClient:
    """The few Consul calls the backend makes, with errors translated.

    Connections are budgeted: ``control`` keep-alive connections (requests' pool,
    callers wait for a free one) serve writes and one-shot reads, so watches can never
    starve a registration; ``queries`` connections serve list reads and blocking
    queries. Nothing opens more than ``control + queries`` sockets to the agent.
    """

    def __init__(self, settings: Settings, *, control: int, queries: int) -> None:
        self._settings = settings
        verify: bool | str = settings.verify and (settings.ca_file or True)
        cert = (
            (settings.cert_file, settings.key_file) if settings.cert_file and settings.key_file else settings.cert_file
        )
        self._consul = consul.Consul(
            host=settings.host,
            port=settings.port,
            scheme=settings.scheme,
            verify=verify,
            cert=cert,
            connections_timeout=settings.timeout,
        )
        self._consul.token = None  # py-consul reads CONSUL_HTTP_TOKEN over ours; we send our own header
        self._http = self._consul.http
        session: requests.Session = self._http.session
        session.trust_env = False  # no proxy between us and the local agent
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=control, pool_block=True)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._session = session
        self._headers = {"X-Consul-Token": settings.token} if settings.token else {}
        self._connections = _Connections(settings, queries)
        self._timeouts: dict[str, float] = {}

    def close(self) -> None:
        self._session.close()
        self._connections.close()

    def __repr__(self) -> str:
        return f"<ConsulClient {self._settings.base_url}>"

    # -- calls ------------------------------------------------------------------------

    def register(self, payload: Mapping[str, Any]) -> None:
        self._call(
            lambda: self._http.put(
                consul.callback.CB.boolean(),
                "/v1/agent/service/register",
                params=[("replace-existing-checks", "true")],
                headers=self._headers,
                data=json.dumps(payload),
            )
        )

    def deregister(self, service_id: str) -> None:
        self._call(
            lambda: self._http.put(
                consul.callback.CB.boolean(), f"/v1/agent/service/deregister/{service_id}", headers=self._headers
            )
        )

    def pass_ttl(self, check_id: str) -> None:
        self._call(
            lambda: self._http.put(
                consul.callback.CB.boolean(), f"/v1/agent/check/pass/{check_id}", headers=self._headers
            )
        )

    def agent_service(self, service_id: str) -> dict[str, Any] | None:
        """The local agent's service of this id, None if it holds none (a 404)."""
        found = self._call(
            lambda: self._http.get(consul.callback.CB.json(), f"/v1/agent/service/{service_id}", headers=self._headers)
        )
        if found is not None and not isinstance(found, dict):
            raise DiscoveryError(f"Consul at {self._settings.base_url} answered a non-object for {service_id!r}")
        return found

    # -- what a keepalive sweep reads (one of each, plus a catalog read per service) ---

    def agent_services(self) -> dict[str, Any]:
        """GET /v1/agent/services: every service the local agent holds, by id."""
        return self._json_object("/v1/agent/services", [])

    def agent_node(self) -> tuple[str, str]:
        """The local agent's node name and node id (GET /v1/agent/self)."""
        config = self._json_object("/v1/agent/self", []).get("Config") or {}
        return str(config.get("NodeName", "")), str(config.get("NodeID", ""))

    def catalog_service(self, service: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """GET /v1/catalog/service/<service>: its instances as the servers know them."""
        entries = self._call(
            lambda: self._http.get(
                consul.callback.CB.json(allow_404=False),
                f"/v1/catalog/service/{service}",
                params=params,
                headers=self._headers,
            )
        )
        if not isinstance(entries, list):
            raise DiscoveryError(f"Consul at {self._settings.base_url} answered a non-list for {service!r}")
        return entries

    def _json_object(self, path: str, params: list[tuple[str, str]]) -> dict[str, Any]:
        found = self._call(
            lambda: self._http.get(consul.callback.CB.json(allow_404=False), path, params=params, headers=self._headers)
        )
        if not isinstance(found, dict):
            raise DiscoveryError(f"Consul at {self._settings.base_url} answered a non-object for {path}")
        return found

    def health(self, service: str, params: list[tuple[str, str]], *, stop: Stop | None = None) -> HealthResult:
        """GET /v1/health/service/<service> on a query connection; a blocking query
        when ``params`` holds an index and a wait. Setting ``stop`` ends it at once."""
        return self.get_list(f"/v1/health/service/{urllib.parse.quote(service, safe='/:')}", params, stop=stop)

    def read_health(self, service: str, params: list[tuple[str, str]]) -> HealthResult:
        """A one-shot (non-blocking) read of /v1/health/service/<service> on a control
        connection, so it never waits behind blocking queries."""
        path = f"/v1/health/service/{urllib.parse.quote(service, safe='/:')}"
        index, entries = self._call(
            lambda: self._http.get(
                consul.callback.CB.json(index=True, allow_404=False), path, params=params, headers=self._headers
            )
        )
        return self._result(path, index, entries)

    def get_list(self, path: str, params: list[tuple[str, str]], *, stop: Stop | None = None) -> HealthResult:
        """GET a list endpoint on a query connection (a blocking query when ``params``
        holds an index and a wait); setting ``stop`` ends it at once."""
        return self._result(path, *self._query(path, params, stop))

    def get_object(
        self, path: str, params: list[tuple[str, str]], *, stop: Stop | None = None
    ) -> tuple[int, dict[str, Any]]:
        """``get_list`` for an endpoint that answers a JSON object."""
        index, found = self._query(path, params, stop)
        if not isinstance(found, dict):
            raise DiscoveryError(f"Consul at {self._settings.base_url} answered a non-object for {path}")
        return self._result(path, index, []).index, found

    def _query(self, path: str, params: list[tuple[str, str]], stop: Stop | None) -> tuple[Any, Any]:
        """The index header and the parsed body of a GET on a query connection."""
        url = f"{path}?{urllib.parse.urlencode(params)}" if params else path
        for attempt in (1, 2):
            try:
                conn = self._connections.take()
            except OSError as exc:
                self._translate(exc)
            try:
                stops = (self._connections.closing,) if stop is None else (self._connections.closing, stop)
                status, headers, body = conn.ask(url, self._headers, self._timeout(params), stops)
            except _STALE_KEEPALIVE as exc:
                # The agent closed an idle keep-alive connection as we reused it: the
                # request never reached it, so ask once more on a fresh one.
                self._connections.give(conn, reuse=False)
                if attempt == 2 or (stop is not None and stop.is_set()):
                    self._translate(exc)
                continue
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
                self._connections.give(conn, reuse=False)
                self._translate(exc)
            self._connections.give(conn)
            break
        index: Any = headers.get("X-Consul-Index")
        entries: Any = None
        if status == 200 and index is not None:
            with contextlib.suppress(ValueError):
                entries = json.loads(body)
        if entries is None:
            # Anything unexpected: py-consul's callback raises what it raises for
            # every other call, and _call translates it.
            answer = consul.base.Response(status, dict(headers.items()), body.decode("utf-8", "replace"))
            index, entries = self._call(lambda: consul.callback.CB.json(index=True, allow_404=False)(answer))
        return index, entries

    def _result(self, path: str, index: Any, entries: Any) -> HealthResult:
        if not isinstance(entries, list):
            raise DiscoveryError(f"Consul at {self._settings.base_url} answered a non-list for {path}")
        try:
            return HealthResult(int(index), entries)
        except (TypeError, ValueError):
            raise DiscoveryError(f"Consul at {self._settings.base_url} sent a bad index {index!r}") from None

    def _timeout(self, params: list[tuple[str, str]]) -> float:
        """What requests would be given: the timeout, plus a blocking query's wait and
        its jitter (up to wait/16)."""
        given = dict(params)
        wait = given.get("wait", "default") if "index" in given else ""
        timeout = self._timeouts.get(wait)
        if timeout is None:
            seconds = self._settings.timeout
            if wait:
                wait_seconds = consul.std.DEFAULT_WAIT if wait == "default" else consul.std.parse_duration(wait)
                seconds += wait_seconds * 17 / 16
            timeout = self._timeouts[wait] = seconds
        return timeout

    # -- error translation ------------------------------------------------------------

    def _call(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except (
            consul.exceptions.ConsulException,
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            OSError,
            ValueError,
        ) as exc:
            self._translate(exc)

    def _redact(self, text: str) -> str:
        token = self._settings.token
        return text.replace(token, "***") if token else text

    def _translate(self, exc: Exception) -> NoReturn:
        where = f"Consul at {self._settings.base_url}"
        text = self._redact(str(exc))
        if isinstance(exc, consul.exceptions.ACLPermissionDenied):
            hint = "" if self._settings.token else "; no ACL token was given (token=, token_file= or CONSUL_HTTP_TOKEN)"
            raise PermissionDenied(f"{where} denied the request: {text or 'Permission denied'}{hint}") from exc
        if isinstance(exc, consul.exceptions.ACLDisabled):
            raise PermissionDenied(f"{where} refused the request (401): {text}") from exc
        if isinstance(exc, consul.exceptions.BadRequest):
            raise DiscoveryError(f"{where} rejected the request: {text}") from exc
        if isinstance(exc, consul.exceptions.ClientError | consul.exceptions.NotFound):
            raise DiscoveryError(f"{where} answered {text}") from exc
        if isinstance(exc, consul.exceptions.ConsulException):
            # Consul answers 500 for client mistakes too (an unknown dc, a check
            # without a TTL): only a missing leader or server, or a proxy's 502-504,
            # means it is unavailable.
            if _UNAVAILABLE.search(text):
                raise BackendUnavailable(f"{where} cannot serve: {text}") from exc
            raise DiscoveryError(f"{where} failed: {text}") from exc
        if isinstance(exc, requests.exceptions.SSLError | urllib3.exceptions.SSLError) or _caused_by(exc, ssl.SSLError):
            hint = "" if self._settings.ca_file else "; is the agent's CA given (ca_file=)?"
            raise BackendUnavailable(f"TLS with {where} failed: {_reason(exc)}{hint}") from exc
        if isinstance(exc, requests.exceptions.Timeout | TimeoutError) or (
            isinstance(exc, urllib3.exceptions.TimeoutError)
            and not isinstance(exc, urllib3.exceptions.NewConnectionError)
        ):
            raise BackendUnavailable(f"{where} did not answer in time: {_reason(exc)}") from exc
        if isinstance(
            exc, requests.RequestException | urllib3.exceptions.HTTPError | http.client.HTTPException | OSError
        ):
            raise BackendUnavailable(f"{where} is unreachable: {_reason(exc)}") from exc
        raise DiscoveryError(f"{where} sent an answer that could not be read: {text}") from exc


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(link, kind) for link in _chain(exc))


def _reason(exc: BaseException) -> str:
    """The innermost cause's words (refused, reset, timed out, certificate verify failed)."""
    innermost = exc
    for arg in _chain(exc):
        innermost = arg
    if isinstance(innermost, ssl.SSLError) and innermost.reason:
        return str(innermost.reason).replace("_", " ").lower()
    if isinstance(innermost, OSError) and innermost.strerror:
        return innermost.strerror.lower()
    return type(innermost).__name__ if not str(innermost) else str(innermost)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        nested = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        reason = getattr(current, "reason", None)
        current = (
            nested
            or (reason if isinstance(reason, BaseException) else None)
            or current.__cause__
            or current.__context__
        )
