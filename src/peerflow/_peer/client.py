"""PeerClient: calls a peer's gRPC service over one multiplexed HTTP/2 connection."""

from __future__ import annotations

import contextvars
import math
import ssl
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, Final, TypeVar, final

import attrs
import trio

from .._engine.events import Event, event_from_wire
from .._excgroups import collapse_excgroups
from .._refs.descriptor import RefLifetime
from .._transport.h2conn import ClientStream, H2ClientConnection, Headers, open_h2_client
from .._transport.listener import connect_tcp
from .._wire import grpc
from .._wire.codec import decode_message, decode_stream_message, encode_message
from .._wire.envelopes import (
    DerefChunk,
    DerefSessionRefRequest,
    InvokeSubWorkflowRequest,
    LeaseRequest,
    LeaseResponse,
    ReleaseSessionRefRequest,
    ReleaseSessionRefResponse,
    StreamEvent,
    SubWorkflowResponse,
)
from .._wire.framing import NEED_DATA, FrameDecoder, encode_frame
from ..errors import PeerError, PeerTimeoutError, PeerTransportError
from .auth import bearer_header, resolve_peer_token
from .limits import Limits
from .logs import PeerLogger, for_node
from .trace import current_trace_context, trace_headers

__all__ = [
    "LostRefs",
    "PeerClient",
    "StreamCall",
    "deadline_scope",
    "endpoint_of",
    "open_client_over",
    "parse_endpoint",
    "release_lost_refs",
]

_CONTENT_TYPE: Final = grpc.CONTENT_TYPE.encode()
M = TypeVar("M")

_FROM_ENV: Final = object()
_PARENT = RefLifetime.UNTIL_PARENT_FINISH


