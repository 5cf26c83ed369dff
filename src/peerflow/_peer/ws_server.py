"""The WebSocket front end of a peer: one upgraded connection, many multiplexed calls.

The HTTP/1.1 driver hands over a ``GET /peerflow.peer.v1/ws`` upgrade with
its bytes replayed; trio-websocket does the handshake and the framing. The
handshake is where the caller is admitted (token, node id, subprotocol
``peerflow.v1``); after it, every binary message is a frame
(:mod:`.ws_frames`): each call frame runs in its own task under its own
cancel scope, which a cancel frame, the call's deadline or the connection's
end cancels. Whatever goes wrong with one call becomes that call's error
frame; a frame that cannot even name its call closes the connection. A
connection with no call in flight for ``idle_timeout`` is closed with 1000
(normal closure), as an idle HTTP/2 or keep-alive connection is.

When the server drains (see :class:`~peerflow._transport.listener.Drain`),
a new call gets an UNAVAILABLE error frame, the calls in flight run on for
the grace period (one still running then is cancelled and gets a CANCELLED
error frame), and the connection closes with 1001 (going away) once none
is left; an upgrade that arrives during the drain is refused with 503.
Sending a frame is shielded from cancellation (half a frame would break the
connection), so the drain bounds each send itself: a client that stops
reading loses the connection when the drain ends, grace plus goodbye.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Final, final

import trio
import trio_websocket

from .._engine.events import Event, event_to_wire
from .._transport.listener import Drain
from .._wire import grpc
from .._wire.codec import (
    decode_message,
    encode_deref_chunk_header,
    encode_message,
    encode_stream_message,
)
from .._wire.envelopes import (
    DerefSessionRefRequest,
    ErrorDetails,
    InvokeSubWorkflowRequest,
    LeaseRequest,
    ReleaseSessionRefRequest,
    ReleaseSessionRefResponse,
    StreamEvent,
    SubWorkflowResponse,
)
from ..errors import (
    PeerEncodeError,
    PeerError,
    PeerflowError,
    PeerLimitError,
    PeerTimeoutError,
    PeerTransportError,
)
from .calls import CallGate, ClosingConnection, deadline_from_timeout_ms, name_call
from .http1_server import SHUTTING_DOWN, cut_off_message
from .json_codec import JSON_CONTENT_TYPE, encode_json_error
from .limits import Limits
from .logs import PeerLogger
from .service import Caller, PeerService, deref_pieces, encode_response
from .trace import call_failed
from .ws_frames import (
    SUBPROTOCOL,
    CallFrame,
    CancelFrame,
    EndFrame,
    ErrorFrame,
    FrameDecodeError,
    FrameVersionError,
    MessageFrame,
    decode_client_frame,
    encode_frame,
)

__all__ = ["WebSocketServer", "wait_until_silent"]

_Method = Callable[["_Session", int, bytes, float], Awaitable[None]]

_NODE_ID: Final = grpc.NODE_ID_HEADER.encode()
# Frames wrap a message in a few bytes of map (with a call's trace context,
# up to about 600 more): the WebSocket message limit leaves room for them
# above the message size limit.
_FRAME_OVERHEAD: Final = 1024
# WebSocket close codes (RFC 6455, 7.4.1). An idle connection is closed
# with 1000, not 1001: 1001 says the server is going away (its drain),
# while after an idle close the same server takes a new connection.
_NORMAL_CLOSURE: Final = 1000
_GOING_AWAY: Final = 1001
_UNSUPPORTED_DATA: Final = 1003
_INVALID_PAYLOAD: Final = 1007
# Answered calls whose refs a late cancel frame may still drop, per connection;
# each is watched for keepalive_timeout at most (a cancel frame comes within a
# round trip of the answer, or the connection is as good as dead).
_MAX_ANSWERED: Final = 1024


@final
class WebSocketServer:
    """Serves upgraded WebSocket connections (the HTTP/1.1 driver's ``websocket`` handler).

    Args:
        service: does the work of each method.
        limits: message size, deref chunks, handshake and send timeouts.
        gate: checks the handshake's credentials and names the caller.
        scope_for: the ref scope of the underlying connection.
    """

    def __init__(
        self,
        service: PeerService,
        limits: Limits,
        *,
        gate: CallGate,
        scope_for: Callable[[ClosingConnection], Hashable],
    ) -> None:
        self.service = service
        self.limits = limits
        #: Admits each connection and joins each call to its caller's trace.
        self.gate = gate
        self._scope_for = scope_for
        self.log = PeerLogger("websocket", service.node_id)
        #: The methods served, by name (every session looks them up here).
        self.methods: dict[str, _Method] = {
            "InvokeSubWorkflow": _Session.invoke,
            "StreamSubWorkflow": _Session.stream,
            "DerefSessionRef": _Session.deref,
            "ReleaseSessionRef": _Session.release,
            "Lease": _Session.lease,
        }

    async def __call__(
        self,
        stream: trio.abc.Stream,
        connection: ClosingConnection,
        principal: str | None,
        drain: Drain,
    ) -> None:
        """Do the handshake on ``stream`` and serve the connection's calls until it closes.

        Once ``drain`` starts, the connection drains (see the module's docstring).
        """
        async with trio.open_nursery() as nursery:  # trio-websocket's reader task
            try:
                await self._serve(nursery, stream, connection, principal, drain)
            except trio_websocket.ConnectionClosed:
                pass  # the client left mid-handshake or mid-frame: nothing to answer
            finally:
                nursery.cancel_scope.cancel()

    async def _serve(
        self,
        nursery: trio.Nursery,
        stream: trio.abc.Stream,
        connection: ClosingConnection,
        principal: str | None,
        drain: Drain,
    ) -> None:
        # The HTTP/1.1 driver has read the whole head: the handshake request
        # is already here, unless the client sent something wsproto refuses.
        request: trio_websocket.WebSocketRequest | None = None
        with trio.move_on_after(self.limits.request_timeout):
            request = await trio_websocket.wrap_server_stream(
                nursery,
                stream,
                message_queue_size=1,
                max_message_size=self.limits.max_message_size + _FRAME_OVERHEAD,
            )
        if request is None:
            return
        if drain.started:
            await _reject(request, 503, encode_message(ErrorDetails("unavailable", SHUTTING_DOWN)))
            return
        if SUBPROTOCOL not in request.proposed_subprotocols:
            message = f"the WebSocket subprotocol must be {SUBPROTOCOL!r}"
            await _reject(request, 400, encode_message(ErrorDetails("encode", message)))
            return
        headers = dict(request.headers)
        try:
            caller = self.gate.admit(
                headers.get(b"authorization"),
                headers.get(_NODE_ID),
                principal,
                self._scope_for,
                connection,
            )
        except PeerflowError as exc:
            status, _, details = grpc.status_for_error(exc)
            await _reject(request, grpc.http_status_for(status), details)
            return
        ws = await request.accept(subprotocol=SUBPROTOCOL)
        session = _Session(self, ws, stream, caller, drain)
        try:
            await session.run()
        finally:
            # A closing handshake when there is time for one; when the server
            # itself is being cancelled, trio-websocket just closes the stream.
            if session.drained:
                with trio.move_on_after(drain.goodbye):
                    await ws.aclose(_GOING_AWAY, "the peer is shutting down")
            elif session.idle:
                with trio.move_on_after(self.limits.keepalive_timeout):
                    await ws.aclose(_NORMAL_CLOSURE, session.idle)
            else:
                with trio.move_on_after(self.limits.keepalive_timeout):
                    await ws.aclose()


async def _reject(request: trio_websocket.WebSocketRequest, status: int, details: bytes) -> None:
    # The same JSON error body as an HTTP/JSON call would get.
    await request.reject(
        status,
        extra_headers=[(b"content-type", JSON_CONTENT_TYPE.encode())],
        body=encode_json_error(details),
    )


@final
class _Session:
    """The calls of one WebSocket connection."""

    def __init__(
        self,
        server: WebSocketServer,
        ws: trio_websocket.WebSocketConnection,
        stream: trio.abc.Stream,
        caller: Caller,
        drain: Drain,
    ) -> None:
        self._transport = stream
        self._service = server.service
        self._limits = server.limits
        self._log = server.log
        self._ws = ws
        self._caller = caller
        self._gate = server.gate
        self._running: dict[int, trio.CancelScope] = {}
        self._call_ended = trio.lowlevel.ParkingLot()
        # When the last call ended (or the connection opened): the idle clock.
        self._idle_since = trio.current_time()
        # The deadlines of the frames being sent, which the drain may shorten.
        self._sending: set[trio.CancelScope] = set()
        self._broken = False
        self._methods = server.methods
        self._drain = drain
        # Calls answered with refs, oldest first: a cancel frame for one of
        # them says the client gave up before it handed the answer on.
        self._answered: dict[int, tuple[float, Callable[[], None]]] = {}
        #: Whether the session ended because the drain let its last call finish.
        self.drained = False
        #: Why the session ended for want of calls (the close reason), or "".
        self.idle = ""

    async def run(self) -> None:
        """Read frames and run calls until the connection ends; then cancel every call."""
        async with trio.open_nursery() as calls:
            calls.start_soon(self._watch_liveness)
            calls.start_soon(self._end_when_drained, calls.cancel_scope)
            calls.start_soon(self._end_when_idle, calls.cancel_scope)
            try:
                await self._read_frames(calls)
            finally:
                calls.cancel_scope.cancel()

    async def _watch_liveness(self) -> None:
        # A client that vanished without closing (a half-open connection)
        # must not hold its calls and its ref scope forever.
        await wait_until_silent(self._ws, self._limits)
        self._log.info("closing a WebSocket whose client stopped answering pings")
        self._broken = True
        await trio.aclose_forcefully(self._transport)

    async def _end_when_drained(self, calls: trio.CancelScope) -> None:
        # The calls in flight may finish (the drain cuts them off at its
        # deadline); then the session ends and the connection closes (1001).
        await self._drain.wait_started()
        # A send already under way learns the drain's end only now.
        for sending in self._sending:
            sending.deadline = min(sending.deadline, self._drain_cutoff())
        while self._running:
            await self._call_ended.park()
        self.drained = True
        calls.cancel()

    async def _end_when_idle(self, calls: trio.CancelScope) -> None:
        # A connection nobody uses must not hold a connection slot and its
        # ref scope forever; pongs keep it alive but do not make it busy.
        idle_for = self._limits.idle_timeout
        if idle_for is None:
            return
        while True:
            if self._running:
                await self._call_ended.park()
                continue
            deadline = self._idle_since + idle_for
            if trio.current_time() >= deadline:
                break
            await trio.sleep_until(deadline)
        self._log.debug("closing a WebSocket with no call for %gs", idle_for)
        self.idle = f"no call for {idle_for:g}s (idle timeout)"
        calls.cancel()

    async def _read_frames(self, calls: trio.Nursery) -> None:
        while not self._broken:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            if isinstance(message, str):
                await self._ws.aclose(_UNSUPPORTED_DATA, "peerflow frames are binary messages")
                return
            try:
                frame = decode_client_frame(message)
            except (FrameDecodeError, FrameVersionError) as exc:
                if exc.frame_id is None:
                    await self._ws.aclose(_INVALID_PAYLOAD, f"undecodable frame: {exc}")
                    return
                if exc.frame_id not in self._running:
                    await self._send_error(exc.frame_id, exc)
                continue
            if isinstance(frame, CancelFrame):
                scope = self._running.get(frame.id)
                if scope is not None:
                    scope.cancel()
                answered = self._answered.pop(frame.id, None)
                if answered is not None:
                    answered[1]()
                continue
            if self._drain.started:
                await self._send_status(
                    frame.id, grpc.Status.UNAVAILABLE, "unavailable", SHUTTING_DOWN
                )
                continue
            if frame.id in self._running:
                error = PeerEncodeError(f"call {frame.id} is already running", "id")
                await self._send_error(frame.id, error)
                continue
            if len(self._running) >= self._limits.max_concurrent_streams:
                limit = self._limits.max_concurrent_streams
                await self._send_error(frame.id, PeerLimitError(f"{limit} calls already running"))
                continue
            scope = trio.CancelScope()
            self._running[frame.id] = scope
            calls.start_soon(self._call, frame, scope)

    async def _call(self, frame: CallFrame, scope: trio.CancelScope) -> None:
        name_call(None, self._ws, frame.id)
        try:
            # ``scope`` is the client's (its cancel frame); ``grace`` the drain's.
            with scope, self._drain.in_flight() as grace:
                method = self._methods.get(frame.method)
                if method is None:
                    message = f"unknown method {frame.method[:200]!r}"
                    await self._send_status(
                        frame.id, grpc.Status.UNIMPLEMENTED, "unimplemented", message
                    )
                    return
                with self._gate.trace(
                    frame.traceparent, frame.tracestate, frame.method, "websocket"
                ):
                    try:
                        deadline = deadline_from_timeout_ms(frame.timeout_ms, "timeout_ms")
                        with trio.move_on_at(deadline):
                            await method(self, frame.id, frame.body, deadline)
                            return
                        raise PeerTimeoutError("the call's deadline (timeout_ms) passed")
                    except PeerflowError as exc:
                        await self._send_error(frame.id, exc)
                    except Exception as exc:
                        self._log.exception("call %s failed", frame.method)
                        await self._send_error(frame.id, exc)
            if grace.cancelled_caught:
                message = cut_off_message(self._drain)
                await self._send_status(frame.id, grpc.Status.CANCELLED, "cancelled", message)
        finally:
            del self._running[frame.id]
            if not self._running:
                self._idle_since = trio.current_time()
            self._call_ended.unpark_all()

    # -- sending -----------------------------------------------------------------

    async def _send(self, frame: MessageFrame | EndFrame | ErrorFrame) -> None:
        """Send one frame whole: a cancelled call never leaves half a frame behind.

        Raises:
            PeerTransportError: the connection is gone, or the client took
                none of the frame within the request timeout, or before the
                drain ended (the connection is then closed: it may hold half
                a frame).
        """
        data = encode_frame(frame)
        with trio.CancelScope(shield=True):
            sending = self._send_scope()
            try:
                with sending:
                    try:
                        await self._ws.send_message(data)
                    except trio_websocket.ConnectionClosed:
                        raise PeerTransportError("the WebSocket connection closed") from None
                    return
            finally:
                self._sending.discard(sending)
            # Half a frame may be out: the connection cannot carry another.
            self._broken = True
            await trio.aclose_forcefully(self._transport)
            raise PeerTransportError("the client took none of a frame in time")

    def _send_scope(self) -> trio.CancelScope:
        # The shield around a send hides the drain's cutoff (the listener's
        # guard), so the send carries it: the earlier of the request timeout
        # and the drain's end, which _end_when_drained sets on a send under way.
        deadline = trio.current_time() + self._limits.request_timeout
        sending = trio.CancelScope(deadline=min(deadline, self._drain_cutoff()))
        self._sending.add(sending)
        return sending

    def _drain_cutoff(self) -> float:
        # When the listener cancels whatever is left of a drain (infinite
        # until the drain starts): the grace period, then the goodbye.
        return self._drain.deadline + self._drain.goodbye

    async def _send_error(self, frame_id: int, exc: BaseException) -> None:
        call_failed(exc)
        status, _, details = grpc.status_for_error(exc)
        try:
            await self._send(ErrorFrame(frame_id, int(status), details))
        except PeerError:
            self._log.debug("could not report %r: the connection is gone", exc)

    async def _send_status(
        self, frame_id: int, status: grpc.Status, code: str, message: str
    ) -> None:
        # For the failures that have a status but no error class (section 4's
        # rows without a code): unknown method, shutting down, cut off.
        details = encode_message(ErrorDetails(code, message))
        try:
            await self._send(ErrorFrame(frame_id, int(status), details))
        except PeerError:
            self._log.debug("could not report %s: the connection is gone", code)

    async def _reply(self, frame_id: int, body: bytes) -> None:
        await self._send(MessageFrame(frame_id, body))
        await self._send(EndFrame(frame_id))

    async def _answer(self, frame_id: int, response: SubWorkflowResponse, body: bytes) -> None:
        """Send a call's final response, unless the client has cancelled the call.

        A client that cancels as the answer goes out never hands it on: the
        response's refs are dropped when the cancel frame comes before the
        answer, while it is being sent, or (for the last answers with refs)
        after it.
        """
        with self._service.delivering(response, self._caller, self._watcher(frame_id)):
            # Sends are shielded: a cancel frame that came first must stop it here.
            await trio.lowlevel.checkpoint_if_cancelled()
            await self._reply(frame_id, body)

    def _watcher(self, frame_id: int) -> Callable[[Callable[[], None]], None]:
        def watch(on_lost: Callable[[], None]) -> None:
            if self._running[frame_id].cancel_called:  # the cancel came as it went out
                on_lost()
                return
            answered = self._answered
            now = trio.current_time()
            answered[frame_id] = (now, on_lost)
            # Oldest first: drop the watches that are too many or too old.
            expired = now - self._limits.keepalive_timeout
            while len(answered) > _MAX_ANSWERED or answered[next(iter(answered))][0] < expired:
                del answered[next(iter(answered))]

        return watch

    # -- methods -------------------------------------------------------------------

    async def invoke(self, frame_id: int, raw: bytes, deadline: float) -> None:
        """InvokeSubWorkflow: one response message, then the end frame."""
        request = decode_message(InvokeSubWorkflowRequest, raw)
        response = await self._service.invoke(request, self._caller, deadline=deadline)
        await self._answer(frame_id, response, encode_response(encode_message, response))

    async def stream(self, frame_id: int, raw: bytes, deadline: float) -> None:
        """StreamSubWorkflow: a message per event, the response, then the end frame."""
        request = decode_message(InvokeSubWorkflowRequest, raw)

        async def forward(event: Event) -> None:
            wire = event_to_wire(event)
            message = StreamEvent(wire["event_type"], wire["data"])
            await self._send(MessageFrame(frame_id, encode_stream_message(message)))

        response = await self._service.invoke(
            request, self._caller, deadline=deadline, on_event=forward
        )
        await self._answer(frame_id, response, encode_response(encode_stream_message, response))

    async def deref(self, frame_id: int, raw: bytes, deadline: float) -> None:
        """DerefSessionRef: a message per chunk, then the end frame."""
        request = decode_message(DerefSessionRefRequest, raw)
        type_tag, payload = self._service.deref(request.ref_uuid, self._caller)
        for piece, tag, total in deref_pieces(type_tag, payload, self._limits.max_deref_chunk):
            header = encode_deref_chunk_header(len(piece), type_tag=tag, total_size=total)
            await self._send(MessageFrame(frame_id, header + piece))
        await self._send(EndFrame(frame_id))

    async def release(self, frame_id: int, raw: bytes, deadline: float) -> None:
        """ReleaseSessionRef: one response message, then the end frame."""
        request = decode_message(ReleaseSessionRefRequest, raw)
        released = self._service.release(request.ref_uuid, self._caller)
        await self._reply(frame_id, encode_message(ReleaseSessionRefResponse(released)))

    async def lease(self, frame_id: int, raw: bytes, deadline: float) -> None:
        """Lease: one response message, then the end frame."""
        request = decode_message(LeaseRequest, raw)
        await self._reply(frame_id, encode_message(self._service.lease(request, self._caller)))


async def wait_until_silent(ws: trio_websocket.WebSocketConnection, limits: Limits) -> None:
    """Ping the other end every ``keepalive_interval``; return once a pong is late.

    A pong later than ``keepalive_timeout`` means the other end is gone (or
    hopelessly stuck); the caller then drops the connection. Without a
    ``keepalive_interval`` this never returns.
    """
    interval = limits.keepalive_interval
    if interval is None:
        await trio.sleep_forever()
    while True:
        await trio.sleep(interval)
        with trio.move_on_after(limits.keepalive_timeout):
            try:
                await ws.ping()
            except trio_websocket.ConnectionClosed:
                await trio.sleep_forever()  # the reader sees the close and ends the session
            continue
        return
