"""The gRPC surface of the protocol, sans-IO: methods, headers and status mapping.

Everything a transport needs to agree with another gRPC peer lives here: the
service's method paths, content types, the ``grpc-timeout`` and
``grpc-message`` header codecs, the status codes, the ``peerflow-error-bin``
trailer and the one table that maps errors to statuses and back.
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
import re
from collections.abc import Callable
from typing import Final

import attrs

from ..errors import (
    PeerAuthError,
    PeerEncodeError,
    PeerEnvelopeVersionError,
    PeerError,
    PeerLimitError,
    PeerRefNotFoundError,
    PeerRefNotSerializableError,
    PeerTimeoutError,
    PeerTransportError,
    PeerUnavailableError,
    PeerUnknownStepError,
    RefCapacityError,
    RefNotFoundError,
    RefNotSerializableError,
)
from .codec import decode_message, encode_message
from .envelopes import (
    DerefChunk,
    DerefSessionRefRequest,
    ErrorDetails,
    InvokeSubWorkflowRequest,
    LeaseRequest,
    LeaseResponse,
    ReleaseSessionRefRequest,
    ReleaseSessionRefResponse,
    StreamEvent,
    SubWorkflowResponse,
)

__all__ = [
    "CALL_ID_HEADER",
    "CONTENT_TYPE",
    "DEREF_SESSION_REF",
    "ERROR_DETAILS_TRAILER",
    "INVOKE_SUB_WORKFLOW",
    "LEASE",
    "METHODS",
    "NODE_ID_HEADER",
    "RELEASE_SESSION_REF",
    "SERVICE",
    "STREAM_SUB_WORKFLOW",
    "MethodSpec",
    "Status",
    "decode_bin_header",
    "decode_grpc_message",
    "decode_grpc_timeout",
    "encode_bin_header",
    "encode_grpc_message",
    "encode_grpc_timeout",
    "error_for_status",
    "http_status_for",
    "is_grpc_content_type",
    "status_for_error",
]

#: The gRPC service name.
SERVICE: Final = "peerflow.peer.v1.Peer"
#: The content type peerflow sends; any ``application/grpc[+x]`` is accepted.
CONTENT_TYPE: Final = "application/grpc+msgpack"
#: The caller's node id, sent on every call.
NODE_ID_HEADER: Final = "x-peerflow-peer-node-id"
#: An optional id for one call, chosen by the caller, that the peer puts in its logs.
CALL_ID_HEADER: Final = "x-peerflow-call-id"
#: Trailer carrying an :class:`ErrorDetails` message on a non-OK status.
ERROR_DETAILS_TRAILER: Final = "peerflow-error-bin"


class Status(enum.IntEnum):
    """gRPC status codes, as sent in the ``grpc-status`` trailer."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# --------------------------------------------------------------------------
# Methods


@attrs.frozen
class MethodSpec:
    """One method of the ``peerflow.peer.v1.Peer`` service.

    Attributes:
        name: the method name, e.g. ``"InvokeSubWorkflow"``.
        request: the request message class (every method takes one request).
        response: the class of each response message; ``StreamSubWorkflow``
            sends :class:`StreamEvent` messages and then one
            :class:`SubWorkflowResponse` (decode them with
            ``decode_stream_message``).
        server_streaming: whether the server sends a stream of messages.
        optional: a peer may answer UNIMPLEMENTED; callers must cope.
    """

    name: str
    request: type
    response: object
    server_streaming: bool = False
    optional: bool = False

    @property
    def path(self) -> str:
        """The HTTP/2 ``:path``, e.g. ``/peerflow.peer.v1.Peer/InvokeSubWorkflow``."""
        return f"/{SERVICE}/{self.name}"