@attrs.frozen
class Endpoint:
    """A parsed peer endpoint URI."""

    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        """``host:port`` as sent in ``:authority`` (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(endpoint: str) -> Endpoint:
    """Parse ``http://host:port`` or ``https://host:port``.

    Raises:
        PeerTransportError: the URI is not of that form.
    """
    if not isinstance(endpoint, str):
        raise PeerTransportError(f"endpoint must be a str URI, got {type(endpoint).__name__}")
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https"):
        raise PeerTransportError(
            f"invalid endpoint {endpoint!r}: the scheme must be http:// or https://"
        )
    found = endpoint_of(parts, parts.scheme, endpoint)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise PeerTransportError(f"invalid endpoint {endpoint!r}: a peer endpoint has no path")
    return found


def endpoint_of(
    parts: urllib.parse.SplitResult, scheme: str, given: str, noun: str = "endpoint"
) -> Endpoint:
    """The endpoint of ``parts`` (from ``urlsplit(given)``), reached by ``scheme``.

    ``scheme`` is ``"http"`` or ``"https"``; errors name the ``noun`` ``given``.

    Raises:
        PeerTransportError: no host, or a port that is not a number in range.
    """
    try:
        port = parts.port
    except ValueError as exc:
        raise PeerTransportError(f"invalid {noun} {given!r}: {exc}") from None
    if not parts.hostname:
        raise PeerTransportError(f"invalid {noun} {given!r}: no host")
    default = 443 if scheme == "https" else 80
    return Endpoint(scheme, parts.hostname, default if port is None else port)


@final
class _Scope:
    """One ref scope of a client: a lease on the peer plus the refs it bound."""

    def __init__(self, lease_id: str) -> None:
        self.lease_id = lease_id
        self.refs: set[str] = set()


@final
class PeerClient:
    """A connection to one peer; get one with ``async with PeerClient.connect(...)``.

    Any number of calls can run concurrently on it. ``UNTIL_PARENT_FINISH``
    refs handed out to calls made inside the client's block (or a
    :meth:`ref_scope`) are released when that block ends.
    """

    def __init__(
        self,
        conn: H2ClientConnection,
        endpoint: Endpoint,
        node_id: str,
        *,
        token: str | None,
        limits: Limits,
        lease_ttl: float,
    ) -> None:
        self.node_id = node_id
        self.endpoint = endpoint
        self._log = PeerLogger("client", node_id)
        self._conn = conn
        self._limits = limits
        self._lease_ttl = lease_ttl
        self._leases_supported = True
        self._scopes: dict[str, _Scope] = {}
        root = _Scope(str(uuid.uuid4()))
        self._scope_var: contextvars.ContextVar[_Scope] = contextvars.ContextVar(
            f"peerflow-client-scope-{id(self)}", default=root
        )
        self._root = root
        headers = [
            (b":method", b"POST"),
            (b":scheme", endpoint.scheme.encode()),
            (b":authority", endpoint.authority.encode()),
            (b"content-type", grpc.CONTENT_TYPE.encode()),
            (b"te", b"trailers"),
            (grpc.NODE_ID_HEADER.encode(), node_id.encode()),
        ]
        if token is not None:
            headers.append(bearer_header(token))
        self._base_headers: Final = tuple(headers)
        self._method_headers: dict[grpc.MethodSpec, tuple[tuple[bytes, bytes], ...]] = {}
        self._lost = LostRefs(self.release_session_ref, limits.keepalive_timeout, self._log)

    @staticmethod
    def connect(
        endpoint: str,
        node_id: str,
        *,
        tls: ssl.SSLContext | None = None,
        token: str | object | None = _FROM_ENV,
        limits: Limits | None = None,
        lease_ttl: float = 30.0,
    ) -> AbstractAsyncContextManager[PeerClient]:
        """Connect to the peer at ``endpoint`` for the duration of an ``async with``.

        ``endpoint`` is ``http://host:port``, or ``https://host:port`` for TLS
        (ALPN ``h2``; mTLS when ``tls`` carries a client certificate). The
        token defaults to ``PEERFLOW_PEER_TOKEN``; pass None to send none.

        Opening is bounded by ``limits.handshake_timeout`` twice over: the
        TCP connect with its TLS handshake, then the client's opening
        ``Lease`` call (the first call a peer must answer).

        Raises:
            PeerTransportError: at once for a bad URI; on entering the block
                when the connection is refused (the message names the
                address), the TLS handshake fails or the peer agrees by
                ALPN on a protocol other than ``h2``.
            PeerTimeoutError: on entering the block, when the connection, the
                TLS handshake or the opening ``Lease`` call takes longer than
                ``limits.handshake_timeout``.
        """
        parsed = parse_endpoint(endpoint)
        if parsed.scheme == "https" and tls is None:
            tls = ssl.create_default_context()
            tls.set_alpn_protocols(["h2"])
        resolved = resolve_peer_token() if token is _FROM_ENV else token
        if resolved is not None and not isinstance(resolved, str):
            raise TypeError("token must be a str or None")
        return _open_client(
            parsed,
            node_id,
            tls=tls if parsed.scheme == "https" else None,
            token=resolved,
            limits=limits or Limits(),
            lease_ttl=lease_ttl,
        )

    # -- ref scopes ------------------------------------------------------------

    @asynccontextmanager
    async def ref_scope(self) -> AsyncIterator[None]:
        """Bind the ``UNTIL_PARENT_FINISH`` refs of calls made inside to this block.

        Leaving the block releases them on the peer. Calls made from tasks
        started inside the block belong to it too.

        Raises:
            PeerTimeoutError: the peer did not answer the scope's ``Lease``
                call within ``limits.handshake_timeout``.
            PeerTransportError: the ``Lease`` call failed.
        """
        scope = _Scope(str(uuid.uuid4()))
        await self._open_lease(scope)
        token = self._scope_var.set(scope)
        try:
            yield
        finally:
            self._scope_var.reset(token)
            with trio.CancelScope(shield=True):
                await self._close_scope(scope)

    async def _open_lease(self, scope: _Scope) -> None:
        # A peer whose HTTP/2 stack answers but whose service does not must
        # not hold the caller at the door: opening a scope is bounded.
        self._scopes[scope.lease_id] = scope
        if not self._leases_supported:
            return
        try:
            with trio.move_on_after(self._limits.handshake_timeout) as opening:
                await self._lease(LeaseRequest(scope.lease_id, int(self._lease_ttl * 1000)))
        except PeerTransportError as exc:
            if "UNIMPLEMENTED" not in str(exc):
                del self._scopes[scope.lease_id]
                raise
            # A minimal peer: refs are then released one by one at scope exit.
            self._leases_supported = False
        if opening.cancelled_caught:
            del self._scopes[scope.lease_id]
            raise PeerTimeoutError(
                f"{self.endpoint.authority} did not answer a Lease call within "
                f"{self._limits.handshake_timeout:g}s (Limits.handshake_timeout)"
            )

    async def _close_scope(self, scope: _Scope) -> None:
        self._scopes.pop(scope.lease_id, None)
        if self._conn.closed:
            return  # the peer's lease (or connection grace) reclaims them
        with trio.move_on_after(self._limits.keepalive_timeout):
            try:
                if self._leases_supported:
                    await self._lease(LeaseRequest(scope.lease_id, 0, close=True))
                else:
                    for ref_uuid in scope.refs:
                        await self.release_session_ref(ref_uuid)
            except PeerError as exc:
                self._log.warning("could not release the refs of a closing scope: %s", exc)

    async def _renew_leases(self) -> None:
        while True:
            await trio.sleep(self._lease_ttl / 3)
            if not self._leases_supported:
                return
            for scope in list(self._scopes.values()):
                # One renewal the peer sits on must not starve the others.
                with trio.move_on_after(self._limits.keepalive_timeout) as renewing:
                    try:
                        await self._lease(LeaseRequest(scope.lease_id, int(self._lease_ttl * 1000)))
                    except PeerError as exc:
                        self._log.warning("lease renewal failed: %s", exc)
                if renewing.cancelled_caught:
                    self._log.warning(
                        "lease renewal got no answer within %gs", self._limits.keepalive_timeout
                    )

    # -- calls -----------------------------------------------------------------

    async def invoke_sub_workflow(
        self,
        workflow_name: str,
        step_ids: Iterable[str],
        input: Any = None,
        *,
        timeout: float | None = None,
    ) -> SubWorkflowResponse:
        """Run a sub-workflow on the peer and return its response.

        A failed remote run is not raised: check ``response.error`` or call
        ``response.raise_for_error()``.

        Raises:
            PeerUnknownStepError: the peer lacks a step; nothing ran.
            PeerEncodeError: ``input`` is not a wire value (the path names it).
            PeerTimeoutError: ``timeout`` passed first.
            PeerTransportError: the connection failed.
        """
        request = self._request(workflow_name, step_ids, input, timeout)
        response = await self._unary(
            grpc.INVOKE_SUB_WORKFLOW, request, SubWorkflowResponse, timeout
        )
        self._adopt(response)
        return response

    @asynccontextmanager
    async def stream_sub_workflow(
        self,
        workflow_name: str,
        step_ids: Iterable[str],
        input: Any = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamCall]:
        """Run a sub-workflow and iterate its streamed events as they happen.

        ``async for event in call`` yields the remote run's events; then
        ``call.response`` holds the final response. Leaving the block early
        cancels the remote run.

        Raises:
            The same errors as :meth:`invoke_sub_workflow`.
        """
        request = self._request(workflow_name, step_ids, input, timeout)
        with collapse_excgroups(), deadline_scope(timeout) as timer:
            async with self._call(grpc.STREAM_SUB_WORKFLOW, request) as reader:
                call = StreamCall(reader, self)
                try:
                    yield call
                finally:
                    if call.response is None:
                        self._release_lost(reader.lost_response(decode_stream_message))
        if timer.cancelled_caught:
            raise PeerTimeoutError(f"StreamSubWorkflow timed out after {timeout:g}s")

    async def deref_session_ref(self, ref_uuid: str, *, timeout: float | None = None) -> bytes:
        """Fetch a remote ref's serialized bytes.

        The value arrives in chunks; holding it costs about twice its size
        while they are joined. Use :meth:`open_session_ref` to process the
        chunks as they come instead.

        Raises:
            PeerRefNotFoundError: no such ref for this caller.
            PeerRefNotSerializableError: the value is live-only on the peer.
            PeerTimeoutError, PeerTransportError: as for every call.
        """
        async with self.open_session_ref(ref_uuid, timeout=timeout) as chunks:
            parts = [chunk async for chunk in chunks]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @asynccontextmanager
    async def open_session_ref(
        self, ref_uuid: str, *, timeout: float | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream a remote ref's bytes: ``async for chunk in chunks`` inside the block.

        Leaving the block early cancels the transfer.

        Raises:
            The same errors as :meth:`deref_session_ref`.
        """
        request = encode_message(DerefSessionRefRequest(ref_uuid))
        with deadline_scope(timeout) as timer:
            async with self._call(grpc.DEREF_SESSION_REF, request) as reader:
                yield _Payloads(reader)
        if timer.cancelled_caught:
            raise PeerTimeoutError(f"DerefSessionRef timed out after {timeout:g}s")

    async def release_session_ref(self, ref_uuid: str, *, timeout: float | None = None) -> bool:
        """Release a remote ref; True if the peer found and dropped it."""
        request = encode_message(ReleaseSessionRefRequest(ref_uuid))
        response = await self._unary(
            grpc.RELEASE_SESSION_REF, request, ReleaseSessionRefResponse, timeout
        )
        for scope in self._scopes.values():
            scope.refs.discard(ref_uuid)
        return response.released

    async def ping(self) -> float:
        """Measure the round-trip time to the peer with an HTTP/2 PING, in seconds."""
        return await self._conn.ping()

    def abandon(self, reason: PeerTransportError) -> None:
        """Drop the connection at once: every call in flight fails with ``reason``.

        For a peer known to be dead (it stopped answering PINGs): leaving the
        client's block then skips the goodbyes the peer would never answer,
        and its lease lapses on the peer instead.
        """
        self._conn.abort(reason)

    @property
    def accepting_calls(self) -> bool:
        """False once the connection has ended or the peer has sent GOAWAY.

        New calls would then fail with :class:`~peerflow.PeerUnavailableError`.
        """
        return not self._conn.closed and not self._conn.going_away

    # -- plumbing --------------------------------------------------------------

    def _request(
        self, workflow_name: str, step_ids: Iterable[str], input: Any, timeout: float | None
    ) -> bytes:
        if isinstance(step_ids, str):
            raise TypeError("step_ids must be a list of step ids, not one str")
        scope = self._scope_var.get()
        return encode_message(
            InvokeSubWorkflowRequest(
                workflow_name,
                tuple(step_ids),
                input,
                timeout_ms=None if timeout is None else math.ceil(timeout * 1000),
                lease_id=scope.lease_id if self._leases_supported else None,
            )
        )

    def _adopt(self, response: SubWorkflowResponse) -> None:
        scope = self._scope_var.get()
        for ref_uuid, descriptor in response.remote_refs.items():
            if descriptor.lifetime is _PARENT:
                scope.refs.add(ref_uuid)

    async def _lease(self, request: LeaseRequest) -> LeaseResponse:
        return await self._unary(grpc.LEASE, encode_message(request), LeaseResponse, None)

    async def _unary(
        self, method: grpc.MethodSpec, request: bytes, cls: type[M], timeout: float | None
    ) -> M:
        if timeout is None:
            return await self._unary_exchange(method, request, cls)
        with trio.move_on_after(timeout):
            return await self._unary_exchange(method, request, cls)
        raise PeerTimeoutError(f"{method.name} timed out after {timeout:g}s")

    async def _unary_exchange(self, method: grpc.MethodSpec, request: bytes, cls: type[M]) -> M:
        # The hot path of every call: one stream read in place, with no
        # iterator or context-manager objects and no extra checkpoint.
        stream = await self._conn.open_stream(self._headers_for(method), body=encode_frame(request))
        decoder = FrameDecoder(self._limits.max_message_size)
        result: M | None = None
        try:
            _check_headers(method, await stream.receive_headers())
            while data := await stream.receive_data():
                decoder.feed(bytes(data))
                while (message := decoder.next_message()) is not NEED_DATA:
                    if result is not None:
                        raise PeerTransportError(f"{method.name}: more than one response message")
                    result = decode_message(cls, message)
            decoder.end_of_stream()
            _raise_status(method, dict(stream.trailers or ()))
        except trio.Cancelled:
            if cls is SubWorkflowResponse:
                self._release_lost(
                    _lost_response(method, stream, decoder, _decode_response, result)
                )
            raise
        finally:
            stream.close()
        if result is None:
            raise PeerTransportError(f"{method.name}: the peer sent no response message")
        return result

    def _release_lost(self, response: object) -> None:
        # The call was given up as its response arrived whole: no RST_STREAM
        # goes out for an ended stream, so the peer thinks it delivered the
        # refs, and only this client can release them.
        if isinstance(response, SubWorkflowResponse):
            self._lost.release(response)

    def _headers_for(self, method: grpc.MethodSpec) -> tuple[tuple[bytes, bytes], ...]:
        headers = self._method_headers.get(method)
        if headers is None:
            headers = ((b":path", method.path.encode()), *self._base_headers)
            self._method_headers[method] = headers
        deadline = trio.current_effective_deadline()
        if deadline != math.inf:
            timeout = grpc.encode_grpc_timeout(deadline - trio.current_time())
            headers = (*headers, (b"grpc-timeout", timeout.encode()))
        trace = current_trace_context()
        if trace is not None:
            headers = (*headers, *trace_headers(trace))
        return headers

    @asynccontextmanager
    async def _call(self, method: grpc.MethodSpec, request: bytes) -> AsyncIterator[_Reader]:
        stream = await self._conn.open_stream(self._headers_for(method), body=encode_frame(request))
        async with stream:
            yield _Reader(stream, method, self._limits.max_message_size)


