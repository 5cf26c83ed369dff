"""Tools for attacking a real PeerServer: a raw h2 client, frame builders, steps, checks.

The raw client is a bare ``h2`` connection on a trio stream. It sends only
what it is told to, answers nothing on its own unless ``pump`` is called, and
can write arbitrary bytes, so tests can play the misbehaving peer that a
PeerClient never would.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.events
import h2.frame_buffer
import h2.settings
import hpack
import hyperframe.frame
import msgpack
import trio

from peerflow import (
    Context,
    Limits,
    PeerAddress,
    PeerClient,
    PeerServer,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)
from peerflow._transport.h2conn import H2ServerConnection
from peerflow._transport.listener import H2_PREFACE
from peerflow._wire import grpc
from peerflow._wire.codec import decode_message
from peerflow._wire.envelopes import ErrorDetails
from peerflow._wire.framing import encode_frame, encode_frame_prefix

__all__ = [
    "DEREF",
    "H2_PREFACE",
    "INVOKE",
    "LEASE",
    "PATHS",
    "RELEASE",
    "STREAM",
    "ErrorLog",
    "FrameReader",
    "RawH2Client",
    "RawResponse",
    "assert_good_call",
    "build_steps",
    "capture_errors",
    "grpc_headers",
    "grpc_message",
    "header_block",
    "invoke_envelope",
    "open_raw",
    "parse_frames",
    "prefix_only",
    "raw_frame",
    "read_until_eof",
    "running_server",
    "server_connections",
    "settings_frame",
]

INVOKE = grpc.INVOKE_SUB_WORKFLOW.path.encode()
STREAM = grpc.STREAM_SUB_WORKFLOW.path.encode()
DEREF = grpc.DEREF_SESSION_REF.path.encode()
RELEASE = grpc.RELEASE_SESSION_REF.path.encode()
LEASE = grpc.LEASE.path.encode()
#: Every method path the server serves.
PATHS = (INVOKE, STREAM, DEREF, RELEASE, LEASE)


# --- the server under attack -------------------------------------------------


def build_steps() -> StepRegistry:
    """Steps the attacked server offers: ``echo``, ``sleep`` (seconds) and ``big`` (bytes)."""
    registry = StepRegistry()
    wf = Workflow("hardening", registry=registry)

    @wf.step("echo", accepts=[StartEvent])
    async def echo(event: StartEvent, ctx: Context) -> StopEvent:
        return StopEvent(result=event.data)

    @wf.step("sleep", accepts=[StartEvent])
    async def sleep(event: StartEvent, ctx: Context) -> StopEvent:
        await trio.sleep(event.data)
        return StopEvent(result="slept")

    @wf.step("big", accepts=[StartEvent])
    async def big(event: StartEvent, ctx: Context) -> StopEvent:
        value = bytes(event.data)
        return StopEvent(result=ctx.refs.insert(value, lifetime=RefLifetime.UNTIL_EXPLICIT_DROP))

    return registry


@asynccontextmanager
async def running_server(
    limits: Limits | None = None,
) -> AsyncIterator[tuple[PeerServer, PeerAddress]]:
    """Serve :func:`build_steps` on an ephemeral loopback port for the block."""
    server = PeerServer("node-hard", registry=build_steps(), token=None, limits=limits)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        yield server, address
        nursery.cancel_scope.cancel()


def server_connections(server: PeerServer) -> list[H2ServerConnection]:
    """The server's HTTP/2 connections that have carried at least one call.

    The server exposes no list of its connections; its per-connection ref
    scopes are keyed by them, which is the one handle a test can reach.
    """
    return [conn for conn in server._scopes if isinstance(conn, H2ServerConnection)]


async def assert_good_call(address: PeerAddress, value: Any = "still-alive") -> None:
    """Make a real call on a fresh connection and check that it succeeds."""
    async with PeerClient.connect(address.url, "node-good", token=None) as client:
        response = await client.invoke_sub_workflow("hardening", ["echo"], value)
    assert response.error is None
    assert response.result == value


@attrs.define
class ErrorLog:
    """Records at ERROR or above from the ``peerflow`` loggers."""

    records: list[logging.LogRecord] = attrs.field(factory=list)

    def texts(self) -> list[str]:
        """Each record's message, with its traceback's last line when it has one."""
        return [
            record.getMessage()
            + (f" [{record.exc_info[1]!r}]" if record.exc_info and record.exc_info[1] else "")
            for record in self.records
        ]


class _Collect(logging.Handler):
    def __init__(self, log: ErrorLog) -> None:
        super().__init__(logging.ERROR)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        self._log.records.append(record)


@contextmanager
def capture_errors() -> Iterator[ErrorLog]:
    """Collect what the server logs at ERROR: an "internal error" is a hardening failure."""
    log = ErrorLog()
    handler = _Collect(log)
    logger = logging.getLogger("peerflow")
    logger.addHandler(handler)
    try:
        yield log
    finally:
        logger.removeHandler(handler)


# --- messages and frames -----------------------------------------------------


def grpc_headers(
    path: bytes = INVOKE,
    *,
    content_type: bytes = b"application/grpc+msgpack",
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> list[tuple[bytes, bytes]]:
    """Request headers of one gRPC call, as a PeerClient would send them.

    ``extra`` headers replace the defaults of the same name.
    """
    replaced = {name for name, _ in extra}
    defaults = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"hardening"),
        (b"content-type", content_type),
        (b"te", b"trailers"),
        (grpc.NODE_ID_HEADER.encode(), b"node-raw"),
    ]
    return [h for h in defaults if h[0] not in replaced] + list(extra)


def grpc_message(envelope: Any) -> bytes:
    """``envelope`` packed with msgpack and framed with the 5-byte gRPC prefix."""
    return encode_frame(msgpack.packb(envelope, use_bin_type=True))


def invoke_envelope(step_ids: Any = ("echo",), value: Any = "x") -> dict[str, Any]:
    """A version-1 InvokeSubWorkflowRequest map."""
    return {"v": 1, "workflow_name": "hardening", "step_ids": list(step_ids), "input": value}


def raw_frame(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """One HTTP/2 frame with any type, flags, stream id (R bit included) and payload."""
    length = len(payload)
    return struct.pack(">BHBBI", length >> 16, length & 0xFFFF, frame_type, flags, stream_id) + (
        payload
    )


def settings_frame(*pairs: tuple[int, int]) -> bytes:
    """A SETTINGS frame with any (id, value) pairs, valid or not."""
    return raw_frame(4, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def prefix_only(announced: int) -> bytes:
    """A gRPC message prefix announcing ``announced`` bytes, for size-limit attacks."""
    return encode_frame_prefix(announced)


# --- the raw client ----------------------------------------------------------


@attrs.define
class RawResponse:
    """What came back on one stream of a :class:`RawH2Client`."""

    headers: list[tuple[bytes, bytes]] | None = None
    data: bytearray = attrs.field(factory=bytearray)
    trailers: list[tuple[bytes, bytes]] | None = None
    reset_code: int | None = None
    ended: bool = False

    @property
    def done(self) -> bool:
        """Whether the server finished the stream (END_STREAM or RST_STREAM)."""
        return self.ended or self.reset_code is not None

    def header(self, name: bytes) -> bytes | None:
        """``name`` from the trailers, or from the headers of a Trailers-Only reply."""
        for block in (self.trailers, self.headers):
            for key, value in block or ():
                if key == name:
                    return value
        return None

    @property
    def http_status(self) -> int | None:
        """The response's ``:status``."""
        for key, value in self.headers or ():
            if key == b":status":
                return int(value)
        return None

    @property
    def grpc_status(self) -> int | None:
        """The ``grpc-status`` the server sent, if any."""
        value = self.header(b"grpc-status")
        return None if value is None else int(value)

    @property
    def grpc_message(self) -> str:
        """The decoded ``grpc-message`` (empty if none)."""
        value = self.header(b"grpc-message")
        return "" if value is None else grpc.decode_grpc_message(value)

    @property
    def details(self) -> ErrorDetails | None:
        """The decoded ``peerflow-error-bin`` trailer, if any."""
        value = self.header(grpc.ERROR_DETAILS_TRAILER.encode())
        if value is None:
            return None
        return decode_message(ErrorDetails, grpc.decode_bin_header(value))