INVOKE_SUB_WORKFLOW: Final = MethodSpec(
    "InvokeSubWorkflow", InvokeSubWorkflowRequest, SubWorkflowResponse
)
STREAM_SUB_WORKFLOW: Final = MethodSpec(
    "StreamSubWorkflow",
    InvokeSubWorkflowRequest,
    StreamEvent | SubWorkflowResponse,
    server_streaming=True,
)
DEREF_SESSION_REF: Final = MethodSpec(
    "DerefSessionRef", DerefSessionRefRequest, DerefChunk, server_streaming=True
)
RELEASE_SESSION_REF: Final = MethodSpec(
    "ReleaseSessionRef", ReleaseSessionRefRequest, ReleaseSessionRefResponse
)
LEASE: Final = MethodSpec("Lease", LeaseRequest, LeaseResponse, optional=True)

#: Every method by its ``:path``.
METHODS: Final[dict[str, MethodSpec]] = {
    m.path: m
    for m in (
        INVOKE_SUB_WORKFLOW,
        STREAM_SUB_WORKFLOW,
        DEREF_SESSION_REF,
        RELEASE_SESSION_REF,
        LEASE,
    )
}


def is_grpc_content_type(value: str) -> bool:
    """Return True for ``application/grpc`` and ``application/grpc+<anything>``.

    Parameters after ``;`` are ignored, and so is case.
    """
    base = value.split(";", 1)[0].strip().lower()
    return base == "application/grpc" or base.startswith("application/grpc+")


# --------------------------------------------------------------------------
# grpc-timeout

_TIMEOUT_UNITS: Final = (
    ("n", 1e9),
    ("u", 1e6),
    ("m", 1e3),
    ("S", 1.0),
    ("M", 1 / 60),
    ("H", 1 / 3600),
)
_TIMEOUT_SECONDS: Final = {unit: 1 / per_second for unit, per_second in _TIMEOUT_UNITS}
_TIMEOUT_RE: Final = re.compile(r"([0-9]{1,8})([HMSmun])")
_MAX_TIMEOUT_DIGITS: Final = 99_999_999


def encode_grpc_timeout(seconds: float) -> str:
    """Encode a timeout for the ``grpc-timeout`` header.

    Picks the finest unit whose value fits in 8 digits and rounds up, so the
    peer never sees a shorter deadline than the caller's. Negative timeouts
    encode as ``0n``; timeouts beyond 8 digits of hours are clamped.
    """
    if seconds <= 0 or math.isnan(seconds):
        return "0n"
    for unit, per_second in _TIMEOUT_UNITS:
        value = math.ceil(seconds * per_second)
        if value <= _MAX_TIMEOUT_DIGITS:
            return f"{value}{unit}"
    return f"{_MAX_TIMEOUT_DIGITS}H"


def decode_grpc_timeout(value: str) -> float:
    """Decode a ``grpc-timeout`` header value to seconds.

    Raises:
        PeerEncodeError: the value is not 1 to 8 digits followed by one of
            ``H M S m u n``; the path is ``grpc-timeout``.
    """
    match = _TIMEOUT_RE.fullmatch(value)
    if match is None:
        raise PeerEncodeError(f"malformed timeout {value!r}", "grpc-timeout")
    return int(match[1]) * _TIMEOUT_SECONDS[match[2]]


# --------------------------------------------------------------------------
# grpc-message: printable ASCII except "%" goes as is, everything else is
# percent-encoded UTF-8 (gRPC's PROTOCOL-HTTP2 "Percent-Encoded").

_UNRESERVED: Final = frozenset(range(0x20, 0x7F)) - {ord("%")}
_PERCENT_RE: Final = re.compile(rb"%([0-9A-Fa-f]{2})")


def encode_grpc_message(message: str) -> str:
    """Percent-encode a status message for the ``grpc-message`` trailer.

    A leading or trailing space is encoded too: HTTP/2 forbids field values
    that begin or end with whitespace (RFC 9113 8.2.1).
    """
    raw = message.encode("utf-8", "backslashreplace")
    encoded = "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in raw)
    if encoded.startswith(" "):
        encoded = "%20" + encoded[1:]
    if encoded.endswith(" "):
        encoded = encoded[:-1] + "%20"
    return encoded


