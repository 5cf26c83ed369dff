"""The HTTP/JSON front end of a peer: JSON requests in, service calls, JSON answers out.

One :class:`JsonHandler` serves the routes of protocol/README.md section 6,
whatever HTTP version carried them: the HTTP/1.1 driver (:mod:`.http1_server`)
and the HTTP/2 stream router (:class:`~peerflow._peer.grpc_server.GrpcHandler`)
each wrap a request in an :class:`HttpExchange` and hand it over. Unary
methods answer one JSON object; streaming ones answer NDJSON, one object a
line. Whatever goes wrong with one call becomes that call's HTTP status and
``{"error": ...}`` body (or last line); nothing here can end the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Final, Protocol, final

import trio

from .._engine.events import Event, event_to_wire
from .._transport.h2conn import ServerStream
from .._wire import grpc
from .._wire.codec import encode_message
from .._wire.envelopes import (
    DerefSessionRefRequest,
    ErrorDetails,
    InvokeSubWorkflowRequest,
    LeaseRequest,
    ReleaseSessionRefRequest,
    ReleaseSessionRefResponse,
    StreamEvent,
)
from ..errors import PeerError, PeerflowError, PeerLimitError, PeerTimeoutError, PeerTransportError
from .calls import TIMEOUT_MS_HEADER, CallGate, deadline_from_timeout_ms
from .json_codec import (
    END_LINE,
    JSON_CONTENT_TYPE,
    NDJSON_CONTENT_TYPE,
    decode_json,
    encode_json,
    encode_json_deref_chunk,
    encode_json_error,
    encode_json_stream_message,
)
from .limits import Limits
from .logs import PeerLogger
from .service import Caller, PeerService, deref_pieces, encode_response
from .trace import TRACEPARENT, TRACESTATE, call_failed

__all__ = [
    "JSON_PATH_PREFIX",
    "WEBSOCKET_PATH",
    "BodyTimeoutError",
    "BodyTooLargeError",
    "H2Exchange",
    "HttpExchange",
    "JsonHandler",
    "error_body",
]

#: Every HTTP/JSON route is ``JSON_PATH_PREFIX + <Method>``.
JSON_PATH_PREFIX: Final = b"/peerflow.peer.v1/"
#: The WebSocket variant's upgrade path.
WEBSOCKET_PATH: Final = b"/peerflow.peer.v1/ws"

_JSON: Final = JSON_CONTENT_TYPE.encode()
_NDJSON: Final = NDJSON_CONTENT_TYPE.encode()
_NODE_ID: Final = grpc.NODE_ID_HEADER.encode()
_TIMEOUT_MS: Final = TIMEOUT_MS_HEADER.encode()
_TRACEPARENT: Final = TRACEPARENT.encode()
_TRACESTATE: Final = TRACESTATE.encode()

Headers = Sequence[tuple[bytes, bytes]]


class BodyTooLargeError(PeerLimitError):
    """A request body above ``Limits.max_message_size``: HTTP 413, before it is buffered."""

    http_status = 413


class BodyTimeoutError(PeerTimeoutError):
    """A request body slower than ``Limits.request_timeout``: HTTP 408."""

    http_status = 408


class HttpExchange(Protocol):
    """One HTTP request and its answer, as the JSON front end sees it.

    Implemented once for HTTP/1.1 (over h11) and once for HTTP/2 streams.
    """

    @property
    def method(self) -> bytes:
        """The request method, e.g. ``b"POST"``."""

    @property
    def target(self) -> bytes:
        """The request target: the path, with any query string."""

    def header(self, name: bytes) -> bytes | None:
        """The first value of request header ``name`` (lowercase), or None."""

    @property
    def principal(self) -> str | None:
        """What the transport proved about the caller (a TLS client certificate subject)."""

    def scope(self) -> Hashable:
        """The ref scope of the caller's connection."""

    @property
    def response_started(self) -> bool:
        """Whether the answer's status line or headers have gone out."""

    async def read_body(self) -> bytes:
        """Read the whole request body.

        Raises:
            BodyTooLargeError: it is larger than the message size limit.
            BodyTimeoutError: it did not arrive within the request timeout.
            PeerTransportError: the connection failed.
        """

    async def respond(
        self, status: int, content_type: bytes, body: bytes, headers: Headers = ()
    ) -> None:
        """Send a complete answer."""

    async def start_stream(self, content_type: bytes) -> None:
        """Send a 200 answer's head; its body follows with :meth:`send`."""

    async def send(self, data: bytes) -> None:
        """Send more of a streamed answer's body."""

    async def end_stream(self) -> None:
        """End a streamed answer."""

    def watch_delivery(self, on_lost: Callable[[], None]) -> None:
        """Call ``on_lost`` if the client turns out not to have read the ended answer.

        Where the transport cannot tell (HTTP/1.1), this does nothing.
        """


