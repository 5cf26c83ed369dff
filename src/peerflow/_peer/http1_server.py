"""HTTP/1.1 on the peer's port: h11 parses, the JSON front end answers, keep-alive reuses.

The listener hands over every connection that is not HTTP/2. Each one is a
loop of request/response cycles driven by an ``h11.Connection``; requests go
to the :class:`~peerflow._peer.http_json.JsonHandler` through an
:class:`_Exchange`, and a WebSocket upgrade of ``/peerflow.peer.v1/ws`` goes
to the WebSocket front end with the request's bytes replayed.

Timeouts (from :class:`~peerflow.Limits`): an idle connection is closed after
``idle_timeout``; once a request's first byte is in, its head and then its
body must each arrive within ``request_timeout``; a client that stops reading
its answer for ``request_timeout`` loses the connection. A client that closes
its connection while its call runs cancels the call.

HTTP/1.1 has no GOAWAY, so a connection drains (:func:`serve_draining`) like
this: an idle connection closes at once; a request that arrives after the
drain began is answered 503 (``unavailable``) and the connection closes; a
call in flight runs on for ``drain_grace`` and its answer carries
``Connection: close``; one still running then is cancelled and answered 499
(``cancelled``), or ends its stream with that error line.
"""

from __future__ import annotations

import contextlib
import http
import math
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Final, final

import h11
import trio

from .._transport.listener import Drain, PrefixedStream, serve_draining
from .._transport.mapping import map_exceptions
from .._wire import grpc
from ..errors import PeerError, PeerTimeoutError, PeerTransportError
from .calls import ClosingConnection, name_call
from .http_json import (
    JSON_PATH_PREFIX,
    WEBSOCKET_PATH,
    BodyTimeoutError,
    BodyTooLargeError,
    Headers,
    JsonHandler,
    error_body,
)
from .json_codec import JSON_CONTENT_TYPE
from .limits import Limits
from .logs import PeerLogger

__all__ = ["SHUTTING_DOWN", "Http1Server", "WebSocketHandler", "cut_off_message"]

#: Serves one upgraded connection; it gets the stream with the upgrade
#: request's bytes replayed, the connection (its ref scope's holder), what
#: the transport proved about the client and the connection's drain.
WebSocketHandler = Callable[
    [trio.abc.Stream, ClosingConnection, str | None, Drain], Awaitable[None]
]

_RECEIVE_SIZE: Final = 65536
_CALL_ID: Final = grpc.CALL_ID_HEADER.encode()
_JSON: Final = JSON_CONTENT_TYPE.encode()
# After an answer that closes the connection while the client may still be
# sending (a refused body), keep reading a little so that closing does not
# reset the connection under the answer before the client has read it.
_LINGER_SECONDS: Final = 1.0
_LINGER_PAUSE: Final = 0.1
_LINGER_BYTES: Final = 4 * 1024 * 1024
# The error code of the body that goes with each refusal of a connection.
_REFUSAL_CODES: Final = {
    404: "not_found",
    408: "timeout",
    431: "limit",
    501: "unimplemented",
    503: "unavailable",
}
#: Why a draining peer refuses a new call (HTTP 503, WebSocket status 14).
SHUTTING_DOWN: Final = "the peer is shutting down and takes no new calls"