def decode_grpc_message(value: str | bytes) -> str:
    """Decode a ``grpc-message`` value; malformed escapes are kept as they are.

    Never raises: a status message is for humans, and a bad one must not hide
    the status it came with.
    """
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    decoded = _PERCENT_RE.sub(lambda m: bytes((int(m[1], 16),)), raw)
    return decoded.decode("utf-8", "replace")


# --------------------------------------------------------------------------
# Binary headers ("-bin" suffix): base64, sent unpadded, accepted either way.


def encode_bin_header(value: bytes) -> str:
    """Encode a binary header value (``*-bin``) as unpadded base64."""
    return base64.b64encode(value).decode("ascii").rstrip("=")


def decode_bin_header(value: str | bytes) -> bytes:
    """Decode a binary header value, padded or not.

    Raises:
        PeerEncodeError: the value is not base64.
    """
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise PeerEncodeError("binary header is not valid base64") from None


# --------------------------------------------------------------------------
# Errors <-> statuses: the one table.
#
# Each row: the error class raised on the server, the gRPC status it becomes,
# the ErrorDetails ``code`` sent in the ``peerflow-error-bin`` trailer, how to
# fill the details from the error, and how the client rebuilds the error.
# Order matters: subclasses come before their bases.


def _attr(exc: BaseException, name: str) -> object:
    return getattr(exc, name, None)


@attrs.frozen
class _Row:
    error: type[BaseException]
    status: Status
    code: str
    details: Callable[[BaseException], dict[str, object]]
    rebuild: Callable[[ErrorDetails], PeerError]


def _no_details(_: BaseException) -> dict[str, object]:
    return {}


_TABLE: Final = (
    _Row(
        PeerUnknownStepError,
        Status.NOT_FOUND,
        "unknown_step",
        lambda e: {"step_id": _attr(e, "step_id")},
        lambda d: PeerUnknownStepError(d.step_id or ""),
    ),
    _Row(
        PeerEnvelopeVersionError,
        Status.FAILED_PRECONDITION,
        "envelope_version",
        lambda e: {"got": _attr(e, "got"), "supported": _attr(e, "supported")},
        lambda d: PeerEnvelopeVersionError(d.got or 0, d.supported or 0),
    ),
    _Row(
        PeerEncodeError,
        Status.INVALID_ARGUMENT,
        "encode",
        lambda e: {"path": _attr(e, "path") or None},
        lambda d: PeerEncodeError(d.message, d.path or ""),
    ),
    _Row(
        RefNotSerializableError,
        Status.FAILED_PRECONDITION,
        "ref_not_serializable",
        lambda e: {"ref_uuid": _attr(e, "ref_uuid"), "value_type": _attr(e, "value_type")},
        lambda d: PeerRefNotSerializableError(d.ref_uuid or "", d.value_type or "value"),
    ),
    _Row(
        RefNotFoundError,
        Status.NOT_FOUND,
        "ref_not_found",
        lambda e: {"ref_uuid": _attr(e, "ref_uuid")},
        lambda d: PeerRefNotFoundError(d.ref_uuid or ""),
    ),
    _Row(
        PeerAuthError,
        Status.UNAUTHENTICATED,
        "auth",
        _no_details,
        lambda d: PeerAuthError(d.message),
    ),
    _Row(
        PeerLimitError,
        Status.RESOURCE_EXHAUSTED,
        "limit",
        _no_details,
        lambda d: PeerLimitError(d.message),
    ),
    _Row(
        RefCapacityError,
        Status.RESOURCE_EXHAUSTED,
        "limit",
        _no_details,
        lambda d: PeerLimitError(d.message),
    ),
    _Row(
        PeerTimeoutError,
        Status.DEADLINE_EXCEEDED,
        "timeout",
        _no_details,
        lambda d: PeerTimeoutError(d.message),
    ),
)
_ROW_BY_CODE: Final = {row.code: row for row in _TABLE}

