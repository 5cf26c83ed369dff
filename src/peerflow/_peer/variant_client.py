"""What the HTTP/JSON and WebSocket clients share: ref scopes held by leases, streamed calls.

Both clients bind the ``UNTIL_PARENT_FINISH`` refs their calls receive to a
scope (the client itself, or a ``ref_scope()`` block) exactly as
:class:`~peerflow.PeerClient` does (protocol/README.md section 5): a lease
on the peer, opened before the scope's first invoke, renewed every third of
its TTL, closed with the scope. A peer without the ``Lease`` method gets the
scope's refs released one by one instead.
"""

from __future__ import annotations

import abc
import contextvars
import math
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, Generic, TypeVar, final

import trio

from .._engine.events import Event, event_from_wire
from .._refs.descriptor import RefLifetime
from .._wire import grpc
from .._wire.codec import encode_message
from .._wire.envelopes import (
    DerefSessionRefRequest,
    ErrorDetails,
    InvokeSubWorkflowRequest,
    LeaseRequest,
    LeaseResponse,
    Message,
    ReleaseSessionRefRequest,
    ReleaseSessionRefResponse,
    StreamEvent,
    SubWorkflowResponse,
)
from ..errors import PeerError, PeerTimeoutError, PeerTransportError
from .client import Endpoint, deadline_scope, endpoint_of
from .logs import PeerLogger

__all__ = [
    "EventStreamCall",
    "MessageClient",
    "RefScope",
    "RefScopes",
    "UnimplementedError",
    "error_for_details",
    "parse_base_url",
    "status_for_http",
]

_PARENT = RefLifetime.UNTIL_PARENT_FINISH
M = TypeVar("M")
R = TypeVar("R")

#: Sends one Lease request; None means the peer does not implement ``Lease``.
LeaseCall = Callable[[LeaseRequest], Awaitable[LeaseResponse | None]]

# The codes the JSON and WebSocket variants send for the rows of section 4
# that gRPC reports by status alone.
_STATUS_FOR_CODE: Final = {
    "internal": grpc.Status.INTERNAL,
    "unimplemented": grpc.Status.UNIMPLEMENTED,
    "unavailable": grpc.Status.UNAVAILABLE,
    "cancelled": grpc.Status.CANCELLED,
}


# The gRPC status behind each HTTP status of section 4, for the statuses
# that mean something without error details (and 413/408/431, the HTTP
# spellings of a refused body or head).
_STATUS_FOR_HTTP: Final = {
    400: grpc.Status.INVALID_ARGUMENT,
    401: grpc.Status.UNAUTHENTICATED,
    404: grpc.Status.NOT_FOUND,
    408: grpc.Status.DEADLINE_EXCEEDED,
    412: grpc.Status.FAILED_PRECONDITION,
    413: grpc.Status.RESOURCE_EXHAUSTED,
    429: grpc.Status.RESOURCE_EXHAUSTED,
    431: grpc.Status.RESOURCE_EXHAUSTED,
    499: grpc.Status.CANCELLED,
    500: grpc.Status.INTERNAL,
    501: grpc.Status.UNIMPLEMENTED,
    503: grpc.Status.UNAVAILABLE,
    504: grpc.Status.DEADLINE_EXCEEDED,
}


def status_for_http(http_status: int) -> grpc.Status:
    """The gRPC status an HTTP/JSON (or WebSocket handshake) answer stands for."""
    return _STATUS_FOR_HTTP.get(http_status, grpc.Status.UNKNOWN)


def parse_base_url(url: str, *, websocket: bool = False) -> tuple[Endpoint, str]:
    """Split a base URL into the peer's endpoint and a path prefix (maybe empty).

    ``http`` and ``https`` are accepted, and with ``websocket`` also ``ws``
    and ``wss`` (the same as ``http`` and ``https``). A path is a prefix the
    routes hang under: a peer published under a path by a reverse proxy.

    Raises:
        PeerTransportError: the URL is not of that form.
    """
    if not isinstance(url, str):
        raise PeerTransportError(f"the URL must be a str, got {type(url).__name__}")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme
    if websocket:
        scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    if scheme not in ("http", "https"):
        accepted = "http://, https://, ws:// or wss://" if websocket else "http:// or https://"
        raise PeerTransportError(f"invalid URL {url!r}: the scheme must be {accepted}")
    if parts.query or parts.fragment:
        raise PeerTransportError(f"invalid URL {url!r}: no query or fragment allowed")
    return endpoint_of(parts, scheme, url, "URL"), parts.path.rstrip("/")


