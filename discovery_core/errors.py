"""One exception tree for everything the API raises.

Backends translate their transport errors at the boundary (``raise ... from``), so a
caller only ever catches ``DiscoveryError`` and its subclasses. Misuse (a closed
object, a bad value) is kept apart from operational failure (the backend is down).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "BackendNotFound",
    "BackendUnavailable",
    "ClosedError",
    "DiscoveryError",
    "InvalidConfig",
    "InvalidInstance",
    "PermissionDenied",
    "WatchTimeout",
]


_USERINFO = re.compile(r"://[^/?#@\s]*@")
_PARAM = re.compile(r"([?&;])([^=&;#\s]*)=([^&;#\s]*)")


def _shorten(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def secret_option(name: str) -> bool:
    """Whether an option (or URL parameter) of this name holds a credential; a
    ``*_file`` option holds only the path to one."""
    lowered = name.lower()
    return any(word in lowered for word in ("token", "password", "secret")) and not lowered.endswith("_file")


def redact(text: str) -> str:
    """``text`` with the credentials a URL may carry masked: its user info
    (``scheme://user:secret@host``) and the values of secret query parameters."""
    text = _USERINFO.sub("://***@", text)
    return _PARAM.sub(lambda m: f"{m[1]}{m[2]}=***" if secret_option(m[2]) else m[0], text)


class DiscoveryError(Exception):
    """Base of every error discovery-core raises.

    ``service`` and ``backend`` say what the error is about when that is known.
    """

    def __init__(self, message: str, *, service: str | None = None, backend: str | None = None) -> None:
        super().__init__(message)
        self.service = service
        self.backend = backend


class BackendUnavailable(DiscoveryError):
    """The backend could not be reached (refused, reset, timed out, TLS failure)."""


class PermissionDenied(DiscoveryError):
    """The backend refused the request (an ACL denial, a missing or wrong token)."""


class WatchTimeout(DiscoveryError, TimeoutError):
    """``Watch.wait(timeout)`` saw no new snapshot in time (the backend answers, nothing
    changed). A ``TimeoutError`` too, so either ``except`` catches it."""


class ClosedError(DiscoveryError, RuntimeError):
    """The object (watch, registration, backend, channel) was used after close()."""


class BackendNotFound(DiscoveryError, LookupError):
    """No backend is installed under that name; the message lists the installed ones."""

    def __init__(self, name: str, installed: Iterable[str], *, hint: str = "") -> None:
        self.name = name
        self.installed = sorted(installed)
        listed = ", ".join(self.installed) or "none"
        message = f"no discovery backend named {name!r} is installed (installed: {listed})"
        super().__init__(message + (f"; {hint}" if hint else ""), backend=name)


class InvalidInstance(DiscoveryError, ValueError):
    """A field of a ServiceInstance or a check is invalid; nothing was written."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"invalid {field} {_shorten(value)}: {reason}")


class InvalidConfig(DiscoveryError, ValueError):
    """A backend option (from a URL or a keyword argument) is unknown or invalid."""

    def __init__(self, option: str, value: object, reason: str, *, backend: str | None = None) -> None:
        # Never keep a credential: ``value`` is what may be shown (a secret option's
        # value masked whole, a URL's user info and secret parameters masked).
        if secret_option(option):
            value = "***"
        elif isinstance(value, str):
            value = redact(value)
        self.option = option
        self.value = value
        where = f"{backend} backend: " if backend else ""
        super().__init__(f"{where}invalid option {option}={_shorten(value)}: {reason}", backend=backend)
