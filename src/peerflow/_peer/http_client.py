"""HttpPeerClient: calls a peer's HTTP/JSON routes over HTTP/1.1, with a keep-alive pool.

For callers that cannot (or would rather not) speak HTTP/2: the same methods
as :class:`~peerflow.PeerClient`, the same typed errors, the same ref scopes,
over plain HTTP/1.1 requests parsed by h11 (protocol/README.md section 6).
"""

from __future__ import annotations

import contextlib
import math
import select
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, Final, TypeVar, final

import h11
import trio

from .._excgroups import collapse_excgroups
from .._transport.listener import connect_tcp
from .._transport.mapping import map_exceptions
from .._wire import grpc
from .._wire.envelopes import (
    DerefChunk,
    StreamEvent,
    SubWorkflowResponse,
)
from ..errors import PeerError, PeerTimeoutError, PeerTransportError
from .auth import bearer_header, resolve_peer_token
from .calls import TIMEOUT_MS_HEADER
from .client import deadline_scope, release_lost_refs
from .http_json import JSON_PATH_PREFIX
from .json_codec import (
    JSON_CONTENT_TYPE,
    decode_json,
    decode_json_body,
    decode_json_stream_body,
    encode_json,
    parse_json_line,
)
from .limits import Limits
from .logs import PeerLogger
from .trace import current_trace_context, trace_headers
from .variant_client import (
    MessageClient,
    RefScopes,
    error_for_details,
    parse_base_url,
    status_for_http,
)

__all__ = ["HttpPeerClient"]

M = TypeVar("M")

_FROM_ENV: Final = object()
_RECEIVE_SIZE: Final = 65536
_JSON: Final = JSON_CONTENT_TYPE.encode()
# The calls whose answer hands out refs: one its caller gives up on is read
# out in the background, so that those refs can be released (_read_lost_answer).
_HANDS_OUT_REFS: Final = frozenset({"InvokeSubWorkflow", "StreamSubWorkflow"})


@final
class _Connection:
    """One keep-alive HTTP/1.1 connection of the pool."""

    def __init__(self, stream: trio.abc.Stream, where: str) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.where = where
        # Whether the whole of the current request has left: h11 says DONE
        # as soon as it framed the last bytes, before they were written.
        self.request_sent = False

    async def send(self, *events: h11.Event) -> None:
        data = b"".join(self.h11.send(event) or b"" for event in events)
        self.request_sent = False
        with map_exceptions(f"connection to {self.where} failed"):
            await self.stream.send_all(data)
        self.request_sent = self.h11.our_state is h11.DONE

    async def next_event(self) -> h11.Event:
        while True:
            answered = self.h11.their_state is not h11.SEND_RESPONSE
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                if self.h11.trailing_data[1]:  # h11's complaint is the peer's EOF
                    raise self.closed_error(answered) from None
                raise PeerTransportError(f"{self.where} sent malformed HTTP: {exc}") from None
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]  # PAUSED never comes here
            with map_exceptions(f"connection to {self.where} failed"):
                data = await self.stream.receive_some(_RECEIVE_SIZE)
            self.h11.receive_data(bytes(data))

    def closed_error(self, answered: bool) -> PeerTransportError:
        """The error for the peer's EOF: ``answered`` once the answer's head has arrived."""
        if answered:
            return PeerTransportError(f"{self.where} closed the connection mid-answer")
        return PeerTransportError(
            f"{self.where} closed the connection before answering; the request may "
            "have reached it, so it is not sent again"
        )

    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def closed_while_idle(self) -> bool:
        """Whether this kept-alive connection already shows it cannot carry another request.

        Between exchanges the peer has nothing to say, so anything to read
        (its EOF, a reset, or bytes such as a ``408`` sent before closing)
        means it closed the connection or is closing it. This looks without
        waiting and without reading.
        """
        leftover, closed = self.h11.trailing_data
        if leftover or closed:
            return True
        sock = _socket_of(self.stream)
        return sock is not None and _readable_now(sock.fileno())


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def _readable_now(fd: int) -> bool:
    """Whether ``fd`` has data, an EOF or an error to report, asked without blocking."""
    if sys.platform == "win32":  # no poll(); its select() takes any socket handle
        readable, _, failed = select.select([fd], [], [fd], 0)
        return bool(readable or failed)
    # poll(), not select(): select() cannot watch descriptors past FD_SETSIZE.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