class UnimplementedError(PeerTransportError):
    """The peer does not implement the method (UNIMPLEMENTED, HTTP 501)."""


def error_for_details(
    status: grpc.Status | int, details: ErrorDetails | None, message: str
) -> PeerError:
    """The error a client raises for a failed call, from the section-4 table.

    ``details`` decide when they name a known error kind; otherwise the
    status does, as for gRPC. ``message`` stands in when there are no
    details.
    """
    if details is not None:
        status = _STATUS_FOR_CODE.get(details.code, status)
        message = details.message
    error = grpc.error_for_status(
        status, message, None if details is None else encode_message(details)
    )
    if status == grpc.Status.UNIMPLEMENTED and type(error) is PeerTransportError:
        return UnimplementedError(str(error))
    return error


@final
class RefScope:
    """One ref scope of a client: a lease on the peer plus the refs bound to it."""

    def __init__(self) -> None:
        self.lease_id = str(uuid.uuid4())
        self.refs: set[str] = set()
        self.opened = False
        self.lock = trio.Lock()


@final
class RefScopes:
    """A client's ref scopes: which one a call belongs to, and their leases.

    Args:
        lease: sends a Lease request to the peer.
        release: releases one ref on the peer (for peers without leases).
        lease_ttl: the TTL asked for; leases are renewed every third of it.
        goodbye_timeout: how long closing a scope may wait for the peer.
        log: the client's logger.
    """

    def __init__(
        self,
        *,
        lease: LeaseCall,
        release: Callable[[str], Awaitable[bool]],
        lease_ttl: float,
        goodbye_timeout: float,
        log: PeerLogger,
    ) -> None:
        self._lease = lease
        self._release = release
        self.lease_ttl = lease_ttl
        self._goodbye_timeout = goodbye_timeout
        self._log = log
        self.leases_supported = True
        self._open: dict[str, RefScope] = {}
        self.root = RefScope()
        self._current: contextvars.ContextVar[RefScope] = contextvars.ContextVar(
            f"peerflow-client-scope-{id(self)}", default=self.root
        )
        self._renewed_at = -math.inf

    def current(self) -> RefScope:
        """The scope that calls made by the current task belong to."""
        return self._current.get()

    async def lease_id_for(self, scope: RefScope) -> str | None:
        """Open ``scope``'s lease if that has not been done; return the id invokes carry.

        Raises:
            PeerError: the Lease call failed (other than by being unimplemented).
        """
        if not scope.opened:
            async with scope.lock:
                if not scope.opened:
                    if self.leases_supported:
                        await self._send_lease(LeaseRequest(scope.lease_id, self._ttl_ms()))
                    self._open[scope.lease_id] = scope
                    scope.opened = True
        return scope.lease_id if self.leases_supported else None

    def adopt(self, scope: RefScope, response: SubWorkflowResponse) -> None:
        """Bind the ``UNTIL_PARENT_FINISH`` refs of a response to ``scope``."""
        for ref_uuid, descriptor in response.remote_refs.items():
            if descriptor.lifetime is _PARENT:
                scope.refs.add(ref_uuid)

    def forget(self, ref_uuid: str) -> None:
        """A ref was released explicitly: no scope needs to release it again."""
        for scope in self._open.values():
            scope.refs.discard(ref_uuid)

    @asynccontextmanager
    async def ref_scope(self) -> AsyncIterator[None]:
        """Run the block in a new scope, closed (its refs released) when the block ends."""
        scope = RefScope()
        token = self._current.set(scope)
        try:
            yield
        finally:
            self._current.reset(token)
            with trio.CancelScope(shield=True):
                await self.close(scope)

    async def close(self, scope: RefScope) -> None:
        """Release a scope's refs on the peer: close its lease, or release them one by one.

        Failures are logged, not raised: the peer's lease expiry (or its
        connection grace period) reclaims what a failed goodbye leaves.
        """
        if self._open.pop(scope.lease_id, None) is None:
            return  # no call ever used it
        with trio.move_on_after(self._goodbye_timeout):
            try:
                if self.leases_supported:
                    await self._lease(LeaseRequest(scope.lease_id, 0, close=True))
                else:
                    for ref_uuid in list(scope.refs):
                        await self._release(ref_uuid)
            except PeerError as exc:
                self._log.warning("could not release the refs of a closing scope: %s", exc)

    async def renew_forever(self) -> None:
        """Renew every open lease each third of the TTL, until cancelled."""
        while True:
            await trio.sleep(self.lease_ttl / 3)
            await self.renew()

    async def renew_if_due(self) -> None:
        """Renew the open leases if a third of the TTL has passed since the last renewal.

        A client used without ``async with`` has no background task: its
        calls renew its leases instead.
        """
        if trio.current_time() - self._renewed_at >= self.lease_ttl / 3 and self._open:
            await self.renew()

    async def renew(self) -> None:
        """Renew every open lease now; failures are logged."""
        self._renewed_at = trio.current_time()
        if not self.leases_supported:
            return
        for scope in list(self._open.values()):
            try:
                await self._send_lease(LeaseRequest(scope.lease_id, self._ttl_ms()))
            except PeerError as exc:
                self._log.warning("lease renewal failed: %s", exc)

    async def _send_lease(self, request: LeaseRequest) -> None:
        if await self._lease(request) is None:
            # A minimal peer: refs are then released one by one at scope exit.
            self.leases_supported = False
        self._renewed_at = trio.current_time()

    def _ttl_ms(self) -> int:
        return int(self.lease_ttl * 1000)


