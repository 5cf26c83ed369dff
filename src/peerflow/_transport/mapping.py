"""The one table that turns trio, h2 and OS exceptions into peerflow errors."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import h2.exceptions
import trio

from ..errors import PeerflowError, PeerTimeoutError, PeerTransportError

__all__ = ["map_exceptions", "to_peer_error"]

# Order matters: the first matching row wins, so subclasses come first
# (TimeoutError and ssl.SSLError are OSErrors).
_TABLE: tuple[tuple[type[BaseException], type[PeerTransportError]], ...] = (
    (trio.TooSlowError, PeerTimeoutError),
    (TimeoutError, PeerTimeoutError),
    (trio.BrokenResourceError, PeerTransportError),
    (trio.ClosedResourceError, PeerTransportError),
    (ssl.SSLError, PeerTransportError),
    (ssl.CertificateError, PeerTransportError),
    (h2.exceptions.H2Error, PeerTransportError),
    (OSError, PeerTransportError),
)


def to_peer_error(exc: BaseException, context: str) -> PeerTransportError | None:
    """Return the peerflow error for ``exc`` per the table, or None if it has no row.

    The result's message is ``"<context>: <what happened>"``; its
    ``__cause__`` is ``exc``.
    """
    for source, target in _TABLE:
        if isinstance(exc, source):
            error = target(f"{context}: {_describe(exc)}")
            error.__cause__ = exc
            return error
    return None


def _describe(exc: BaseException) -> str:
    # trio wraps the real failure (an ssl or OS error) in a BrokenResourceError
    # with no message of its own: the cause says what went wrong.
    seen: BaseException | None = exc
    while seen is not None:
        if str(seen):
            return str(seen)
        seen = seen.__cause__
    return type(exc).__name__


@contextmanager
def map_exceptions(context: str) -> Iterator[None]:
    """Re-raise table exceptions from the block as peerflow errors.

    ``context`` says what was being done, e.g. ``"cannot connect to h:1"``.
    peerflow errors, ``trio.Cancelled`` and anything not in the table pass
    through untouched.

    Raises:
        PeerTransportError: for network, TLS and HTTP/2 protocol failures.
        PeerTimeoutError: for timeouts.
    """
    try:
        yield
    except PeerflowError:
        raise
    except Exception as exc:
        error = to_peer_error(exc, context)
        if error is None:
            raise
        raise error from exc
