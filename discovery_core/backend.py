"""A backend is a Registry and a Watcher; ``connect()`` loads one by name or URL.

Backends are found through the ``discovery_core.backends`` entry point group
(stevedore's ``DriverManager``), so core never imports one and a third party ships
its own distribution with its own entry point. The entry point names a ``Backend``
subclass; ``connect("name://...")`` calls its ``from_url``, ``connect("name", **kw)``
its constructor.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Collection
from types import TracebackType
from typing import Any, Self

from stevedore import DriverManager
from stevedore.exception import NoMatches

from discovery_core.errors import BackendNotFound, DiscoveryError, InvalidConfig
from discovery_core.registry import Registry
from discovery_core.watcher import Watcher

__all__ = ["DEFAULT_URL", "ENTRY_POINT_GROUP", "Backend", "available_backends", "connect"]

log = logging.getLogger("discovery_core")

ENTRY_POINT_GROUP = "discovery_core.backends"
DEFAULT_URL = "memory://"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")
_warned_default = False


class Backend(Registry, Watcher):
    """Registry + Watcher behind one object; a context manager.

    Closing stops every watch feed, deregisters every live Registration made through
    it, then calls ``_close_resources()`` for the backend's own sockets and threads.
    """

    #: The entry point name, used in messages.
    name: str = ""

    def __init__(self) -> None:
        Registry.__init__(self)
        Watcher.__init__(self)
        self._close_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Build from ``scheme://...?key=value``: the query string and keyword options
        become constructor arguments (keyword options win). Backends with an address
        in the URL override this."""
        parts = urllib.parse.urlsplit(url)
        if parts.netloc or parts.path not in ("", "/"):
            raise InvalidConfig("url", url, "this backend takes no address", backend=cls.name)
        return cls.create(**{**dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True)), **options})

    @classmethod
    def create(cls, **options: Any) -> Self:
        """Construct, turning an unknown option into ``InvalidConfig`` naming it."""
        parameters = inspect.signature(cls).parameters
        known = [name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        for option in options:
            if option not in known:
                reason = f"unknown option; known: {', '.join(known) or 'none'}"
                # Never echo the value: a misspelled "token" option would show the secret.
                raise InvalidConfig(option, "(value not shown)", reason, backend=cls.name)
        return cls(**options)

    def _feed_noticed(self, *, recovered: bool = False, gone: Collection[str] = ()) -> None:
        """A watch of this backend saw it answer again, or instances leave a set: the
        keepalive sweeps at once (restoring ours) instead of at its next interval."""
        self._keepalive.poke(None if recovered else gone)

    def close(self) -> None:
        """Stop watches, deregister live registrations, release resources. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._close_feeds()
            self._close_registrations()
            self._closed = True
            self._close_resources()

    def _close_resources(self) -> None:
        """Release the backend's own sockets and threads (override; call nothing else)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}{' closed' if self._closed else ''}>"


def available_backends() -> list[str]:
    """Names of the installed backends (entry points; nothing is imported)."""
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


def _install_hint(name: str) -> str:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        if ep.dist is not None and name in (ep.dist.metadata.get_all("Provides-Extra") or []):
            return f"pip install '{ep.dist.name}[{name}]'"
    return "install the backend's dependencies"


def _load(name: str) -> type[Backend]:
    try:
        manager: DriverManager[type[Backend]] = DriverManager(
            namespace=ENTRY_POINT_GROUP,
            name=name,
            on_missing_entrypoints_callback=lambda names: None,
        )
    except NoMatches:
        raise BackendNotFound(name, available_backends()) from None
    except ImportError as exc:
        raise BackendNotFound(
            name, available_backends(), hint=f"it is installed but cannot be imported ({exc}); {_install_hint(name)}"
        ) from exc
    except AttributeError as exc:
        raise DiscoveryError(f"the entry point of backend {name!r} names nothing: {exc}", backend=name) from exc
    backend_class = manager.driver
    if not (isinstance(backend_class, type) and issubclass(backend_class, Backend)):
        raise DiscoveryError(f"entry point {name!r} does not name a discovery_core.Backend subclass", backend=name)
    return backend_class


def connect(target: str | None = None, /, **options: Any) -> Backend:
    """Open a backend: ``connect("consul://127.0.0.1:8500?dc=dc1")``,
    ``connect("consul", address=...)``, or ``connect()`` for ``$DISCOVERY_URL``
    (``memory://`` when unset, which keeps registrations inside this process)."""
    global _warned_default
    if target is None:
        target = os.environ.get("DISCOVERY_URL", "")
        if not target:
            if not _warned_default:
                log.warning("DISCOVERY_URL is not set: using %s; registrations stay in this process", DEFAULT_URL)
                _warned_default = True
            target = DEFAULT_URL
    if not isinstance(target, str) or not target:
        raise InvalidConfig("target", target, "must be a backend name or URL")
    name = target.split("://", 1)[0]
    if not _NAME.match(name):
        raise InvalidConfig("target", target, "is neither a backend name nor a URL of the form name://...")
    if "://" in target:
        return _load(name.lower()).from_url(target, **options)
    return _load(target).create(**options)
