"""The thin adapter between the backend and py-consul: nothing of py-consul or
requests crosses it, neither types nor exceptions.

py-consul gives us its HTTP client (a requests session with TLS settings, and an
HTTP timeout that grows with a blocking query's ``wait`` and its jitter) and the
mapping of Consul's status codes to exceptions. We build every request ourselves:
its API methods send snake_case check definitions that Consul 1.8 rejects, read
``CONSUL_HTTP_TOKEN`` over an explicit token, and cannot ask for stale reads.

The watch's blocking query (``health``, the hot path) skips py-consul and requests
and goes through urllib3 directly, on a pool of the same wakeable connections with the
same TLS settings, timeout and token header: py-consul has no streaming or wakeable
call to offer, and requests' layers (preparing the request, the session, the adapter,
building its Response) and py-consul's callback cost about half a millisecond on every
answer, which is most of the time from a change to a subscriber seeing it. Any answer
but a 200 with an index and a JSON body still goes through py-consul's callback, so
status codes map to the same errors as every other call.

A blocking query can be woken: while one runs, its connection's socket is known to
the ``Stop`` of the watch that asked, and setting that ``Stop`` shuts the socket down.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import consul
import consul.base
import consul.callback
import consul.exceptions
import consul.std
import requests
import requests.adapters
import requests.utils
import urllib3
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.response

from discovery_core import BackendUnavailable, DiscoveryError, PermissionDenied, Stop

__all__ = ["ConsulClient", "HealthResult", "Settings"]

_T = TypeVar("_T")

_UNAVAILABLE = re.compile(r"^50[234]\b|No cluster leader|No known Consul servers|rpc error|connection refused", re.I)

# The Stop of the blocking query running on this thread, if any.
_current_stop: contextvars.ContextVar[Stop | None] = contextvars.ContextVar("discovery_consul_stop", default=None)


def _shutdown(sock: socket.socket) -> None:
    # socket.socket.shutdown, not SSLSocket.shutdown: the reading thread keeps its
    # SSL object and simply sees the connection end.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _wakeable(sock: socket.socket | None, getresponse: Callable[[], _T]) -> _T:
    """Wait for a response; if this thread runs a blocking query, setting that
    query's Stop shuts the socket down and the read returns at once."""
    stop = _current_stop.get()
    if stop is None or sock is None:
        return getresponse()
    remove = stop.on_set(lambda: _shutdown(sock))
    try:
        return getresponse()
    finally:
        remove()


class _HTTPConnection(urllib3.connection.HTTPConnection):
    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]  # as urllib3 does
        return _wakeable(self.sock, super().getresponse)


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]  # as urllib3 does
        return _wakeable(self.sock, super().getresponse)


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _WakeableAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def _pool(settings: Settings, maxsize: int) -> urllib3.connectionpool.HTTPConnectionPool:
    """The blocking query's own pool: the adapter's wakeable connections with the TLS
    settings requests would give them (a CA file, else requests' bundle; a client
    certificate; verify), no retries (as requests), no proxy (as ``trust_env=False``)."""
    if settings.scheme != "https":
        return _HTTPPool(settings.host, settings.port, maxsize=maxsize, retries=False)
    return _HTTPSPool(
        settings.host,
        settings.port,
        maxsize=maxsize,
        retries=False,
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
    index: int
    entries: list[dict[str, Any]]


class ConsulClient:
    """The few Consul calls the backend makes, with errors translated."""

    def __init__(self, settings: Settings, *, pool_size: int = 64) -> None:
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
        session.trust_env = False  # no proxy between us and the local agent: a blocking query must be wakeable
        adapter = _WakeableAdapter(pool_connections=2, pool_maxsize=pool_size)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._session = session
        self._headers = {"X-Consul-Token": settings.token} if settings.token else {}
        self._pool = _pool(settings, pool_size)
        self._timeouts: dict[str, urllib3.Timeout] = {}

    def close(self) -> None:
        self._session.close()
        self._pool.close()

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

    def has_service(self, service_id: str) -> bool:
        """Whether the local agent holds the service (a 404 says it does not)."""
        found = self._call(
            lambda: self._http.get(consul.callback.CB.json(), f"/v1/agent/service/{service_id}", headers=self._headers)
        )
        return found is not None

    def health(self, service: str, params: list[tuple[str, str]], *, stop: Stop | None = None) -> HealthResult:
        """GET /v1/health/service/<service>; a blocking query when ``params`` holds an
        index and a wait. Setting ``stop`` ends it at once."""
        url = f"/v1/health/service/{urllib.parse.quote(service, safe='/:')}"
        if params:
            url = f"{url}?{urllib.parse.urlencode(params)}"
        token = _current_stop.set(stop)
        try:
            response = self._pool.urlopen(
                "GET",
                url,
                headers=self._headers,
                retries=False,
                redirect=False,
                timeout=self._timeout(params),
                preload_content=False,
                decode_content=False,
            )
            try:
                body = response.read()
            finally:
                response.release_conn()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            self._translate(exc)
        finally:
            _current_stop.reset(token)
        index: Any = response.headers.get("X-Consul-Index")
        entries: Any = None
        if response.status == 200 and index is not None:
            with contextlib.suppress(ValueError):
                entries = json.loads(body)
        if entries is None:
            # Anything unexpected: py-consul's callback raises what it raises for
            # every other call, and _call translates it.
            answer = consul.base.Response(response.status, response.headers, body.decode("utf-8", "replace"))
            index, entries = self._call(lambda: consul.callback.CB.json(index=True, allow_404=False)(answer))
        if not isinstance(entries, list):
            raise DiscoveryError(f"Consul at {self._settings.base_url} answered a non-list for {service!r}")
        try:
            return HealthResult(int(index), entries)
        except ValueError:
            raise DiscoveryError(f"Consul at {self._settings.base_url} sent a bad index {index!r}") from None

    def _timeout(self, params: list[tuple[str, str]]) -> urllib3.Timeout:
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
            timeout = self._timeouts[wait] = urllib3.Timeout(connect=seconds, read=seconds)
        return timeout

    # -- error translation ------------------------------------------------------------

    def _call(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except (
            consul.exceptions.ConsulException,
            requests.RequestException,
            urllib3.exceptions.HTTPError,
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
        if isinstance(exc, requests.exceptions.Timeout) or (
            isinstance(exc, urllib3.exceptions.TimeoutError)
            and not isinstance(exc, urllib3.exceptions.NewConnectionError)
        ):
            raise BackendUnavailable(f"{where} did not answer in time: {_reason(exc)}") from exc
        if isinstance(exc, requests.RequestException | urllib3.exceptions.HTTPError | OSError):
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