@final
class EventStreamCall:
    """A running ``StreamSubWorkflow`` call of an HTTP/JSON or WebSocket client.

    It behaves as :class:`~peerflow.StreamCall` does: ``async for event in
    call`` yields the remote run's events as they happen; then
    :attr:`response` holds the final response.

    Attributes:
        response: the final :class:`~peerflow.SubWorkflowResponse`, once the
            event stream has ended (None before).
    """

    def __init__(
        self,
        receive: Callable[[], Awaitable[StreamEvent | SubWorkflowResponse | None]],
        adopt: Callable[[SubWorkflowResponse], None],
    ) -> None:
        self._receive = receive
        self._adopt = adopt
        self.response: SubWorkflowResponse | None = None

    def __aiter__(self) -> EventStreamCall:
        return self

    async def __anext__(self) -> Event:
        """The next event of the remote run.

        Raises:
            StopAsyncIteration: the run ended; :attr:`response` is set.
            PeerTransportError: the stream ended without a final response.
            PeerError: the call failed (the error the peer reported).
        """
        while True:
            message = await self._receive()
            if message is None:
                if self.response is None:
                    raise PeerTransportError("StreamSubWorkflow ended without a final response")
                raise StopAsyncIteration
            if isinstance(message, StreamEvent):
                if self.response is not None:
                    raise PeerTransportError("StreamSubWorkflow sent an event after its response")
                return event_from_wire({"event_type": message.event_type, "data": message.data})
            if self.response is not None:
                raise PeerTransportError("StreamSubWorkflow sent more than one response")
            self.response = message
            self._adopt(message)


def _timed_out(method: str, timeout: float | None) -> PeerTimeoutError:
    return PeerTimeoutError(f"{method} timed out after {timeout:g}s")


