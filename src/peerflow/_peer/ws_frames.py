"""The WebSocket variant's frames, sans-IO: one msgpack map per binary WebSocket message.

A frame carries a call's ``id`` and either the call itself, a cancellation,
one response message, the end of the call or its failure
(protocol/README.md section 7). Message bodies are the envelopes exactly as
gRPC frames carry them, so they go through the one msgpack codec; this
module only wraps them.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias

import attrs
import msgpack

from .._wire.version import ENVELOPE_VERSION, check_envelope_version
from ..errors import PeerEncodeError, PeerEnvelopeVersionError

__all__ = [
    "SUBPROTOCOL",
    "CallFrame",
    "CancelFrame",
    "ClientFrame",
    "EndFrame",
    "ErrorFrame",
    "FrameDecodeError",
    "FrameVersionError",
    "MessageFrame",
    "ServerFrame",
    "decode_client_frame",
    "decode_server_frame",
    "encode_frame",
]

#: The WebSocket subprotocol both sides must agree on.
SUBPROTOCOL: Final = "peerflow.v1"

# Frame ids are chosen by the client: any int msgpack carries that fits in
# 64 bits, unsigned, so both sides can keep them in a plain dict.
_MAX_ID: Final = 2**64 - 1


@attrs.frozen
class CallFrame:
    """Client to server: start call ``id`` of ``method`` with request ``body``.

    ``traceparent`` and ``tracestate`` are the caller's W3C trace context, as
    the other variants send them in headers; a value that is not a str is
    ignored, as an invalid header is.
    """

    id: int
    method: str
    body: bytes
    timeout_ms: int | None = None
    traceparent: str | None = None
    tracestate: str | None = None


@attrs.frozen
class CancelFrame:
    """Client to server: cancel call ``id``; the server sends nothing more for it."""

    id: int


@attrs.frozen
class MessageFrame:
    """Server to client: one response message of call ``id``."""

    id: int
    body: bytes


@attrs.frozen
class EndFrame:
    """Server to client: call ``id`` finished OK after its messages."""

    id: int


@attrs.frozen
class ErrorFrame:
    """Server to client: call ``id`` failed with gRPC ``status`` and encoded ErrorDetails."""

    id: int
    status: int
    error: bytes


ClientFrame: TypeAlias = CallFrame | CancelFrame
ServerFrame: TypeAlias = MessageFrame | EndFrame | ErrorFrame


class FrameDecodeError(PeerEncodeError):
    """A frame that cannot be decoded; ``frame_id`` is its id when that much could be read.

    With an id, the call gets an ``encode`` error; without one, the
    connection is closed (1007).
    """

    def __init__(self, reason: str, path: str = "", *, frame_id: int | None = None) -> None:
        super().__init__(reason, path)
        self.frame_id = frame_id


class FrameVersionError(PeerEnvelopeVersionError):
    """A frame of a newer envelope version; the call ``frame_id`` gets the error."""

    def __init__(self, got: int, supported: int, *, frame_id: int) -> None:
        super().__init__(got, supported)
        self.frame_id = frame_id


def encode_frame(frame: ClientFrame | ServerFrame) -> bytes:
    """Encode a frame as the bytes of one binary WebSocket message."""
    body: dict[str, Any] = {"v": ENVELOPE_VERSION, "id": frame.id}
    if isinstance(frame, CallFrame):
        body["method"] = frame.method
        body["body"] = frame.body
        if frame.timeout_ms is not None:
            body["timeout_ms"] = frame.timeout_ms
        if frame.traceparent is not None:
            body["traceparent"] = frame.traceparent
            if frame.tracestate is not None:
                body["tracestate"] = frame.tracestate
    elif isinstance(frame, CancelFrame):
        body["cancel"] = True
    elif isinstance(frame, MessageFrame):
        body["body"] = frame.body
    elif isinstance(frame, EndFrame):
        body["end"] = True
    else:
        body["status"] = frame.status
        body["error"] = frame.error
    return msgpack.packb(body)  # type: ignore[no-any-return]


def _ext(code: int, _data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} in a frame")


def _unpack(data: bytes) -> tuple[dict[str, Any], int]:
    try:
        # Limits default to the input's own size: a lying length cannot
        # make this allocate more than the message holds.
        body = msgpack.unpackb(data, ext_hook=_ext)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise FrameDecodeError(f"malformed frame: {str(exc) or type(exc).__name__}") from None
    if type(body) is not dict:
        raise FrameDecodeError(f"a frame must be a msgpack map, got {type(body).__name__}")
    frame_id = body.get("id")
    if type(frame_id) is not int or not 0 <= frame_id <= _MAX_ID:
        raise FrameDecodeError("a frame's id must be an int from 0 to 2**64-1", "id")
    try:
        check_envelope_version(body.get("v"))
    except PeerEnvelopeVersionError as exc:
        raise FrameVersionError(exc.got, exc.supported, frame_id=frame_id) from None
    except PeerEncodeError as exc:
        raise FrameDecodeError(exc.reason, exc.path, frame_id=frame_id) from None
    return body, frame_id


def _field(
    body: dict[str, Any], key: str, kind: type, frame_id: int, *, optional: bool = False
) -> Any:
    value = body.get(key)
    if value is None and optional:
        return None
    if type(value) is not kind:
        got = "nothing" if value is None else type(value).__name__
        raise FrameDecodeError(f"expected {kind.__name__}, got {got}", key, frame_id=frame_id)
    return value


def decode_client_frame(data: bytes) -> ClientFrame:
    """Decode a frame a client sent.

    Raises:
        FrameDecodeError: not a call or cancel frame (``frame_id`` set when
            the id could be read).
        FrameVersionError: ``v`` is newer than this build speaks.
    """
    body, frame_id = _unpack(data)
    if body.get("cancel") is True:
        return CancelFrame(frame_id)
    timeout_ms = _field(body, "timeout_ms", int, frame_id, optional=True)
    if timeout_ms is not None and timeout_ms < 0:
        raise FrameDecodeError("must not be negative", "timeout_ms", frame_id=frame_id)
    traceparent = body.get("traceparent")
    tracestate = None
    if traceparent is not None:
        # Trace context is best effort: a mistyped value is dropped, not an
        # error (and a tracestate counts only beside a traceparent).
        if type(traceparent) is str:
            tracestate = body.get("tracestate")
            if type(tracestate) is not str:
                tracestate = None
        else:
            traceparent = None
    return CallFrame(
        frame_id,
        _field(body, "method", str, frame_id),
        _field(body, "body", bytes, frame_id),
        timeout_ms,
        traceparent,
        tracestate,
    )


def decode_server_frame(data: bytes) -> ServerFrame:
    """Decode a frame a server sent.

    Raises:
        FrameDecodeError: not a message, end or error frame.
        FrameVersionError: ``v`` is newer than this build speaks.
    """
    body, frame_id = _unpack(data)
    if body.get("end") is True:
        return EndFrame(frame_id)
    if "status" in body:
        return ErrorFrame(
            frame_id,
            _field(body, "status", int, frame_id),
            _field(body, "error", bytes, frame_id),
        )
    return MessageFrame(frame_id, _field(body, "body", bytes, frame_id))