class RawH2Client:
    """A bare h2 client connection on ``stream``; nothing happens unless a test asks.

    Attributes:
        h2: the h2 state machine (with inbound and outbound validation off).
        responses: what arrived, by stream id.
        goaway: the server's GOAWAY, once received.
        closed: whether the server closed the socket.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.responses: dict[int, RawResponse] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False

    async def handshake(self, **settings: int) -> None:
        """Send the preface and our SETTINGS (``settings`` overrides by h2 name)."""
        self.h2.initiate_connection()
        if settings:
            codes = h2.settings.SettingCodes
            self.h2.update_settings({codes[name]: value for name, value in settings.items()})
        await self.flush()

    async def flush(self) -> None:
        """Send whatever h2 has queued (acks, settings, frames)."""
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def send_raw(self, data: bytes) -> None:
        """Write bytes straight to the socket, bypassing h2."""
        await self.stream.send_all(data)

    def new_stream_id(self) -> int:
        """The next client stream id (reserved in h2's state)."""
        return int(self.h2.get_next_available_stream_id())

    async def request(
        self,
        body: bytes = b"",
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        end_stream: bool = True,
    ) -> int:
        """Open a stream with ``headers`` (default: an InvokeSubWorkflow call), send ``body``."""
        stream_id = self.new_stream_id()
        self.h2.send_headers(
            stream_id, headers or grpc_headers(), end_stream=not body and end_stream
        )
        self.responses[stream_id] = RawResponse()
        if body:
            self.h2.send_data(stream_id, body, end_stream=end_stream)
        await self.flush()
        return stream_id

    async def pump(self) -> list[h2.events.Event]:
        """Read once, record the events and answer what h2 answers (PING, SETTINGS)."""
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed = True
            return []
        if self.goaway is not None:
            # h2 refuses frames after GOAWAY; the server may still be sending.
            return []
        events = self.h2.receive_data(data)
        for event in events:
            self._record(event)
        try:
            await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True
        return events

    def _record(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
            return
        stream_id = getattr(event, "stream_id", None)
        if not stream_id:
            return
        response = self.responses.setdefault(stream_id, RawResponse())
        if isinstance(event, h2.events.ResponseReceived):
            response.headers = list(event.headers)
        elif isinstance(event, h2.events.TrailersReceived):
            response.trailers = list(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            response.data += event.data
            self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            response.ended = True
        elif isinstance(event, h2.events.StreamReset):
            response.reset_code = event.error_code

    async def wait_done(self, stream_id: int) -> RawResponse:
        """Pump until the server finished ``stream_id`` (or the connection ended)."""
        response = self.responses.setdefault(stream_id, RawResponse())
        while not response.done and not self.closed and self.goaway is None:
            await self.pump()
        return response

    async def ping(self) -> None:
        """Round-trip a PING: everything sent before it has been processed by the server."""
        self.h2.ping(b"hardened")
        await self.flush()
        while not self.closed:
            for event in await self.pump():
                if isinstance(event, h2.events.PingAckReceived):
                    return
        raise AssertionError("the server closed the connection before answering a PING")

    async def wait_closed(self) -> None:
        """Pump until the server closes the socket."""
        while not self.closed:
            await self.pump()


@asynccontextmanager
async def open_raw(address: PeerAddress, *, handshake: bool = True) -> AsyncIterator[RawH2Client]:
    """A :class:`RawH2Client` on a new TCP connection to ``address``."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        client = RawH2Client(stream)
        if handshake:
            await client.handshake()
        yield client


class FrameReader:
    """Parses what the server sends into hyperframe frames, with no h2 state machine.

    For tests that open streams behind h2's back (thousands of hand-built
    HEADERS frames), where h2 itself would reject the server's answers.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = h2.frame_buffer.FrameBuffer(server=False)
        self._buffer.max_frame_size = 2**24 - 1
        self.closed = False

    async def frames(self) -> list[hyperframe.frame.Frame]:
        """Read once and return the complete frames (empty, with ``closed`` set, at EOF)."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.closed = True
            return []
        self._buffer.add_data(data)
        return list(self._buffer)


def parse_frames(data: bytes) -> list[hyperframe.frame.Frame]:
    """The complete frames in what a server sent (a trailing partial frame is dropped)."""
    buffer = h2.frame_buffer.FrameBuffer(server=False)
    buffer.max_frame_size = 2**24 - 1
    buffer.add_data(data)
    return list(buffer)


def header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HPACK block that decodes the same in any decoder state (no dynamic table refs)."""
    return bytes(hpack.Encoder().encode(headers))


async def read_until_eof(stream: trio.abc.Stream) -> bytes:
    """Everything the server sends until it closes (a reset counts as closing)."""
    received = bytearray()
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not data:
            break
        received += data
    return bytes(received)