@final
class _Response:
    """The answer to one request: its status, then its body as a whole or line by line.

    Attributes:
        status: the answer's status, once its head has been read (None before).
        settled: whether the caller has learnt how the answer ends: it read
            the answer to its end, took a streamed answer's final response,
            or reading failed. An answer left unsettled may hand out refs
            nobody knows of.
    """

    def __init__(self, conn: _Connection, max_size: int) -> None:
        self._conn = conn
        self.status: int | None = None
        self.settled = False
        self._max_size = max_size
        self._buffer = bytearray()
        self._scanned = 0
        self._ended = False

    async def read_status(self) -> int:
        """Read the answer's head (after any 1xx answers); return its status.

        Raises:
            PeerTransportError: the connection failed or closed first.
        """
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Response):
                self.status = event.status_code
                return self.status
            if isinstance(event, h11.ConnectionClosed):
                self.settled = True
                raise self._conn.closed_error(answered=False)
            # 1xx informational answers come before the real one.

    async def _next_event(self) -> h11.Event:
        try:
            return await self._conn.next_event()
        except PeerError:
            self.settled = True
            raise

    async def _more(self) -> bool:
        event = await self._next_event()
        if isinstance(event, h11.Data):
            self._buffer += event.data
            return True
        if isinstance(event, h11.EndOfMessage):
            self._ended = self.settled = True
            return False
        self.settled = True
        raise PeerTransportError(f"{self._conn.where} closed the connection mid-answer")

    async def read_all(self) -> bytes:
        """The whole body.

        Raises:
            PeerLimitError: it is larger than the message size limit.
            PeerTransportError: the connection failed.
        """
        while not self._ended and await self._more():
            self._check_size(len(self._buffer))
        return bytes(self._buffer)

    async def next_line(self) -> bytes | None:
        """The next NDJSON line (without its newline), or None at the end of the body.

        Raises:
            PeerLimitError: a line is larger than the message size limit.
            PeerTransportError: the connection failed, or the body ended mid-line.
        """
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                self._scanned = 0
                if line.strip():
                    return line
                continue
            self._scanned = len(self._buffer)
            self._check_size(self._scanned)
            if self._ended or not await self._more():
                if self._buffer.strip():
                    self.settled = True
                    raise PeerTransportError("the answer ended in the middle of a line")
                return None

    def _check_size(self, size: int) -> None:
        if size > self._max_size:
            self.settled = True
            raise grpc.error_for_status(
                grpc.Status.RESOURCE_EXHAUSTED,
                f"the answer exceeds the message size limit of {self._max_size} bytes",
            )


