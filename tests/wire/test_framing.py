"""gRPC message framing: prefix encoding and the incremental decoder."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerflow import PeerEncodeError, PeerLimitError
from peerflow._wire.framing import (
    NEED_DATA,
    FrameDecoder,
    encode_frame,
    encode_frame_prefix,
)


def _drain(decoder: FrameDecoder) -> list[bytes]:
    out = []
    while (message := decoder.next_message()) is not NEED_DATA:
        out.append(bytes(message))
    return out


def _decode_in_pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    decoder = FrameDecoder()
    messages = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        decoder.feed(data[start:cut])
        messages.extend(_drain(decoder))
        start = cut
    decoder.end_of_stream()
    return messages


MESSAGES = [b"", b"a", b"hello world", bytes(range(256)) * 3, b"\x00\x00\x00\x00\x05"]
STREAM = b"".join(encode_frame(m) for m in MESSAGES)


def test_prefix_is_flag_then_big_endian_length() -> None:
    assert encode_frame_prefix(0x01020304) == b"\x00\x01\x02\x03\x04"
    assert encode_frame(b"ab") == b"\x00\x00\x00\x00\x02ab"


def test_prefix_rejects_lengths_beyond_u32() -> None:
    with pytest.raises(PeerLimitError):
        encode_frame_prefix(2**32)


def test_split_at_every_offset() -> None:
    for cut in range(len(STREAM) + 1):
        assert _decode_in_pieces(STREAM, [cut]) == MESSAGES


def test_one_byte_at_a_time() -> None:
    assert _decode_in_pieces(STREAM, list(range(len(STREAM)))) == MESSAGES


@given(st.lists(st.binary(max_size=40), max_size=6), st.data())
def test_any_split_gives_the_same_messages(messages: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    assert _decode_in_pieces(stream, cuts) == messages


def test_a_message_in_one_chunk_is_not_copied() -> None:
    chunk = encode_frame(b"x" * 1000) + encode_frame(b"y")
    decoder = FrameDecoder()
    decoder.feed(chunk)
    first = decoder.next_message()
    assert first is not NEED_DATA
    assert first.obj is chunk
    assert bytes(decoder.next_message()) == b"y"  # type: ignore[arg-type]
    assert decoder.buffered_bytes == 0


def test_oversized_message_is_refused_from_its_prefix_alone() -> None:
    decoder = FrameDecoder(max_message_size=10)
    decoder.feed(encode_frame(b"0123456789"))
    assert bytes(decoder.next_message()) == b"0123456789"  # type: ignore[arg-type]
    decoder.feed(encode_frame_prefix(11))
    with pytest.raises(PeerLimitError, match="11 bytes exceeds the limit of 10"):
        decoder.next_message()


@pytest.mark.parametrize(("flag", "match"), [(1, "compressed"), (2, "invalid")])
def test_compressed_or_unknown_flags_are_refused(flag: int, match: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(bytes([flag]) + b"\x00\x00\x00\x01x")
    with pytest.raises(PeerEncodeError, match=match):
        decoder.next_message()


@pytest.mark.parametrize("partial", [b"\x00\x00", b"\x00\x00\x00\x00\x05abc"])
def test_stream_ending_inside_a_message_is_an_error(partial: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(partial)
    assert decoder.next_message() is NEED_DATA
    with pytest.raises(PeerEncodeError, match="stream ended"):
        decoder.end_of_stream()


def test_empty_feeds_are_harmless() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"")
    assert decoder.next_message() is NEED_DATA
    decoder.end_of_stream()