def error_body(code: str, message: str) -> bytes:
    """The JSON body ``{"error": {...}}`` of a failure that has no exception behind it."""
    return encode_json_error(encode_message(ErrorDetails(code, message)))


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    return content_type.split(b";", 1)[0].strip().lower() == _JSON


@final
class JsonHandler:
    """Serves the ``/peerflow.peer.v1/<Method>`` routes with JSON bodies.

    Args:
        service: does the work of each method.
        limits: deref chunk size (the exchanges enforce the body limits).
        gate: checks each call's credentials and names its caller.
    """

    def __init__(self, service: PeerService, limits: Limits, *, gate: CallGate) -> None:
        self._service = service
        self._limits = limits
        self._gate = gate
        self._log = PeerLogger("http", service.node_id)
        self._methods: dict[
            bytes, Callable[[HttpExchange, bytes, Caller, float], Awaitable[None]]
        ] = {
            b"InvokeSubWorkflow": self._invoke,
            b"StreamSubWorkflow": self._stream,
            b"DerefSessionRef": self._deref,
            b"ReleaseSessionRef": self._release,
            b"Lease": self._lease,
        }

    async def serve(self, exchange: HttpExchange) -> None:
        """Answer one request; every failure becomes the answer's status and error body.

        The caller has checked that the path is under ``JSON_PATH_PREFIX`` and
        named the call for the logs (see :func:`~peerflow._peer.calls.name_call`).
        """
        path = exchange.target.split(b"?", 1)[0]
        traceparent = exchange.header(_TRACEPARENT)
        with self._gate.trace(
            traceparent, traceparent and exchange.header(_TRACESTATE), path, "http_json"
        ):
            try:
                caller = self._gate.admit(
                    exchange.header(b"authorization"),
                    exchange.header(_NODE_ID),
                    exchange.principal,
                    _scope_of,
                    exchange,
                )
                # Only an admitted caller learns which routes and verbs exist.
                method = self._methods.get(path[len(JSON_PATH_PREFIX) :])
                if method is None:
                    message = f"unknown method {path[:200].decode('latin-1')}"
                    await exchange.respond(501, _JSON, error_body("unimplemented", message))
                    return
                if exchange.method != b"POST":
                    await exchange.respond(
                        405,
                        _JSON,
                        error_body("method_not_allowed", "the HTTP/JSON routes take POST"),
                        [(b"allow", b"POST")],
                    )
                    return
                if not _is_json(exchange.header(b"content-type")):
                    await exchange.respond(
                        415, _JSON, error_body("encode", "expected content-type application/json")
                    )
                    return
                deadline = deadline_from_timeout_ms(exchange.header(_TIMEOUT_MS))
                with trio.move_on_at(deadline):
                    await method(exchange, await exchange.read_body(), caller, deadline)
                    return
                raise PeerTimeoutError("the call's deadline (X-Peerflow-Timeout-Ms) passed")
            except PeerflowError as exc:
                await self._fail(exchange, exc)
            except Exception as exc:
                self._log.exception("call %s failed", path.decode("latin-1"))
                await self._fail(exchange, exc)

    async def _fail(self, exchange: HttpExchange, exc: BaseException) -> None:
        call_failed(exc)
        status, _, details = grpc.status_for_error(exc)
        body = encode_json_error(details)
        try:
            if exchange.response_started:
                # The status line is gone: the error is the stream's last line.
                await exchange.send(body + b"\n")
                await exchange.end_stream()
            else:
                http_status = getattr(exc, "http_status", None) or grpc.http_status_for(status)
                await exchange.respond(http_status, _JSON, body)
        except PeerError:
            self._log.debug("could not report %r: the connection is gone", exc)

    # -- methods ---------------------------------------------------------------

    async def _invoke(
        self, exchange: HttpExchange, raw: bytes, caller: Caller, deadline: float
    ) -> None:
        request = decode_json(InvokeSubWorkflowRequest, raw)
        response = await self._service.invoke(request, caller, deadline=deadline)
        with self._service.delivering(response, caller, exchange.watch_delivery):
            await exchange.respond(200, _JSON, encode_response(encode_json, response))

    async def _stream(
        self, exchange: HttpExchange, raw: bytes, caller: Caller, deadline: float
    ) -> None:
        request = decode_json(InvokeSubWorkflowRequest, raw)
        self._service.assemble(request)  # unknown steps fail before the status goes out
        await exchange.start_stream(_NDJSON)

        async def forward(event: Event) -> None:
            wire = event_to_wire(event)
            message = StreamEvent(wire["event_type"], wire["data"])
            await exchange.send(encode_json_stream_message(message) + b"\n")

        response = await self._service.invoke(request, caller, deadline=deadline, on_event=forward)
        line = encode_response(encode_json_stream_message, response)
        with self._service.delivering(response, caller, exchange.watch_delivery):
            await exchange.send(line + b"\n")
        # Outside: a client may take the response line and then leave before
        # the end, and its caller then holds the refs.
        await exchange.end_stream()

    async def _deref(
        self, exchange: HttpExchange, raw: bytes, caller: Caller, deadline: float
    ) -> None:
        request = decode_json(DerefSessionRefRequest, raw)
        type_tag, payload = self._service.deref(request.ref_uuid, caller)
        await exchange.start_stream(_NDJSON)
        for piece, tag, total in deref_pieces(type_tag, payload, self._limits.max_deref_chunk):
            line = encode_json_deref_chunk(piece, type_tag=tag, total_size=total)
            await exchange.send(line + b"\n")
        await exchange.send(END_LINE)
        await exchange.end_stream()

    async def _release(
        self, exchange: HttpExchange, raw: bytes, caller: Caller, deadline: float
    ) -> None:
        request = decode_json(ReleaseSessionRefRequest, raw)
        released = self._service.release(request.ref_uuid, caller)
        await exchange.respond(200, _JSON, encode_json(ReleaseSessionRefResponse(released)))

    async def _lease(
        self, exchange: HttpExchange, raw: bytes, caller: Caller, deadline: float
    ) -> None:
        request = decode_json(LeaseRequest, raw)
        await exchange.respond(200, _JSON, encode_json(self._service.lease(request, caller)))


