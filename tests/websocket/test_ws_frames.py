"""The WebSocket frames: round trips, and hostile bytes that only ever give frame errors."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerflow._peer.ws_frames import (
    CallFrame,
    CancelFrame,
    EndFrame,
    ErrorFrame,
    FrameDecodeError,
    FrameVersionError,
    MessageFrame,
    decode_client_frame,
    decode_server_frame,
    encode_frame,
)

ids = st.integers(min_value=0, max_value=2**64 - 1)

client_frames = st.builds(
    CallFrame,
    id=ids,
    method=st.text(max_size=20),
    body=st.binary(max_size=64),
    timeout_ms=st.none() | st.integers(min_value=0, max_value=2**63),
) | st.builds(CancelFrame, id=ids)

server_frames = (
    st.builds(MessageFrame, id=ids, body=st.binary(max_size=64))
    | st.builds(EndFrame, id=ids)
    | st.builds(ErrorFrame, id=ids, status=st.integers(0, 16), error=st.binary(max_size=32))
)


@given(client_frames)
def test_client_frames_round_trip(frame: CallFrame | CancelFrame) -> None:
    assert decode_client_frame(encode_frame(frame)) == frame


@given(server_frames)
def test_server_frames_round_trip(frame: MessageFrame | EndFrame | ErrorFrame) -> None:
    assert decode_server_frame(encode_frame(frame)) == frame


@given(st.binary(max_size=100))
def test_any_bytes_decode_or_raise_a_frame_error(data: bytes) -> None:
    with contextlib.suppress(FrameDecodeError, FrameVersionError):
        decode_client_frame(data)
    with contextlib.suppress(FrameDecodeError, FrameVersionError):
        decode_server_frame(data)


maps = st.dictionaries(
    st.sampled_from(
        ["v", "id", "method", "body", "timeout_ms", "cancel", "end", "status", "error"]
    ),
    st.none()
    | st.booleans()
    | st.integers(-5, 2**64 - 1)
    | st.text(max_size=5)
    | st.binary(max_size=5),
)


def _frame_error(decode: object, data: bytes) -> FrameDecodeError | FrameVersionError | None:
    try:
        decode(data)  # type: ignore[operator]
    except (FrameDecodeError, FrameVersionError) as exc:
        return exc
    return None


@given(maps)
def test_any_map_decodes_or_names_what_is_wrong(body: dict[str, object]) -> None:
    data = msgpack.packb(body)
    frame_id = body.get("id")
    readable = type(frame_id) is int and 0 <= frame_id <= 2**64 - 1  # type: ignore[operator]
    for decode in (decode_client_frame, decode_server_frame):
        error = _frame_error(decode, data)
        if error is None:
            continue
        # With a readable id the error names the call; without one it cannot.
        assert error.frame_id == (frame_id if readable else None)


def test_an_id_out_of_range_cannot_name_a_call() -> None:
    with pytest.raises(FrameDecodeError) as info:
        decode_client_frame(msgpack.packb({"v": 1, "id": -1, "cancel": True}))
    assert (info.value.frame_id, info.value.path) == (None, "id")
