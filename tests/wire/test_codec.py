"""Codec tests: round trips, hostile bytes, and the edge cases msgpack gets wrong."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerflow import (
    InlineRef,
    PeerEncodeError,
    PeerEnvelopeVersionError,
    PeerWorkflowError,
    RefLifetime,
    RemoteRefDescriptor,
    SubWorkflowResponse,
    peer_envelope_version,
)
from peerflow._wire import codec
from peerflow._wire.codec import (
    decode_message,
    decode_stream_message,
    encode_deref_chunk_header,
    encode_message,
    encode_stream_message,
)
from peerflow._wire.envelopes import (
    DerefChunk,
    DerefSessionRefRequest,
    InvokeSubWorkflowRequest,
    Message,
    StreamEvent,
)
from peerflow._wire.values import MAX_DEPTH
from peerflow._wire.version import check_envelope_version
from strategies import messages, stream_events, sub_workflow_responses, wire_values


def _request(value: Any) -> InvokeSubWorkflowRequest:
    return InvokeSubWorkflowRequest("wf", ["a"], value)


def _encode_error(value: Any) -> PeerEncodeError:
    with pytest.raises(PeerEncodeError) as info:
        encode_message(_request(value))
    return info.value


def _decode_error(body: dict[str, Any]) -> PeerEncodeError:
    with pytest.raises(PeerEncodeError) as info:
        decode_message(InvokeSubWorkflowRequest, msgpack.packb(body))
    return info.value


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# --------------------------------------------------------------------------
# Round trips


@given(messages())
def test_every_message_round_trips(message: Message) -> None:
    data = encode_message(message)
    assert decode_message(type(message), data) == message
    assert encode_message(decode_message(type(message), data)) == data


@given(wire_values)
def test_every_wire_value_round_trips(value: Any) -> None:
    request = _request(value)
    assert decode_message(InvokeSubWorkflowRequest, encode_message(request)) == request


@given(st.one_of(stream_events, sub_workflow_responses()))
def test_stream_messages_round_trip(message: StreamEvent | SubWorkflowResponse) -> None:
    assert decode_stream_message(encode_stream_message(message)) == message


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_encode_error(data: bytes) -> None:
    # Anything but PeerEncodeError escaping fails the test.
    with contextlib.suppress(PeerEncodeError):
        decode_message(InvokeSubWorkflowRequest, data)


@given(wire_values)
def test_decoding_wrong_shapes_raises_only_encode_errors(value: Any) -> None:
    # A valid wire value put in place of each field: it decodes or is refused
    # with a PeerEncodeError naming the field, never anything else.
    for field in ("workflow_name", "step_ids", "timeout_ms", "lease_id"):
        body = {"v": 1, "workflow_name": "w", "step_ids": [], "input": None, field: value}
        try:
            decode_message(InvokeSubWorkflowRequest, msgpack.packb(body))
        except PeerEncodeError as exc:
            failure: PeerEncodeError | None = exc
        else:
            failure = None
        assert failure is None or failure.path.startswith(field)


def test_every_message_carries_the_version_first() -> None:
    body = msgpack.unpackb(encode_message(DerefSessionRefRequest("u")))
    assert next(iter(body)) == "v"
    assert body["v"] == peer_envelope_version() == 1


def test_tuples_are_encoded_as_lists_and_come_back_as_lists() -> None:
    data = encode_message(_request({"t": (1, (2, "x"))}))
    assert data == encode_message(_request({"t": [1, [2, "x"]]}))
    assert decode_message(InvokeSubWorkflowRequest, data).input == {"t": [1, [2, "x"]]}


def test_bytearray_and_memoryview_are_encoded_as_bytes() -> None:
    data = encode_message(_request([bytearray(b"ab"), memoryview(b"cd")]))
    assert decode_message(InvokeSubWorkflowRequest, data).input == [b"ab", b"cd"]


def test_unknown_keys_are_ignored_and_optional_keys_default() -> None:
    body = {"v": 1, "future": {"x": 1}, "workflow_name": "w", "step_ids": ["a"], "input": 3}
    request = decode_message(InvokeSubWorkflowRequest, msgpack.packb(body))
    assert request == InvokeSubWorkflowRequest("w", ("a",), 3)
    assert request.timeout_ms is None
    assert request.lease_id is None


def test_optional_fields_at_their_default_are_left_out() -> None:
    body = msgpack.unpackb(encode_message(SubWorkflowResponse()))
    assert body == {"v": 1, "result": None, "state": {}, "remote_refs": {}, "error": None}


def test_response_error_travels_as_a_map_and_raises() -> None:
    response = SubWorkflowResponse(error="boom", error_step_id="s", error_type="KeyError")
    body = msgpack.unpackb(encode_message(response))
    assert body["error"] == {"message": "boom", "step_id": "s", "error_type": "KeyError"}
    with pytest.raises(PeerWorkflowError) as info:
        decode_message(SubWorkflowResponse, encode_message(response)).raise_for_error()
    assert (info.value.message, info.value.step_id, info.value.error_type) == (
        "boom",
        "s",
        "KeyError",
    )
    SubWorkflowResponse(result=1).raise_for_error()


def test_descriptors_and_inline_refs_use_the_spec_keys() -> None:
    descriptor = RemoteRefDescriptor("n", "t", 5, RefLifetime.UNTIL_PARENT_FINISH, None, False)
    response = SubWorkflowResponse(
        remote_refs={"u1": descriptor},
        inline_refs={"u2": InlineRef(descriptor, b"x")},
        dropped_refs=("u3",),
    )
    body = msgpack.unpackb(encode_message(response))
    expected = {
        "origin_node_id": "n",
        "type_tag": "t",
        "created_at_epoch_ms": 5,
        "lifetime": "until_parent_finish",
        "size": None,
        "serializable": False,
    }
    assert body["remote_refs"] == {"u1": expected}
    assert body["inline_refs"] == {"u2": {**expected, "payload": b"x"}}
    assert body["dropped_refs"] == ["u3"]


def test_stream_messages_are_tagged_by_kind() -> None:
    event = msgpack.unpackb(encode_stream_message(StreamEvent("E", {"a": 1})))
    assert event == {"v": 1, "kind": "event", "event": {"event_type": "E", "data": {"a": 1}}}
    final = msgpack.unpackb(encode_stream_message(SubWorkflowResponse(result=2)))
    assert (final["kind"], final["result"]) == ("response", 2)
    with pytest.raises(PeerEncodeError) as info:
        decode_stream_message(msgpack.packb({"v": 1, "kind": "progress"}))
    assert info.value.path == "kind"


# --------------------------------------------------------------------------
# Edge cases that msgpack alone gets wrong, on encode


@pytest.mark.parametrize(
    ("value", "path", "reason"),
    [
        ({"rows": [0, 1, 2, {"when": 2**64}]}, 'input["rows"][3]["when"]', "64 bits"),
        ([-(2**63) - 1], "input[0]", "64 bits"),
        ({"s": "ok\ud800"}, 'input["s"]', "surrogate"),
        ({"m": {1: "x"}}, 'input["m"][1]', "map key must be a str"),
        ({"m": {b"k": "x"}}, "input[\"m\"][b'k']", "map key must be a str"),
        ({"s": {1, 2}}, 'input["s"]', "builtins.set is not a wire value"),
        ([object()], "input[0]", "builtins.object is not a wire value"),
        ([msgpack.ExtType(1, b"")], "input[0]", "ExtType is not a wire value"),
        ([msgpack.Timestamp(0, 0)], "input[0]", "Timestamp is not a wire value"),
        ({"bad\ud800key": 1}, 'input["bad\\ud800key"]', "surrogate"),
    ],
)
def test_encoding_a_bad_value_names_its_path(value: Any, path: str, reason: str) -> None:
    error = _encode_error(value)
    assert error.path == path
    assert reason in error.reason


def test_lone_surrogate_in_a_key_is_refused() -> None:
    error = _encode_error({"k\udc80": 1})
    assert "surrogate" in error.reason


def test_nesting_up_to_the_limit_is_fine_and_deeper_is_refused() -> None:
    # The message map is level 0 and ``input`` itself level 1.
    encode_message(_request(_nested(MAX_DEPTH)))
    error = _encode_error(_nested(MAX_DEPTH + 1))
    assert error.path == "input" + "[0]" * MAX_DEPTH
    assert "deeper than" in error.reason


class _Name(str):
    pass


@pytest.mark.parametrize(
    ("fields", "path", "reason"),
    [
        ({"workflow_name": 7}, "workflow_name", "expected str, got int"),
        ({"workflow_name": _Name("w")}, "workflow_name", "expected str, got _Name"),
        ({"step_ids": ["a", 3]}, "step_ids[1]", "expected str, got int"),
        ({"step_ids": ["a", msgpack.ExtType(1, b"")]}, "step_ids[1]", "got ExtType"),
        ({"step_ids": [_Name("a")]}, "step_ids[0]", "_Name is not a wire value"),
        ({"timeout_ms": True}, "timeout_ms", "expected int, got bool"),
        ({"timeout_ms": msgpack.Timestamp(1, 0)}, "timeout_ms", "got Timestamp"),
        ({"lease_id": b"l"}, "lease_id", "expected str, got bytes"),
    ],
)
def test_encoding_a_request_field_of_the_wrong_type_names_it(
    fields: dict[str, Any], path: str, reason: str
) -> None:
    # The sender gets the error the peer would give on decoding.
    request = InvokeSubWorkflowRequest(**{"workflow_name": "wf", "step_ids": ["a"], **fields})
    with pytest.raises(PeerEncodeError) as info:
        encode_message(request)
    assert info.value.path == path
    assert reason in info.value.reason


def test_a_nested_encode_while_packing_gets_its_own_packer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # msgpack calls the codec's default hook mid-pack (for a tuple); an
    # encode from there must not share the packer that is busy.
    inner = InvokeSubWorkflowRequest("inner", ["b"], {"n": 2})
    nested: list[bytes] = []

    def default_that_encodes(value: Any) -> Any:
        nested.append(encode_message(inner))
        return list(value)

    monkeypatch.setattr(codec, "_pack_default", default_that_encodes)
    monkeypatch.setattr(codec, "_PACKERS", [])
    outer = encode_message(_request({"t": (1, 2)}))
    assert msgpack.unpackb(nested[0])["input"] == {"n": 2}
    assert msgpack.unpackb(outer)["input"] == {"t": [1, 2]}
    # Both packers went back, and each packs correctly again.
    assert len(codec._PACKERS) == 2
    assert encode_message(inner) == encode_message(inner) == nested[0]


def test_a_packer_that_grew_or_failed_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "_PACKERS", [])
    encode_message(_request(1))
    assert len(codec._PACKERS) == 1
    encode_message(DerefChunk(bytes(codec._PACKER_KEPT_SIZE)))
    assert codec._PACKERS == []
    encode_message(_request(1))
    with pytest.raises(PeerEncodeError):
        encode_message(_request({"s": {1}}))
    assert codec._PACKERS == []
    assert msgpack.unpackb(encode_message(_request([1, "x"])))["input"] == [1, "x"]


def test_bad_values_in_state_and_result_name_those_fields() -> None:
    with pytest.raises(PeerEncodeError) as info:
        encode_message(SubWorkflowResponse(state={"a": [1, {2}]}))
    assert info.value.path == 'state["a"][1]'
    with pytest.raises(PeerEncodeError) as info:
        encode_message(SubWorkflowResponse(result={"x": 2**70}))
    assert info.value.path == 'result["x"]'


# --------------------------------------------------------------------------
# ... and on decode


def test_decoding_bytes_map_keys_is_refused() -> None:
    error = _decode_error({"v": 1, "workflow_name": "w", "step_ids": [], "input": {b"k": 1}})
    assert error.path == "input[b'k']"


def test_decoding_ext_types_is_refused() -> None:
    for ext in (msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 0)):
        body = {"v": 1, "workflow_name": "w", "step_ids": [], "input": {"at": [ext]}}
        with pytest.raises(PeerEncodeError, match="extension") as info:
            decode_message(InvokeSubWorkflowRequest, msgpack.packb(body))
        assert info.value.path == 'input["at"][0]'


def test_decoding_deep_nesting_is_refused() -> None:
    body = {"v": 1, "workflow_name": "w", "step_ids": [], "input": _nested(MAX_DEPTH + 1)}
    assert "deeper than" in _decode_error(body).reason
    hostile = b"\x81\xa1v\x01" + b"\x91" * 100_000
    with pytest.raises(PeerEncodeError):
        decode_message(InvokeSubWorkflowRequest, hostile)


def test_decoding_invalid_utf8_is_refused_and_named() -> None:
    with pytest.raises(PeerEncodeError, match="not valid UTF-8") as info:
        decode_message(DerefSessionRefRequest, b"\x82\xa1v\x01\xa8ref_uuid\xa1\xff")
    assert info.value.path == "ref_uuid"


def test_decoding_int_map_keys_is_refused_and_named() -> None:
    with pytest.raises(PeerEncodeError, match="map key must be a str") as info:
        decode_message(DerefSessionRefRequest, msgpack.packb({"v": 1, "ref_uuid": "u", 7: 1}))
    assert info.value.path == "7"
    body = {"v": 1, "workflow_name": "w", "step_ids": [], "input": {"rows": [{1: 2}]}}
    with pytest.raises(PeerEncodeError, match="map key must be a str") as info:
        decode_message(InvokeSubWorkflowRequest, msgpack.packb(body))
    assert info.value.path == 'input["rows"][0][1]'


@pytest.mark.parametrize("size", [10, 5000])
def test_decoding_a_bytes_key_in_the_message_map_is_refused(size: int) -> None:
    # Past a few KiB the check is a walk of the decoded map rather than a
    # byte search, and a flat map like a deref chunk takes its shortest path.
    data = msgpack.packb({"v": 1, b"payload": b"x" * size})
    with pytest.raises(PeerEncodeError) as info:
        decode_message(DerefChunk, data)
    assert info.value.path == "b'payload'"


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"payload": "text"}, "payload"),
        ({"payload": None}, "payload"),
        ({"type_tag": 5, "payload": b""}, "type_tag"),
        ({"total_size": "5", "payload": b""}, "total_size"),
        ({"total_size": True, "payload": b""}, "total_size"),
    ],
)
def test_decoding_a_chunk_with_a_wrong_field_names_it(fields: dict[str, Any], path: str) -> None:
    with pytest.raises(PeerEncodeError) as info:
        decode_message(DerefChunk, msgpack.packb({"v": 1, **fields}))
    assert info.value.path == path


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"payload": msgpack.Timestamp(1, 0)}, "payload"),
        ({"total_size": msgpack.Timestamp(1, 0), "payload": b""}, "total_size"),
        # An unknown key takes the chunk off its short path: the value check runs.
        ({"payload": b"x" * 5000, "later": [msgpack.Timestamp(1, 0)]}, "later[0]"),
        ({"payload": b"x", "later": {"m": {b"k": 2}}}, "later[\"m\"][b'k']"),
    ],
)
def test_decoding_a_chunk_refuses_what_is_not_a_wire_value(
    fields: dict[str, Any], path: str
) -> None:
    with pytest.raises(PeerEncodeError) as info:
        decode_message(DerefChunk, msgpack.packb({"v": 1, **fields}))
    assert info.value.path == path


def test_decoding_a_chunk_fills_in_its_defaults() -> None:
    assert decode_message(DerefChunk, msgpack.packb({"v": 1})) == DerefChunk()
    first = {"v": 1, "type_tag": "t", "total_size": 9, "payload": b"abc"}
    assert decode_message(DerefChunk, msgpack.packb(first)) == DerefChunk(
        b"abc", type_tag="t", total_size=9
    )


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"workflow_name": "w", "step_ids": ["a", "b", 3]}, "step_ids[2]"),
        ({"workflow_name": "w", "step_ids": "ab"}, "step_ids"),
        ({"workflow_name": 7, "step_ids": []}, "workflow_name"),
        ({"step_ids": []}, "workflow_name"),
        ({"workflow_name": "w", "step_ids": [], "timeout_ms": "5"}, "timeout_ms"),
        ({"workflow_name": "w", "step_ids": [], "timeout_ms": True}, "timeout_ms"),
    ],
)
def test_decoding_wrong_field_types_names_the_field(body: dict[str, Any], path: str) -> None:
    assert _decode_error({"v": 1, **body}).path == path


def test_decoding_bad_nested_fields_names_the_path() -> None:
    good = msgpack.unpackb(
        encode_message(
            SubWorkflowResponse(
                remote_refs={"u": RemoteRefDescriptor("n", "t", 1)},
                inline_refs={"i": InlineRef(RemoteRefDescriptor("n", "t", 1), b"p")},
                error="e",
            )
        )
    )
    cases = [
        (("remote_refs", "u", "lifetime"), "forever", 'remote_refs["u"]["lifetime"]'),
        (("remote_refs", "u", "size"), "big", 'remote_refs["u"]["size"]'),
        (("inline_refs", "i", "payload"), "text", 'inline_refs["i"]["payload"]'),
        (("error", "message"), None, 'error["message"]'),
        (("error", "step_id"), 3, 'error["step_id"]'),
    ]
    for keys, bad, path in cases:
        body = msgpack.unpackb(msgpack.packb(good))
        target = body
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = bad
        with pytest.raises(PeerEncodeError) as info:
            decode_message(SubWorkflowResponse, msgpack.packb(body))
        assert info.value.path == path


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x90", b"\x81\xa1v", b"\x80\x80", b"\xa3abc", b"\xdf\xff\xff\xff\xff"],
)
def test_malformed_frames_raise_encode_error(data: bytes) -> None:
    with pytest.raises(PeerEncodeError) as info:
        decode_message(DerefSessionRefRequest, data)
    # msgpack's own message is empty for some errors: the reason is never blank.
    assert not str(info.value).endswith(": ")


def test_lying_lengths_do_not_allocate() -> None:
    # A bin32 header claiming 4 GiB inside a 20-byte message.
    data = b"\x82\xa1v\x01\xa7payload\xc6\xff\xff\xff\xff"
    with pytest.raises(PeerEncodeError):
        decode_message(DerefChunk, data)


def test_decoding_accepts_memoryview_and_bytearray() -> None:
    data = encode_message(DerefSessionRefRequest("u"))
    assert decode_message(DerefSessionRefRequest, memoryview(data)).ref_uuid == "u"
    assert decode_message(DerefSessionRefRequest, bytearray(data)).ref_uuid == "u"


# --------------------------------------------------------------------------
# Versions


def test_older_and_current_versions_are_accepted_newer_rejected() -> None:
    body = {"workflow_name": "w", "step_ids": [], "input": None}
    decode_message(InvokeSubWorkflowRequest, msgpack.packb({"v": 1, **body}))
    with pytest.raises(PeerEnvelopeVersionError) as info:
        decode_message(InvokeSubWorkflowRequest, msgpack.packb({"v": 2, **body}))
    assert (info.value.got, info.value.supported) == (2, 1)


def test_a_version_beyond_64_bits_is_an_encode_error() -> None:
    # Only JSON can send one; as a version error it could not travel back.
    with pytest.raises(PeerEncodeError) as info:
        check_envelope_version(2**64)
    assert (info.value.path, info.value.reason) == ("v", "envelope version does not fit in 64 bits")
    with pytest.raises(PeerEnvelopeVersionError):
        check_envelope_version(2**64 - 1)


@pytest.mark.parametrize("v", [None, "1", 1.0, True, 0, -1])
def test_missing_or_non_int_version_is_an_encode_error(v: Any) -> None:
    body = {"workflow_name": "w", "step_ids": [], "input": None}
    if v is not None:
        body["v"] = v
    with pytest.raises(PeerEncodeError) as info:
        decode_message(InvokeSubWorkflowRequest, msgpack.packb(body))
    assert info.value.path == "v"


# --------------------------------------------------------------------------
# Deref chunks without copying the payload


@given(
    st.integers(min_value=0, max_value=70_000),
    st.none() | st.text(max_size=5),
    st.none() | st.integers(min_value=0, max_value=2**40),
)
def test_chunk_header_plus_payload_equals_the_encoded_chunk(
    size: int, type_tag: str | None, total_size: int | None
) -> None:
    payload = b"\xab" * size
    header = encode_deref_chunk_header(size, type_tag=type_tag, total_size=total_size)
    chunk = DerefChunk(payload, type_tag=type_tag, total_size=total_size)
    assert header + payload == encode_message(chunk)
    assert decode_message(DerefChunk, header + payload) == chunk


def test_chunk_header_rejects_impossible_sizes() -> None:
    with pytest.raises(PeerEncodeError):
        encode_deref_chunk_header(-1)
    with pytest.raises(PeerEncodeError):
        encode_deref_chunk_header(2**32)
