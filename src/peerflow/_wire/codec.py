"""Message objects to msgpack bytes and back, through one cattrs converter.

Encoding unstructures a message to a plain map, packs it with exact types and
then checks what msgpack let through (cheaply, see :mod:`.values`). Decoding
unpacks with limits tied to the input's length, checks the version and the
wire values, then structures the map with strict hooks: a wrong type is an
error naming its path, never a silent coercion. Both directions raise only
:class:`~peerflow.PeerEncodeError` (and :class:`~peerflow.PeerEnvelopeVersionError`
for a too-new ``v``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import cattrs
import msgpack
from cattrs.errors import ClassValidationError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from .._refs.descriptor import RefLifetime, RemoteRefDescriptor
from ..errors import PeerEncodeError
from .envelopes import (
    DerefChunk,
    DerefSessionRefRequest,
    ErrorDetails,
    InlineRef,
    InvokeSubWorkflowRequest,
    LeaseRequest,
    LeaseResponse,
    Message,
    ReleaseSessionRefRequest,
    ReleaseSessionRefResponse,
    StreamEvent,
    SubWorkflowResponse,
)
from .values import locate_problem, render_path, scan_after_msgpack, within_depth
from .version import ENVELOPE_VERSION, check_envelope_version

__all__ = [
    "decode_message",
    "decode_stream_message",
    "encode_deref_chunk_header",
    "encode_message",
    "encode_stream_message",
]

M = TypeVar("M")


class _Invalid(Exception):
    """A structuring failure at ``segments`` (relative to the hook that raised)."""

    def __init__(self, reason: str, segments: list[object] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.segments = segments or []


# --------------------------------------------------------------------------
# Strict structuring hooks: msgpack gives us exact builtin types, so anything
# else is the sender's mistake and must not be coerced (cattrs would turn 1
# into "1" for a str field).


def _expect(kind: type) -> Callable[[Any, Any], Any]:
    def hook(value: Any, _: Any) -> Any:
        if type(value) is not kind:
            raise _Invalid(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return hook


def _structure_str_tuple(value: Any, _: Any) -> tuple[str, ...]:
    if type(value) is not list:
        raise _Invalid(f"expected a list of str, got {type(value).__name__}")
    for index, item in enumerate(value):
        if type(item) is not str:
            raise _Invalid(f"expected str, got {type(item).__name__}", [index])
    return tuple(value)


def _structure_wire_map(value: Any, _: Any) -> dict[str, Any]:
    # Keys and contents were already checked by scan_decoded.
    if type(value) is not dict:
        raise _Invalid(f"expected a map, got {type(value).__name__}")
    return value


def _structure_lifetime(value: Any, _: Any) -> RefLifetime:
    try:
        return RefLifetime(value)
    except ValueError:
        names = ", ".join(repr(m.value) for m in RefLifetime)
        raise _Invalid(f"unknown ref lifetime {value!r} (expected one of {names})") from None


def _structure_map_of(cls: type[M]) -> Callable[[Any, Any], dict[str, M]]:
    def hook(value: Any, _: Any) -> dict[str, M]:
        if type(value) is not dict:
            raise _Invalid(f"expected a map, got {type(value).__name__}")
        out = {}
        for key, item in value.items():
            if type(item) is not dict:
                raise _Invalid(f"expected a map, got {type(item).__name__}", [key])
            try:
                out[key] = _converter.structure(item, cls)
            except Exception as exc:  # every structuring failure becomes a path
                segments, reason = _explain(exc)
                raise _Invalid(reason, [key, *segments]) from None
        return out

    return hook


def _explain(exc: BaseException) -> tuple[list[object], str]:
    """Turn a (possibly nested) cattrs validation error into (path, reason)."""
    if isinstance(exc, ClassValidationError):
        attributed = exc.group_exceptions()[0]
        if attributed:
            inner, attribute = attributed[0]
            segments, reason = _explain(inner)
            return [attribute.name, *segments], reason
        return _explain(exc.exceptions[0])
    if isinstance(exc, IterableValidationError):
        indexed = exc.group_exceptions()[0]
        if indexed:
            inner, item = indexed[0]
            segments, reason = _explain(inner)
            return [item.index, *segments], reason
        return _explain(exc.exceptions[0])
    if isinstance(exc, _Invalid):
        return exc.segments, exc.reason
    if isinstance(exc, KeyError):
        return [], "required field is missing"
    return [], f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------
# The converter.

_converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)


def _is_any(t: Any) -> bool:
    return t is Any


def _is_wire_map(t: Any) -> bool:
    return bool(t == dict[str, Any])


def _is_str_tuple(t: Any) -> bool:
    return bool(t == tuple[str, ...])


for _kind in (str, int, bool, bytes, float):
    _converter.register_structure_hook(_kind, _expect(_kind))
_converter.register_structure_hook_func(_is_any, lambda value, _: value)
_converter.register_unstructure_hook_func(_is_any, lambda value: value)
_converter.register_structure_hook_func(_is_wire_map, _structure_wire_map)
_converter.register_unstructure_hook_func(_is_wire_map, lambda value: value)
_converter.register_structure_hook_func(_is_str_tuple, _structure_str_tuple)
_converter.register_unstructure_hook_func(_is_str_tuple, list)
_converter.register_structure_hook(RefLifetime, _structure_lifetime)
_converter.register_structure_hook_func(
    lambda t: t == dict[str, RemoteRefDescriptor], _structure_map_of(RemoteRefDescriptor)
)
_converter.register_structure_hook_func(
    lambda t: t == dict[str, InlineRef], _structure_map_of(InlineRef)
)


def _optional_overrides(cls: type) -> dict[str, Any]:
    return {
        a.name: override(omit_if_default=True)
        for a in attrs.fields(cls)
        if a.metadata.get("optional")
    }


# Structure hooks without cattrs' per-field error bookkeeping, called without
# its dispatch. Only a failure pays for the detailed hooks, which name the path.
_FAST_STRUCTURE: dict[type, Callable[[Any, Any], Any]] = {}

for _cls in (
    RemoteRefDescriptor,
    InvokeSubWorkflowRequest,
    DerefSessionRefRequest,
    DerefChunk,
    ReleaseSessionRefRequest,
    ReleaseSessionRefResponse,
    LeaseRequest,
    LeaseResponse,
    ErrorDetails,
):
    _overrides = _optional_overrides(_cls)
    if _cls is RemoteRefDescriptor:
        # _refs owns this class and knows nothing of the wire, so its one
        # optional key is declared here.
        _overrides["serializable"] = override(omit_if_default=True)
    _converter.register_structure_hook(_cls, make_dict_structure_fn(_cls, _converter))
    if _cls is not DerefChunk:  # its unstructure and fast structure are written out below
        _converter.register_unstructure_hook(
            _cls, make_dict_unstructure_fn(_cls, _converter, **_overrides)
        )
        _FAST_STRUCTURE[_cls] = make_dict_structure_fn(
            _cls, _converter, _cattrs_detailed_validation=False
        )

_unstructure_descriptor = _converter.get_unstructure_hook(RemoteRefDescriptor)
_structure_descriptor = _converter.get_structure_hook(RemoteRefDescriptor)


# InlineRef, SubWorkflowResponse and StreamEvent flatten or nest differently
# from their attributes, and DerefChunk must put its payload last (see
# encode_deref_chunk_header), so their hooks are written out. DerefChunk
# carries the large payloads, so it is structured by hand too: decoding a big
# chunk should cost little more than unpacking it.


def _unstructure_chunk(chunk: DerefChunk) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if chunk.type_tag is not None:
        body["type_tag"] = chunk.type_tag
    if chunk.total_size is not None:
        body["total_size"] = chunk.total_size
    body["payload"] = chunk.payload
    return body


def _structure_chunk(value: dict[str, Any], _: Any) -> DerefChunk:
    type_tag = value.get("type_tag")
    total_size = value.get("total_size")
    payload = value.get("payload", b"")
    if (
        type(payload) is not bytes
        or (type_tag is not None and type(type_tag) is not str)
        or (total_size is not None and type(total_size) is not int)
    ):
        raise _Invalid("not a deref chunk")  # the detailed hook names the field
    # Its slots are filled directly: a frozen class's __init__ sets each one
    # through object.__setattr__, which after a large unpack (caches cold)
    # costs most of what decoding adds to unpacking.
    chunk = _new_chunk(DerefChunk)
    _set_type_tag(chunk, type_tag)
    _set_total_size(chunk, total_size)
    _set_payload(chunk, payload)
    return chunk


_new_chunk = DerefChunk.__new__
_set_type_tag = DerefChunk.__dict__["type_tag"].__set__
_set_total_size = DerefChunk.__dict__["total_size"].__set__
_set_payload = DerefChunk.__dict__["payload"].__set__


def _unstructure_inline_ref(ref: InlineRef) -> dict[str, Any]:
    body: dict[str, Any] = _unstructure_descriptor(ref.descriptor)
    body["payload"] = ref.payload
    return body


def _structure_inline_ref(value: dict[str, Any], _: Any) -> InlineRef:
    payload = value.get("payload")
    if type(payload) is not bytes:
        raise _Invalid(f"expected bytes, got {type(payload).__name__}", ["payload"])
    return InlineRef(_structure_descriptor(value, RemoteRefDescriptor), payload)


def _unstructure_response(resp: SubWorkflowResponse) -> dict[str, Any]:
    error: dict[str, Any] | None = None
    if resp.error is not None:
        error = {"message": resp.error}
        if resp.error_step_id is not None:
            error["step_id"] = resp.error_step_id
        if resp.error_type is not None:
            error["error_type"] = resp.error_type
    body = {
        "result": resp.result,
        "state": resp.state,
        "remote_refs": {k: _unstructure_descriptor(d) for k, d in resp.remote_refs.items()},
        "error": error,
    }
    if resp.inline_refs:
        body["inline_refs"] = {k: _unstructure_inline_ref(r) for k, r in resp.inline_refs.items()}
    if resp.dropped_refs:
        body["dropped_refs"] = list(resp.dropped_refs)
    return body


_RESPONSE_FIELD_HOOKS: tuple[tuple[str, Callable[[Any, Any], Any]], ...] = (
    ("state", _structure_wire_map),
    ("remote_refs", _structure_map_of(RemoteRefDescriptor)),
    ("inline_refs", _structure_map_of(InlineRef)),
    ("dropped_refs", _structure_str_tuple),
)


def _structure_response(value: dict[str, Any], _: Any) -> SubWorkflowResponse:
    error = value.get("error")
    message = step_id = error_type = None
    if error is not None:
        if type(error) is not dict:
            raise _Invalid(f"expected nil or a map, got {type(error).__name__}", ["error"])
        message = error.get("message")
        if type(message) is not str:
            raise _Invalid(f"expected str, got {type(message).__name__}", ["error", "message"])
        step_id = _optional_str(error, "step_id", "error")
        error_type = _optional_str(error, "error_type", "error")
    parts: dict[str, Any] = {}
    for name, hook in _RESPONSE_FIELD_HOOKS:
        if name in value:
            try:
                parts[name] = hook(value[name], None)
            except _Invalid as exc:
                raise _Invalid(exc.reason, [name, *exc.segments]) from None
    return SubWorkflowResponse(
        result=value.get("result"),
        error=message,
        error_step_id=step_id,
        error_type=error_type,
        **parts,
    )


def _optional_str(body: dict[str, Any], key: str, parent: str) -> str | None:
    item = body.get(key)
    if item is not None and type(item) is not str:
        raise _Invalid(f"expected str or nil, got {type(item).__name__}", [parent, key])
    return item


def _unstructure_event(event: StreamEvent) -> dict[str, Any]:
    return {"kind": "event", "event": {"event_type": event.event_type, "data": event.data}}


def _structure_event(value: dict[str, Any], _: Any) -> StreamEvent:
    event = value.get("event")
    if type(event) is not dict:
        raise _Invalid(f"expected a map, got {type(event).__name__}", ["event"])
    event_type = event.get("event_type")
    if type(event_type) is not str:
        raise _Invalid(f"expected str, got {type(event_type).__name__}", ["event", "event_type"])
    data = event.get("data", {})
    if type(data) is not dict:
        raise _Invalid(f"expected a map, got {type(data).__name__}", ["event", "data"])
    return StreamEvent(event_type, data)


_converter.register_unstructure_hook(DerefChunk, _unstructure_chunk)
_converter.register_unstructure_hook(InlineRef, _unstructure_inline_ref)
_converter.register_structure_hook(InlineRef, _structure_inline_ref)
_converter.register_unstructure_hook(SubWorkflowResponse, _unstructure_response)
_converter.register_structure_hook(SubWorkflowResponse, _structure_response)
_converter.register_unstructure_hook(StreamEvent, _unstructure_event)
_converter.register_structure_hook(StreamEvent, _structure_event)
_FAST_STRUCTURE[DerefChunk] = _structure_chunk
_FAST_STRUCTURE[InlineRef] = _structure_inline_ref
_FAST_STRUCTURE[SubWorkflowResponse] = _structure_response
_FAST_STRUCTURE[StreamEvent] = _structure_event


# --------------------------------------------------------------------------
# Message bodies: the map each message class travels as, "v" first.


def _versioned(unstructure: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    def body(message: Any) -> dict[str, Any]:
        out = {"v": ENVELOPE_VERSION}
        out.update(unstructure(message))
        return out

    return body


_BODY: dict[type, Callable[[Any], dict[str, Any]]] = {
    cls: _versioned(_converter.get_unstructure_hook(cls)) for cls in Message.__args__
}
# Anything else (a subclass, say) goes through the converter's dispatch.
_any_body = _versioned(_converter.unstructure)


# --------------------------------------------------------------------------
# Packing and unpacking.


def _pack_default(value: Any) -> Any:
    # strict_types routes tuples (and every non-exact type) here.
    if type(value) is tuple:
        return list(value)
    raise TypeError(f"cannot pack {type(value).__name__}")


# Packers ready for reuse. A packer is off the list while it packs, so a
# thread, or a nested encode from a signal handler or finalizer, that finds
# none builds its own. A packer keeps any buffer it grew beyond the initial
# 256 KiB, so one that packed more, or failed, is dropped.
_PACKERS: list[msgpack.Packer] = []
_PACKER_KEPT_SIZE = 256 * 1024


def _pack(body: dict[str, Any], fields: tuple[Any, ...] | None = None) -> bytes:
    # Pack first: with exact types, msgpack refuses most bad values itself, in
    # C, and the walk afterwards only looks for what it lets through (see
    # values). ``fields`` are the only values of ``body`` that walk needs to
    # see, when the caller vouches for the rest (see scan_after_msgpack).
    try:
        packer = _PACKERS.pop()
    except IndexError:
        packer = msgpack.Packer(strict_types=True, default=_pack_default)
    try:
        data: bytes = packer.pack(body)
    except (TypeError, ValueError, OverflowError) as exc:
        raise locate_problem(body) or PeerEncodeError(f"cannot pack: {exc}") from None
    size = len(data)
    if size <= _PACKER_KEPT_SIZE:
        _PACKERS.append(packer)
    if not scan_after_msgpack(body, size, fields):
        problem = locate_problem(body)
        if problem is not None:
            raise problem
    return data


def encode_message(message: Message) -> bytes:
    """Encode a message object as one msgpack map carrying ``v``.

    Raises:
        PeerEncodeError: a field holds something that is not a wire value; the
            error's path names it, e.g. ``input["rows"][3]``.
    """
    if type(message) is not InvokeSubWorkflowRequest:
        return _pack(_BODY.get(type(message), _any_body)(message))
    # The busiest message is written out here, against the generic hook plus
    # a copy into a versioned map: a small encode is a few microseconds, and
    # each call or copy saved is a few percent of it. Its own fields are
    # type-checked, so that the walk after packing covers only ``input``: the
    # one field a caller fills with anything. A wrong type gets the error
    # decoding would give, with its path; join refuses a step id that is not
    # a str, msgpack one that is a subclass.
    name, step_ids, value = message.workflow_name, list(message.step_ids), message.input
    body = {"v": ENVELOPE_VERSION, "workflow_name": name, "step_ids": step_ids, "input": value}
    timeout_ms, lease_id = message.timeout_ms, message.lease_id
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    if lease_id is not None:
        body["lease_id"] = lease_id
    try:
        typed = (
            type(name) is str
            and (timeout_ms is None or type(timeout_ms) is int)
            and (lease_id is None or type(lease_id) is str)
            and "".join(step_ids) is not None
        )
    except TypeError:
        typed = False
    if not typed:
        _structure(body, InvokeSubWorkflowRequest)  # raises, naming the field
    return _pack(body, (value,))


def encode_stream_message(message: StreamEvent | SubWorkflowResponse) -> bytes:
    """Encode one server message of ``StreamSubWorkflow``.

    A :class:`StreamEvent` becomes ``{"v", "kind": "event", "event"}``; the
    final :class:`SubWorkflowResponse` becomes ``{"v", "kind": "response",
    ...its fields}``.

    Raises:
        PeerEncodeError: as :func:`encode_message`.
    """
    if type(message) is StreamEvent:
        return encode_message(message)
    body = {"v": ENVELOPE_VERSION, "kind": "response"}
    body.update(_unstructure_response(message))  # type: ignore[arg-type]
    return _pack(body)


def _locate_refusal(data: bytes | bytearray | memoryview) -> PeerEncodeError | None:
    """Name the path of what msgpack refused in ``data``, if it is a value inside a map.

    Only on the error path: a second, lenient unpack keeps what the strict
    one refused (a non-str map key, an extension value, invalid UTF-8), and
    the wire-value walk then names where it is.
    """
    try:
        body = msgpack.unpackb(
            data, strict_map_key=False, ext_hook=msgpack.ExtType, unicode_errors="surrogateescape"
        )
    except (ValueError, TypeError, msgpack.UnpackException):
        return None  # malformed as bytes, not as a value: there is no path
    return locate_problem(body, decoded=True) if type(body) is dict else None


def _ext_hook(code: int, _data: bytes) -> Any:
    raise _Invalid(f"msgpack extension type {code} is not a wire value")


# A msgpack timestamp (ext type -1) cannot be written without a 0xff byte, nor
# a bytes map key without a bin header (0xc4-0xc6). A message free of those
# four bytes can only be nested too deep, a cheaper walk. The byte search is a
# C loop; above the limit, payload bytes make a hit near certain and copying a
# large memoryview to search it would cost more than it saves.
_INNOCENT_BYTES = bytes(b for b in range(256) if b not in (0xC4, 0xC5, 0xC6, 0xFF))
_BYTE_SEARCH_LIMIT = 4096

# The keys of a message whose fields are all scalars that its structuring hook
# type-checks: a body with no other keys holds nothing the wire-value check
# could refuse, so the check is skipped. Only the deref chunk is listed: it
# is decoded after copying up to a MiB out of the frame, when every further
# step runs on cold caches and costs several times what it does otherwise.
_SCALAR_FIELDS: dict[type, frozenset[str]] = {
    DerefChunk: frozenset({"v", "type_tag", "total_size", "payload"}),
}


def _unpack(
    data: bytes | bytearray | memoryview, scalar_fields: frozenset[str] | None = None
) -> dict[str, Any]:
    try:
        # msgpack >= 1.0 defaults to what we need: str as str (strict UTF-8),
        # arrays as lists, only str or bytes map keys, and every length limit
        # set to the input's own size, so a lying length prefix cannot make it
        # allocate beyond the frame. Passing them again costs a third of a
        # microsecond per message.
        body = msgpack.unpackb(data, ext_hook=_ext_hook)
    except _Invalid as exc:
        raise _locate_refusal(data) or PeerEncodeError(exc.reason) from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _locate_refusal(data) or PeerEncodeError(
            f"malformed msgpack: {str(exc) or type(exc).__name__}"
        ) from None
    if type(body) is not dict:
        raise PeerEncodeError(f"message must be a msgpack map, got {type(body).__name__}")
    check_envelope_version(body.get("v"))
    if scalar_fields is not None and body.keys() <= scalar_fields:
        return body  # its structuring hook checks every value: see _SCALAR_FIELDS
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size <= _BYTE_SEARCH_LIMIT and not (
        data.tobytes() if isinstance(data, memoryview) else data
    ).translate(None, _INNOCENT_BYTES):
        fine = within_depth(body)
    else:
        fine = scan_after_msgpack(body, size)
    if not fine:
        problem = locate_problem(body, decoded=True)
        if problem is not None:
            raise problem
    return body


def _structure(body: dict[str, Any], cls: type[M]) -> M:
    fast = _FAST_STRUCTURE.get(cls)
    if fast is not None:
        try:
            return fast(body, cls)  # type: ignore[no-any-return]
        except Exception:  # the detailed pass below explains it
            pass
    try:
        return _converter.structure(body, cls)
    except Exception as exc:  # every structuring failure becomes a path
        segments, reason = _explain(exc)
        raise PeerEncodeError(reason, render_path(segments)) from None


def decode_message(cls: type[M], data: bytes | bytearray | memoryview) -> M:
    """Decode untrusted bytes into a message of class ``cls``.

    Unknown keys are ignored and missing optional keys take their defaults.

    Raises:
        PeerEncodeError: the bytes are not one msgpack map, hold something
            that is not a wire value, or a field has the wrong type (the path
            names it, e.g. ``step_ids[2]``); also for a missing or non-int
            ``v``.
        PeerEnvelopeVersionError: ``v`` is newer than this build speaks.
    """
    return _structure(_unpack(data, _SCALAR_FIELDS.get(cls)), cls)


def decode_stream_message(
    data: bytes | bytearray | memoryview,
) -> StreamEvent | SubWorkflowResponse:
    """Decode one server message of ``StreamSubWorkflow``.

    Raises:
        PeerEncodeError: as :func:`decode_message`, and for a ``kind`` other
            than ``"event"`` or ``"response"``.
        PeerEnvelopeVersionError: ``v`` is newer than this build speaks.
    """
    body = _unpack(data)
    kind = body.get("kind")
    if kind == "event":
        return _structure(body, StreamEvent)
    if kind == "response":
        return _structure(body, SubWorkflowResponse)
    raise PeerEncodeError(f"expected 'event' or 'response', got {kind!r}", "kind")


def encode_deref_chunk_header(
    payload_size: int, *, type_tag: str | None = None, total_size: int | None = None
) -> bytes:
    """Encode a :class:`DerefChunk` message without its payload bytes.

    The result followed by exactly ``payload_size`` payload bytes is
    byte-for-byte what :func:`encode_message` produces for the same chunk, so a
    transport can send a ``memoryview`` slice of a large value with no copy.

    Raises:
        PeerEncodeError: ``payload_size`` is negative or does not fit in 32
            bits.
    """
    if not 0 <= payload_size <= 0xFFFFFFFF:
        raise PeerEncodeError(f"payload size {payload_size} out of range", "payload")
    fields: dict[str, Any] = {"v": ENVELOPE_VERSION}
    if type_tag is not None:
        fields["type_tag"] = type_tag
    if total_size is not None:
        fields["total_size"] = total_size
    fields["payload"] = b""
    # Pack with an empty payload, then swap its 2-byte bin8 header for the
    # real one: the map header already counts the payload key.
    prefix = _pack(fields)[:-2]
    if payload_size < 0x100:
        return prefix + struct.pack(">BB", 0xC4, payload_size)
    if payload_size < 0x10000:
        return prefix + struct.pack(">BH", 0xC5, payload_size)
    return prefix + struct.pack(">BI", 0xC6, payload_size)