async def release_lost_refs(
    release: Callable[[str], Awaitable[bool]],
    ref_uuids: list[str],
    timeout: float,
    log: PeerLogger,
) -> None:
    """Release the refs of a response whose caller gave up on it as it arrived.

    A peer keeps the refs of a response it has sent; the caller, cancelled
    before it read them, never learns their ids. So the client that holds
    the response releases them, within ``timeout``. Failures are logged: the
    refs then stay until the peer drops them for another reason.
    """
    with trio.move_on_after(timeout) as waiting:
        try:
            for ref_uuid in ref_uuids:
                await release(ref_uuid)
        except PeerError as exc:
            log.warning("could not release the refs of a response nobody read: %s", exc)
    if waiting.cancelled_caught:
        log.warning("could not release the refs of a response nobody read within %gs", timeout)


@final
class LostRefs:
    """Releases, in the background, the refs of responses their callers gave up on.

    Args:
        release: releases one ref on the peer.
        timeout: bounds the releases of one response.
        log: the client's logger.
    """

    def __init__(
        self, release: Callable[[str], Awaitable[bool]], timeout: float, log: PeerLogger
    ) -> None:
        self._release = release
        self._timeout = timeout
        self._log = log
        self._nursery: trio.Nursery | None = None
        self._pending = 0
        self._done = trio.lowlevel.ParkingLot()

    def start(self, nursery: trio.Nursery) -> None:
        """Run the releases in ``nursery`` (the client's background tasks)."""
        self._nursery = nursery

    def release(self, response: SubWorkflowResponse) -> None:
        """Release the refs ``response`` hands out, in the background."""
        if response.remote_refs and self._nursery is not None:
            self._pending += 1
            self._nursery.start_soon(self._run, list(response.remote_refs))

    async def _run(self, ref_uuids: list[str]) -> None:
        try:
            await release_lost_refs(self._release, ref_uuids, self._timeout, self._log)
        finally:
            self._pending -= 1
            self._done.unpark_all()

    async def wait(self) -> None:
        """Wait for the releases under way (for the client's exit)."""
        while self._pending:
            await self._done.park()


