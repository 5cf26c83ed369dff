"""gRPC length-prefixed message framing: a 5-byte prefix, then the message.

The prefix is a 1-byte compressed flag and a big-endian u32 length. The
decoder is incremental in the h11 style: :meth:`FrameDecoder.feed` bytes as
they arrive, then call :meth:`FrameDecoder.next_message` until it returns
:data:`NEED_DATA`. It never copies a message that arrived in one piece.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from typing import Final, Literal

from ..errors import PeerEncodeError, PeerLimitError

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "NEED_DATA",
    "PREFIX_SIZE",
    "FrameDecoder",
    "encode_frame",
    "encode_frame_prefix",
]

#: The default limit on one message, prefix excluded (64 MiB).
DEFAULT_MAX_MESSAGE_SIZE: Final = 64 * 1024 * 1024
#: Length of the gRPC message prefix.
PREFIX_SIZE: Final = 5

_PREFIX = struct.Struct(">BI")


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


#: Returned by :meth:`FrameDecoder.next_message` when no complete message is
#: buffered yet.
NEED_DATA: Final = _NeedData.NEED_DATA


def encode_frame_prefix(length: int) -> bytes:
    """Return the 5-byte prefix of an uncompressed message of ``length`` bytes.

    Send it followed by the message itself; a transport that writes the two
    separately avoids copying a large message.

    Raises:
        PeerLimitError: ``length`` does not fit in the u32 length field.
    """
    if not 0 <= length <= 0xFFFFFFFF:
        raise PeerLimitError(f"message of {length} bytes does not fit in a gRPC frame")
    return _PREFIX.pack(0, length)


def encode_frame(message: bytes) -> bytes:
    """Return ``message`` framed as one uncompressed gRPC message.

    Raises:
        PeerLimitError: the message is 4 GiB or larger.
    """
    return encode_frame_prefix(len(message)) + message


class FrameDecoder:
    """Incremental decoder of a stream of gRPC length-prefixed messages.

    Feed it the DATA of one HTTP/2 stream, in whatever pieces it arrives, and
    take complete messages out. A message that arrived inside one fed chunk is
    returned as a zero-copy ``memoryview`` of it; one split across chunks is
    joined once. Feed only immutable ``bytes``, since views may alias them.

    Args:
        max_message_size: the largest message accepted, prefix excluded.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._max_message_size = max_message_size
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        # The body length once a prefix has been read, else None.
        self._expected: int | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes fed but not yet returned as part of a message."""
        return self._buffered

    def feed(self, data: bytes) -> None:
        """Append received bytes. Call :meth:`next_message` after each feed.

        Checking after each feed is what lets an oversized message be refused
        as soon as its prefix arrives, before its body is buffered.
        """
        if data:
            self._chunks.append(memoryview(data))
            self._buffered += len(data)

    def next_message(self) -> memoryview | Literal[_NeedData.NEED_DATA]:
        """Return the next complete message, or :data:`NEED_DATA`.

        Raises:
            PeerLimitError: the next message is larger than
                ``max_message_size`` (raised as soon as its prefix is read).
            PeerEncodeError: the message is marked compressed (no
                ``grpc-encoding`` is supported) or the flag byte is invalid.
        """
        if self._expected is None:
            if self._buffered < PREFIX_SIZE:
                return NEED_DATA
            flag, length = _PREFIX.unpack(self._take(PREFIX_SIZE))
            if flag == 1:
                raise PeerEncodeError(
                    "received a compressed gRPC message, but no grpc-encoding is supported"
                )
            if flag != 0:
                raise PeerEncodeError(f"invalid gRPC compressed flag {flag:#04x}")
            if length > self._max_message_size:
                raise PeerLimitError(
                    f"incoming message of {length} bytes exceeds the limit of "
                    f"{self._max_message_size} bytes"
                )
            self._expected = length
        if self._buffered < self._expected:
            return NEED_DATA
        message = self._take(self._expected)
        self._expected = None
        return message

    def end_of_stream(self) -> None:
        """Declare that no more data will come.

        Raises:
            PeerEncodeError: the stream ended inside a message.
        """
        if self._expected is not None:
            raise PeerEncodeError(
                f"stream ended inside a gRPC message ({self._buffered} of "
                f"{self._expected} bytes received)"
            )
        if self._buffered:
            raise PeerEncodeError(
                f"stream ended inside a gRPC message prefix ({self._buffered} of 5 bytes)"
            )

    def _take(self, n: int) -> memoryview:
        if n == 0:
            return memoryview(b"")
        self._buffered -= n
        first = self._chunks[0]
        if len(first) >= n:
            if len(first) == n:
                self._chunks.popleft()
            else:
                self._chunks[0] = first[n:]
            return first[:n]
        parts = []
        while n:
            chunk = self._chunks[0]
            if len(chunk) <= n:
                parts.append(self._chunks.popleft())
                n -= len(chunk)
            else:
                parts.append(chunk[:n])
                self._chunks[0] = chunk[n:]
                n = 0
        return memoryview(b"".join(parts))
