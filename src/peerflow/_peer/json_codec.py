"""The HTTP/JSON spelling of the envelopes, sans-IO: JSON text to message objects and back.

JSON is a second *spelling* of the same messages, not a second codec: a JSON
body is turned into the map the msgpack codec would have unpacked, and
:func:`~peerflow._wire.codec.decode_message` does every check (version,
types, wire values, paths) exactly as for gRPC. Encoding goes the other way:
:func:`~peerflow._wire.codec.encode_message` vets the message, and its map is
respelt for JSON.

JSON has no bytes, so (protocol/README.md, section 6) the schema's bytes
fields (``payload`` of a deref chunk and of an inline ref) are base64
strings, and bytes inside wire values are ``{"$bytes": "<base64>"}``. A map
that looks like that cannot itself travel, and floats must be finite.

This module is the one owner of that spelling: the ``peerflow`` command line
reads its ``--input`` with :func:`decode_json_value` and prints responses and
events from :func:`json_body`, so what it shows is what HTTP/JSON sends.

Every function here raises only :class:`~peerflow.PeerEncodeError` (and
:class:`~peerflow.PeerEnvelopeVersionError` for a too-new ``v``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Final, TypeVar

import msgpack

from .._wire.codec import (
    decode_message,
    decode_stream_message,
    encode_message,
    encode_stream_message,
)
from .._wire.envelopes import DerefChunk, ErrorDetails, Message, StreamEvent, SubWorkflowResponse
from .._wire.values import MAX_DEPTH, locate_problem, render_path
from .._wire.version import ENVELOPE_VERSION, check_envelope_version
from ..errors import PeerEncodeError

__all__ = [
    "END_LINE",
    "JSON_CONTENT_TYPE",
    "NDJSON_CONTENT_TYPE",
    "JsonLine",
    "decode_json",
    "decode_json_body",
    "decode_json_stream_body",
    "decode_json_stream_message",
    "decode_json_value",
    "encode_json",
    "encode_json_deref_chunk",
    "encode_json_error",
    "encode_json_stream_message",
    "json_body",
    "parse_json_line",
]

M = TypeVar("M")

#: Content type of requests and unary answers.
JSON_CONTENT_TYPE: Final = "application/json"
#: Content type of streaming answers: one JSON object per line.
NDJSON_CONTENT_TYPE: Final = "application/x-ndjson"
#: The line a deref stream ends with, after its last chunk.
END_LINE: Final = b'{"end":true}\n'

_BYTES_KEY: Final = "$bytes"
# Where the schema itself has a bytes field (sent as a plain base64 str):
# kinds of message, and for each the keys holding one.
_CHUNK: Final = "chunk"
_RESPONSE: Final = "response"
_OTHER: Final = "other"


# --------------------------------------------------------------------------
# JSON text -> message


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:32]} is out of a float's range")
    return value


def _load(
    data: str | bytes | bytearray | memoryview, path: str = "", *, strict: bool = True
) -> Any:
    # Message bodies are strict: NaN, Infinity and numbers beyond a float's
    # range are refused while parsing, and the error quotes the number but
    # cannot say where it sits. A lone value (the command line's --input)
    # keeps them as floats instead, and _from_json refuses them by path.
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        if strict:
            return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        return json.loads(text)
    except RecursionError:
        raise PeerEncodeError(
            f"JSON nested too deep (values allow {MAX_DEPTH} levels)", path
        ) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise PeerEncodeError(f"malformed JSON: {exc}", path) from None


def _b64decode(text: Any, path: list[object]) -> bytes:
    if type(text) is not str:
        raise PeerEncodeError(
            f"expected a base64 str, got {type(text).__name__}", render_path(path)
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PeerEncodeError(
            "not valid base64 (standard alphabet, with padding)", render_path(path)
        ) from None


def _from_json(value: Any, path: list[object]) -> Any:
    # A field's own container is level 1, so the path's length is the level.
    # Deeper than the codec allows: leave it as it is, the codec refuses it
    # with its own message (and this walk stays bounded).
    if len(path) > MAX_DEPTH + 1:
        return value
    kind = type(value)
    if kind is dict:
        if len(value) == 1 and type(value.get(_BYTES_KEY)) is str:
            return _b64decode(value[_BYTES_KEY], [*path, _BYTES_KEY])
        return {k: _from_json(v, [*path, k]) for k, v in value.items()}
    if kind is list:
        return [_from_json(v, [*path, i]) for i, v in enumerate(value)]
    if kind is float and not math.isfinite(value):
        # Only a value parsed with strict=False gets here (see _load).
        raise PeerEncodeError(f"{value!r} is not a finite number", render_path(path))
    return value


def _body_from_json(body: Any, kind: str) -> dict[str, Any]:
    if type(body) is not dict:
        raise PeerEncodeError(f"message must be a JSON object, got {type(body).__name__}")
    # The version first, as the msgpack codec does: a newer peer's message
    # is refused as such, whatever else it holds.
    check_envelope_version(body.get("v"))
    out: dict[str, Any] = {}
    for key, value in body.items():
        if kind == _CHUNK and key == "payload":
            out[key] = _b64decode(value, [key])
        elif kind == _RESPONSE and key == "inline_refs" and type(value) is dict:
            out[key] = {
                uuid: _inline_ref_from_json(ref, [key, uuid]) for uuid, ref in value.items()
            }
        else:
            out[key] = _from_json(value, [key])
    return out


def _inline_ref_from_json(ref: Any, path: list[object]) -> Any:
    if type(ref) is not dict:
        return ref  # the codec names the problem
    return {
        k: _b64decode(v, [*path, k]) if k == "payload" else _from_json(v, [*path, k])
        for k, v in ref.items()
    }


def _kind_of(cls: type) -> str:
    if cls is DerefChunk:
        return _CHUNK
    if cls is SubWorkflowResponse:
        return _RESPONSE
    return _OTHER


def _pack(body: dict[str, Any]) -> bytes:
    try:
        return msgpack.packb(body)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise locate_problem(body) or PeerEncodeError(f"cannot encode: {exc}") from None


def decode_json(cls: type[M], data: bytes | bytearray | memoryview) -> M:
    """Decode one JSON message of class ``cls``, with the msgpack codec's checks.

    Raises:
        PeerEncodeError: the text is not JSON or not an object; it breaks the
            JSON rules (bad base64, a non-finite number...); or as
            :func:`~peerflow._wire.codec.decode_message` (wrong field types,
            missing fields, values that are not wire values). The path names
            the offending value.
        PeerEnvelopeVersionError: ``v`` is newer than this build speaks.
    """
    return decode_json_body(cls, _load(data))


def decode_json_body(cls: type[M], body: Any) -> M:
    """Decode a message of class ``cls`` from its already parsed JSON object.

    Raises:
        PeerEncodeError, PeerEnvelopeVersionError: as :func:`decode_json`.
    """
    return decode_message(cls, _pack(_body_from_json(body, _kind_of(cls))))


def decode_json_stream_message(
    data: bytes | bytearray | memoryview,
) -> StreamEvent | SubWorkflowResponse:
    """Decode one line of a ``StreamSubWorkflow`` answer (an event or the response).

    Raises:
        PeerEncodeError, PeerEnvelopeVersionError: as :func:`decode_json`.
    """
    return decode_json_stream_body(_load(data))


def decode_json_stream_body(body: Any) -> StreamEvent | SubWorkflowResponse:
    """Decode a ``StreamSubWorkflow`` message from its already parsed JSON object.

    Raises:
        PeerEncodeError, PeerEnvelopeVersionError: as :func:`decode_json`.
    """
    # Only a response has bytes fields of its own (its inline refs' payloads).
    return decode_stream_message(_pack(_body_from_json(body, _RESPONSE)))


def decode_json_value(data: str | bytes, field: str) -> Any:
    """Read one wire value written as JSON text, such as the command line's ``--input``.

    ``{"$bytes": "<base64>"}`` becomes bytes. ``field`` names the value in
    errors: their paths start with it, e.g. ``input["rows"][3]``. What comes
    back has passed the codec's wire-value checks, so it can be sent as is.

    Raises:
        PeerEncodeError: the text is not JSON; a ``$bytes`` string is not
            base64; a number is NaN, infinite or beyond a float's range; or
            the value is not a wire value (an int out of range, nesting
            deeper than the protocol allows, a lone surrogate). The path
            names the offending value.
    """
    value = _from_json(_load(data, field, strict=False), [field])
    problem = locate_problem({field: value})
    if problem is not None:
        raise problem
    return value


# --------------------------------------------------------------------------
# message -> JSON text


def _to_json(value: Any, path: list[object]) -> Any:
    kind = type(value)
    if kind is bytes:
        return {_BYTES_KEY: base64.b64encode(value).decode("ascii")}
    if kind is float and not math.isfinite(value):
        # Worded for every reader: an HTTP/JSON peer or client, and the
        # command line, which got the value over gRPC but cannot print it.
        raise PeerEncodeError(
            f"{value!r} has no JSON form (only the gRPC and WebSocket variants "
            "carry NaN and infinities)",
            render_path(path),
        )
    if kind is dict:
        if len(value) == 1 and type(value.get(_BYTES_KEY)) is str:
            raise PeerEncodeError(
                'a map whose only key is "$bytes" with a str value has no JSON form '
                "(it would read back as bytes)",
                render_path(path),
            )
        return {k: _to_json(v, [*path, k]) for k, v in value.items()}
    if kind is list:
        return [_to_json(v, [*path, i]) for i, v in enumerate(value)]
    return value


def _body_to_json(body: dict[str, Any], kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in body.items():
        if kind == _CHUNK and key == "payload":
            out[key] = base64.b64encode(value).decode("ascii")
        elif kind == _RESPONSE and key == "inline_refs":
            out[key] = {
                uuid: {
                    k: base64.b64encode(v).decode("ascii")
                    if k == "payload"
                    else _to_json(v, [key, uuid, k])
                    for k, v in ref.items()
                }
                for uuid, ref in value.items()
            }
        else:
            out[key] = _to_json(value, [key])
    return out


def _dumps(body: dict[str, Any]) -> bytes:
    # Compact, and UTF-8 rather than \u escapes: the codec has already made
    # sure every str is valid Unicode.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )


def _respell(packed: bytes, kind: str) -> dict[str, Any]:
    return _body_to_json(msgpack.unpackb(packed), kind)


def json_body(message: Message) -> dict[str, Any]:
    """The JSON object :func:`encode_json` writes for a message, before it is text.

    ``v`` included, optional keys at their defaults left out, bytes spelt as
    base64 or ``{"$bytes": ...}``.

    Raises:
        PeerEncodeError: as :func:`encode_json`.
    """
    return _respell(encode_message(message), _kind_of(type(message)))


def encode_json(message: Message) -> bytes:
    """Encode a message object as one JSON object (no trailing newline).

    Raises:
        PeerEncodeError: a field holds something that is not a wire value,
            or something JSON cannot carry (a non-finite float, a map that
            reads as ``$bytes``); the path names it.
    """
    return _dumps(json_body(message))


def encode_json_stream_message(message: StreamEvent | SubWorkflowResponse) -> bytes:
    """Encode one message of a ``StreamSubWorkflow`` answer, ``kind`` and all.

    Raises:
        PeerEncodeError: as :func:`encode_json`.
    """
    return _dumps(_respell(encode_stream_message(message), _RESPONSE))


def encode_json_deref_chunk(
    payload: bytes | memoryview, *, type_tag: str | None = None, total_size: int | None = None
) -> bytes:
    """Encode one deref chunk as one JSON object, its payload in base64.

    Written directly rather than through the codec: the payload is the
    large part and needs no checks.
    """
    body: dict[str, Any] = {"v": ENVELOPE_VERSION}
    if type_tag is not None:
        body["type_tag"] = type_tag
    if total_size is not None:
        body["total_size"] = total_size
    body["payload"] = base64.b64encode(payload).decode("ascii")
    return _dumps(body)


def encode_json_error(details: bytes) -> bytes:
    """The body ``{"error": {...}}`` for an encoded :class:`ErrorDetails` message."""
    return b'{"error":' + _dumps(_respell(details, _OTHER)) + b"}"


# --------------------------------------------------------------------------
# NDJSON lines, as a client reads them


class JsonLine:
    """What one line of a streaming answer (or an error body) holds.

    Exactly one attribute is set: ``message`` (the parsed JSON object of a
    message, for :func:`decode_json_body`: every message carries ``v``),
    ``error`` (the decoded details of a ``{"error": ...}`` line) or ``end``
    (the ``{"end": true}`` line).
    """

    __slots__ = ("end", "error", "message")

    def __init__(
        self,
        *,
        message: dict[str, Any] | None = None,
        error: ErrorDetails | None = None,
        end: bool = False,
    ) -> None:
        self.message = message
        self.error = error
        self.end = end


def parse_json_line(line: bytes | bytearray | memoryview) -> JsonLine:
    """Tell a message line from an ``{"error": ...}`` and an ``{"end": true}`` line.

    Only the line's top level is looked at: a message always has ``v``, and
    the other two never do.

    Raises:
        PeerEncodeError: the line is not a JSON object of one of those shapes,
            or its error details do not decode.
        PeerEnvelopeVersionError: the error details are of a newer version.
    """
    body = _load(line)
    if type(body) is not dict:
        raise PeerEncodeError(f"expected a JSON object, got {type(body).__name__}")
    if "v" in body:
        return JsonLine(message=body)
    if body.get("end") is True:
        return JsonLine(end=True)
    error = body.get("error")
    if type(error) is dict:
        return JsonLine(error=decode_json_body(ErrorDetails, error))
    raise PeerEncodeError('expected a message, {"error": ...} or {"end": true}')
