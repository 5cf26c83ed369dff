"""WebSocketPeerClient: calls a peer over one WebSocket, every call multiplexed on it.

For callers that can keep one HTTP/1.1 connection open but cannot speak
HTTP/2 (a proxy that upgrades WebSockets but not h2, for one). The messages
are the gRPC variant's msgpack envelopes, wrapped in frames
(protocol/README.md section 7). One reader task hands each frame to the call
it names; cancelling a call sends a cancel frame, unless the call's whole
answer had already arrived unread: the client then releases the refs that
answer hands out itself (see ``WebSocketPeerClient._unread_answer``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final, TypeVar, final

import h11
import trio
import trio_websocket
import wsproto.utilities  # comes with trio-websocket, whose handshake errors are wsproto's

from .._excgroups import collapse_excgroups
from .._transport.listener import connect_tcp
from .._transport.mapping import to_peer_error
from .._wire import grpc
from .._wire.codec import decode_message, decode_stream_message, encode_message
from .._wire.envelopes import (
    DerefChunk,
    ErrorDetails,
    StreamEvent,
    SubWorkflowResponse,
)
from ..errors import PeerError, PeerTimeoutError, PeerTransportError, PeerUnavailableError
from .auth import bearer_header, resolve_peer_token
from .client import Endpoint, LostRefs, deadline_scope
from .http_json import WEBSOCKET_PATH
from .json_codec import parse_json_line
from .limits import Limits
from .logs import PeerLogger
from .trace import current_trace_context
from .variant_client import (
    MessageClient,
    RefScopes,
    error_for_details,
    parse_base_url,
    status_for_http,
)
from .ws_frames import (
    SUBPROTOCOL,
    CallFrame,
    CancelFrame,
    EndFrame,
    FrameDecodeError,
    FrameVersionError,
    MessageFrame,
    ServerFrame,
    decode_server_frame,
    encode_frame,
)
from .ws_server import wait_until_silent

__all__ = ["WebSocketPeerClient", "open_websocket_client_over"]

M = TypeVar("M")

_FROM_ENV: Final = object()
# Frames a call may have waiting before the reader waits for it (and so for
# every call on the connection: a WebSocket has no per-call flow control).
_CALL_BUFFER: Final = 16
_FRAME_OVERHEAD: Final = 256
_INVALID_PAYLOAD: Final = 1007
_MAX_REASON: Final = 200


# The methods whose answer hands out refs (in a SubWorkflowResponse), with
# how their messages decode (see WebSocketPeerClient._unread_answer).
_HANDS_OUT_REFS: Final[dict[str, Callable[[bytes], object]]] = {
    "InvokeSubWorkflow": functools.partial(decode_message, SubWorkflowResponse),
    "StreamSubWorkflow": decode_stream_message,
}


@final
class _CallReader:
    """The frames of one call, as message bodies, until its end or error frame."""

    def __init__(
        self, frames: trio.MemoryReceiveChannel[ServerFrame], client: WebSocketPeerClient
    ) -> None:
        self._frames = frames
        self._client = client
        self.finished = False
        #: A unary call's response message, read while the call waits for its
        #: end frame: the caller has not seen it yet.
        self.held: bytes | None = None

    async def next_body(self) -> bytes | None:
        """The next response message's bytes; None after the end frame.

        Raises:
            PeerError: the call's error frame, mapped through the status table.
            PeerTransportError: the connection ended first.
        """
        if self.finished:
            return None
        try:
            frame = await self._frames.receive()
        except trio.EndOfChannel:
            raise self._client._failed() from None
        if isinstance(frame, MessageFrame):
            return frame.body
        self.finished = True
        if isinstance(frame, EndFrame):
            return None
        try:
            details: ErrorDetails | None = decode_message(ErrorDetails, frame.error)
        except PeerError:
            details = None  # undecodable details are ignored: the status decides
        raise error_for_details(frame.status, details, "")


@final
class WebSocketPeerClient(MessageClient[_CallReader]):
    """A connection to one peer over one WebSocket: ``async with WebSocketPeerClient.connect(...)``.

    It has the methods of :class:`~peerflow.PeerClient` and raises the same
    errors. Any number of calls can run concurrently on it. The
    ``UNTIL_PARENT_FINISH`` refs handed to calls made inside the client's
    block (or a :meth:`ref_scope`) are released when that block ends.
    """

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        transport: trio.abc.Stream,
        node_id: str,
        *,
        limits: Limits,
        lease_ttl: float,
    ) -> None:
        self.node_id = node_id
        self._ws = ws
        self._transport = transport
        self._limits = limits
        self._log = PeerLogger("client", node_id)
        self._ids = itertools.count(1)
        self._calls: dict[int, trio.MemorySendChannel[ServerFrame]] = {}
        self._lost = LostRefs(self.release_session_ref, limits.keepalive_timeout, self._log)
        self._failure: PeerTransportError | None = None
        self._scopes = RefScopes(
            lease=self._lease,
            release=self.release_session_ref,
            lease_ttl=lease_ttl,
            goodbye_timeout=limits.keepalive_timeout,
            log=self._log,
        )

    @staticmethod
    def connect(
        url: str,
        node_id: str,
        *,
        tls: ssl.SSLContext | None = None,
        token: str | object | None = _FROM_ENV,
        limits: Limits | None = None,
        lease_ttl: float = 30.0,
    ) -> AbstractAsyncContextManager[WebSocketPeerClient]:
        """Open the WebSocket to the peer at ``url`` for the duration of an ``async with``.

        ``url`` is the peer's endpoint, ``http://host:port`` or
        ``https://host:port`` (``ws://`` and ``wss://`` mean the same),
        optionally with a path prefix; the client adds
        ``/peerflow.peer.v1/ws``. With TLS, the context must offer ALPN
        ``http/1.1`` and not ``h2`` (the default context does). The token
        defaults to ``PEERFLOW_PEER_TOKEN``; pass None to send none.

        Raises:
            PeerTransportError: at once for a bad URL; on entering the block
                when the connection is refused (the message names the
                address), the TLS handshake fails, the peer refuses the
                WebSocket (``PeerAuthError`` for a missing or wrong token) or
                its answer to the handshake is malformed (the message says
                how).
            PeerUnavailableError: on entering the block, when the peer closes
                the connection (or it is lost) before the WebSocket is open.
            PeerTimeoutError: on entering the block, when the TCP connect
                with its TLS handshake, or then the WebSocket handshake, takes
                longer than ``limits.handshake_timeout``.
        """
        endpoint, prefix = parse_base_url(url, websocket=True)
        if endpoint.scheme == "https" and tls is None:
            tls = ssl.create_default_context()
            tls.set_alpn_protocols(["http/1.1"])
        resolved = resolve_peer_token() if token is _FROM_ENV else token
        if resolved is not None and not isinstance(resolved, str):
            raise TypeError("token must be a str or None")
        return _open(
            endpoint,
            prefix,
            node_id,
            tls=tls if endpoint.scheme == "https" else None,
            token=resolved,
            limits=limits or Limits(),
            lease_ttl=lease_ttl,
        )

    # -- how calls travel ------------------------------------------------------

    _encode = staticmethod(encode_message)

    def _open_call(self, method: str, body: bytes) -> AbstractAsyncContextManager[_CallReader]:
        return self._call(method, body)

    async def _next_stream_message(
        self, call: _CallReader
    ) -> StreamEvent | SubWorkflowResponse | None:
        raw = await call.next_body()
        return None if raw is None else decode_stream_message(raw)

    def _chunks(self, call: _CallReader) -> AsyncIterator[bytes]:
        return _Chunks(call)

    async def _unary(self, method: str, body: bytes, cls: type[M], timeout: float | None) -> M:
        with deadline_scope(timeout):
            async with self._call(method, body) as reader:
                message = await reader.next_body()
                if message is None:
                    raise PeerTransportError(f"{method}: the peer sent no response message")
                reader.held = message  # until its end frame, a cancel loses it
                if await reader.next_body() is not None:
                    raise PeerTransportError(f"{method}: more than one response message")
            return decode_message(cls, message)
        raise PeerTimeoutError(f"{method} timed out after {timeout:g}s")

    @asynccontextmanager
    async def _call(self, method: str, body: bytes) -> AsyncIterator[_CallReader]:
        """Start one call and yield its frames; leaving early sends a cancel frame."""
        if self._failure is not None:
            raise self._failed()
        call_id = next(self._ids)
        send, receive = trio.open_memory_channel[ServerFrame](_CALL_BUFFER)
        self._calls[call_id] = send
        deadline = trio.current_effective_deadline()
        timeout_ms = None
        if deadline != math.inf:
            timeout_ms = max(0, math.ceil((deadline - trio.current_time()) * 1000))
        trace = current_trace_context()
        traceparent = tracestate = None
        if trace is not None:
            traceparent, tracestate = trace.traceparent, trace.tracestate
        reader = _CallReader(receive, self)
        try:
            await self._send(CallFrame(call_id, method, body, timeout_ms, traceparent, tracestate))
            yield reader
        finally:
            del self._calls[call_id]
            send.close()
            answered = reader.finished or self._unread_answer(method, reader, receive)
            receive.close()
            if not answered and self._failure is None:
                # The peer cancels the run, drops the refs of an answer it
                # has already sent, and sends nothing more for this id.
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(self._limits.keepalive_timeout),
                ):
                    try:
                        await self._send(CancelFrame(call_id))
                    except PeerError as exc:
                        self._log.debug("could not cancel call %d: %s", call_id, exc)

    def _unread_answer(
        self,
        method: str,
        reader: _CallReader,
        receive: trio.MemoryReceiveChannel[ServerFrame],
    ) -> bool:
        """Whether a call left early had its whole answer here, unread.

        The peer then considers the answer delivered, so no cancel frame
        goes out, and the refs its response hands out are released here: the
        caller, which would have learnt their ids, is gone.
        """
        decode = _HANDS_OUT_REFS.get(method)
        last = reader.held
        while True:
            try:
                frame = receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return False
            if isinstance(frame, MessageFrame):
                last = frame.body
            elif isinstance(frame, EndFrame):
                break
            else:
                return True  # an error frame: a failed call hands out nothing
        if decode is not None and last is not None:
            with contextlib.suppress(PeerError):  # not a response anyone could use
                response = decode(last)
                if isinstance(response, SubWorkflowResponse):
                    self._lost.release(response)
        return True

    async def _send(self, frame: CallFrame | CancelFrame) -> None:
        """Send one frame whole: a cancelled caller never leaves half a frame behind.

        Raises:
            PeerTransportError: the connection is gone.
        """
        data = encode_frame(frame)
        with trio.CancelScope(shield=True):
            try:
                await self._ws.send_message(data)
            except trio_websocket.ConnectionClosed as exc:
                self._fail_calls(_closed_error(exc))
                raise self._failed() from None
        await trio.lowlevel.checkpoint_if_cancelled()

    def _failed(self) -> PeerTransportError:
        failure = self._failure or PeerTransportError("the WebSocket connection closed")
        return type(failure)(str(failure))

    def _fail_calls(self, failure: PeerTransportError) -> None:
        if self._failure is None:
            self._failure = failure
        for channel in self._calls.values():
            channel.close()

    async def _watch_liveness(self) -> None:
        # A peer that vanished without closing must not leave calls hanging.
        await wait_until_silent(self._ws, self._limits)
        self._fail_calls(PeerTimeoutError("the peer stopped answering WebSocket pings"))
        await trio.aclose_forcefully(self._transport)

    async def _read_frames(self) -> None:
        """Hand each frame from the peer to the call it names, until the connection ends."""
        try:
            while True:
                message = await self._ws.get_message()
                if isinstance(message, str):
                    self._fail_calls(PeerTransportError("the peer sent a text WebSocket message"))
                    await self._ws.aclose(_INVALID_PAYLOAD, "peerflow frames are binary")
                    return
                try:
                    frame = decode_server_frame(message)
                except (FrameDecodeError, FrameVersionError) as exc:
                    self._fail_calls(
                        PeerTransportError(f"the peer sent an undecodable frame: {exc}")
                    )
                    await self._ws.aclose(_INVALID_PAYLOAD, "undecodable frame")
                    return
                channel = self._calls.get(frame.id)
                if channel is None:
                    continue  # a call that was cancelled or has ended
                # The call may leave while its frame is on the way.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await channel.send(frame)
        except trio_websocket.ConnectionClosed as exc:
            self._fail_calls(_closed_error(exc))


async def _run_guarded(
    guard: trio.CancelScope, *, task_status: trio.TaskStatus[trio.Nursery]
) -> None:
    """Hand out a nursery whose tasks only ``guard`` cancels, until it does."""
    with guard:
        async with trio.open_nursery() as nursery:
            task_status.started(nursery)
            await trio.sleep_forever()


def _closed_error(exc: trio_websocket.ConnectionClosed) -> PeerTransportError:
    reason = exc.reason
    if reason is None:
        return PeerTransportError("the WebSocket connection closed")
    detail = f": {reason.reason}" if reason.reason else ""
    return PeerTransportError(
        f"the WebSocket connection closed ({reason.code} {reason.name}{detail})"
    )


@final
class _Chunks:
    """Iterates the payloads of a ``DerefSessionRef`` call."""

    def __init__(self, reader: _CallReader) -> None:
        self._reader = reader

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        body = await self._reader.next_body()
        if body is None:
            raise StopAsyncIteration
        return decode_message(DerefChunk, body).payload


@final
class _HandshakeWatch(trio.abc.Stream):
    """The transport as trio-websocket sees it, watched until the WebSocket is open.

    When the connection ends before the handshake's answer, trio-websocket's
    reader task just stops, and its client waits for the answer until
    cancelled. This stream notices the end as it happens: it keeps the error
    that says what happened in ``failure`` and cancels ``scope``, the
    handshake's wait. Once ``open`` is set it only passes bytes through.
    """

    def __init__(self, transport: trio.abc.Stream, where: str) -> None:
        self.transport = transport
        self.where = where
        self.scope = trio.CancelScope()
        self.failure: PeerUnavailableError | None = None
        self.open = False
        self._received = 0

    def _ended(self, exc: BaseException | None = None) -> None:
        if self.open or self.failure is not None:
            return
        if self._received:
            what = "in the middle of its answer to the WebSocket handshake"
        else:
            what = "before answering the WebSocket handshake"
        context = f"{self.where} closed the connection {what}"
        mapped = None if exc is None else to_peer_error(exc, context)
        # No call was made yet: trying again, here or elsewhere, is safe.
        self.failure = PeerUnavailableError(str(mapped or context))
        self.failure.__cause__ = exc
        self.scope.cancel()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.transport.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._ended(exc)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.transport.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._ended(exc)
            raise
        if not data:
            self._ended()
        self._received += len(data)
        return data

    async def aclose(self) -> None:
        await self.transport.aclose()


def _malformed_answer(exc: h11.ProtocolError, where: str) -> PeerTransportError:
    """The error for a handshake answer that is not HTTP, or not a WebSocket acceptance."""
    # trio-websocket trips over such an answer while trying to reject it: the
    # error raised is h11's about its own reply. What the peer got wrong is in
    # the errors it was handling: wsproto's, and h11's parse error below it.
    reasons = []
    seen = exc.__context__
    while seen is not None:
        if isinstance(seen, (wsproto.utilities.RemoteProtocolError, h11.RemoteProtocolError)):
            reasons.append(str(seen))
        seen = seen.__context__
    reason = ": ".join(reasons) or str(exc)
    if len(reason) > _MAX_REASON:
        reason = reason[:_MAX_REASON] + "..."
    return PeerTransportError(
        f"{where} sent a malformed answer to the WebSocket handshake: {reason}"
    )


def _rejection(exc: trio_websocket.ConnectionRejected) -> PeerError:
    """The error for a refused handshake: the JSON error body decides, else the status."""
    details = None
    if exc.body:
        try:
            details = parse_json_line(exc.body).error
        except PeerError:
            details = None
    return error_for_details(
        status_for_http(exc.status_code),
        details,
        f"the peer refused the WebSocket (HTTP {exc.status_code})",
    )


@asynccontextmanager
async def open_websocket_client_over(
    transport: trio.abc.Stream,
    endpoint: Endpoint,
    prefix: str,
    node_id: str,
    *,
    token: str | None,
    limits: Limits,
    lease_ttl: float,
) -> AsyncIterator[WebSocketPeerClient]:
    """Run a :class:`WebSocketPeerClient` over an already-open transport (TCP, TLS, in-memory).

    Every failure to open the WebSocket is one typed error, raised on
    entering the block.

    Raises:
        PeerTransportError: the peer refused the WebSocket, or its answer to
            the handshake is malformed (the message says how).
        PeerUnavailableError: the peer closed the connection (or it was lost)
            before the WebSocket was open; no call was made.
        PeerTimeoutError: the peer did not answer the handshake within
            ``limits.handshake_timeout``.
        PeerAuthError: the peer refused the token.
    """
    headers = [(grpc.NODE_ID_HEADER.encode(), node_id.encode())]
    if token is not None:
        headers.append(bearer_header(token))
    watch = _HandshakeWatch(transport, endpoint.authority)
    try:
        with collapse_excgroups():
            async with trio.open_nursery() as outer:
                # The connection's tasks (trio-websocket's reader among them)
                # run shielded, as an HTTP/2 connection's do: a block
                # cancelled from outside must still hear the goodbyes answered.
                guard = trio.CancelScope(shield=True)
                nursery = await outer.start(_run_guarded, guard)
                try:
                    ws = None
                    with trio.move_on_after(limits.handshake_timeout), watch.scope:
                        ws = await trio_websocket.wrap_client_stream(
                            nursery,
                            watch,  # type: ignore[arg-type]  # any trio stream works
                            endpoint.authority,
                            prefix + WEBSOCKET_PATH.decode(),
                            subprotocols=[SUBPROTOCOL],
                            extra_headers=headers,
                            max_message_size=limits.max_message_size + _FRAME_OVERHEAD,
                        )
                    if ws is None:
                        raise watch.failure or PeerTimeoutError(
                            f"the WebSocket handshake with {endpoint.authority} did not "
                            f"complete within {limits.handshake_timeout:g}s"
                        )
                    watch.open = True
                    if ws.subprotocol != SUBPROTOCOL:
                        raise PeerTransportError(
                            f"the peer chose WebSocket subprotocol {ws.subprotocol!r}, "
                            f"not {SUBPROTOCOL!r}"
                        )
                    client = WebSocketPeerClient(
                        ws, transport, node_id, limits=limits, lease_ttl=lease_ttl
                    )
                    client._lost.start(nursery)
                    nursery.start_soon(client._read_frames)
                    nursery.start_soon(client._watch_liveness)
                    nursery.start_soon(client._scopes.renew_forever)
                    try:
                        yield client
                    finally:
                        with trio.CancelScope(shield=True):
                            await client._lost.wait()  # each bounded by keepalive_timeout
                            await client._scopes.close(client._scopes.root)
                            with trio.move_on_after(limits.keepalive_timeout):
                                await ws.aclose()
                finally:
                    guard.cancel()
    except trio_websocket.ConnectionRejected as exc:
        raise _rejection(exc) from None
    except h11.ProtocolError as exc:
        if watch.open:
            raise  # not the handshake's: the caller's own
        raise _malformed_answer(exc, endpoint.authority) from None


@asynccontextmanager
async def _open(
    endpoint: Endpoint,
    prefix: str,
    node_id: str,
    *,
    tls: ssl.SSLContext | None,
    token: str | None,
    limits: Limits,
    lease_ttl: float,
) -> AsyncIterator[WebSocketPeerClient]:
    transport = await connect_tcp(
        endpoint.host, endpoint.port, ssl_context=tls, timeout=limits.handshake_timeout
    )
    if isinstance(transport, trio.SSLStream) and transport.selected_alpn_protocol() == "h2":
        await trio.aclose_forcefully(transport)
        raise PeerTransportError(
            f"{endpoint.authority} chose HTTP/2 by ALPN; a WebSocket needs HTTP/1.1: give "
            'the client a TLS context offering "http/1.1" (load_client_tls(..., '
            'alpn=("http/1.1",)))'
        )
    try:
        async with open_websocket_client_over(
            transport, endpoint, prefix, node_id, token=token, limits=limits, lease_ttl=lease_ttl
        ) as client:
            yield client
    finally:
        # Shielded: in a cancelled scope, its Cancelled would replace the
        # error the block is raising, and that scope would then swallow it.
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(transport)
