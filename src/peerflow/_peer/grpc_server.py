"""The gRPC front end of a peer: HTTP/2 streams in, service calls, gRPC replies out.

One :class:`GrpcHandler` serves every stream of every connection. For each
stream it checks the method, content type and credentials, reads exactly one
request message, calls :class:`~peerflow._peer.service.PeerService` and
answers with gRPC's headers, length-prefixed messages and status trailers.
Whatever goes wrong with one call becomes that call's status; nothing here
can end the connection or the server. Streams for the HTTP/JSON routes
(``/peerflow.peer.v1/<Method>`` with a JSON body) share the port and are
handed to the JSON front end.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Hashable
from typing import Final, final

import trio

from .._engine.events import Event, event_to_wire
from .._transport.h2conn import ErrorCodes, ServerStream
from .._wire import grpc
from .._wire.codec import (
    decode_message,
    encode_deref_chunk_header,
    encode_message,
    encode_stream_message,
)
from .._wire.envelopes import (
    DerefSessionRefRequest,
    InvokeSubWorkflowRequest,
    LeaseRequest,
    ReleaseSessionRefRequest,
    ReleaseSessionRefResponse,
    StreamEvent,
)
from .._wire.framing import NEED_DATA, FrameDecoder, encode_frame, encode_frame_prefix
from ..errors import PeerEncodeError, PeerError, PeerflowError, PeerTimeoutError
from .calls import CallGate, deadline_from_grpc_timeout, name_call
from .http_json import JSON_PATH_PREFIX
from .limits import Limits
from .logs import PeerLogger
from .service import Caller, PeerService, deref_pieces, encode_response
from .trace import TRACEPARENT, TRACESTATE, call_failed

__all__ = ["GrpcHandler"]

_CONTENT_TYPE: Final = grpc.CONTENT_TYPE.encode()
_RESPONSE_HEADERS: Final = ((b":status", b"200"), (b"content-type", _CONTENT_TYPE))
_OK_TRAILERS: Final = ((b"grpc-status", b"0"),)
_NODE_ID: Final = grpc.NODE_ID_HEADER.encode()
_CALL_ID: Final = grpc.CALL_ID_HEADER.encode()
_TRACEPARENT: Final = TRACEPARENT.encode()
_TRACESTATE: Final = TRACESTATE.encode()


def status_trailers(exc: BaseException) -> list[tuple[bytes, bytes]]:
    """The gRPC trailers reporting ``exc`` (see the status table in ``_wire.grpc``)."""
    status, message, details = grpc.status_for_error(exc)
    return [
        (b"grpc-status", str(int(status)).encode()),
        (b"grpc-message", grpc.encode_grpc_message(message).encode("ascii")),
        (grpc.ERROR_DETAILS_TRAILER.encode(), grpc.encode_bin_header(details).encode("ascii")),
    ]


def _plain_status(status: grpc.Status, message: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"grpc-status", str(int(status)).encode()),
        (b"grpc-message", grpc.encode_grpc_message(message).encode("ascii")),
    ]


@final
class GrpcHandler:
    """Serves the ``peerflow.peer.v1.Peer`` gRPC service on HTTP/2 streams.

    Args:
        service: does the work of each method.
        limits: message size and deref chunk bounds.
        gate: checks each call's credentials and names its caller.
        principal_of: maps a stream to its authenticated principal (the TLS
            client certificate subject), or None.
        scope_of: maps a stream to its connection's ref scope.
        json_handler: serves streams on the HTTP/JSON paths that do not
            carry a gRPC content type; without it they get HTTP 415.
    """

    def __init__(
        self,
        service: PeerService,
        limits: Limits,
        *,
        gate: CallGate,
        principal_of: Callable[[ServerStream], str | None],
        scope_of: Callable[[ServerStream], Hashable],
        json_handler: Callable[[ServerStream], Awaitable[None]] | None = None,
    ) -> None:
        self._service = service
        self._limits = limits
        self._log = PeerLogger("grpc", service.node_id)
        self._gate = gate
        self._principal_of = principal_of
        self._scope_of = scope_of
        self._json_handler = json_handler
        self._methods: dict[bytes, Callable[[ServerStream, bytes, Caller, float], Awaitable[None]]]
        self._methods = {
            grpc.INVOKE_SUB_WORKFLOW.path.encode(): self._invoke,
            grpc.STREAM_SUB_WORKFLOW.path.encode(): self._stream,
            grpc.DEREF_SESSION_REF.path.encode(): self._deref,
            grpc.RELEASE_SESSION_REF.path.encode(): self._release,
            grpc.LEASE.path.encode(): self._lease,
        }

    async def __call__(self, stream: ServerStream) -> None:
        """Serve one call; every failure becomes the call's gRPC status."""
        name_call(stream.header(_CALL_ID), stream.connection, stream.stream_id)
        content_type = stream.content_type
        if content_type != _CONTENT_TYPE and (
            content_type is None or not grpc.is_grpc_content_type(content_type.decode("latin-1"))
        ):
            if self._json_handler is not None and stream.path.startswith(JSON_PATH_PREFIX):
                # It answers a wrong verb or content type itself (after the token).
                await self._json_handler(stream)
                return
            stream.send_headers(
                [(b":status", b"415"), (b"content-type", b"text/plain")], end_stream=False
            )
            await stream.send_data(b"expected content-type application/grpc", end_stream=True)
            return
        if stream.method != b"POST":
            stream.send_headers([(b":status", b"405")], end_stream=True)
            return
        method = self._methods.get(stream.path)
        traceparent = stream.header(_TRACEPARENT)
        with self._gate.trace(
            traceparent, traceparent and stream.header(_TRACESTATE), stream.path, "grpc"
        ):
            try:
                caller = self._gate.admit(
                    stream.header(b"authorization"),
                    stream.header(_NODE_ID),
                    self._principal_of(stream),
                    self._scope_of,
                    stream,
                )
                if method is None:  # only for an admitted caller: names are not for everyone
                    self._trailers_only(
                        stream,
                        _plain_status(
                            grpc.Status.UNIMPLEMENTED,
                            f"unknown method {stream.path.decode('latin-1')}",
                        ),
                    )
                    return
                deadline = deadline_from_grpc_timeout(stream.header(b"grpc-timeout"))
                if deadline == math.inf:
                    # No deadline: spare the common path a cancel scope that never fires.
                    await method(stream, await self._read_request(stream), caller, math.inf)
                else:
                    with trio.move_on_at(deadline):
                        await method(stream, await self._read_request(stream), caller, deadline)
                        return
                    raise PeerTimeoutError("the call's deadline (grpc-timeout) passed")
            except (PeerflowError, UnicodeDecodeError) as exc:
                self._fail(stream, exc)
            except Exception as exc:
                self._log.exception("call %s failed", stream.path.decode("latin-1"))
                self._fail(stream, exc)

    async def _read_request(self, stream: ServerStream) -> bytes:
        if stream.remote_ended:  # the usual unary case: it all came in one read
            return await self._read_request_body(stream)
        # A request body that trickles in must not hold its stream forever:
        # keepalive and idle timeouts cannot see a connection that is "busy".
        with trio.move_on_after(self._limits.request_timeout):
            return await self._read_request_body(stream)
        raise PeerTimeoutError(
            f"the request message did not arrive within {self._limits.request_timeout:g}s"
        )

    async def _read_request_body(self, stream: ServerStream) -> bytes:
        decoder = FrameDecoder(self._limits.max_message_size)
        message: bytes | None = None
        while data := await stream.receive_data():
            decoder.feed(bytes(data))
            found = decoder.next_message()
            if found is not NEED_DATA:
                if message is not None or decoder.next_message() is not NEED_DATA:
                    raise PeerEncodeError("a unary request carries exactly one message")
                message = bytes(found)
        decoder.end_of_stream()
        if message is None:
            raise PeerEncodeError("the request carries no message")
        return message

    def _fail(self, stream: ServerStream, exc: BaseException) -> None:
        call_failed(exc)
        trailers = status_trailers(exc)
        if stream.reset_code is not None:
            return
        if stream.body_cut:
            # Part of a message is out (a backlog overflowed, a deadline
            # passed mid-message): trailers would read as its truncated rest.
            stream.abort(exc)
            return
        try:
            if stream.response_started:
                stream.send_trailers(trailers)
            else:
                self._trailers_only(stream, trailers)
        except PeerError:
            self._log.debug("could not report %r: the stream is gone", exc)

    @staticmethod
    def _trailers_only(stream: ServerStream, trailers: list[tuple[bytes, bytes]]) -> None:
        stream.send_headers([*_RESPONSE_HEADERS, *trailers], end_stream=True)

    async def _send(self, stream: ServerStream, *message: bytes | memoryview) -> None:
        """Send one message of a streamed response (in pieces, to spare a copy).

        Flow control would otherwise hold the call, and all a run streams
        meanwhile, for as long as the connection lives. As the HTTP/1.1 and
        WebSocket front ends do, a message that the client does not take
        within ``request_timeout`` ends the call, which cancels its run. The
        stream is reset (CANCEL), not ended with a status: part of the
        message may be out, and trailers after it would read as a
        truncated message.

        Raises:
            PeerTimeoutError: the client did not take the message in time.
            PeerTransportError: the stream was reset or the connection failed.
        """
        timeout = self._limits.request_timeout
        with trio.move_on_after(timeout):
            await stream.send_data(*message)
            return
        stream.reset(ErrorCodes.CANCEL)
        raise PeerTimeoutError(
            f"the client stopped reading the response ({timeout:g}s without taking a message)"
        )

    @staticmethod
    async def _unary_reply(stream: ServerStream, body: bytes) -> None:
        await stream.send_response(_RESPONSE_HEADERS, encode_frame(body), _OK_TRAILERS)

    # -- methods ---------------------------------------------------------------

    async def _invoke(
        self, stream: ServerStream, raw: bytes, caller: Caller, deadline: float
    ) -> None:
        request = decode_message(InvokeSubWorkflowRequest, raw)
        response = await self._service.invoke(request, caller, deadline=deadline)
        with self._service.delivering(response, caller, stream.watch_delivery):
            await self._unary_reply(stream, encode_response(encode_message, response))

    async def _stream(
        self, stream: ServerStream, raw: bytes, caller: Caller, deadline: float
    ) -> None:
        request = decode_message(InvokeSubWorkflowRequest, raw)
        self._service.assemble(request)  # unknown steps fail before headers go out
        stream.send_headers(_RESPONSE_HEADERS)

        async def forward(event: Event) -> None:
            wire = event_to_wire(event)
            message = StreamEvent(wire["event_type"], wire["data"])
            await self._send(stream, encode_frame(encode_stream_message(message)))

        response = await self._service.invoke(request, caller, deadline=deadline, on_event=forward)
        body = encode_response(encode_stream_message, response)
        with self._service.delivering(response, caller, stream.watch_delivery):
            await self._send(stream, encode_frame(body))
            stream.send_trailers(_OK_TRAILERS)

    async def _deref(
        self, stream: ServerStream, raw: bytes, caller: Caller, deadline: float
    ) -> None:
        request = decode_message(DerefSessionRefRequest, raw)
        type_tag, payload = self._service.deref(request.ref_uuid, caller)
        stream.send_headers(_RESPONSE_HEADERS)
        for piece, tag, total in deref_pieces(type_tag, payload, self._limits.max_deref_chunk):
            header = encode_deref_chunk_header(len(piece), type_tag=tag, total_size=total)
            # Prefix and chunk header go first, then the slice itself: the
            # value's bytes are never copied into a message.
            await self._send(stream, encode_frame_prefix(len(header) + len(piece)) + header, piece)
        stream.send_trailers(_OK_TRAILERS)

    async def _release(
        self, stream: ServerStream, raw: bytes, caller: Caller, deadline: float
    ) -> None:
        request = decode_message(ReleaseSessionRefRequest, raw)
        released = self._service.release(request.ref_uuid, caller)
        await self._unary_reply(stream, encode_message(ReleaseSessionRefResponse(released)))

    async def _lease(
        self, stream: ServerStream, raw: bytes, caller: Caller, deadline: float
    ) -> None:
        request = decode_message(LeaseRequest, raw)
        await self._unary_reply(stream, encode_message(self._service.lease(request, caller)))