def _decode_response(message: bytes | memoryview) -> SubWorkflowResponse:
    return decode_message(SubWorkflowResponse, message)


def _lost_response(
    method: grpc.MethodSpec,
    stream: ClientStream,
    decoder: FrameDecoder,
    decode: Callable[[bytes | memoryview], object],
    read: object = None,
) -> object:
    """The last message of a call whose stream ended well but was not read to its end.

    ``read`` is the last message already decoded, if any. None if the stream
    has not ended (the reset that cancelling sends then tells the peer) or
    ended in an error.
    """
    headers = stream.response_headers
    if not stream.remote_ended or headers is None or stream.reset_code is not None:
        return None
    try:
        _check_headers(method, headers)
        decoder.feed(stream.take_unread())
        while (message := decoder.next_message()) is not NEED_DATA:
            read = decode(message)
        decoder.end_of_stream()
        _raise_status(method, dict(stream.trailers or ()))
    except PeerError:
        return None
    return read


def deadline_scope(timeout: float | None) -> trio.CancelScope:
    """A cancel scope that expires after ``timeout`` seconds, or never for None."""
    if timeout is None:
        return trio.CancelScope()
    return trio.move_on_after(timeout)


@final
class _Payloads:
    """Iterates the payload chunks of a ``DerefSessionRef`` call."""

    def __init__(self, reader: _Reader) -> None:
        self._reader = reader

    def __aiter__(self) -> _Payloads:
        return self

    async def __anext__(self) -> bytes:
        return decode_message(DerefChunk, await self._reader.__anext__()).payload


