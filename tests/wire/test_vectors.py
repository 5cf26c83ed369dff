"""Golden vectors: the bytes in protocol/vectors/ must keep decoding, forever.

Each ``v<N>/<name>.msgpack`` decodes to the object in :data:`EXPECTED` and
the current encoder reproduces it byte for byte; ``vectors.json`` describes
the same maps language-neutrally (bytes as ``{"$bytes": base64}``) for
implementers of other peers. The ``ws_*`` vectors are the WebSocket
variant's frames (:data:`FRAMES`), whose ``body`` and ``error`` carry the
bytes of the envelope vectors above them. Run this file as a script to write
the vectors for the current version (never rewrite an older version's files).
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any, Literal

import msgpack
import pytest

from peerflow import InlineRef, RefLifetime, RemoteRefDescriptor, SubWorkflowResponse
from peerflow._peer.ws_frames import (
    CallFrame,
    CancelFrame,
    ClientFrame,
    EndFrame,
    ErrorFrame,
    MessageFrame,
    ServerFrame,
    decode_client_frame,
    decode_server_frame,
    encode_frame,
)
from peerflow._wire.codec import (
    decode_message,
    decode_stream_message,
    encode_message,
    encode_stream_message,
)
from peerflow._wire.envelopes import (
    DerefChunk,
    DerefSessionRefRequest,
    ErrorDetails,
    InvokeSubWorkflowRequest,
    LeaseRequest,
    LeaseResponse,
    ReleaseSessionRefRequest,
    ReleaseSessionRefResponse,
    StreamEvent,
)

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"

_DESCRIPTOR = RemoteRefDescriptor(
    origin_node_id="node-b",
    type_tag="example.Tensor",
    created_at_epoch_ms=1_700_000_000_123,
    lifetime=RefLifetime.UNTIL_PARENT_FINISH,
    size=4096,
)
_INLINE = RemoteRefDescriptor(
    origin_node_id="node-b",
    type_tag="example.Doc",
    created_at_epoch_ms=1_700_000_000_456,
    lifetime=RefLifetime.UNTIL_CONTEXT_DROP,
    size=5,
)
_LIVE_ONLY = RemoteRefDescriptor(
    origin_node_id="node-b",
    type_tag="example.Model",
    created_at_epoch_ms=1_700_000_000_789,
    lifetime=RefLifetime.UNTIL_EXPLICIT_DROP,
    size=None,
    serializable=False,
)
_UUID_1 = "0b7e7c4e-4d1c-4f61-9a55-3f1d2b6c8a01"
_UUID_2 = "5f2c9a8e-1b3d-4e7f-8a6b-2c4d6e8f0a12"
_UUID_3 = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c23"
_UUID_4 = "c3d4e5f6-a7b8-4c9d-8e0f-1a2b3c4d5e34"

#: Every v1 vector: file stem -> (stream message?, expected object).
EXPECTED: dict[str, tuple[bool, Any]] = {
    "invoke_request": (
        False,
        InvokeSubWorkflowRequest(
            workflow_name="summarise",
            step_ids=("fetch", "rank"),
            input={
                "query": "trio",
                "limit": 3,
                "big": 2**64 - 1,
                "neg": -(2**63),
                "ratio": 0.25,
                "flags": [True, False, None],
                "blob": b"\x00\xff",
                "nested": {"a": [1, [2, {"b": "é"}]]},
            },
        ),
    ),
    "invoke_request_full": (
        False,
        InvokeSubWorkflowRequest(
            workflow_name="summarise",
            step_ids=("fetch",),
            input=None,
            timeout_ms=2500,
            lease_id=_UUID_4,
        ),
    ),
    "invoke_response": (
        False,
        SubWorkflowResponse(
            result={"summary": "ok", "score": 0.5},
            state={"pages": 3, "seen": ["a", "b"]},
            remote_refs={_UUID_1: _DESCRIPTOR, _UUID_3: _LIVE_ONLY},
            inline_refs={_UUID_2: InlineRef(_INLINE, b"hello")},
            dropped_refs=(_UUID_4,),
        ),
    ),
    "invoke_response_minimal": (False, SubWorkflowResponse(result=42)),
    "invoke_response_error": (
        False,
        SubWorkflowResponse(
            error="division by zero",
            error_step_id="rank",
            error_type="ZeroDivisionError",
            state={"pages": 1},
        ),
    ),
    "stream_event": (True, StreamEvent("example.Progress", {"done": 2, "of": 5})),
    "stream_response": (True, SubWorkflowResponse(result="done", state={"k": "v"})),
    "deref_request": (False, DerefSessionRefRequest(_UUID_1)),
    "deref_chunk_first": (
        False,
        DerefChunk(b"\x01\x02\x03", type_tag="example.Tensor", total_size=4096),
    ),
    "deref_chunk_next": (False, DerefChunk(b"\x04" * 300)),
    "release_request": (False, ReleaseSessionRefRequest(_UUID_1)),
    "release_response": (False, ReleaseSessionRefResponse(released=True)),
    "lease_request": (False, LeaseRequest(_UUID_4, ttl_ms=30_000)),
    "lease_request_close": (False, LeaseRequest(_UUID_4, ttl_ms=0, close=True)),
    "lease_response": (False, LeaseResponse(_UUID_4, ttl_ms=30_000)),
    "lease_response_closed": (False, LeaseResponse(_UUID_4, ttl_ms=0, released=2)),
    "error_unknown_step": (
        False,
        ErrorDetails("unknown_step", "peer has no step registered as 'nope'", step_id="nope"),
    ),
    "error_envelope_version": (
        False,
        ErrorDetails(
            "envelope_version",
            "envelope version 2 is newer than the supported version 1",
            got=2,
            supported=1,
        ),
    ),
    "error_encode": (
        False,
        ErrorDetails("encode", "expected str, got int", path="step_ids[2]"),
    ),
}

#: Messages from a future peer: v1 with extra keys, which must still decode.
FUTURE: dict[str, tuple[bool, dict[str, Any], Any]] = {
    "future_invoke_request": (
        False,
        {
            "v": 1,
            "workflow_name": "summarise",
            "trace": {"id": "abc", "sampled": True},
            "step_ids": ["fetch"],
            "input": {"q": 1},
            "priority": 7,
        },
        InvokeSubWorkflowRequest("summarise", ("fetch",), {"q": 1}),
    ),
    "future_invoke_response": (
        False,
        {
            "v": 1,
            "result": 1,
            "state": {},
            "remote_refs": {
                _UUID_1: {
                    "origin_node_id": "node-b",
                    "type_tag": "example.Tensor",
                    "created_at_epoch_ms": 1_700_000_000_123,
                    "lifetime": "until_parent_finish",
                    "size": 4096,
                    "checksum": b"\x12\x34",
                }
            },
            "error": None,
            "metrics": {"cpu_ms": 12},
        },
        SubWorkflowResponse(result=1, remote_refs={_UUID_1: _DESCRIPTOR}),
    ),
    "future_stream_event": (
        True,
        {"v": 1, "kind": "event", "seq": 4, "event": {"event_type": "E", "data": {}, "ts": 1}},
        StreamEvent("E", {}),
    ),
}


# The frames nest the envelope vectors: a frame's ``body`` or ``error`` is
# exactly the bytes of the vector named here, so an implementer can check
# the two layers apart.
_CALL_BODY = encode_message(EXPECTED["invoke_request"][1])
_RESPONSE_BODY = encode_message(EXPECTED["invoke_response"][1])
_ERROR_BODY = encode_message(EXPECTED["error_unknown_step"][1])
_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
_TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"

Direction = Literal["client", "server"]

#: Every v1 WebSocket frame vector: file stem -> (who sends it, expected frame).
FRAMES: dict[str, tuple[Direction, ClientFrame | ServerFrame]] = {
    "ws_call": (
        "client",
        CallFrame(
            7,
            "InvokeSubWorkflow",
            _CALL_BODY,
            timeout_ms=2500,
            traceparent=_TRACEPARENT,
            tracestate=_TRACESTATE,
        ),
    ),
    "ws_call_minimal": ("client", CallFrame(0, "InvokeSubWorkflow", _CALL_BODY)),
    "ws_message": ("server", MessageFrame(7, _RESPONSE_BODY)),
    "ws_end": ("server", EndFrame(7)),
    # A call naming a step the peer lacks: NOT_FOUND with unknown_step details.
    "ws_error": ("server", ErrorFrame(8, 5, _ERROR_BODY)),
    "ws_cancel": ("client", CancelFrame(7)),
}

#: Frames from a future peer: v1 with extra keys, which must still decode.
FUTURE_FRAMES: dict[str, tuple[Direction, dict[str, Any], ClientFrame | ServerFrame]] = {
    "future_ws_call": (
        "client",
        {
            "v": 1,
            "id": 7,
            "method": "InvokeSubWorkflow",
            "priority": 3,
            "body": _CALL_BODY,
            "baggage": {"tenant": "acme"},
        },
        CallFrame(7, "InvokeSubWorkflow", _CALL_BODY),
    ),
    "future_ws_error": (
        "server",
        {"v": 1, "id": 8, "status": 5, "error": _ERROR_BODY, "retry_after_ms": 250},
        ErrorFrame(8, 5, _ERROR_BODY),
    ),
    "future_ws_cancel": (
        "client",
        {"v": 1, "id": 7, "cancel": True, "reason": "caller gave up"},
        CancelFrame(7),
    ),
}

#: Which envelope vector each frame vector's payload holds, byte for byte.
_NESTED: dict[str, str] = {
    "ws_call": "invoke_request",
    "ws_call_minimal": "invoke_request",
    "ws_message": "invoke_response",
    "ws_error": "error_unknown_step",
    "future_ws_call": "invoke_request",
    "future_ws_error": "error_unknown_step",
}


def _encode(stream: bool, message: Any) -> bytes:
    return encode_stream_message(message) if stream else encode_message(message)


def _decode(stream: bool, message_type: type, data: bytes) -> Any:
    return decode_stream_message(data) if stream else decode_message(message_type, data)


def _decode_frame(direction: Direction, data: bytes) -> ClientFrame | ServerFrame:
    return decode_client_frame(data) if direction == "client" else decode_server_frame(data)


def _frame_kind(direction: Direction, frame: ClientFrame | ServerFrame) -> str:
    to = "server" if direction == "client" else "client"
    return f"{type(frame).__name__} (websocket, {direction} to {to})"


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def _read(name: str) -> bytes:
    return (VECTORS / "v1" / f"{name}.msgpack").read_bytes()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vector_decodes_and_reencodes_byte_for_byte(name: str) -> None:
    stream, expected = EXPECTED[name]
    data = _read(name)
    assert _decode(stream, type(expected), data) == expected
    assert _encode(stream, expected) == data


@pytest.mark.parametrize("name", sorted(FUTURE))
def test_future_vector_with_unknown_keys_still_decodes(name: str) -> None:
    stream, body, expected = FUTURE[name]
    data = _read(name)
    assert msgpack.unpackb(data) == body
    assert _decode(stream, type(expected), data) == expected


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_frame_vector_decodes_and_reencodes_byte_for_byte(name: str) -> None:
    direction, expected = FRAMES[name]
    data = _read(name)
    assert _decode_frame(direction, data) == expected
    assert encode_frame(expected) == data


@pytest.mark.parametrize("name", sorted(FUTURE_FRAMES))
def test_future_frame_vector_with_unknown_keys_still_decodes(name: str) -> None:
    direction, body, expected = FUTURE_FRAMES[name]
    data = _read(name)
    assert msgpack.unpackb(data) == body
    assert _decode_frame(direction, data) == expected


@pytest.mark.parametrize("name", sorted(_NESTED))
def test_frame_vector_carries_an_envelope_vector(name: str) -> None:
    body = msgpack.unpackb(_read(name))
    payload = body["error"] if "status" in body else body["body"]
    assert payload == _read(_NESTED[name])


def test_json_description_matches_the_files() -> None:
    manifest = json.loads((VECTORS / "v1" / "vectors.json").read_text("utf-8"))
    names = set(EXPECTED) | set(FUTURE) | set(FRAMES) | set(FUTURE_FRAMES)
    assert {entry["name"] for entry in manifest} == names
    for entry in manifest:
        data = _read(entry["name"])
        assert data.hex() == entry["hex"]
        assert _to_json(msgpack.unpackb(data)) == entry["map"]


def _write_vectors() -> None:
    out = VECTORS / "v1"
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    blobs: list[tuple[str, str, bytes]] = []
    for name, (stream, message) in EXPECTED.items():
        kind = f"{type(message).__name__}{' (stream)' if stream else ''}"
        blobs.append((name, kind, _encode(stream, message)))
    for name, (stream, body, expected) in FUTURE.items():
        kind = f"{type(expected).__name__}{' (stream)' if stream else ''}"
        blobs.append((name, kind, msgpack.packb(body)))
    # Frames come after the envelopes, so adding them left every earlier
    # entry of vectors.json as it was.
    for name, (direction, frame) in FRAMES.items():
        blobs.append((name, _frame_kind(direction, frame), encode_frame(frame)))
    for name, (direction, body, expected) in FUTURE_FRAMES.items():
        blobs.append((name, _frame_kind(direction, expected), msgpack.packb(body)))
    for name, kind, data in blobs:
        (out / f"{name}.msgpack").write_bytes(data)
        body = _to_json(msgpack.unpackb(data))
        manifest.append({"name": name, "message": kind, "hex": data.hex(), "map": body})
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    (out / "vectors.json").write_text(text, "utf-8")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/wire/test_vectors.py --write")
    _write_vectors()