@final
class Http1Server:
    """Serves the HTTP/1.1 connections of a peer's port (the listener's ``http1_handler``).

    Args:
        json_handler: answers HTTP/JSON requests.
        limits: header size, body size and timeouts.
        node_id: for the logs.
        principal_of: what a connection's transport proves about the client
            (its TLS certificate subject), or None.
        scope_for: the ref scope of a connection, held while it is open.
        websocket: serves upgraded WebSocket connections; without it an
            upgrade is answered 501.
    """

    def __init__(
        self,
        json_handler: JsonHandler,
        limits: Limits,
        node_id: str,
        *,
        principal_of: Callable[[trio.abc.Stream], str | None],
        scope_for: Callable[[ClosingConnection], Hashable],
        websocket: WebSocketHandler | None = None,
    ) -> None:
        self.json_handler = json_handler
        self.limits = limits
        self.principal_of = principal_of
        self.scope_for = scope_for
        self.websocket = websocket
        self.log = PeerLogger("http", node_id)

    async def __call__(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until it closes (the listener then closes the stream).

        Cancelling this drains the connection for ``limits.drain_grace``
        seconds (see the module's docstring), then returns.
        """
        await serve_draining(partial(self._serve, stream), self.limits.drain_grace)

    async def _serve(self, stream: trio.abc.Stream, drain: Drain) -> None:
        await _Connection(self, stream, drain).serve()


def cut_off_message(drain: Drain) -> str:
    """Why a call the drain cut off was cancelled (status CANCELLED, HTTP 499)."""
    return (
        "the peer shut down: the call was cancelled when its drain grace period "
        f"of {drain.grace_period:g}s ran out"
    )


@final
class _Connection:
    """One HTTP/1.1 connection: a loop of request/response cycles."""

    def __init__(self, server: Http1Server, stream: trio.abc.Stream, drain: Drain) -> None:
        self.server = server
        self.limits = server.limits
        self.stream = stream
        self.drain = drain
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.limits.max_header_list_size
        )
        self.principal = server.principal_of(stream)
        self._closed = trio.Event()
        self._calls = 0
        self._eof = False
        # The raw bytes of the request head being parsed, so that a WebSocket
        # upgrade can be replayed to the WebSocket library as it arrived.
        self._head_bytes = bytearray()

    async def wait_closed(self) -> None:
        """Return once the connection has closed (its ref scope then starts to expire)."""
        await self._closed.wait()

    async def serve(self) -> None:
        try:
            while True:
                request = await self._next_request()
                if request is None:
                    return
                if self.drain.started:
                    # Only a request that had begun to arrive gets this far.
                    await self._refuse(503, SHUTTING_DOWN)
                    return
                if _is_websocket_upgrade(request):
                    await self._upgrade(request)
                    return
                path = request.target.split(b"?", 1)[0]
                if not path.startswith(JSON_PATH_PREFIX):
                    # Not a peerflow client (a browser, a misdirected probe):
                    # answered, and not kept.
                    route = path[:200].decode("latin-1")
                    await self._refuse(404, f"no such route: {route}")
                    return
                if not await self._serve_request(request):
                    return
                self.h11.start_next_cycle()
        finally:
            self._closed.set()

    # -- reading ---------------------------------------------------------------

    async def receive(self) -> bytes:
        """The next bytes from the client; ``b""`` at EOF or when the connection broke."""
        if self._eof:
            return b""
        try:
            data = bytes(await self.stream.receive_some(_RECEIVE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        self._eof = not data
        return data

    async def _next_request(self) -> h11.Request | None:
        pending = self.h11.trailing_data[0]
        self._head_bytes = bytearray(pending)
        idle = self.limits.idle_timeout
        # A request that has begun must finish its head in time; before its
        # first byte the connection is merely idle. The listener's peek at a
        # new connection is a first byte too, even though h11 has not seen it.
        begun = pending or (isinstance(self.stream, PrefixedStream) and self.stream.replaying)
        head_deadline = trio.current_time() + self.limits.request_timeout if begun else math.inf
        idle_deadline = trio.current_time() + idle if idle is not None else math.inf
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc.error_status_hint, f"malformed HTTP/1.1 request: {exc}")
                return None
            if isinstance(event, h11.Request):
                # h11 bounds a head that trickles in; one that came in a
                # single read is measured here, as HTTP/2 measures its headers.
                if _head_size(event) > self.limits.max_header_list_size:
                    await self._refuse(431, "the request head exceeds the header size limit")
                    return None
                if event.http_version not in (b"1.0", b"1.1"):  # a broken HTTP/2 preface
                    await self._refuse(400, "expected an HTTP/1.1 request or HTTP/2")
                    return None
                return event
            if event is not h11.NEED_DATA:  # ConnectionClosed
                return None
            with trio.move_on_at(min(head_deadline, idle_deadline)):
                data = await self._receive_unless_drained(idle=head_deadline == math.inf)
                if data is None:
                    return None
                self.h11.receive_data(data)
                if data and head_deadline == math.inf:
                    head_deadline = trio.current_time() + self.limits.request_timeout
                if len(self._head_bytes) <= self.limits.max_header_list_size:
                    self._head_bytes += data
                continue
            if head_deadline != math.inf:
                await self._refuse(408, "the request head did not arrive in time")
            return None

    async def _receive_unless_drained(self, *, idle: bool) -> bytes | None:
        # Before a request's first byte the connection is idle: a drain
        # closes it at once (None) rather than wait for a request to refuse.
        if not idle:
            return await self.receive()
        data = None
        with self.drain.while_idle():
            data = await self.receive()
        return data

    async def watch_for_disconnect(self, call: trio.CancelScope) -> None:
        """Cancel ``call`` if the client closes the connection while it runs.

        Bytes that arrive meanwhile are a pipelined next request: h11 keeps
        them for the next cycle. Past a header block's worth, reading stops
        and TCP pushes back.
        """
        while len(self.h11.trailing_data[0]) <= self.limits.max_header_list_size:
            data = await self.receive()
            self.h11.receive_data(data)
            if not data:
                call.cancel()
                return

    async def discard_body(self) -> bool:
        """Read and drop the rest of a request body nobody read; False if it cannot be done."""
        dropped = 0
        with trio.move_on_after(self.limits.request_timeout):
            while True:
                try:
                    event = self.h11.next_event()
                except h11.RemoteProtocolError:
                    return False
                if isinstance(event, h11.EndOfMessage):
                    return True
                if isinstance(event, h11.Data):
                    dropped += len(event.data)
                    if dropped > self.limits.max_message_size:
                        return False
                elif event is h11.NEED_DATA:
                    self.h11.receive_data(await self.receive())
                else:
                    return False
        return False

    async def linger(self) -> None:
        """Read and drop what the client still sends, briefly, before the connection closes."""
        dropped = 0
        with trio.move_on_after(_LINGER_SECONDS):
            while dropped < _LINGER_BYTES:
                with trio.move_on_after(_LINGER_PAUSE):
                    data = await self.receive()
                    dropped += len(data)
                    if data:
                        continue
                return

    # -- writing ---------------------------------------------------------------

    async def send(self, *events: h11.Event) -> None:
        """Send h11 events in one write.

        Raises:
            PeerTransportError: the connection failed.
            PeerTimeoutError: the client did not take the bytes within the
                request timeout (a reader that stopped reading).
        """
        try:
            data = b"".join(self.h11.send(event) or b"" for event in events)
        except h11.LocalProtocolError as exc:
            raise PeerTransportError(f"cannot send the answer: {exc}") from None
        sent = False
        try:
            with trio.move_on_after(self.limits.request_timeout):
                with map_exceptions("the client's connection failed"):
                    await self.stream.send_all(data)
                sent = True
        finally:
            # Cut off mid-write (failed, timed out or cancelled), the stream
            # may hold half an answer: h11 must not send on it again.
            if not sent:
                self.h11.send_failed()
        if sent:
            return
        raise PeerTimeoutError(
            f"the client took none of its answer for {self.limits.request_timeout:g}s"
        )

    async def _refuse(self, status: int, message: str) -> None:
        # Only when a response may still be sent; then the connection closes.
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = error_body(_REFUSAL_CODES.get(status, "encode"), message)
        response = h11.Response(
            status_code=status,
            reason=_reason(status),
            headers=[
                (b"content-type", _JSON),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        )
        try:
            await self.send(response, h11.Data(data=body), h11.EndOfMessage())
        except PeerError:
            return
        await self.linger()

    # -- one request -------------------------------------------------------------

    async def _serve_request(self, request: h11.Request) -> bool:
        """Answer one request; True if the connection can take another."""
        self._calls += 1
        exchange = _Exchange(self, request)
        name_call(exchange.header(_CALL_ID), self, self._calls)
        with self.drain.in_flight() as grace:
            async with trio.open_nursery() as nursery:
                exchange.nursery = nursery
                await self.server.json_handler.serve(exchange)
                nursery.cancel_scope.cancel()
        if grace.cancelled_caught:
            await self._answer_cut_off(exchange)
        if self._eof or exchange.broken:
            return False
        h = self.h11
        if h.our_state is not h11.DONE:
            if h.our_state is h11.MUST_CLOSE and h.their_state is not h11.DONE:
                await self.linger()
            return False
        if h.their_state is h11.SEND_BODY:
            # Answered without reading the body (a refused call): drop it to
            # keep the connection.
            return await self.discard_body()
        return h.their_state is h11.DONE

    async def _answer_cut_off(self, exchange: _Exchange) -> None:
        # The drain cancelled the call: say so as its answer if none went
        # out, else as the last line of its stream (as a failure would).
        body = error_body("cancelled", cut_off_message(self.drain))
        with contextlib.suppress(PeerError):  # the exchange is marked broken
            if self.h11.our_state is h11.SEND_RESPONSE:
                await exchange.respond(grpc.http_status_for(grpc.Status.CANCELLED), _JSON, body)
            elif self.h11.our_state is h11.SEND_BODY:
                await exchange.send(body + b"\n")
                await exchange.end_stream()

    async def _upgrade(self, request: h11.Request) -> None:
        handler = self.server.websocket
        if handler is None:
            await self._refuse(501, "this peer does not serve WebSocket")
            return
        headers = dict(request.headers)
        if b"sec-websocket-key" not in headers or headers.get(b"sec-websocket-version") != b"13":
            # Refused here: the WebSocket library would refuse it too, but
            # then wait for a handshake that never comes.
            await self._refuse(400, "a WebSocket upgrade needs Sec-WebSocket-Key and version 13")
            return
        self._calls += 1
        name_call(None, self, self._calls)
        # The WebSocket library reads the handshake itself: give it the bytes
        # h11 consumed, then the connection.
        stream = PrefixedStream(self.stream, bytes(self._head_bytes))
        await handler(stream, self, self.principal, self.drain)


def _head_size(request: h11.Request) -> int:
    # Counted as HTTP/2 counts a header list: name, value and 32 octets each.
    return len(request.target) + sum(len(name) + len(value) + 32 for name, value in request.headers)


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:  # 499, gRPC's "client closed request", is nginx's
        return b"Client Closed Request" if status == 499 else b""


def _is_websocket_upgrade(request: h11.Request) -> bool:
    if request.method != b"GET" or request.target.split(b"?", 1)[0] != WEBSOCKET_PATH:
        return False
    return any(
        name == b"upgrade" and value.lower() == b"websocket" for name, value in request.headers
    )


@final
class _Exchange:
    """One HTTP/1.1 request and its answer, as the JSON front end sees it."""

    def __init__(self, conn: _Connection, request: h11.Request) -> None:
        self._conn = conn
        self._request = request
        self._headers: dict[bytes, bytes] = {}
        for name, value in request.headers:
            self._headers.setdefault(name, value)
        self.nursery: trio.Nursery | None = None
        self.broken = False
        self._must_close = False
        self._response_started = False

    @property
    def method(self) -> bytes:
        """The request method."""
        return self._request.method

    @property
    def target(self) -> bytes:
        """The request target (path and query)."""
        return self._request.target

    def header(self, name: bytes) -> bytes | None:
        """The first value of request header ``name``, or None."""
        return self._headers.get(name)

    @property
    def principal(self) -> str | None:
        """The TLS client certificate subject, if any."""
        return self._conn.principal

    def scope(self) -> Hashable:
        """The ref scope of this TCP connection."""
        return self._conn.server.scope_for(self._conn)

    @property
    def response_started(self) -> bool:
        """Whether the status line has gone out."""
        return self._response_started

    async def read_body(self) -> bytes:
        """Read the request body, within the size limit and the request timeout.

        Once it is in, a watcher cancels the call if the client goes away.
        """
        limit = self._conn.limits.max_message_size
        length = self.header(b"content-length")
        if length is not None and int(length) > limit:  # h11 has checked the digits
            self._must_close = True
            raise BodyTooLargeError(
                f"the request body of {int(length)} bytes exceeds the limit of {limit} bytes"
            )
        h = self._conn.h11
        if h.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        timeout = self._conn.limits.request_timeout
        with trio.move_on_after(timeout):
            body = await self._read_body(limit)
            assert self.nursery is not None
            self.nursery.start_soon(self._conn.watch_for_disconnect, self.nursery.cancel_scope)
            return body
        self._must_close = True
        raise BodyTimeoutError(f"the request body did not arrive within {timeout:g}s")

    async def _read_body(self, limit: int) -> bytes:
        conn = self._conn
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self.broken = True
                raise PeerTransportError(f"malformed request body: {exc}") from None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:  # a chunked body has no length up front
                    self._must_close = True
                    raise BodyTooLargeError(f"the request body exceeds the limit of {limit} bytes")
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            elif event is h11.NEED_DATA:
                conn.h11.receive_data(await conn.receive())
            else:  # the connection closed mid-body
                self.broken = True
                raise PeerTransportError("the client closed the connection mid-request")

    async def _send(self, *events: h11.Event) -> None:
        try:
            await self._conn.send(*events)
        except PeerError:
            self.broken = True
            raise

    def _head(self, status: int, headers: Headers) -> h11.Response:
        conn = self._conn
        if self._must_close or conn.h11.they_are_waiting_for_100_continue or conn.drain.started:
            # The body was refused unread (or never sent), or the server is
            # draining: the connection will not carry another request.
            headers = [*headers, (b"connection", b"close")]
        self._response_started = True
        return h11.Response(status_code=status, headers=list(headers), reason=_reason(status))

    async def respond(
        self, status: int, content_type: bytes, body: bytes, headers: Headers = ()
    ) -> None:
        """Send a complete answer in one write (a HEAD request gets the head alone)."""
        length = str(len(body)).encode()
        head = self._head(
            status, [(b"content-type", content_type), (b"content-length", length), *headers]
        )
        if self.method == b"HEAD":
            await self._send(head, h11.EndOfMessage())
        else:
            await self._send(head, h11.Data(data=body), h11.EndOfMessage())

    async def start_stream(self, content_type: bytes) -> None:
        """Send a 200 head; h11 frames the body (chunked for HTTP/1.1 clients)."""
        await self._send(self._head(200, [(b"content-type", content_type)]))

    async def send(self, data: bytes) -> None:
        """Send one piece of a streamed answer."""
        await self._send(h11.Data(data=data))

    async def end_stream(self) -> None:
        """End a streamed answer."""
        await self._send(h11.EndOfMessage())

    def watch_delivery(self, on_lost: Callable[[], None]) -> None:
        """Nothing: an HTTP/1.1 client that gives up only closes the connection.

        That looks the same whether or not it read the answer, so
        ``HttpPeerClient`` half-closes instead (which cancels a run still
        going, as a close does), reads the answer out and releases what it
        hands out itself.
        """