@final
class _Reader:
    """Iterates one call's response messages, then checks its status.

    Explicit ``__anext__`` rather than an async generator: a caller may stop
    iterating early, and a half-run generator would be finalized only by the
    garbage collector.
    """

    def __init__(self, stream: ClientStream, method: grpc.MethodSpec, max_size: int) -> None:
        self._stream = stream
        self._method = method
        self._decoder = FrameDecoder(max_size)
        self._started = False
        self._finished = False

    def __aiter__(self) -> _Reader:
        return self

    def lost_response(self, decode: Callable[[bytes | memoryview], object]) -> object:
        """The last message left unread in a stream that has ended (see ``_lost_response``)."""
        return _lost_response(self._method, self._stream, self._decoder, decode)

    async def start(self) -> None:
        """Wait for the response headers (once); a refused call raises here."""
        if not self._started:
            self._started = True
            _check_headers(self._method, await self._stream.receive_headers())

    async def __anext__(self) -> memoryview:
        await self.start()
        while not self._finished:
            message = self._decoder.next_message()
            if message is not NEED_DATA:
                return message
            data = await self._stream.receive_data()
            if data:
                self._decoder.feed(bytes(data))
                continue
            self._finished = True
            self._decoder.end_of_stream()
            _raise_status(self._method, dict(self._stream.trailers or ()))
        raise StopAsyncIteration


