"""The per-call checks every front end shares: credentials, caller identity, deadline, call id.

gRPC, HTTP/JSON (on HTTP/1.1 and HTTP/2) and WebSocket calls carry the same
facts in slightly different places. Each front end reads them from its own
headers and hands them to :class:`CallGate`, so that who may call, who the
caller is, how long the call may run and which trace it belongs to are
decided in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from typing import Final, Protocol, TypeVar, final

import trio

from .._wire import grpc
from ..errors import PeerAuthError, PeerEncodeError, PeerflowError
from .auth import check_bearer, token_principal
from .logs import current_call_id, set_call_id
from .service import Caller
from .trace import serve_trace, set_caller_node_id

__all__ = [
    "TIMEOUT_MS_HEADER",
    "CallGate",
    "ClosingConnection",
    "deadline_from_grpc_timeout",
    "deadline_from_timeout_ms",
    "name_call",
]

#: The HTTP/JSON and WebSocket spelling of ``grpc-timeout``: whole milliseconds.
TIMEOUT_MS_HEADER: Final = "x-peerflow-timeout-ms"

# Eighteen digits keep the value well inside a float's exact range; a longer
# number is no deadline anyone meant.
_MAX_TIMEOUT_MS_DIGITS: Final = 18

K = TypeVar("K")


class ClosingConnection(Protocol):
    """A client connection whose end the server can wait for (to expire its ref scope)."""

    async def wait_closed(self) -> None:
        """Return once the connection has closed."""


@final
class CallGate:
    """Admits calls: checks the bearer token, names the caller, joins the caller's trace.

    Args:
        token: when set, every call must carry ``authorization: Bearer <token>``.
        node_id: the serving node's id, recorded on the calls' spans.
    """

    def __init__(self, token: str | None, *, node_id: str) -> None:
        self.token = token
        self.node_id = node_id
        self._token_principal = None if token is None else token_principal(token)

    def admit(
        self,
        authorization: bytes | None,
        node_id: bytes | None,
        principal: str | None,
        scope_of: Callable[[K], Hashable],
        connection: K,
    ) -> Caller:
        """Check a call's credentials and return who is calling.

        ``principal`` is what the transport proved (the TLS client
        certificate subject), if anything. ``scope_of(connection)`` gives the
        ref scope of the caller's connection; it is asked only once the call
        is admitted, so refused calls open no scope.

        The caller's node id then names the caller in the call's log
        records and span.

        Raises:
            PeerAuthError: the server has a token and the call's
                ``authorization`` header does not carry it.
            PeerEncodeError: the call names no caller node id (an empty one
                included); callers without one would share one identity.
        """
        if self.token is not None:
            if not check_bearer(authorization, self.token):
                raise _refused(PeerAuthError("missing or wrong bearer token"))
            # With a token and no client certificate, every holder of the token
            # is one principal: the token itself is the identity.
            if principal is None:
                principal = self._token_principal
        if not node_id:
            raise _refused(
                PeerEncodeError("every call must name its caller's node id", grpc.NODE_ID_HEADER)
            )
        caller = node_id.decode("utf-8", "replace")
        set_caller_node_id(caller)
        return Caller(caller, principal, scope_of(connection))

    def trace(
        self,
        traceparent: str | bytes | None,
        tracestate: str | bytes | None,
        method: str | bytes,
        transport: str,
    ) -> AbstractContextManager[None]:
        """The context manager a call runs in for its trace context (see ``trace.serve_trace``).

        Inside it, the call's tasks see the caller's ``traceparent`` (so peer
        calls they make forward it), and an OpenTelemetry SERVER span covers
        the call when a real tracer provider is set. Without a
        ``traceparent`` and such a provider it does nothing; an invalid
        ``traceparent`` is ignored. Front ends look ``tracestate`` up only
        when ``traceparent`` is there. ``method`` is the method's name or path.
        """
        return serve_trace(
            traceparent,
            tracestate,
            method=method,
            transport=transport,
            node_id=self.node_id,
            call_id=current_call_id,
        )


def _refused(error: PeerflowError) -> PeerflowError:
    # A refused call on a connection that served another caller before must
    # not log under that caller's name.
    set_caller_node_id("-")
    return error


def name_call(call_id: bytes | None, connection: object, number: int) -> None:
    """Set the call id the current task logs with.

    A caller may send its own id (``x-peerflow-call-id``) to tie both sides'
    logs together; otherwise the connection and the call's number on it name
    the call.
    """
    set_call_id(
        call_id[:64].decode("ascii", "replace") if call_id else f"{id(connection):x}/{number}"
    )


def deadline_from_grpc_timeout(value: bytes | None) -> float:
    """The trio-clock deadline a ``grpc-timeout`` header sets (``inf`` without one).

    Raises:
        PeerEncodeError: the header is malformed.
    """
    if value is None:
        return math.inf
    return trio.current_time() + grpc.decode_grpc_timeout(value.decode("ascii", "replace"))


def deadline_from_timeout_ms(value: bytes | int | None, path: str = TIMEOUT_MS_HEADER) -> float:
    """The trio-clock deadline a timeout in milliseconds sets (``inf`` without one).

    The value is decimal digits in the ``X-Peerflow-Timeout-Ms`` header, or an
    int in a WebSocket call frame; 0 means the deadline has already passed.

    Raises:
        PeerEncodeError: the value is not a non-negative whole number; the
            error's path is ``path``.
    """
    if value is None:
        return math.inf
    if isinstance(value, bytes):
        if not value.isdigit() or len(value) > _MAX_TIMEOUT_MS_DIGITS:
            raise PeerEncodeError(
                f"malformed timeout {value[:32]!r}: expected milliseconds as digits", path
            )
        value = int(value)
    elif type(value) is not int or value < 0:
        raise PeerEncodeError(
            f"timeout must be a non-negative int of milliseconds, got {value!r}", path
        )
    return trio.current_time() + value / 1000