def _scope_of(exchange: HttpExchange) -> Hashable:
    return exchange.scope()


@final
class H2Exchange:
    """An HTTP/JSON request on an HTTP/2 stream (the port's gRPC streams' neighbour).

    The stream's own machinery does the rest: a client's RST_STREAM cancels
    the handler, flow control paces the answer.
    """

    def __init__(
        self,
        stream: ServerStream,
        limits: Limits,
        principal: str | None,
        scope_of: Callable[[ServerStream], Hashable],
    ) -> None:
        self._stream = stream
        self._limits = limits
        self._principal = principal
        self._scope_of = scope_of

    @property
    def method(self) -> bytes:
        """The request's ``:method``."""
        return self._stream.method

    @property
    def target(self) -> bytes:
        """The request's ``:path``."""
        return self._stream.path

    def header(self, name: bytes) -> bytes | None:
        """The first value of request header ``name``, or None."""
        return self._stream.header(name)

    @property
    def principal(self) -> str | None:
        """The TLS client certificate subject, if any."""
        return self._principal

    def scope(self) -> Hashable:
        """The ref scope of the HTTP/2 connection."""
        return self._scope_of(self._stream)

    @property
    def response_started(self) -> bool:
        """Whether the response headers have gone out."""
        return self._stream.response_started

    async def read_body(self) -> bytes:
        """Read the request body, within the size limit and the request timeout."""
        with trio.move_on_after(self._limits.request_timeout):
            return await self._read_body()
        raise BodyTimeoutError(
            f"the request body did not arrive within {self._limits.request_timeout:g}s"
        )

    async def _read_body(self) -> bytes:
        limit = self._limits.max_message_size
        parts: list[bytes | memoryview] = []
        size = 0
        while data := await self._stream.receive_data():
            size += len(data)
            if size > limit:
                raise BodyTooLargeError(f"the request body exceeds the limit of {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    async def respond(
        self, status: int, content_type: bytes, body: bytes, headers: Headers = ()
    ) -> None:
        """Send headers and body, in one write when the window allows."""
        await self._stream.send_response(
            [
                (b":status", str(status).encode()),
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
            body,
        )

    async def start_stream(self, content_type: bytes) -> None:
        """Send a 200 answer's headers."""
        self._stream.send_headers([(b":status", b"200"), (b"content-type", content_type)])
        await trio.lowlevel.checkpoint()

    async def send(self, data: bytes) -> None:
        """Send body bytes, paced by flow control.

        Raises:
            PeerTransportError: the stream failed, or an earlier send stopped
                mid-line, so anything more would read as that line's rest
                (as h11 refuses after a cut write; the stream is reset when
                the call ends).
        """
        if self._stream.body_cut:
            raise PeerTransportError("the answer was cut off mid-line")
        await self._stream.send_data(data)

    async def end_stream(self) -> None:
        """End the answer (END_STREAM)."""
        self._stream.end_stream()
        await trio.lowlevel.checkpoint()

    def watch_delivery(self, on_lost: Callable[[], None]) -> None:
        """See :meth:`ServerStream.watch_delivery`."""
        self._stream.watch_delivery(on_lost)