def _check_headers(method: grpc.MethodSpec, received: Headers) -> None:
    headers = dict(received)
    if b"grpc-status" in headers:  # a trailers-only response: an error, or empty
        _raise_status(method, headers)
    status = headers.get(b":status", b"")
    if status != b"200":
        raise PeerTransportError(
            f"{method.name}: peer answered HTTP {status.decode('latin-1')}, not gRPC"
        )
    content_type = headers.get(b"content-type", b"")
    if content_type != _CONTENT_TYPE and not grpc.is_grpc_content_type(
        content_type.decode("latin-1")
    ):
        raise PeerTransportError(
            f"{method.name}: peer answered content-type {content_type!r}, not gRPC"
        )


def _raise_status(method: grpc.MethodSpec, trailers: dict[bytes, bytes]) -> None:
    raw = trailers.get(b"grpc-status")
    if raw is None:
        raise PeerTransportError(f"{method.name}: the response ended without a grpc-status")
    try:
        status = int(raw)
    except ValueError:
        raise PeerTransportError(f"{method.name}: malformed grpc-status {raw!r}") from None
    if status == 0:
        return
    message = grpc.decode_grpc_message(trailers.get(b"grpc-message", b""))
    details_raw = trailers.get(grpc.ERROR_DETAILS_TRAILER.encode())
    details = None
    if details_raw is not None:
        try:
            details = grpc.decode_bin_header(details_raw)
        except PeerError:
            details = None
    raise grpc.error_for_status(status, message, details)