#: Statuses that mean something specific even without details.
_STATUS_ERRORS: Final[dict[Status, type[PeerError]]] = {
    Status.UNAUTHENTICATED: PeerAuthError,
    Status.RESOURCE_EXHAUSTED: PeerLimitError,
    Status.DEADLINE_EXCEEDED: PeerTimeoutError,
    Status.UNAVAILABLE: PeerUnavailableError,
}


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def status_for_error(exc: BaseException) -> tuple[Status, str, bytes]:
    """Map an error raised while serving a call to what the server sends.

    Returns ``(status, message, details)``: the ``grpc-status``, the plain
    (not yet percent-encoded) ``grpc-message``, and the msgpack
    :class:`ErrorDetails` for the ``peerflow-error-bin`` trailer. An error
    outside the table becomes INTERNAL with a generic message, so server
    internals do not leak to callers.
    """
    for row in _TABLE:
        if isinstance(exc, row.error):
            message = str(exc)
            # An encode error's path travels as its own field.
            detail_message = getattr(exc, "reason", message) if row.code == "encode" else message
            fields = {k: v for k, v in row.details(exc).items() if v is not None}
            details = ErrorDetails(row.code, detail_message, **fields)  # type: ignore[arg-type]
            try:
                return row.status, message, encode_message(details)
            except PeerEncodeError:
                # A lone surrogate from the caller's input, in a message or a
                # field: sent escaped. Failing here would leave the call
                # unanswered.
                fields = {k: _escaped(v) if isinstance(v, str) else v for k, v in fields.items()}
                details = ErrorDetails(row.code, _escaped(detail_message), **fields)  # type: ignore[arg-type]
                return row.status, _escaped(message), encode_message(details)
    message = "internal error while serving the call (see the peer's log)"
    return Status.INTERNAL, message, encode_message(ErrorDetails("internal", message))


def error_for_status(status: int, message: str, details: bytes | None = None) -> PeerError:
    """Build the error a client raises for a non-OK gRPC status.

    ``details`` is the decoded ``peerflow-error-bin`` trailer, if any; when it
    names a known error kind, that kind wins. Otherwise the status decides:
    UNAUTHENTICATED gives :class:`PeerAuthError`, RESOURCE_EXHAUSTED
    :class:`PeerLimitError`, DEADLINE_EXCEEDED :class:`PeerTimeoutError`,
    UNAVAILABLE :class:`PeerUnavailableError`, and everything else
    (CANCELLED, INTERNAL, UNIMPLEMENTED, a NOT_FOUND with no details...)
    :class:`PeerTransportError`. Undecodable details are ignored.
    """
    if details:
        try:
            parsed = decode_message(ErrorDetails, details)
        except PeerError:
            parsed = None
        if parsed is not None and parsed.code in _ROW_BY_CODE:
            return _ROW_BY_CODE[parsed.code].rebuild(parsed)
    try:
        known = Status(status)
    except ValueError:
        return PeerTransportError(f"peer answered with unknown gRPC status {status}: {message}")
    error = _STATUS_ERRORS.get(known, PeerTransportError)
    return error(
        f"peer answered {known.name}: {message}" if message else f"peer answered {known.name}"
    )


# HTTP/JSON and WebSocket error replies carry the same status; this is the
# HTTP status the JSON shim uses for each (Google's API mapping).
_HTTP_STATUS: Final = {
    Status.OK: 200,
    Status.CANCELLED: 499,
    Status.UNKNOWN: 500,
    Status.INVALID_ARGUMENT: 400,
    Status.DEADLINE_EXCEEDED: 504,
    Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409,
    Status.PERMISSION_DENIED: 403,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.FAILED_PRECONDITION: 412,
    Status.ABORTED: 409,
    Status.OUT_OF_RANGE: 400,
    Status.UNIMPLEMENTED: 501,
    Status.INTERNAL: 500,
    Status.UNAVAILABLE: 503,
    Status.DATA_LOSS: 500,
    Status.UNAUTHENTICATED: 401,
}


def http_status_for(status: Status) -> int:
    """The HTTP status code the HTTP/JSON variant answers with for a gRPC status."""
    return _HTTP_STATUS[status]