class MessageClient(abc.ABC, Generic[R]):
    """The :class:`~peerflow.PeerClient` methods, once for the HTTP/JSON and WebSocket clients.

    A subclass says how a message is written (:meth:`_encode`), how a call
    travels (:meth:`_unary`, :meth:`_open_call`) and how its answer reads
    (:meth:`_next_stream_message`, :meth:`_chunks`), with ``R`` the kind of
    open call it yields.
    """

    _scopes: RefScopes

    @staticmethod
    @abc.abstractmethod
    def _encode(message: Message) -> bytes:
        """The request body for ``message`` in this variant's encoding."""

    @abc.abstractmethod
    async def _unary(self, method: str, body: bytes, cls: type[M], timeout: float | None) -> M:
        """Make a call with exactly one answer message, of class ``cls``."""

    @abc.abstractmethod
    def _open_call(self, method: str, body: bytes) -> AbstractAsyncContextManager[R]:
        """Start a streamed call; leaving the block early cancels it."""

    @abc.abstractmethod
    async def _next_stream_message(self, call: R) -> StreamEvent | SubWorkflowResponse | None:
        """The next message of a ``StreamSubWorkflow`` answer, or None at its end."""

    @abc.abstractmethod
    def _chunks(self, call: R) -> AsyncIterator[bytes]:
        """The payloads of a ``DerefSessionRef`` answer."""

    async def _before_call(self) -> None:
        """Runs before each call (a client without a background task renews leases here)."""

    @asynccontextmanager
    async def ref_scope(self) -> AsyncIterator[None]:
        """Bind the ``UNTIL_PARENT_FINISH`` refs of calls made inside to this block.

        Leaving the block releases them on the peer. Calls made from tasks
        started inside the block belong to it too.
        """
        async with self._scopes.ref_scope():
            yield

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
            PeerEncodeError: ``input`` cannot travel in this variant (the
                path names the value).
            PeerTimeoutError: ``timeout`` passed first.
            PeerTransportError: the connection failed.
        """
        scope = self._scopes.current()
        # One deadline for all the call waits for: a lease opened (or
        # renewed) on the way counts against it too.
        with deadline_scope(timeout):
            body = await self._invoke_body(workflow_name, step_ids, input, timeout, scope)
            response = await self._unary("InvokeSubWorkflow", body, SubWorkflowResponse, None)
            self._scopes.adopt(scope, response)
            return response
        raise _timed_out("InvokeSubWorkflow", timeout)

    @asynccontextmanager
    async def stream_sub_workflow(
        self,
        workflow_name: str,
        step_ids: Iterable[str],
        input: Any = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[EventStreamCall]:
        """Run a sub-workflow and iterate its streamed events as they happen.

        ``async for event in call`` yields the remote run's events; then
        ``call.response`` holds the final response. Leaving the block early
        cancels the remote run.

        Raises:
            The same errors as :meth:`invoke_sub_workflow`.
        """
        scope = self._scopes.current()
        with deadline_scope(timeout) as timer:
            body = await self._invoke_body(workflow_name, step_ids, input, timeout, scope)
            async with self._open_call("StreamSubWorkflow", body) as call:
                yield EventStreamCall(
                    lambda: self._next_stream_message(call),
                    lambda message: self._scopes.adopt(scope, message),
                )
        if timer.cancelled_caught:
            raise _timed_out("StreamSubWorkflow", timeout)

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
        body = self._encode(DerefSessionRefRequest(ref_uuid))
        with deadline_scope(timeout) as timer:
            await self._before_call()
            async with self._open_call("DerefSessionRef", body) as call:
                yield self._chunks(call)
        if timer.cancelled_caught:
            raise _timed_out("DerefSessionRef", timeout)

    async def release_session_ref(self, ref_uuid: str, *, timeout: float | None = None) -> bool:
        """Release a remote ref; True if the peer found and dropped it."""
        body = self._encode(ReleaseSessionRefRequest(ref_uuid))
        with deadline_scope(timeout):
            await self._before_call()
            response = await self._unary("ReleaseSessionRef", body, ReleaseSessionRefResponse, None)
            self._scopes.forget(ref_uuid)
            return response.released
        raise _timed_out("ReleaseSessionRef", timeout)

    async def _invoke_body(
        self,
        workflow_name: str,
        step_ids: Iterable[str],
        input: Any,
        timeout: float | None,
        scope: RefScope,
    ) -> bytes:
        if isinstance(step_ids, str):
            raise TypeError("step_ids must be a list of step ids, not one str")
        await self._before_call()
        lease_id = await self._scopes.lease_id_for(scope)
        # What is left of the call's deadline once the lease is set up.
        deadline = trio.current_effective_deadline()
        return self._encode(
            InvokeSubWorkflowRequest(
                workflow_name,
                tuple(step_ids),
                input,
                timeout_ms=None
                if timeout is None
                else max(0, math.ceil((deadline - trio.current_time()) * 1000)),
                lease_id=lease_id,
            )
        )

    async def _lease(self, request: LeaseRequest) -> LeaseResponse | None:
        try:
            return await self._unary("Lease", self._encode(request), LeaseResponse, None)
        except UnimplementedError:
            return None
