"""The JSON spelling of the envelopes: round trips, the $bytes rule, and hostile input."""

from __future__ import annotations

import contextlib
import functools
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerflow import PeerEncodeError, PeerEnvelopeVersionError, SubWorkflowResponse
from peerflow._peer.json_codec import (
    END_LINE,
    decode_json,
    decode_json_stream_message,
    decode_json_value,
    encode_json,
    encode_json_deref_chunk,
    encode_json_error,
    encode_json_stream_message,
    json_body,
    parse_json_line,
)
from peerflow._wire.codec import encode_message
from peerflow._wire.envelopes import (
    DerefChunk,
    DerefSessionRefRequest,
    ErrorDetails,
    InvokeSubWorkflowRequest,
    LeaseRequest,
    Message,
    StreamEvent,
)
from strategies import (
    deref_chunks,
    error_details,
    invoke_requests,
    messages,
    stream_events,
    sub_workflow_responses,
    wire_values,
)

DECODABLE = (
    InvokeSubWorkflowRequest,
    SubWorkflowResponse,
    DerefSessionRefRequest,
    DerefChunk,
    LeaseRequest,
    ErrorDetails,
)


def _json_safe(value: Any) -> bool:
    """Whether a wire value can travel over JSON: finite floats, no map that reads as $bytes."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(map(_json_safe, value))
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("$bytes"), str):
            return False
        return all(map(_json_safe, value.values()))
    return True


def _fields(message: object) -> list[Any]:
    return [getattr(message, a.name) for a in getattr(message, "__attrs_attrs__", ())]


def _is_json_safe(message: Message) -> bool:
    return all(
        _json_safe(f) if not hasattr(f, "__attrs_attrs__") else True for f in _fields(message)
    )


@given(messages())
def test_every_message_round_trips_or_is_refused_with_a_path(message: Message) -> None:
    if not _is_json_safe(message):
        with pytest.raises(PeerEncodeError, match=r"\$bytes|NaN") as refused:
            encode_json(message)
        assert refused.value.path  # names where JSON cannot follow
        return
    encoded = encode_json(message)
    assert decode_json(type(message), encoded) == message
    # It is JSON a third party can read, with bytes as base64 text.
    assert isinstance(json.loads(encoded), dict)


@given(invoke_requests.filter(lambda m: _json_safe(m.input)))
def test_requests_round_trip(request: InvokeSubWorkflowRequest) -> None:
    assert decode_json(InvokeSubWorkflowRequest, encode_json(request)) == request


@given(sub_workflow_responses().filter(_is_json_safe) | stream_events.filter(_is_json_safe))
def test_stream_messages_round_trip(message: StreamEvent | SubWorkflowResponse) -> None:
    assert decode_json_stream_message(encode_json_stream_message(message)) == message


@given(deref_chunks)
def test_the_direct_chunk_encoder_matches_the_codec(chunk: DerefChunk) -> None:
    direct = encode_json_deref_chunk(
        chunk.payload, type_tag=chunk.type_tag, total_size=chunk.total_size
    )
    assert json.loads(direct) == json.loads(encode_json(chunk))
    assert decode_json(DerefChunk, direct) == chunk


@given(st.binary(max_size=200), st.sampled_from(DECODABLE))
def test_any_bytes_decode_or_raise_peer_encode_error(data: bytes, cls: type) -> None:
    with contextlib.suppress(PeerEncodeError, PeerEnvelopeVersionError):
        decode_json(cls, data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.fixed_dictionaries(
        {"v": st.integers(-2, 3) | json_values},
        optional={
            "workflow_name": json_values,
            "step_ids": json_values,
            "input": json_values,
            "ref_uuid": json_values,
            "payload": json_values,
            "code": json_values,
            "message": json_values,
            "inline_refs": json_values,
        },
    ),
    st.sampled_from(DECODABLE),
)
def test_any_json_object_decodes_or_raises_peer_encode_error(
    body: dict[str, Any], cls: type
) -> None:
    text = json.dumps(body).encode()  # may hold NaN and Infinity, which are refused
    with contextlib.suppress(PeerEncodeError, PeerEnvelopeVersionError):
        decode_json(cls, text)


def test_bytes_in_values_are_tagged_and_schema_bytes_are_plain_base64() -> None:
    request = InvokeSubWorkflowRequest("w", ("s",), {"raw": b"\x00\xff"})
    assert json.loads(encode_json(request))["input"] == {"raw": {"$bytes": "AP8="}}
    chunk = DerefChunk(payload=b"\x00\xff")  # type: ignore[call-arg]
    assert json.loads(encode_json(chunk)) == {"v": 1, "payload": "AP8="}


@pytest.mark.parametrize(
    ("value", "path"),
    [
        (math.inf, "input"),
        ([1, -math.inf], "input[1]"),
        ({"a": math.nan}, 'input["a"]'),
        ({"k": {"$bytes": "AA=="}}, 'input["k"]'),
    ],
)
def test_what_json_cannot_carry_is_refused_with_its_path(value: Any, path: str) -> None:
    with pytest.raises(PeerEncodeError) as info:
        encode_json(InvokeSubWorkflowRequest("w", ("s",), value))
    assert info.value.path == path


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (b'{"v":1,"workflow_name":"w","step_ids":[],"input":1e999}', ""),
        (b'{"v":1,"workflow_name":"w","step_ids":[],"input":Infinity}', ""),
        (b'{"v":1,"workflow_name":"w","step_ids":[],"input":{"$bytes":"*"}}', 'input["$bytes"]'),
        (b'{"v":1,"workflow_name":"w","step_ids":[],"input":' + b"1" * 30 + b"}", "input"),
        (b'{"v":1,"workflow_name":"w","step_ids":[],"input":"\\ud800"}', "input"),
        (b'{"v":1,"workflow_name":"w","step_ids":[],"input":' + b"[" * 70 + b"]" * 70 + b"}", None),
        (b"[" * 100_000, ""),
        (b'{"v":"1"}', "v"),
    ],
)
def test_hostile_json_is_an_encode_error(text: bytes, path: str | None) -> None:
    with pytest.raises(PeerEncodeError) as info:
        decode_json(InvokeSubWorkflowRequest, text)
    if path is not None:
        assert info.value.path == path


def test_a_newer_version_is_refused_as_such() -> None:
    with pytest.raises(PeerEnvelopeVersionError):
        decode_json(InvokeSubWorkflowRequest, b'{"v": 2, "input": {"$bytes": "*"}}')


def test_a_payload_must_be_base64_text() -> None:
    with pytest.raises(PeerEncodeError) as info:
        decode_json(DerefChunk, b'{"v": 1, "payload": {"$bytes": "AA=="}}')
    assert info.value.path == "payload"
    with pytest.raises(PeerEncodeError, match="base64"):
        decode_json(DerefChunk, b'{"v": 1, "payload": "not base64!"}')


@given(error_details)
def test_lines_tell_messages_errors_and_the_end_apart(details: ErrorDetails) -> None:
    line = parse_json_line(encode_json_error(encode_message(details)))
    assert (line.error, line.message, line.end) == (details, None, False)
    assert parse_json_line(END_LINE).end
    message = parse_json_line(encode_json(LeaseRequest("l", 5)))
    assert message.message == {"v": 1, "lease_id": "l", "ttl_ms": 5}
    for odd in (b"[]", b'{"end": false}', b'{"error": 1}'):
        with pytest.raises(PeerEncodeError):
            parse_json_line(odd)


# --------------------------------------------------------------------------
# One value on its own, as the command line reads --input and prints results


@given(wire_values.filter(_json_safe))
def test_a_value_reads_back_from_the_spelling_http_json_sends(value: Any) -> None:
    text = json.dumps(json_body(InvokeSubWorkflowRequest("w", (), value))["input"])
    assert decode_json_value(text, "input") == value


def test_a_value_reads_bytes_and_leaves_look_alikes_as_maps() -> None:
    text = (
        '{"b": {"$bytes": "AP8="}, "two_keys": {"$bytes": "AA==", "x": 1}, '
        '"not_str": {"$bytes": 5}, "deep": ' + "[" * 63 + '{"$bytes": ""}' + "]" * 63 + "}"
    )
    assert decode_json_value(text, "input") == {
        "b": b"\x00\xff",
        "two_keys": {"$bytes": "AA==", "x": 1},
        "not_str": {"$bytes": 5},
        # Bytes are a leaf, not a container: at level 65 they are not too deep.
        "deep": functools.reduce(lambda inner, _: [inner], range(63), b""),
    }


@pytest.mark.parametrize(
    ("text", "path", "reason"),
    [
        ('{"a": [1, NaN]}', 'input["a"][1]', "nan is not a finite number"),
        ("-Infinity", "input", "-inf is not a finite number"),
        ("[1e400]", "input[0]", "inf is not a finite number"),
        ('{"b": {"$bytes": "AA"}}', 'input["b"]["$bytes"]', "not valid base64"),
        (str(2**64), "input", "int does not fit in 64 bits"),
        ('["\\ud800"]', "input[0]", "lone surrogate"),
        ("[" * 65 + "]" * 65, "input" + "[0]" * 64, "nested deeper than 64 levels"),
        ('{"a": }', "input", "malformed JSON"),
        ("[" * 100_000, "input", "JSON nested too deep"),
    ],
)
def test_a_value_is_refused_naming_its_path(text: str, path: str, reason: str) -> None:
    with pytest.raises(PeerEncodeError) as info:
        decode_json_value(text, "input")
    assert info.value.path == path
    assert reason in info.value.reason
