"""HTTP/2 connections on trio: one reader task and one writer path around h2.

The connection core reads up to ``read_size`` bytes, feeds every resulting h2
event to its stream, then flushes once. A flush tries a non-blocking send on
the socket right away and hands only what would block to the writer task, so
the common case costs no task switch. Deferring every stream's output to one
send per scheduler batch was measured too: it cut sends ~25-fold but made
client and server work in lockstep batches, and calls/s fell from ~10k to
~6k on two cores. Output is a list of chunks, so a large DATA payload goes
to ``sendmsg`` without being copied into a buffer. Every background task
runs under one shielded cancel scope: a caller's cancellation never cuts a
frame in half and never stops the reader while in-flight streams drain.
"""

from __future__ import annotations

import binascii
import logging
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import hpack
import hpack.table
import hyperframe.frame
import trio
from h2.connection import AllowedStreamIDs, ConnectionInputs
from h2.stream import StreamInputs
from h2.utilities import authority_from_headers, extract_method_header

from .._excgroups import collapse_excgroups
from ..errors import (
    PeerError,
    PeerLimitError,
    PeerTimeoutError,
    PeerTransportError,
    PeerUnavailableError,
)
from .config import H2Settings
from .mapping import to_peer_error

__all__ = [
    "ClientStream",
    "ErrorCodes",
    "H2ClientConnection",
    "H2ConnectionStatistics",
    "H2ServerConnection",
    "Headers",
    "ServerStream",
    "open_h2_client",
    "serve_h2_connection",
]

ErrorCodes = h2.errors.ErrorCodes
Headers = list[tuple[bytes, bytes]]
HeaderSeq = Sequence[tuple[bytes, bytes]]
StreamHandler = Callable[["ServerStream"], Awaitable[object]]

logger = logging.getLogger("peerflow.transport")

_DEFAULT_WINDOW = 65535
# DATA payloads at least this big skip h2's serialization copies.
_SEPARATE_PAYLOAD = 16384
# A frame header: length (24 bits, as 16 + 8), type, flags, stream id.
_FRAME_HEADER = struct.Struct(">HBBBL")
_DATA = 0x0
_HEADERS = 0x1
_CONTINUATION = 0x9
_PUSH_PROMISE = 0x5
# Frames that carry a header block (refused early when it grows too big).
_HEADER_BLOCK_KINDS = frozenset({_HEADERS, _PUSH_PROMISE, _CONTINUATION})
_END_STREAM_FLAG = 0x1
_END_HEADERS_FLAG = 0x4
_PADDED_FLAG = 0x8
_PRIORITY_FLAG = 0x20
_END_STREAM_SET = frozenset({"END_STREAM"})
_NO_FLAGS: frozenset[str] = frozenset()
# Distinct header lists (blocks) remembered per connection direction.
_HPACK_CACHE_ENTRIES = 64
_HPACK_CACHE_MAX_BLOCK = 1024
# Header fields remembered as seen once (indexed when seen again).
_HPACK_SEEN_ENTRIES = 256
# How long a request may go on arriving after its answer is complete.
_REQUEST_TAIL_GRACE = 1.0
# sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call.
_MAX_SEND_CHUNKS = 64
_EMPTY = b""
# Header lists the fast paths take: plain sequences of plain 2-tuples.
_HEADER_LISTS = (list, tuple)
# Ended responses watched for a late reset at once (see watch_delivery); a
# client that never answers PINGs makes the oldest count as delivered.
_MAX_UNDELIVERED = 4096


def _data_frame_body_repr(frame: hyperframe.frame.DataFrame) -> str:
    # h2 logs repr(frame) for every received frame before it checks the log
    # level, and hyperframe's DATA repr hex-encodes the whole payload only to
    # keep 10 bytes of it. This yields the same text from the first 11 bytes,
    # which took h2's receive path from ~0.5 to ~4.5 GB/s on a 1 MiB frame.
    head = bytes(frame.serialize_padding_data()) + bytes(frame.data[:11])
    head = (head + b"\0" * frame.pad_length)[:11]
    if not head:
        return "None"
    text = binascii.hexlify(head).decode("ascii")
    return "<hex:" + (text[:20] + "..." if len(text) > 20 else text) + ">"


hyperframe.frame.DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]


class _CountedTable(hpack.table.HeaderTable):
    """An HPACK dynamic table that counts its changes, so results can be cached."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.generation += 1
        hpack.table.HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


class _CachingEncoder(hpack.Encoder):
    """An HPACK encoder that reuses what it encoded while its table is unchanged.

    A field found in the static or dynamic table encodes to the same bytes
    and changes nothing until the table changes, and so does a list of such
    fields. A gRPC peer sends the same few header lists over and over, often
    with one field that differs per call: whole lists are reused when they
    repeat, and otherwise each field that did not touch the table is. A
    field enters the table only when it is used a second time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.header_table = _CountedTable()
        self._blocks: dict[tuple[tuple[bytes, bytes], ...], tuple[int, bytes]] = {}
        self._fields: dict[tuple[bytes, bytes], bytes] = {}
        self._fields_generation = 0
        self._seen: dict[tuple[bytes, bytes], None] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        table = self.header_table
        # Only sequences of plain 2-tuples: HeaderTuple subclasses (never-indexed)
        # compare equal to plain tuples but must encode differently. A block
        # that announces a new table size is never reused.
        if type(headers) not in _HEADER_LISTS or not huffman or table.resized:
            return super().encode(headers, huffman)
        key = tuple(headers)
        reusable = all(type(field) is tuple and len(field) == 2 for field in key)
        generation = table.generation  # type: ignore[attr-defined]
        if reusable:
            cached = self._blocks.get(key)
            if cached is not None and cached[0] == generation:
                return cached[1]
        fields = self._fields
        parts = []
        for field in key:
            if self._fields_generation != table.generation:  # type: ignore[attr-defined]
                fields.clear()
                self._fields_generation = table.generation  # type: ignore[attr-defined]
            if type(field) is not tuple or len(field) != 2:
                parts.append(super().encode([field], huffman))
                continue
            part = fields.get(field)
            if part is None and field not in self._seen:
                # Indexed only from its second use: a value that never comes
                # back (a call id) must not push out the ones that do, nor
                # change the table under every cached block.
                if len(self._seen) >= _HPACK_SEEN_ENTRIES:
                    self._seen.clear()
                self._seen[field] = None
                parts.append(self._encode_unindexed(field, huffman))
                # Not worth keeping: the next use indexes this field.
                reusable = False
                continue
            if part is None:
                part = super().encode([field], huffman)
                if table.generation == self._fields_generation:  # type: ignore[attr-defined]
                    if len(fields) >= _HPACK_CACHE_ENTRIES:
                        fields.clear()
                    fields[field] = part
            parts.append(part)
        block = b"".join(parts)
        if reusable and table.generation == generation:  # type: ignore[attr-defined]
            if len(self._blocks) >= _HPACK_CACHE_ENTRIES:
                self._blocks.clear()
            self._blocks[key] = (generation, block)
        return block

    def _encode_unindexed(self, field: tuple[bytes, bytes], huffman: bool) -> bytes:
        # RFC 7541 6.2.2, literal without indexing: the table is left as is.
        name, value = field
        match = self.header_table.search(name, value)
        if match is None:
            return self._encode_literal(name, value, hpack.hpack.INDEX_NONE, huffman)
        index, _, perfect = match
        if perfect is not None:
            return self._encode_indexed(index)
        return self._encode_indexed_literal(index, value, hpack.hpack.INDEX_NONE, huffman)