@final
class HttpPeerClient(MessageClient[_Response]):
    """A client of a peer's HTTP/JSON routes, over HTTP/1.1 with a keep-alive pool.

    It has the methods of :class:`~peerflow.PeerClient` and raises the same
    errors. Creating it opens no connection; calls open up to
    ``max_connections`` keep-alive connections as they need them. Use it as
    ``async with HttpPeerClient(...) as client:`` (or call :meth:`aclose`
    when done): closing it releases the ``UNTIL_PARENT_FINISH`` refs its
    calls received. Inside ``async with`` its leases are renewed in the
    background; a client used without it renews them when it makes calls.

    A request is sent once and never again. A kept-alive connection the peer
    has closed while idle is replaced before the request goes out; once the
    request may have reached the peer, a failing connection raises
    :class:`~peerflow.PeerTransportError`, even when the peer closed it just
    as the request left, since the run may have started there.

    A call that hands out refs (``invoke_sub_workflow``,
    ``stream_sub_workflow``) and is left before its answer was read
    (cancelled, timed out, a stream block left early) after its request
    went out whole does not simply close its connection: closing could not
    tell the peer whether the answer was lost. Inside ``async with``, a
    background task half-closes it (the peer then cancels a run still
    going, as on a close), reads the rest of the answer within
    ``keepalive_timeout`` and, if it was a complete response, releases the
    refs it hands out (within ``keepalive_timeout`` again). Until it is
    closed, the connection keeps its place in ``max_connections``. Leaving
    ``async with`` waits for these tasks. Without ``async with``,
    or over TLS (a TLS stream cannot half-close), the connection closes at
    once and such refs stay on the peer.

    Args:
        base_url: ``http://host:port`` or ``https://host:port``, optionally
            with a path prefix the routes hang under (a peer behind a
            reverse proxy).
        node_id: this caller's node id, sent as ``X-Peerflow-Peer-Node-Id``.
        tls: the ``ssl.SSLContext`` for ``https`` (default: the system's
            trust store). It must offer ALPN ``http/1.1`` and not ``h2``,
            which the peer would pick: ``load_client_tls(..., alpn=("http/1.1",))``.
        token: the bearer token; defaults to ``PEERFLOW_PEER_TOKEN``; None
            sends none.
        limits: ``max_message_size`` bounds an answer (or one streamed
            line); ``handshake_timeout`` bounds opening a connection (TCP
            and TLS); ``keepalive_timeout`` bounds the goodbyes of closing,
            and reading out an answer a caller gave up on.
        lease_ttl: the TTL asked for this client's leases.
        max_connections: how many connections (so concurrent calls) at most.

    Raises:
        PeerTransportError: at once, for a bad URL.
    """

    def __init__(
        self,
        base_url: str,
        node_id: str,
        *,
        tls: ssl.SSLContext | None = None,
        token: str | object | None = _FROM_ENV,
        limits: Limits | None = None,
        lease_ttl: float = 30.0,
        max_connections: int = 10,
    ) -> None:
        self.endpoint, self._prefix = parse_base_url(base_url)
        self.node_id = node_id
        resolved = resolve_peer_token() if token is _FROM_ENV else token
        if resolved is not None and not isinstance(resolved, str):
            raise TypeError("token must be a str or None")
        if self.endpoint.scheme == "https" and tls is None:
            tls = ssl.create_default_context()
            tls.set_alpn_protocols(["http/1.1"])
        self._tls = tls if self.endpoint.scheme == "https" else None
        self._limits = limits = limits or Limits()
        self._log = PeerLogger("client", node_id)
        headers = [
            (b"host", self.endpoint.authority.encode()),
            (b"content-type", _JSON),
            (b"accept", b"application/json, application/x-ndjson"),
            (grpc.NODE_ID_HEADER.encode(), node_id.encode()),
        ]
        if resolved is not None:
            headers.append(bearer_header(resolved))
        self._headers: Final = tuple(headers)
        self._idle: list[_Connection] = []
        self._limiter = trio.CapacityLimiter(max_connections)
        self._closed = False
        self._scopes = RefScopes(
            lease=self._lease,
            release=self.release_session_ref,
            lease_ttl=lease_ttl,
            goodbye_timeout=limits.keepalive_timeout,
            log=self._log,
        )
        self._running: AbstractAsyncContextManager[None] | None = None
        # Where the answers of abandoned calls are read out; only inside ``async with``.
        self._lost_answers: trio.Nursery | None = None

    # -- lifetime --------------------------------------------------------------

    async def __aenter__(self) -> HttpPeerClient:
        running = self._run()
        await running.__aenter__()
        self._running = running
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        running, self._running = self._running, None
        assert running is not None
        return await running.__aexit__(exc_type, exc, traceback)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[None]:
        with collapse_excgroups():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._scopes.renew_forever)
                try:
                    # Closed before the goodbyes, which must not refuse the
                    # releases a lost answer's reader may still make.
                    async with trio.open_nursery() as lost_answers:
                        self._lost_answers = lost_answers
                        try:
                            yield
                        finally:
                            self._lost_answers = None
                finally:
                    nursery.cancel_scope.cancel()
                    with trio.CancelScope(shield=True):
                        await self.aclose()

    async def aclose(self) -> None:
        """Release this client's ``UNTIL_PARENT_FINISH`` refs and close its connections.

        Failures to reach the peer are logged: its lease expiry reclaims the
        refs then. The client cannot be used afterwards.
        """
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            await self._scopes.close(self._scopes.root)
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)

    # -- how calls travel ------------------------------------------------------

    _encode = staticmethod(encode_json)

    async def _before_call(self) -> None:
        # Used without ``async with``, the client has no renewal task.
        await self._scopes.renew_if_due()

    def _open_call(self, method: str, body: bytes) -> AbstractAsyncContextManager[_Response]:
        return self._request(method, body)

    async def _next_stream_message(
        self, call: _Response
    ) -> StreamEvent | SubWorkflowResponse | None:
        try:
            body = await _next_message(call)
            message = None if body is None else decode_json_stream_body(body)
        except PeerError:
            call.settled = True  # a failure line, or an answer that cannot be read
            raise
        if isinstance(message, SubWorkflowResponse):
            call.settled = True  # the caller holds the refs now
        return message

    def _chunks(self, call: _Response) -> AsyncIterator[bytes]:
        return _Chunks(call)

    async def _unary(self, method: str, body: bytes, cls: type[M], timeout: float | None) -> M:
        with deadline_scope(timeout):
            async with self._request(method, body) as response:
                data = await response.read_all()
            return decode_json(cls, data)
        raise PeerTimeoutError(f"{method} timed out after {timeout:g}s")

    @asynccontextmanager
    async def _request(self, method: str, body: bytes) -> AsyncIterator[_Response]:
        """Send one request and yield its 200 answer; anything else is raised.

        A connection goes back to the pool only after a complete exchange; a
        call cancelled midway closes it, which tells the peer to cancel too
        (or hands it to :meth:`_read_lost_answer`).
        """
        if self._closed:
            raise PeerTransportError("this HttpPeerClient is closed")
        target = f"{self._prefix}{JSON_PATH_PREFIX.decode()}{method}".encode()
        # The pool slot is held by a token, not by this task, so that the
        # reader of an answer this call gives up on can keep it.
        slot = object()
        await self._limiter.acquire_on_behalf_of(slot)
        try:
            conn = await self._checkout()
        except BaseException:
            self._limiter.release_on_behalf_of(slot)
            raise
        response = _Response(conn, self._limits.max_message_size)
        try:
            await self._send(conn, target, body, response)
            if response.status != 200:
                raise await _error_from(response)
            yield response
        finally:
            await self._finish(conn, response, method, slot)

    async def _finish(
        self, conn: _Connection, response: _Response, method: str, slot: object
    ) -> None:
        """After a call: pool its connection, close it, or hand it to a lost answer's reader."""
        if conn.reusable() and not self._closed:
            conn.h11.start_next_cycle()
            self._idle.append(conn)
            self._limiter.release_on_behalf_of(slot)
        elif self._lost_answers is not None and _lost_answer(conn, response, method):
            self._lost_answers.start_soon(self._read_lost_answer, conn, response, method, slot)
        else:
            self._limiter.release_on_behalf_of(slot)
            # Shielded: this runs as a call ends, maybe raising in a cancelled
            # scope, where a Cancelled would replace the call's own error.
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(conn.stream)

    async def _read_lost_answer(
        self, conn: _Connection, response: _Response, method: str, slot: object
    ) -> None:
        """Read out the answer of a call its caller gave up on; release the refs it hands out.

        A close cannot tell the peer whether its answer was read: it has
        handed out the refs once the answer left. So the connection is
        half-closed instead, which the peer takes as a close (it cancels the
        run if it is still going, and its refs go with it), and the answer
        is read to its end. If it is a complete response, this client is
        the only one that knows its refs, and releases them. Each part is
        bounded by ``keepalive_timeout``, and shielded: leaving the client's
        ``async with`` waits for it rather than orphan the refs.
        """
        timeout = self._limits.keepalive_timeout
        refs: list[str] = []
        with trio.CancelScope(shield=True):
            try:
                with trio.move_on_after(timeout) as reading:
                    with contextlib.suppress(PeerError):  # a broken answer hands out nothing
                        refs = await _refs_of_lost_answer(conn, response, method)
            finally:
                self._limiter.release_on_behalf_of(slot)
                await trio.aclose_forcefully(conn.stream)
            if reading.cancelled_caught:
                # Closing now fails the peer's send if it is still to come
                # (it then drops the refs); an answer that was on its way stays.
                self._log.warning(
                    "gave up reading an answer nobody read from %s after %gs; refs it "
                    "hands out may stay on the peer",
                    conn.where,
                    timeout,
                )
            if refs:
                await release_lost_refs(self.release_session_ref, refs, timeout, self._log)

    async def _send(
        self, conn: _Connection, target: bytes, body: bytes, response: _Response
    ) -> None:
        """Send one request and read the status of its answer into ``response``.

        The request goes out once, and is never resent: as soon as any of its
        bytes may have reached the peer, the peer may have started the run,
        and sending it again could run the workflow twice. So a connection
        that fails from then on raises :class:`~peerflow.PeerTransportError`
        (not :class:`~peerflow.PeerUnavailableError`: the call may have
        started). That includes a kept-alive connection the peer closes just
        as the request leaves (its idle timeout racing the call): nobody can
        tell whether the request arrived. A kept-alive connection that already
        shows it was closed is replaced before anything is sent
        (:meth:`_checkout`).
        """
        headers = [*self._headers, (b"content-length", str(len(body)).encode())]
        deadline = trio.current_effective_deadline()
        if deadline != math.inf:
            remaining = max(0, math.ceil((deadline - trio.current_time()) * 1000))
            headers.append((TIMEOUT_MS_HEADER.encode(), str(remaining).encode()))
        trace = current_trace_context()
        if trace is not None:
            headers.extend(trace_headers(trace))
        await conn.send(h11.Request(method="POST", target=target, headers=headers))
        await _send_body_reading_answer(conn, body, response)

    async def _checkout(self) -> _Connection:
        """A kept-alive connection that still looks open, or else a new one."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed_while_idle():
                return conn
            # The peer closed it while idle (its idle timeout, a restart):
            # nothing was sent on it, so a new connection costs no safety.
            await trio.aclose_forcefully(conn.stream)
        return await self._connect()

    async def _connect(self) -> _Connection:
        host, port = self.endpoint.host, self.endpoint.port
        stream = await connect_tcp(
            host, port, ssl_context=self._tls, timeout=self._limits.handshake_timeout
        )
        if isinstance(stream, trio.SSLStream) and stream.selected_alpn_protocol() == "h2":
            await trio.aclose_forcefully(stream)
            raise PeerTransportError(
                f"{host}:{port} chose HTTP/2 by ALPN; HttpPeerClient speaks HTTP/1.1: give it "
                'a TLS context offering "http/1.1" (load_client_tls(..., alpn=("http/1.1",)))'
            )
        return _Connection(stream, self.endpoint.authority)


async def _send_body_reading_answer(conn: _Connection, body: bytes, response: _Response) -> None:
    """Send the request body while watching for the answer; read its status.

    A peer may answer before it has read the body: a ``413`` for a body over
    its limit, which it then reads (and drops) only for a while before it
    closes the connection. Waiting to finish sending first would run into
    that close as a reset, losing the answer; so the answer is read as the
    body goes out (h11 allows an early response), and an early refusal stops
    the sending. The connection is then not reusable and gets closed.
    """
    send_failure: PeerTransportError | None = None

    async def send_body() -> None:
        nonlocal send_failure
        try:
            await conn.send(h11.Data(data=body), h11.EndOfMessage())
        except PeerTransportError as exc:
            # The peer may have answered before it closed: let the reader say.
            send_failure = exc

    with collapse_excgroups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body)
            try:
                status = await response.read_status()
            except PeerTransportError:
                if send_failure is not None:
                    raise send_failure from None
                raise
            if status != 200:
                nursery.cancel_scope.cancel()  # refused: the rest of the body is not wanted


def _lost_answer(conn: _Connection, response: _Response, method: str) -> bool:
    """Whether a call left its answer unread after its request went out whole.

    Only an answer that may hand out refs counts, and only on a stream that
    can half-close: a TLS stream cannot, so it is closed at once as before.
    """
    return (
        method in _HANDS_OUT_REFS
        and conn.request_sent
        and response.status in (None, 200)
        and not response.settled
        and isinstance(conn.stream, trio.abc.HalfCloseableStream)
    )


async def _refs_of_lost_answer(conn: _Connection, response: _Response, method: str) -> list[str]:
    """Half-close ``conn``, read the rest of ``response``; the refs a complete one hands out.

    What the caller had read already stays accounted for: h11 holds the
    connection's place in the answer, and ``response`` the unread part of
    its body. The answer is bounded as the caller's read was: by the
    message size limit, for the whole body or for each streamed line.

    Raises:
        PeerError: the answer broke off, failed, or could not be read.
    """
    assert isinstance(conn.stream, trio.abc.HalfCloseableStream)
    # A peer that closed already may have left its whole answer to read.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await conn.stream.send_eof()
    status = response.status if response.status is not None else await response.read_status()
    if status != 200:
        return []  # refused or cut off: nothing was handed out
    if method == "StreamSubWorkflow":
        last = None
        while (message := await _next_message(response)) is not None:
            last = message  # events, then the final response
        final = None if last is None else decode_json_stream_body(last)
    else:
        final = decode_json(SubWorkflowResponse, await response.read_all())
    return list(final.remote_refs) if isinstance(final, SubWorkflowResponse) else []


async def _error_from(response: _Response) -> PeerError:
    assert response.status is not None
    status = status_for_http(response.status)
    details = None
    with contextlib.suppress(PeerError):  # no usable body: the status alone decides
        details = parse_json_line(await response.read_all()).error
    return error_for_details(status, details, f"HTTP {response.status}")


async def _next_message(response: _Response) -> dict[str, Any] | None:
    """The next message line of a streamed answer, or None at its end.

    Raises:
        PeerError: the answer's last line reported a failure.
        PeerTransportError: the stream broke off.
    """
    raw = await response.next_line()
    if raw is None:
        return None
    line = parse_json_line(raw)
    if line.error is not None:
        raise error_for_details(grpc.Status.UNKNOWN, line.error, "")
    if line.end:
        if await response.next_line() is not None:
            raise PeerTransportError("the answer went on after its end line")
        return None
    assert line.message is not None
    return line.message


@final
class _Chunks:
    """Iterates the payloads of a ``DerefSessionRef`` answer; it must end with its end line."""

    def __init__(self, response: _Response) -> None:
        self._response = response
        self._ended = False

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self._ended:
            raise StopAsyncIteration
        raw = await self._response.next_line()
        if raw is None:
            raise PeerTransportError("DerefSessionRef ended without its end line")
        line = parse_json_line(raw)
        if line.error is not None:
            raise error_for_details(grpc.Status.UNKNOWN, line.error, "")
        if line.end:
            self._ended = True
            if await self._response.next_line() is not None:
                raise PeerTransportError("the answer went on after its end line")
            raise StopAsyncIteration
        return decode_json_body(DerefChunk, line.message).payload