@final
class StreamCall:
    """A running ``StreamSubWorkflow`` call: iterate it for events.

    Attributes:
        response: the final :class:`~peerflow.SubWorkflowResponse`, once the
            event stream has ended (None before).
    """

    def __init__(self, reader: _Reader, client: PeerClient) -> None:
        self._reader = reader
        self._client = client
        self.response: SubWorkflowResponse | None = None

    def __aiter__(self) -> StreamCall:
        return self

    async def _wait_started(self) -> None:
        # For PeerPool: a call refused before its answer began (REFUSED_STREAM,
        # GOAWAY, a trailers-only UNAVAILABLE) never started, so it may move on.
        await self._reader.start()

    async def __anext__(self) -> Event:
        while True:
            try:
                raw = await self._reader.__anext__()
            except StopAsyncIteration:
                if self.response is None:
                    raise PeerTransportError(
                        "StreamSubWorkflow ended without a final response"
                    ) from None
                raise
            message = decode_stream_message(raw)
            if isinstance(message, StreamEvent):
                return event_from_wire({"event_type": message.event_type, "data": message.data})
            self.response = message
            self._client._adopt(message)


@asynccontextmanager
async def open_client_over(
    transport: trio.abc.Stream,
    endpoint: Endpoint,
    node_id: str,
    *,
    token: str | None,
    limits: Limits,
    lease_ttl: float,
) -> AsyncIterator[PeerClient]:
    """Run a :class:`PeerClient` over an already-open transport (TCP, TLS, in-memory)."""
    with collapse_excgroups():
        async with AsyncExitStack() as stack:
            with for_node(node_id):  # the tasks that read and renew log for this node
                conn = await stack.enter_async_context(
                    open_h2_client(transport, limits.h2_settings(server=False))
                )
                client = PeerClient(
                    conn, endpoint, node_id, token=token, limits=limits, lease_ttl=lease_ttl
                )
                nursery = await stack.enter_async_context(trio.open_nursery())
                client._lost.start(nursery)
                await client._open_lease(client._root)
                if client._leases_supported:
                    nursery.start_soon(client._renew_leases)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client._lost.wait()  # each bounded by keepalive_timeout
                    nursery.cancel_scope.cancel()
                    await client._close_scope(client._root)


@asynccontextmanager
async def _open_client(
    endpoint: Endpoint,
    node_id: str,
    *,
    tls: ssl.SSLContext | None,
    token: str | None,
    limits: Limits,
    lease_ttl: float,
) -> AsyncIterator[PeerClient]:
    transport = await connect_tcp(
        endpoint.host, endpoint.port, ssl_context=tls, timeout=limits.handshake_timeout
    )
    alpn = transport.selected_alpn_protocol() if isinstance(transport, trio.SSLStream) else None
    if alpn not in (None, "h2"):
        # Without ALPN the peer tells HTTP/2 by its preface; with another
        # protocol agreed, it would answer the preface as that protocol.
        await trio.aclose_forcefully(transport)
        raise PeerTransportError(
            f"{endpoint.authority} chose {alpn} by ALPN; PeerClient speaks gRPC over HTTP/2: "
            'give it a TLS context offering "h2" (load_client_tls(...) does)'
        )
    async with open_client_over(
        transport, endpoint, node_id, token=token, limits=limits, lease_ttl=lease_ttl
    ) as client:
        yield client