class _CachingDecoder(hpack.Decoder):
    """An HPACK decoder that reuses the header list for a block it has decoded.

    The counterpart of _CachingEncoder: a block that left the table unchanged
    decodes to the same list until the table or the limits change. A block
    that differs only after a leading run of indexed fields (the fixed
    request headers, then a per-call value) reuses the decoded run.
    """

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size)
        self.header_table = _CountedTable()
        self._lists: dict[bytes, tuple[tuple[int, int, int], list[Any]]] = {}
        self._heads: dict[bytes, tuple[tuple[int, int, int], list[Any], int]] = {}

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:
        if not raw or len(data) > _HPACK_CACHE_MAX_BLOCK:
            return list(super().decode(data, raw))
        state = (
            self.header_table.generation,  # type: ignore[attr-defined]
            self.max_header_list_size,
            self.max_allowed_table_size,
        )
        key = bytes(data)
        cached = self._lists.get(key)
        if cached is not None and cached[0] == state:
            return list(cached[1])
        headers = self._decode_split(key, state)
        if self.header_table.generation == state[0]:  # type: ignore[attr-defined]
            if len(self._lists) >= _HPACK_CACHE_ENTRIES:
                self._lists.clear()
            self._lists[key] = (state, headers)
            return list(headers)
        return headers

    def _decode_split(self, data: bytes, state: tuple[int, int, int]) -> list[Any]:
        # The leading run of one-byte indexed fields (0x81..0xfe) decodes the
        # same way whatever follows, and changes nothing in the table.
        run = 0
        while run < len(data) and 0x80 < data[run] < 0xFF:
            run += 1
        if run == 0 or run == len(data):
            return list(super().decode(data, True))
        head_key = data[:run]
        head = self._heads.get(head_key)
        if head is None or head[0] != state:
            fields = list(super().decode(head_key, True))
            size = sum(hpack.table.table_entry_size(name, value) for name, value in fields)
            head = (state, fields, size)
            if len(self._heads) >= _HPACK_CACHE_ENTRIES:
                self._heads.clear()
            self._heads[head_key] = head
        if data[run] & 0xE0 == 0x20:
            raise hpack.HPACKDecodingError("Table size update not at the start of the block")
        tail = list(super().decode(data[run:], True))
        size = head[2] + sum(hpack.table.table_entry_size(name, value) for name, value in tail)
        if size > self.max_header_list_size:
            raise hpack.OversizedHeaderListError(
                f"A header list larger than {self.max_header_list_size} has been received"
            )
        return head[1] + tail


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, refusing an oversized frame or header block from a 9-byte header.

    h2 checks a frame's length only once the whole frame has arrived, so a
    header announcing 16 MiB would be buffered up to 16 MiB before the
    FRAME_SIZE_ERROR. Checking the announced length first bounds the buffer
    by the advertised maximum frame size.

    h2 also checks a header block's size only once it has ended, after up
    to 64 CONTINUATION frames: 64 MiB with 1 MiB frames (the "CONTINUATION
    flood"). A frame that would take the block beyond ``max_header_block``
    is refused from its header, with GOAWAY(ENHANCE_YOUR_CALM): the block
    cannot be skipped, since the HPACK context needs all of it (RFC 9113
    10.5.1), so the connection ends.
    """

    max_header_block = 2**32

    def __next__(self) -> hyperframe.frame.Frame:
        data = self._data
        if len(data) >= 9:
            length = int.from_bytes(data[:3], "big")
            self._validate_frame_length(length)
            if data[3] in _HEADER_BLOCK_KINDS:
                block = length + sum(len(frame.data) for frame in self._headers_buffer)
                if block > self.max_header_block:
                    raise h2.exceptions.DenialOfServiceError(
                        f"header block of at least {block} bytes exceeds the limit of "
                        f"{self.max_header_block}"
                    )
        return super().__next__()


def _header_block_limit(max_header_list_size: int) -> int:
    # The encoded block bound for a decoded list of max_header_list_size. A
    # field costs its name and value plus 32 decoded; encoded, at most 11
    # bytes of prefixes plus 30 bits per octet (HPACK's longest Huffman
    # code), so under 4x. The slack covers HEADERS padding and priority.
    return 4 * max_header_list_size + 1024


class _ReceivedFrame:
    """A DATA or HEADERS frame cut out by the driver, shaped as h2's handlers read it.

    hyperframe builds a full object per frame (a flag set, a parsed body, an
    eager repr for h2's log); these two kinds carry nothing h2 does not use.
    """

    __slots__ = ("data", "flags", "flow_controlled_length", "stream_id")

    def __init__(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flags = _END_STREAM_SET if end_stream else _NO_FLAGS
        self.flow_controlled_length = len(data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stream_id={self.stream_id}, length={len(self.data)})"


class _ReceivedData(_ReceivedFrame):
    """An unpadded DATA frame."""


class _ReceivedHeaders(_ReceivedFrame):
    """A HEADERS frame with END_HEADERS, no padding and no priority."""


class _LateReset(h2.events.Event):
    """A RST_STREAM for a stream h2 has already closed, which h2 itself ignores."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _H2Connection(h2.connection.H2Connection):
    """h2's connection state machine, with lean paths for the frames every call sends.

    h2 stays the authority on every state: each stream and connection
    transition, window and HPACK context goes through its state machines.
    What is cut is the generic machinery around them, which costs more than
    the state itself on a small call:

    - Receiving: the driver splits the input into frames itself and hands
      unpadded DATA and single-frame HEADERS to h2's own handlers (through
      ``_receive_frame``, so its stream-error handling applies) without
      building hyperframe objects. Every other frame, the preface and any
      header block that spans CONTINUATION frames take h2's full path.
    - Sending: HEADERS and DATA are written as bytes after the same
      transitions and checks h2 makes, with HPACK blocks from the caching
      encoder and large payloads left uncopied for ``sendmsg``.
    - h2 counts open streams by walking every stream it knows, once or twice
      for each new stream, and prunes closed ones during that walk. The
      driver instead prunes each stream as it releases it (``forget``), which
      keeps ``streams`` close to the open set, so its size bounds the count.
    """

    _output: list[bytes | memoryview]
    incoming_buffer: _FrameBuffer

    def __init__(self, config: h2.config.H2Configuration) -> None:
        self._output = []
        self._pending = bytearray()
        self._client = config.client_side
        super().__init__(config=config)
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)
        # Fresh HPACK contexts: nothing has been encoded or decoded yet.
        self.encoder = _CachingEncoder()
        self.decoder = _CachingDecoder(self.decoder.max_header_list_size)
        self._frame_dispatch_table[_ReceivedData] = self._receive_data_frame  # type: ignore[index]
        self._frame_dispatch_table[_ReceivedHeaders] = self._receive_headers_frame  # type: ignore[index]

    # ------------------------------------------------------------- receiving

    # h2 types ``data`` as any buffer; the driver only ever passes these.
    def receive_data(  # type: ignore[override]
        self, data: bytes | bytearray | memoryview
    ) -> list[h2.events.Event]:
        buffer = self.incoming_buffer
        if buffer._preamble_len or buffer._data or buffer._headers_buffer:
            # h2 holds part of the preface, a frame or a header block.
            return super().receive_data(data)
        pending = self._pending
        pending += data
        events: list[h2.events.Event] = []
        view = memoryview(pending)
        size = len(view)
        pos = 0
        max_size = self.max_inbound_frame_size
        max_block = buffer.max_header_block
        try:
            while size - pos >= 9:
                length = view[pos] << 16 | view[pos + 1] << 8 | view[pos + 2]
                if length > max_size or (
                    length > max_block and view[pos + 3] in _HEADER_BLOCK_KINDS
                ):
                    # h2 refuses it from its header; hand over the rest.
                    events += super().receive_data(view[pos:])
                    pos = size
                    break
                end = pos + 9 + length
                if end > size:
                    break
                kind = view[pos + 3]
                flags = view[pos + 4]
                stream_id = int.from_bytes(view[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                frame: _ReceivedFrame
                if kind == _DATA and stream_id and not flags & _PADDED_FLAG:
                    frame = _ReceivedData(
                        stream_id, bytes(view[pos + 9 : end]), bool(flags & _END_STREAM_FLAG)
                    )
                elif (
                    kind == _HEADERS
                    and stream_id
                    and flags & (_END_HEADERS_FLAG | _PADDED_FLAG | _PRIORITY_FLAG)
                    == _END_HEADERS_FLAG
                ):
                    frame = _ReceivedHeaders(
                        stream_id, bytes(view[pos + 9 : end]), bool(flags & _END_STREAM_FLAG)
                    )
                else:
                    events += super().receive_data(view[pos:end])
                    pos = end
                    if buffer._headers_buffer:
                        # A header block continues: h2 takes the rest.
                        events += super().receive_data(view[pos:])
                        pos = size
                        break
                    continue
                pos = end
                try:
                    events += self._receive_frame(frame)  # type: ignore[arg-type]
                except h2.exceptions.ProtocolError as exc:
                    # As h2's receive_data: GOAWAY goes out, then the error.
                    self._terminate_connection(exc.error_code)
                    raise
        except BaseException:
            # The traceback may still hold views of the buffer, which then
            # cannot shrink; the connection is over anyway.
            self._pending = bytearray()
            raise
        view.release()
        del pending[:pos]
        return events

    def _receive_rst_stream_frame(
        self, frame: hyperframe.frame.RstStreamFrame
    ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        frames, events = super()._receive_rst_stream_frame(frame)
        if not events:
            # The stream is closed on our side: the client reset it before it
            # had read all we sent. The driver may still need to know.
            events = [_LateReset(frame.stream_id)]
        return frames, events

    # --------------------------------------------------------------- sending

    def send_headers(  # noqa: PLR0917 -- h2's signature
        self,
        stream_id: int,
        headers: Any,
        end_stream: bool = False,
        priority_weight: int | None = None,
        priority_depends_on: int | None = None,
        priority_exclusive: bool | None = None,
    ) -> None:
        if (
            type(headers) not in _HEADER_LISTS
            or priority_weight is not None
            or priority_depends_on is not None
            or priority_exclusive is not None
            or (not self._client and _is_informational(headers))
        ):
            super().send_headers(
                stream_id,
                headers,
                end_stream,
                priority_weight,
                priority_depends_on,
                priority_exclusive,
            )
            return
        # The same checks and transitions as h2, in its order: the state
        # moves before the block is encoded, since encoding changes the HPACK
        # context for good.
        client = self._client
        stream = self.streams.get(stream_id)
        if stream is None:
            limit = self.remote_settings.max_concurrent_streams
            if self.open_outbound_streams + 1 > limit:
                raise h2.exceptions.TooManyStreamsError(
                    f"Max outbound streams is {limit}, {self.open_outbound_streams} open"
                )
        self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        if stream is None:
            stream = self._get_or_create_stream(stream_id, AllowedStreamIDs(client))
        machine = stream.state_machine
        machine.process_input(StreamInputs.SEND_HEADERS)
        block = self.encoder.encode(headers)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        if machine.trailers_sent and not end_stream:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
        if client:
            if stream._authority is None:
                stream._authority = authority_from_headers(headers)
            stream.request_method = extract_method_header(headers)
        self._adopt_direct_output()
        flags = _END_STREAM_FLAG if end_stream else 0
        size = len(block)
        step = self.max_outbound_frame_size
        if size <= step:
            self._output.append(
                _FRAME_HEADER.pack(
                    size >> 8, size & 0xFF, _HEADERS, flags | _END_HEADERS_FLAG, stream_id
                )
                + block
            )
            return
        # A block beyond one frame continues in CONTINUATION frames.
        parts = [
            _FRAME_HEADER.pack(step >> 8, step & 0xFF, _HEADERS, flags, stream_id),
            block[:step],
        ]
        for start in range(step, size, step):
            piece = block[start : start + step]
            last = start + step >= size
            parts.append(
                _FRAME_HEADER.pack(
                    len(piece) >> 8,
                    len(piece) & 0xFF,
                    _CONTINUATION,
                    _END_HEADERS_FLAG if last else 0,
                    stream_id,
                )
            )
            parts.append(piece)
        self._output.append(b"".join(parts))

    def send_data(
        self,
        stream_id: int,
        data: bytes | memoryview,
        end_stream: bool = False,
        pad_length: Any = None,
    ) -> None:
        if pad_length is not None:
            super().send_data(stream_id, data, end_stream, pad_length)
            return
        size = len(data)
        stream = self._get_stream_by_id(stream_id)
        window = min(self.outbound_flow_control_window, stream.outbound_flow_control_window)
        if size > window:
            raise h2.exceptions.FlowControlError(
                f"Cannot send {size} bytes, flow control window is {window}"
            )
        if size > self.max_outbound_frame_size:
            raise h2.exceptions.FrameTooLargeError(
                f"Cannot send frame size {size}, max frame size is {self.max_outbound_frame_size}"
            )
        self.state_machine.process_input(ConnectionInputs.SEND_DATA)
        stream.state_machine.process_input(StreamInputs.SEND_DATA)
        flags = 0
        if end_stream:
            stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
            flags = _END_STREAM_FLAG
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        self._adopt_direct_output()
        header = _FRAME_HEADER.pack(size >> 8, size & 0xFF, _DATA, flags, stream_id)
        if size >= _SEPARATE_PAYLOAD:
            # Sent from the caller's buffer by sendmsg, never copied.
            self._output.append(header)
            self._output.append(data)
        else:
            self._output.append(header + data)

    def _open_streams(self, remainder: int) -> int:
        # h2 only compares the count with the concurrency limit; the bound
        # gives the same answer until it reaches the limit, and from there
        # the exact walk (which also prunes) decides.
        outbound = remainder == int(self.config.client_side)
        limit = (self.remote_settings if outbound else self.local_settings).max_concurrent_streams
        bound = len(self.streams)
        if bound < limit:
            return bound
        return super()._open_streams(remainder)

    def _receive_goaway_frame(
        self, frame: hyperframe.frame.GoAwayFrame
    ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        frames, events = super()._receive_goaway_frame(frame)
        if self.config.client_side and frame.error_code == ErrorCodes.NO_ERROR:
            # RFC 9113 6.8: streams up to last_stream_id may still complete,
            # but h2 closes its state machine on any GOAWAY. Reopening it here,
            # not after the event, keeps the frames that follow the GOAWAY in
            # the same read (those streams' responses) from being refused.
            self.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        return frames, events

    def _prepare_for_sending(self, frames: list[hyperframe.frame.Frame]) -> None:
        # h2 serializes into its own buffer, which take_output would copy again.
        if frames:
            self._adopt_direct_output()
            self._output.append(b"".join(frame.serialize() for frame in frames))

    def take_output(self) -> list[bytes | memoryview]:
        """Return and clear everything queued for the peer, in order.

        This replaces ``data_to_send``, which only sees what h2 writes to
        its own buffer directly.
        """
        self._adopt_direct_output()
        output, self._output = self._output, []
        return output

    def _adopt_direct_output(self) -> None:
        # h2 writes the connection preamble straight into its own buffer.
        if self._data_to_send:
            self._output.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()

    def clear_outbound_data_buffer(self) -> None:
        super().clear_outbound_data_buffer()
        self._output = []

    def forget(self, stream_id: int) -> None:
        """Drop a closed stream from the table, as h2's own walk would."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.closed:
            del self.streams[stream_id]
            self._closed_streams[stream_id] = stream.closed_by


def _is_informational(headers: HeaderSeq) -> bool:
    # A 1xx response (h2's rule: pseudo-headers lead, :status among them).
    for name, value in headers:
        if not name.startswith(b":"):
            return False
        if name == b":status":
            return value.startswith(b"1")
    return False


def _send_chunks(raw: socket.socket, chunks: Sequence[bytes | memoryview]) -> int:
    # One non-blocking send of as many chunks as one call takes; returns the
    # bytes sent, which may end inside any chunk.
    if len(chunks) == 1 or not _HAVE_SENDMSG:
        return raw.send(chunks[0])
    return raw.sendmsg(chunks[:_MAX_SEND_CHUNKS])


_HAVE_SENDMSG = hasattr(socket.socket, "sendmsg")


def _goaway_frame(last_stream_id: int, error_code: int) -> bytes:
    # Hand-built because h2's close_connection() moves its state machine to
    # CLOSED, after which in-flight streams could no longer send their
    # responses: a graceful drain needs the GOAWAY without the state change.
    return b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + struct.pack(
        ">II", last_stream_id & 0x7FFFFFFF, error_code
    )


def _h2_config(client_side: bool) -> h2.config.H2Configuration:
    # Validation and normalisation cost ~13% of calls/s; what matters for
    # safety (pseudo-headers, header list size) is checked in
    # _request_header_problem instead.
    return h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
        logger=h2.config.DummyLogger(),
    )


def _index_request_headers(headers: HeaderSeq, max_size: int) -> dict[bytes, bytes] | str:
    """Map each request header name to its first value, or say what is wrong."""
    size = 0
    index: dict[bytes, bytes] = {}
    for name, value in headers:
        size += len(name) + len(value) + 32
        if name not in index:
            index[name] = value
    if size > max_size:
        return f"header list of {size} bytes exceeds the limit of {max_size}"
    if b":method" not in index or not index.get(b":path") or b":scheme" not in index:
        return "request lacks :method, :path or :scheme"
    return index


def _h2_failure(exc: h2.exceptions.H2Error, context: str) -> PeerTransportError:
    # A plain try/except at each call site instead of a context manager: the
    # success path then builds no generator and no message.
    return to_peer_error(exc, context) or PeerTransportError(context)


def _code_name(code: int | None) -> str:
    if code is None:
        return "unknown"
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


@attrs.frozen
class H2ConnectionStatistics:
    """A snapshot of one connection's state, from ``statistics()``.

    Attributes:
        open_streams: streams the driver is tracking.
        inbound_buffered_bytes: received bytes not yet taken by consumers.
        outbound_buffered_bytes: bytes waiting for the socket.
        closed: whether the connection has ended.
    """

    open_streams: int
    inbound_buffered_bytes: int
    outbound_buffered_bytes: int
    closed: bool


class _Stream:
    """State shared by both ends of one HTTP/2 stream."""

    def __init__(self, conn: _Connection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._chunks: deque[tuple[bytes | memoryview, int]] = deque()
        self._buffered = 0
        self._remote_ended = False
        self._local_ended = False
        self._failure: PeerError | None = None
        self._reset_code: int | None = None
        # The peer answered in full, then asked us to stop sending
        # (RST_STREAM NO_ERROR): the rest of our body is dropped, not an error.
        self._cut_short = False
        # A send stopped (cancelled or failed) after part of its bytes went out.
        self._body_cut = False
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def connection(self) -> _Connection:
        """The HTTP/2 connection this stream belongs to."""
        return self._conn

    @property
    def buffered_bytes(self) -> int:
        """Received bytes waiting for ``receive_data`` (bounded by the window)."""
        return self._buffered

    @property
    def reset_code(self) -> int | None:
        """The RST_STREAM error code if the peer reset this stream, else None."""
        return self._reset_code

    @property
    def remote_ended(self) -> bool:
        """Whether the peer has finished sending (END_STREAM seen)."""
        return self._remote_ended

    def _raise_failure(self) -> None:
        failure = self._failure
        if failure is not None:
            raise type(failure)(str(failure))

    def _fail(self, failure: PeerError) -> None:
        if self._failure is None:
            self._failure = failure
        self._lot.unpark_all()

    def _on_reset(self, code: int) -> None:
        self._reset_code = code
        # REFUSED_STREAM promises the peer did not process the stream;
        # ENHANCE_YOUR_CALM is gRPC's RESOURCE_EXHAUSTED for a cut stream.
        kind: type[PeerError] = (
            PeerUnavailableError
            if code == ErrorCodes.REFUSED_STREAM
            else PeerLimitError
            if code == ErrorCodes.ENHANCE_YOUR_CALM
            else PeerTransportError
        )
        self._fail(kind(f"stream {self.stream_id} was reset by the peer ({_code_name(code)})"))

    async def receive_data(self) -> bytes | memoryview:
        """Wait for the next chunk of the peer's body; ``b""`` once it has ended.

        Taking a chunk credits it back to the peer's flow-control window, so
        an unread stream holds at most one window of data.

        Raises:
            PeerTransportError: the stream was reset or the connection failed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._chunks:
                data, flow_length = self._chunks.popleft()
                self._buffered -= len(data)
                self._conn._acknowledge(self.stream_id, flow_length)
                return data
            if self._remote_ended:
                return _EMPTY
            self._raise_failure()
            await self._lot.park()

    def take_unread(self) -> bytes:
        """Take every received chunk not read yet, joined, without waiting.

        Once the stream has ended (:attr:`remote_ended`), that is the rest of
        the peer's body.
        """
        data = b"".join(chunk for chunk, _ in self._chunks)
        self._conn._discard(self)
        return data

    async def receive_all(self, limit: int | None = None) -> bytes:
        """Read the peer's body to its end and return it joined.

        Raises:
            PeerTransportError: reset, connection failure, or more than
                ``limit`` bytes.
        """
        parts: list[bytes | memoryview] = []
        total = 0
        while data := await self.receive_data():
            total += len(data)
            if limit is not None and total > limit:
                self.reset(ErrorCodes.CANCEL)
                raise PeerTransportError(f"body exceeds the limit of {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    def _check_sendable(self) -> None:
        self._raise_failure()
        if self._local_ended:
            raise PeerTransportError(f"stream {self.stream_id} already ended its side")
        self._conn._raise_if_closed()

    def _mark_local_ended(self) -> None:
        self._local_ended = True
        self._conn._stream_progress(self)

    async def _queue_data(self, data: bytes | bytearray | memoryview, end_stream: bool) -> None:
        # A small body costs no await. Large frames are flushed as they are
        # made, and the sender waits while the window or the write buffer is
        # exhausted, after its last frame too.
        conn = self._conn
        h2c = conn._h2
        stream_id = self.stream_id
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        total = len(view)
        if total == 0:
            if self._cut_short:
                return
            self._check_sendable()
            if end_stream:
                try:
                    h2c.end_stream(stream_id)
                except h2.exceptions.H2Error as exc:
                    raise _h2_failure(exc, f"cannot end stream {stream_id}") from exc
                self._mark_local_ended()
            return
        offset = 0
        try:
            while offset < total:
                if self._cut_short:
                    return
                self._check_sendable()
                window = h2c.local_flow_control_window(stream_id)
                if window <= 0:
                    conn._flush()
                    await conn._window_lot.park()
                    continue
                n = min(window, h2c.max_outbound_frame_size, total - offset)
                last = offset + n == total
                try:
                    h2c.send_data(
                        stream_id, view[offset : offset + n], end_stream=end_stream and last
                    )
                except h2.exceptions.H2Error as exc:
                    raise _h2_failure(exc, f"cannot send data on stream {stream_id}") from exc
                offset += n
                if last and end_stream:
                    self._mark_local_ended()
                if not last or n >= _SEPARATE_PAYLOAD:
                    conn._flush()
                    if conn._outq_bytes > conn._settings.write_buffer_size:
                        await conn._wait_write_room()
        except BaseException:
            if offset:
                self._body_cut = True
            raise

    async def send_data(
        self, *data: bytes | bytearray | memoryview, end_stream: bool = False
    ) -> None:
        """Send body bytes, waiting for flow-control window as needed.

        Several buffers go out one after the other as one piece of the body
        (a message and its payload, with no copy to join them). Large
        payloads are chunked by the peer's max frame size without copying
        the whole buffer; pass a memoryview to avoid any copy. A send that
        stops partway sets :attr:`body_cut`.

        Raises:
            PeerTransportError: the stream was reset, already ended, or the
                connection failed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        last = len(data) - 1
        for index, part in enumerate(data):
            try:
                await self._queue_data(part, end_stream and index == last)
            except BaseException:
                if index:  # the piece's first buffers went out
                    self._body_cut = True
                raise
        self._conn._flush()

    @property
    def body_cut(self) -> bool:
        """Whether a send stopped (cancelled or failed) after part of its bytes went out.

        Whatever followed on the stream, trailers included, would read as the
        rest of that piece: a truncated message. Such a stream can only be
        reset (see :meth:`ServerStream.abort`).
        """
        return self._body_cut

    def end_stream(self) -> None:
        """Finish our side of the stream (an empty DATA frame with END_STREAM).

        Raises:
            PeerTransportError: the stream was reset or already ended.
        """
        self._check_sendable()
        try:
            self._conn._h2.end_stream(self.stream_id)
        except h2.exceptions.H2Error as exc:
            raise _h2_failure(exc, f"cannot end stream {self.stream_id}") from exc
        self._mark_local_ended()
        self._conn._flush()

    def reset(self, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort the stream with RST_STREAM; a no-op if it is already closed."""
        if self._reset_code is None and not (self._local_ended and self._remote_ended):
            self._conn._send_reset(self.stream_id, error_code)
        self._local_ended = True
        self._remote_ended = True
        self._fail(PeerTransportError(f"stream {self.stream_id} was reset locally"))
        self._conn._discard(self)
        self._conn._release(self)


class ServerStream(_Stream):
    """One incoming request, handed to the server's handler.

    The handler runs in its own task under a cancel scope that the peer's
    RST_STREAM cancels (``reset_code`` then says why).
    """

    def __init__(
        self, conn: _Connection, stream_id: int, headers: Headers, index: dict[bytes, bytes]
    ) -> None:
        super().__init__(conn, stream_id)
        self.headers = headers
        self._scope = trio.CancelScope()
        self._index = index
        self._response_started = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of request header ``name`` (lowercase bytes), or None."""
        return self._index.get(name)

    @property
    def method(self) -> bytes:
        """The request's ``:method``."""
        return self.header(b":method") or b""

    @property
    def path(self) -> bytes:
        """The request's ``:path``."""
        return self.header(b":path") or b""

    @property
    def authority(self) -> bytes | None:
        """The request's ``:authority``, if sent."""
        return self.header(b":authority")

    @property
    def content_type(self) -> bytes | None:
        """The request's ``content-type``, if sent."""
        return self.header(b"content-type")

    @property
    def response_started(self) -> bool:
        """Whether response headers have been sent (so only trailers may follow)."""
        return self._response_started

    def _on_reset(self, code: int) -> None:
        super()._on_reset(code)
        self._scope.cancel()

    def send_headers(self, headers: HeaderSeq, *, end_stream: bool = False) -> None:
        """Send the response headers (``:status`` first).

        Raises:
            PeerTransportError: the stream was reset or already ended.
        """
        self._check_sendable()
        try:
            self._conn._h2.send_headers(self.stream_id, headers, end_stream=end_stream)
        except h2.exceptions.H2Error as exc:
            raise _h2_failure(exc, f"cannot send headers on stream {self.stream_id}") from exc
        self._response_started = True
        if end_stream:
            self._mark_local_ended()
        self._conn._flush()

    def send_trailers(self, trailers: HeaderSeq) -> None:
        """Send trailers, which ends the response.

        Raises:
            PeerTransportError: the stream was reset or already ended.
        """
        self.send_headers(trailers, end_stream=True)

    def abort(self, error: BaseException) -> None:
        """Reset the stream because the call failed with ``error`` and cannot say so.

        For an answer whose body was cut (:attr:`body_cut`): ENHANCE_YOUR_CALM
        for a :class:`~peerflow.PeerLimitError` (gRPC reads it as
        RESOURCE_EXHAUSTED, and so do peerflow's clients), CANCEL otherwise.
        """
        limited = isinstance(error, PeerLimitError)
        self.reset(ErrorCodes.ENHANCE_YOUR_CALM if limited else ErrorCodes.CANCEL)

    def watch_delivery(self, on_lost: Callable[[], None]) -> None:
        """Call ``on_lost`` if the client resets the stream without having read the response.

        For a response that has ended: a client cancelled as it arrived
        resets a stream that is already closed here, which HTTP/2 otherwise
        ignores. The watch ends when the client acknowledges a PING sent
        after the response: it reads frames in order, so by then it has
        taken the whole response. A connection that ends first counts as
        delivered. ``on_lost`` runs in the connection's reader task and must
        not block.
        """
        self._conn._watch_delivery(self.stream_id, on_lost)

    async def send_response(
        self,
        headers: HeaderSeq,
        data: bytes | bytearray | memoryview = b"",
        trailers: HeaderSeq | None = None,
    ) -> None:
        """Send headers, body and trailers as one write when the window allows.

        This is the fast path for unary calls: when the body fits the current
        flow-control window everything is queued with no await and flushed
        once. Without trailers the body carries END_STREAM.

        Raises:
            PeerTransportError: the stream was reset or the connection failed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_sendable()
        h2c = self._conn._h2
        end_on_headers = not data and trailers is None
        try:
            h2c.send_headers(self.stream_id, headers, end_stream=end_on_headers)
        except h2.exceptions.H2Error as exc:
            raise _h2_failure(exc, f"cannot send headers on stream {self.stream_id}") from exc
        self._response_started = True
        if end_on_headers:
            self._mark_local_ended()
        else:
            if data:
                await self._queue_data(data, trailers is None)
            if trailers is not None:
                self._check_sendable()
                try:
                    h2c.send_headers(self.stream_id, trailers, end_stream=True)
                except h2.exceptions.H2Error as exc:
                    context = f"cannot send trailers on stream {self.stream_id}"
                    raise _h2_failure(exc, context) from exc
                self._mark_local_ended()
        self._conn._flush()


class ClientStream(_Stream):
    """One request opened by ``H2ClientConnection.open_stream``.

    Use it as an async context manager: leaving the block before the
    exchange has finished (an error, a cancellation) resets the stream with
    RST_STREAM(CANCEL).

    Attributes:
        trailers: the response trailers, once the body has ended with them.
    """

    def __init__(self, conn: _Connection, stream_id: int) -> None:
        super().__init__(conn, stream_id)
        self.response_headers: Headers | None = None
        self.trailers: Headers | None = None

    def _on_reset(self, code: int) -> None:
        if code == ErrorCodes.NO_ERROR and self._remote_ended:
            # RFC 9113 8.1: a server may answer before the request is complete
            # and then reset with NO_ERROR; the response must not be discarded.
            self._reset_code = code
            self._cut_short = True
            self._local_ended = True
            self._lot.unpark_all()
            return
        super()._on_reset(code)

    async def receive_headers(self) -> Headers:
        """Wait for the response headers and return them.

        Raises:
            PeerTransportError: the stream was reset, refused by GOAWAY or the
                connection failed before the headers came.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while self.response_headers is None:
            self._raise_failure()
            if self._remote_ended:
                raise PeerTransportError(f"stream {self.stream_id} ended without response headers")
            await self._lot.park()
        return self.response_headers

    def close(self) -> None:
        """Release the stream, resetting it if the exchange is unfinished.

        The synchronous form of :meth:`aclose`, for callers that have just
        awaited the stream's end and need no further checkpoint.
        """
        if not (self._local_ended and self._remote_ended):
            self.reset(ErrorCodes.CANCEL)
        else:
            self._conn._discard(self)
            self._conn._release(self)

    async def aclose(self) -> None:
        """Release the stream, resetting it if the exchange is unfinished."""
        self.close()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def __aenter__(self) -> ClientStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Connection:
    """The connection core shared by the client and server sides."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        settings: H2Settings | None,
        *,
        client_side: bool,
        initial_data: bytes = b"",
    ) -> None:
        self._transport = transport
        self._settings = settings = settings or H2Settings()
        self._client_side = client_side
        self._initial_data = initial_data
        h2c = _H2Connection(config=_h2_config(client_side))
        codes = h2.settings.SettingCodes
        initial: dict[h2.settings.SettingCodes, int] = {
            codes.INITIAL_WINDOW_SIZE: settings.initial_stream_window,
            codes.MAX_FRAME_SIZE: settings.max_frame_size,
            codes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            codes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
        }
        if client_side:
            initial[codes.ENABLE_PUSH] = 0
        # A fresh Settings object makes these values current at once, so they
        # go out in the very first SETTINGS frame and apply from the start.
        h2c.local_settings = h2.settings.Settings(client=client_side, initial_values=initial)
        h2c.max_inbound_frame_size = settings.max_frame_size
        h2c.decoder.max_header_list_size = settings.max_header_list_size
        h2c.incoming_buffer.max_header_block = _header_block_limit(settings.max_header_list_size)
        self._h2 = h2c
        self._streams: dict[int, Any] = {}
        self._outq: deque[bytes | memoryview] = deque()
        self._outq_bytes = 0
        self._sending = False
        self._raw: socket.socket | None = None
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._drain_lot = trio.lowlevel.ParkingLot()
        self._window_lot = trio.lowlevel.ParkingLot()
        self._slot_lot = trio.lowlevel.ParkingLot()
        self._idle_lot = trio.lowlevel.ParkingLot()
        self._error: PeerTransportError | None = None
        self._closed = trio.Event()
        self._guard = trio.CancelScope(shield=True)
        self._nursery: trio.Nursery | None = None
        self._pings: dict[bytes, list[Any]] = {}
        self._ping_counter = 0
        # Ended responses not yet known to be read (ServerStream.watch_delivery),
        # and the PINGs that will confirm them: each covers the streams
        # watched before it went out.
        self._undelivered: dict[int, Callable[[], None]] = {}
        self._fences: dict[bytes, list[int]] = {}
        self._unfenced: list[int] = []
        self._last_activity = 0.0
        self._idle_since = 0.0
        self._peer_settings_seen = False
        self._going_away = False
        self._goaway_last_stream_id: int | None = None
        self._protocol_error: PeerTransportError | None = None
        self._reset_tokens = float(settings.reset_budget or 0)
        self._reset_stamp = 0.0
        self._dispatch: dict[type[h2.events.Event], Callable[[Any], None]] = {
            h2.events.DataReceived: self._on_data,
            h2.events.StreamEnded: self._on_stream_ended,
            h2.events.StreamReset: self._on_stream_reset,
            h2.events.WindowUpdated: self._on_window_updated,
            h2.events.RemoteSettingsChanged: self._on_remote_settings,
            h2.events.PingAckReceived: self._on_ping_ack,
            h2.events.ConnectionTerminated: self._on_connection_terminated,
            h2.events.RequestReceived: self._on_request,
            h2.events.ResponseReceived: self._on_response,
            h2.events.TrailersReceived: self._on_trailers,
            _LateReset: self._on_late_reset,
        }

    # ------------------------------------------------------------------ state

    @property
    def transport(self) -> trio.abc.Stream:
        """The byte stream under the connection (a ``trio.SSLStream`` with TLS)."""
        return self._transport

    @property
    def closed(self) -> bool:
        """Whether the connection has ended (no new streams possible)."""
        return self._error is not None

    def statistics(self) -> H2ConnectionStatistics:
        """Return a snapshot of stream and buffer counts."""
        return H2ConnectionStatistics(
            open_streams=len(self._streams),
            inbound_buffered_bytes=sum(s._buffered for s in self._streams.values()),
            outbound_buffered_bytes=self._outq_bytes,
            closed=self._error is not None,
        )

    def _raise_if_closed(self) -> None:
        error = self._error
        if error is not None:
            raise type(error)(str(error))

    # ------------------------------------------------------------- lifecycle

    async def _run_core(self, *, task_status: trio.TaskStatus[None]) -> None:
        stream = self._transport
        if isinstance(stream, trio.SocketStream):
            # A second Python socket object over the same descriptor gives us a
            # synchronous non-blocking send; trio still owns and closes the fd.
            self._raw = socket.socket(fileno=stream.socket.fileno())
            self._raw.setblocking(False)
        now = trio.current_time()
        self._last_activity = self._idle_since = self._reset_stamp = now
        try:
            with self._guard:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._h2.initiate_connection()
                    extra = self._settings.initial_connection_window - _DEFAULT_WINDOW
                    if extra > 0:
                        self._h2.increment_flow_control_window(extra)
                    self._flush()
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._reader)
                    if self._settings.keepalive_interval is not None:
                        nursery.start_soon(self._keepalive, self._settings.keepalive_interval)
                    if self._settings.idle_timeout is not None and not self._client_side:
                        nursery.start_soon(self._idle_watch, self._settings.idle_timeout)
                    task_status.started()
        finally:
            self._terminate(PeerTransportError("connection closed"))
            if self._raw is not None:
                self._raw.detach()
                self._raw = None
            try:
                # Shielded: this runs outside the guard, maybe in a cancelled
                # scope, and waiters rely on _closed being set.
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
            finally:
                self._closed.set()

    def _terminate(self, error: PeerTransportError) -> None:
        """Fail everything waiting on the connection and stop its tasks."""
        if self._error is None:
            self._error = error
            if not isinstance(error, PeerTimeoutError) and str(error) != "connection closed":
                logger.debug("HTTP/2 connection ended: %s", error)
        for stream in list(self._streams.values()):
            stream._fail(self._error)
            if isinstance(stream, ServerStream):
                stream._scope.cancel()
        for lot in (self._window_lot, self._slot_lot, self._drain_lot, self._idle_lot):
            lot.unpark_all()
        for entry in self._pings.values():
            entry[0].set()
        self._guard.cancel()

    async def _close_gracefully(self, grace_period: float) -> None:
        if self._error is not None:
            return
        if not self._going_away:
            self._going_away = True
            last = self._h2.highest_inbound_stream_id
            self._flush()
            self._write([_goaway_frame(last, ErrorCodes.NO_ERROR)])
        with trio.move_on_after(grace_period):
            while self._streams and self._error is None:
                await self._idle_lot.park()
        for stream in list(self._streams.values()):
            if isinstance(stream, ServerStream):
                stream._scope.cancel()
            else:
                stream.reset(ErrorCodes.CANCEL)
        with trio.move_on_after(min(grace_period, 1.0)):
            # A cancelled handler resets its stream (CANCEL) as it ends; the
            # client must get that, or it cannot tell "cut off" from "never
            # started" (gRPC would report UNAVAILABLE).
            while self._streams and self._error is None:
                await self._idle_lot.park()
            await self._wait_drained()
        self._terminate(PeerTransportError("connection closed"))

    async def wait_closed(self) -> None:
        """Wait until the connection has ended and its transport is closed."""
        await self._closed.wait()

    def abort(self, error: PeerTransportError) -> None:
        """End the connection now, failing every stream with ``error``.

        No GOAWAY and no grace period: for a peer known to be dead, which
        would never answer them.
        """
        self._terminate(error)

    async def aclose(self, grace_period: float | None = None) -> None:
        """Close gracefully: GOAWAY, let streams finish, then cancel the rest.

        ``grace_period`` defaults to the settings' value. Returns once the
        transport is closed; safe to call more than once.
        """
        if grace_period is None:
            grace_period = self._settings.grace_period
        await self._close_gracefully(grace_period)
        await self._closed.wait()

    # ----------------------------------------------------------------- output

    def _flush(self) -> None:
        chunks = self._h2.take_output()
        if chunks:
            self._write(chunks)

    def _write(self, chunks: list[bytes | memoryview]) -> None:
        if self._error is not None:
            return
        raw = self._raw
        if raw is not None and not self._outq:
            try:
                sent = _send_chunks(raw, chunks)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._terminate(to_peer_error(exc, "cannot send") or PeerTransportError(str(exc)))
                return
            for chunk in chunks:
                if sent >= len(chunk):
                    sent -= len(chunk)
                    continue
                rest = memoryview(chunk)[sent:] if sent else chunk
                sent = 0
                self._outq.append(rest)
                self._outq_bytes += len(rest)
        else:
            for chunk in chunks:
                self._outq.append(chunk)
                self._outq_bytes += len(chunk)
        if self._outq:
            self._writer_lot.unpark_all()

    async def _writer(self) -> None:
        outbuf_limit = self._settings.write_buffer_size
        outq = self._outq
        while True:
            if not outq:
                self._drain_lot.unpark_all()
                await self._writer_lot.park()
                continue
            try:
                raw = self._raw
                if raw is not None:
                    await trio.lowlevel.wait_writable(raw)
                    try:
                        sent = _send_chunks(
                            raw, [outq[i] for i in range(min(len(outq), _MAX_SEND_CHUNKS))]
                        )
                    except BlockingIOError:
                        continue
                    self._outq_bytes -= sent
                    while sent:
                        head = outq[0]
                        if sent < len(head):
                            outq[0] = memoryview(head)[sent:]
                            break
                        sent -= len(head)
                        outq.popleft()
                else:
                    data = b"".join(outq)
                    outq.clear()
                    self._outq_bytes = 0
                    self._sending = True
                    await self._transport.send_all(data)
                    self._sending = False
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._terminate(to_peer_error(exc, "cannot send") or PeerTransportError(str(exc)))
                return
            if self._outq_bytes <= outbuf_limit:
                self._drain_lot.unpark_all()

    async def _wait_write_room(self) -> None:
        while self._outq_bytes > self._settings.write_buffer_size and self._error is None:
            await self._drain_lot.park()
        self._raise_if_closed()

    async def _wait_drained(self) -> None:
        while (self._outq or self._sending) and self._error is None:
            await self._drain_lot.park()

    def _acknowledge(self, stream_id: int, flow_length: int) -> None:
        if flow_length and self._error is None:
            # h2 batches these into a WINDOW_UPDATE once half a window is used.
            self._h2.acknowledge_received_data(flow_length, stream_id)
            self._flush()

    def _send_reset(self, stream_id: int, error_code: int) -> None:
        if self._error is not None:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            return
        self._flush()

    # ------------------------------------------------------------------ input

    async def _reader(self) -> None:
        if self._initial_data:
            data, self._initial_data = self._initial_data, b""
            if not await self._process_async(data):
                return
        timeout = self._settings.handshake_timeout
        if timeout is not None and not self._peer_settings_seen:
            with trio.move_on_after(timeout):
                while not self._peer_settings_seen:
                    if not await self._read_once():
                        return
            if not self._peer_settings_seen:
                self._terminate(
                    PeerTimeoutError(
                        f"peer sent no HTTP/2 preface and SETTINGS within {timeout:g}s"
                    )
                )
                return
        while await self._read_once():
            if self._outq_bytes > self._settings.write_buffer_size and not self._client_side:
                await self._wait_peer_reads()

    async def _wait_peer_reads(self) -> None:
        # A peer that sends without reading (a PING or SETTINGS flood, or
        # requests whose answers it never takes) would grow our queue of
        # replies without bound. So a server stops reading until the queue
        # drains below the write buffer, and TCP pushes back on the peer; a
        # peer that never drains it is then dropped by the keepalive, which
        # sees no activity. One read follows each drain, so a sender that
        # refills the queue at once cannot starve the reader. Only a server
        # does this: if both ends stopped reading while sending, each would
        # wait for the other forever.
        if self._error is None:
            await self._drain_lot.park()

    async def _read_once(self) -> bool:
        try:
            data = await self._transport.receive_some(self._settings.read_size)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._terminate(to_peer_error(exc, "connection lost") or PeerTransportError(str(exc)))
            return False
        if not data:
            self._terminate(PeerTransportError("peer closed the connection"))
            return False
        return await self._process_async(data)

    async def _process_async(self, data: bytes | bytearray) -> bool:
        if self._process(data):
            return True
        # A protocol error: h2 queued a GOAWAY; give it a moment to leave.
        with trio.move_on_after(1.0):
            await self._wait_drained()
        self._terminate(self._protocol_error or PeerTransportError("HTTP/2 protocol error"))
        return False

    def _process(self, data: bytes | bytearray) -> bool:
        self._last_activity = trio.current_time()
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._flush()
            self._protocol_error = PeerTransportError(f"HTTP/2 protocol error from peer: {exc}")
            return False
        dispatch = self._dispatch
        for event in events:
            handler = dispatch.get(type(event))
            if handler is not None:
                handler(event)
        self._flush()
        # A handler may have given up on the peer (see _charge_reset).
        return self._protocol_error is None

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        flow_length = event.flow_controlled_length
        data = event.data
        if stream is None or stream._remote_ended or stream._failure is not None:
            self._acknowledge(event.stream_id, flow_length)
            return
        if data:
            stream._chunks.append((data, flow_length))
            stream._buffered += len(data)
            if stream._lot:  # an empty lot still costs a call chain
                stream._lot.unpark_all()
        elif flow_length:
            self._acknowledge(event.stream_id, flow_length)

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._remote_ended = True
            if stream._lot:
                stream._lot.unpark_all()
            self._stream_progress(stream)

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        if not self._client_side and self._settings.reset_budget is not None:
            self._charge_reset(self._settings.reset_budget)
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._on_reset(event.error_code)
            self._window_lot.unpark_all()
            if isinstance(stream, ClientStream):
                self._release(stream)
        self._slot_lot.unpark_all()

    def _charge_reset(self, budget: int) -> None:
        # A token bucket: a burst of `budget` resets, refilled by `budget` per
        # second. Opening a stream and resetting it at once costs the client
        # nothing but costs us a handler task (CVE-2023-44487).
        now = trio.current_time()
        tokens = self._reset_tokens + (now - self._reset_stamp) * budget
        self._reset_tokens = min(float(budget), tokens) - 1
        self._reset_stamp = now
        if self._reset_tokens < 0 and self._protocol_error is None:
            logger.warning("peer reset streams faster than its budget allows; closing")
            self._h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
            self._protocol_error = PeerTransportError(
                "peer reset streams faster than its budget allows (HTTP/2 rapid reset)"
            )

    def _on_window_updated(self, event: h2.events.WindowUpdated) -> None:
        self._window_lot.unpark_all()

    def _on_remote_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        self._peer_settings_seen = True
        self._window_lot.unpark_all()
        self._slot_lot.unpark_all()

    def _on_ping_ack(self, event: h2.events.PingAckReceived) -> None:
        delivered = self._fences.pop(event.ping_data, None)
        if delivered is not None:
            for stream_id in delivered:
                self._undelivered.pop(stream_id, None)
            if self._unfenced:
                self._send_fence()
            return
        entry = self._pings.get(event.ping_data)
        if entry is not None:
            entry[1] = trio.current_time()
            entry[0].set()

    def _on_late_reset(self, event: _LateReset) -> None:
        on_lost = self._undelivered.pop(event.stream_id, None)
        if on_lost is not None:
            try:
                on_lost()
            except Exception:
                logger.exception("handling the reset of stream %d failed", event.stream_id)

    def _on_connection_terminated(self, event: h2.events.ConnectionTerminated) -> None:
        self._terminate(
            PeerTransportError(
                f"peer sent GOAWAY ({_code_name(event.error_code)}, "
                f"last stream {event.last_stream_id})"
            )
        )

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        self._h2.reset_stream(event.stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        self._h2.reset_stream(event.stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        pass

    # -------------------------------------------------------------- streams

    def _stream_progress(self, stream: _Stream) -> None:
        if stream._local_ended and stream._remote_ended:
            if self._slot_lot:
                self._slot_lot.unpark_all()
            if isinstance(stream, ClientStream):
                self._release(stream)

    def _discard(self, stream: _Stream) -> None:
        # Unread data still counts against the connection window until
        # acknowledged, so a stream that is abandoned must give it back.
        leftover = sum(flow for _, flow in stream._chunks)
        stream._chunks.clear()
        stream._buffered = 0
        self._acknowledge(stream.stream_id, leftover)

    def _release(self, stream: _Stream) -> None:
        if self._streams.pop(stream.stream_id, None) is None:
            return
        self._h2.forget(stream.stream_id)
        if self._slot_lot:
            self._slot_lot.unpark_all()
        if not self._streams:
            self._idle_since = trio.current_time()
            if self._idle_lot:
                self._idle_lot.unpark_all()
            if self._goaway_last_stream_id is not None:
                self._terminate(
                    PeerTransportError(
                        "peer sent GOAWAY; the connection closed after its last stream"
                    )
                )

    # ------------------------------------------------------------- liveness

    async def ping(self) -> float:
        """Send a PING and return the round-trip time in seconds.

        Raises:
            PeerTransportError: the connection failed before the answer.
        """
        self._raise_if_closed()
        self._ping_counter += 1
        payload = self._ping_counter.to_bytes(8, "big")
        entry: list[Any] = [trio.Event(), None]
        self._pings[payload] = entry
        start = trio.current_time()
        try:
            self._h2.ping(payload)
            self._flush()
            await entry[0].wait()
        finally:
            del self._pings[payload]
        if entry[1] is None:
            self._raise_if_closed()
        return float(entry[1]) - start

    def _watch_delivery(self, stream_id: int, on_lost: Callable[[], None]) -> None:
        if self._error is not None:
            return
        undelivered = self._undelivered
        undelivered[stream_id] = on_lost
        if len(undelivered) > _MAX_UNDELIVERED:
            del undelivered[next(iter(undelivered))]
        self._unfenced.append(stream_id)
        if not self._fences:  # one fence at a time; the next covers what came meanwhile
            self._send_fence()

    def _send_fence(self) -> None:
        self._ping_counter += 1
        payload = self._ping_counter.to_bytes(8, "big")
        self._fences[payload] = self._unfenced
        self._unfenced = []
        self._h2.ping(payload)
        self._flush()

    async def _keepalive(self, interval: float) -> None:
        timeout = self._settings.keepalive_timeout
        while True:
            deadline = self._last_activity + interval
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue
            with trio.move_on_after(timeout) as scope:
                try:
                    await self.ping()
                except PeerTransportError:
                    return
            if scope.cancelled_caught:
                self._terminate(
                    PeerTimeoutError(f"peer did not answer a keepalive PING within {timeout:g}s")
                )
                return

    async def _idle_watch(self, idle_for: float) -> None:
        while True:
            if self._streams:
                await self._idle_lot.park()
                continue
            deadline = self._idle_since + idle_for
            if trio.current_time() >= deadline:
                break
            await trio.sleep_until(deadline)
        await self._close_gracefully(self._settings.grace_period)


class H2ServerConnection(_Connection):
    """The server side of one HTTP/2 connection.

    Each incoming stream runs ``await handler(stream)`` in its own task with
    a ServerStream. A handler's exception resets its stream
    (INTERNAL_ERROR) and is logged; it never ends the connection. A handler
    that returns before ending its response has its stream reset (CANCEL).
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        handler: StreamHandler,
        settings: H2Settings | None = None,
        *,
        initial_data: bytes = b"",
    ) -> None:
        super().__init__(transport, settings, client_side=False, initial_data=initial_data)
        self._handler = handler

    async def serve(
        self, *, task_status: trio.TaskStatus[H2ServerConnection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the connection until it ends.

        Cancelling ``serve`` closes gracefully: GOAWAY, in-flight streams get
        ``grace_period`` seconds to finish, then are cancelled. Connection
        failures (peer gone, protocol errors, timeouts) end it quietly.
        """
        with collapse_excgroups():
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run_core)
                task_status.started(self)
                try:
                    await self._closed.wait()
                finally:
                    if not self._closed.is_set():
                        with trio.CancelScope(shield=True):
                            await self.aclose()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self._going_away or self._error is not None:
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        headers = event.headers
        index = _index_request_headers(headers, self._settings.max_header_list_size)
        if isinstance(index, str):
            logger.debug("refusing stream %d: %s", stream_id, index)
            self._h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        stream = ServerStream(self, stream_id, headers, index)
        self._streams[stream_id] = stream
        assert self._nursery is not None
        self._nursery.start_soon(self._run_handler, stream)

    async def _run_handler(self, stream: ServerStream) -> None:
        try:
            with stream._scope:
                await self._handler(stream)
        except Exception as exc:
            if stream._reset_code is None and self._error is None:
                logger.exception("handler for stream %d failed", stream.stream_id, exc_info=exc)
                stream.reset(ErrorCodes.INTERNAL_ERROR)
        finally:
            if not stream._local_ended:
                stream.reset(ErrorCodes.CANCEL)
            elif not stream._remote_ended:
                await self._await_request_end(stream)
            self._discard(stream)
            self._release(stream)

    async def _await_request_end(self, stream: ServerStream) -> None:
        # The response is complete but the request is not (an early error
        # answer). RFC 9113 8.1 lets us stop the client with RST_STREAM
        # (NO_ERROR), but some clients (curl 7.x) then drop the response they
        # already have; so the rest of a request already on its way gets a
        # moment to arrive, and only a client still sending after that is
        # reset. Shielded, so a cancelled handler still releases its stream.
        with trio.CancelScope(shield=True), trio.move_on_after(_REQUEST_TAIL_GRACE):
            while not (stream._remote_ended or stream._failure or self._error):
                self._discard(stream)
                await stream._lot.park()
        if not stream._remote_ended:
            stream.reset(ErrorCodes.NO_ERROR)


class H2ClientConnection(_Connection):
    """The client side of one HTTP/2 connection; get one from ``open_h2_client``."""

    def __init__(self, transport: trio.abc.Stream, settings: H2Settings | None = None) -> None:
        super().__init__(transport, settings, client_side=True)

    @property
    def going_away(self) -> bool:
        """Whether the peer has sent GOAWAY: no new stream may be opened."""
        return self._goaway_last_stream_id is not None

    async def open_stream(
        self,
        headers: HeaderSeq,
        *,
        end_stream: bool = False,
        body: bytes | bytearray | memoryview | None = None,
    ) -> ClientStream:
        """Open a stream by sending its request headers.

        With ``body``, the whole request body follows with END_STREAM, in the
        same write as the headers when the flow-control window allows (one
        send for a small unary request). Waits while the peer's
        ``max_concurrent_streams`` is reached.

        Raises:
            PeerUnavailableError: the connection is closed or the peer sent
                GOAWAY; nothing was sent.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        h2c = self._h2
        while True:
            if self._error is not None:
                raise PeerUnavailableError(str(self._error))
            if self._goaway_last_stream_id is not None:
                raise PeerUnavailableError("peer sent GOAWAY; open a new connection")
            # Until the peer's SETTINGS arrive its stream limit is unknown, and
            # h2 on the far side treats overshooting it as a connection error.
            if (
                self._peer_settings_seen
                and h2c.open_outbound_streams < h2c.remote_settings.max_concurrent_streams
            ):
                break
            await self._slot_lot.park()
        # No await between allocating the id and sending HEADERS: ids must go
        # out in increasing order.
        stream_id = h2c.get_next_available_stream_id()
        stream = ClientStream(self, stream_id)
        try:
            h2c.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.H2Error as exc:
            raise _h2_failure(exc, "cannot open a stream") from exc
        self._streams[stream_id] = stream
        stream._local_ended = end_stream
        if body is None:
            self._flush()
            return stream
        try:
            await stream.send_data(body, end_stream=True)
        except BaseException:
            stream.reset(ErrorCodes.CANCEL)
            raise
        return stream

    async def _close_client(self) -> None:
        if self._error is None:
            for stream in list(self._streams.values()):
                stream.reset(ErrorCodes.CANCEL)
            with suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection()
            self._flush()
            with trio.move_on_after(1.0):
                await self._wait_drained()
            self._terminate(PeerTransportError("connection closed"))
        await self._closed.wait()

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.response_headers = event.headers
            if stream._lot:
                stream._lot.unpark_all()

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.trailers = event.headers

    def _on_request(self, event: h2.events.RequestReceived) -> None:  # pragma: no cover
        self._h2.reset_stream(event.stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _on_connection_terminated(self, event: h2.events.ConnectionTerminated) -> None:
        last = event.last_stream_id or 0
        failure = PeerTransportError(
            f"peer sent GOAWAY ({_code_name(event.error_code)}, last stream {last})"
        )
        if event.error_code != ErrorCodes.NO_ERROR:
            self._terminate(failure)
            return
        self._goaway_last_stream_id = last
        refused = PeerUnavailableError(
            f"stream not processed: peer sent GOAWAY with last stream {last}; safe to retry"
        )
        for stream_id, stream in list(self._streams.items()):
            if stream_id > last:
                stream._fail(refused)
                self._streams.pop(stream_id)
        if not self._streams:
            self._terminate(failure)


async def serve_h2_connection(
    transport: trio.abc.Stream,
    handler: StreamHandler,
    settings: H2Settings | None = None,
    *,
    initial_data: bytes = b"",
    task_status: trio.TaskStatus[H2ServerConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP/2 on ``transport`` until the connection ends.

    ``initial_data`` holds bytes already read from the transport (e.g. the
    preface a listener sniffed). ``task_status`` reports the
    H2ServerConnection (for ``ping``, ``aclose``, ``statistics``). See
    ``H2ServerConnection.serve`` for cancellation behaviour.
    """
    conn = H2ServerConnection(transport, handler, settings, initial_data=initial_data)
    await conn.serve(task_status=task_status)


@asynccontextmanager
async def open_h2_client(
    transport: trio.abc.Stream, settings: H2Settings | None = None
) -> AsyncIterator[H2ClientConnection]:
    """Run the client side of HTTP/2 over ``transport`` for the block's duration.

    Leaving the block sends GOAWAY, resets any stream still open and closes
    the transport.

    Raises:
        PeerTransportError: from the connection's methods when the connection
            fails (peer gone, GOAWAY, protocol error).
        PeerTimeoutError: when a keepalive PING or the handshake times out.
    """
    conn = H2ClientConnection(transport, settings)
    with collapse_excgroups():
        async with trio.open_nursery() as nursery:
            await nursery.start(conn._run_core)
            try:
                yield conn
            finally:
                with trio.CancelScope(shield=True):
                    await conn._close_client()
