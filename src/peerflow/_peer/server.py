"""PeerServer: serves registered steps to other machines over gRPC, HTTP/JSON and WebSocket."""

from __future__ import annotations

import ipaddress
import itertools
import ssl
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from typing import Final, NamedTuple, final

import trio

from .._engine.steps import StepRegistry
from .._refs.registry import SessionRefRegistry
from .._transport.h2conn import ServerStream
from .._transport.listener import PrefixedStream, handle_connection, serve_tcp
from .._transport.tls import peer_principal
from .auth import resolve_peer_token
from .calls import CallGate, ClosingConnection
from .grpc_server import GrpcHandler
from .http1_server import Http1Server
from .http_json import H2Exchange, JsonHandler
from .limits import Limits
from .logs import PeerLogger, for_node
from .service import PeerService
from .ws_server import WebSocketServer

__all__ = ["PeerAddress", "PeerServer"]

_FROM_ENV: Final = object()


class PeerAddress(NamedTuple):
    """Where a :class:`PeerServer` listens, as reported by ``nursery.start(server.serve, ...)``."""

    host: str
    port: int
    scheme: str = "http"

    @property
    def url(self) -> str:
        """The endpoint URI a :class:`~peerflow.PeerClient` connects to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@final
class PeerServer:
    """Runs sub-workflows for remote callers, from the steps registered on this node.

    Args:
        node_id: this node's stable id, stamped on every ref descriptor it
            hands out.
        registry: where requested step ids are looked up (default: the
            process-wide :class:`~peerflow.StepRegistry`).
        tls: an ``ssl.SSLContext`` from :func:`~peerflow.load_server_tls`;
            with a CA in it, clients must present certificates (mTLS).
        token: the bearer token every call must carry; defaults to
            ``PEERFLOW_PEER_TOKEN``. None turns token auth off.
        limits: the bounds the server enforces.

    Attributes:
        refs: the server's session-ref registry (inspect it in tests).

    Raises:
        ValueError: ``node_id`` is empty (a ref's origin could not be told).
        TypeError: ``node_id`` or ``token`` is not a str.
    """

    def __init__(
        self,
        node_id: str,
        *,
        registry: StepRegistry | None = None,
        tls: ssl.SSLContext | None = None,
        token: str | object | None = _FROM_ENV,
        limits: Limits | None = None,
    ) -> None:
        if not isinstance(node_id, str):
            raise TypeError(f"node_id must be a str, got {type(node_id).__name__}")
        if not node_id:
            raise ValueError("node_id cannot be empty: it names the origin of every ref")
        resolved = resolve_peer_token() if token is _FROM_ENV else token
        if resolved is not None and not isinstance(resolved, str):
            raise TypeError("token must be a str or None")
        self.node_id = node_id
        self._log = PeerLogger("server", node_id)
        self.limits = limits = limits or Limits()
        self.tls = tls
        self.token: str | None = resolved
        self.refs = SessionRefRegistry(
            node_id, capacity=limits.ref_capacity, per_owner_capacity=limits.refs_per_caller
        )
        self.service = PeerService(
            node_id,
            steps=StepRegistry.default() if registry is None else registry,
            refs=self.refs,
            limits=limits,
        )
        self._scopes: dict[object, Hashable] = {}
        self._scope_ids = itertools.count()
        self._nursery: trio.Nursery | None = None
        gate = CallGate(self.token, node_id=node_id)
        self._json = JsonHandler(self.service, limits, gate=gate)
        self._handler = GrpcHandler(
            self.service,
            limits,
            gate=gate,
            principal_of=self._principal_of,
            scope_of=self._scope_of,
            json_handler=self._serve_json_stream,
        )
        self._http1 = Http1Server(
            self._json,
            limits,
            node_id,
            principal_of=self._transport_principal,
            scope_for=self._scope_for,
            websocket=WebSocketServer(self.service, limits, gate=gate, scope_for=self._scope_for),
        )

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[PeerAddress] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until cancelled.

        Start it with ``address = await nursery.start(server.serve, host, port)``;
        port 0 picks an ephemeral port, and ``address`` tells which. On
        cancellation the server stops accepting and drains every connection,
        whatever its variant: new calls are refused (GOAWAY on HTTP/2, 503 on
        HTTP/1.1, an UNAVAILABLE error frame on a WebSocket), in-flight calls
        get ``limits.drain_grace`` seconds, then their nurseries are
        cancelled. It returns once every connection has closed.

        Raises:
            RuntimeError: the server is already running.
            PeerTransportError: the address cannot be bound.
        """
        async with self.running():
            assert self._nursery is not None
            with for_node(self.node_id):  # the listener's tasks log for this node
                addresses = await self._nursery.start(
                    lambda task_status: serve_tcp(
                        self._handler,
                        port,
                        host=host,
                        settings=self.limits.h2_settings(server=True),
                        ssl_context=self.tls,
                        http1_handler=self._http1,
                        max_connections=self.limits.max_connections,
                        task_status=task_status,
                    )
                )
            bound_host, bound_port = addresses[0]
            self._warn_if_open(bound_host)
            address = PeerAddress(bound_host, bound_port, "https" if self.tls else "http")
            self._log.info("serving on %s", address.url)
            task_status.started(address)
            await trio.sleep_forever()

    @property
    def running_now(self) -> bool:
        """Whether the server's background work is running (see :meth:`running`)."""
        return self._nursery is not None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the server's background work (lease expiry) for the block.

        :meth:`serve` does this itself. Use it directly to serve connections
        of your own with :meth:`serve_stream`.

        Raises:
            RuntimeError: the server is already running.
        """
        if self._nursery is not None:
            raise RuntimeError("this PeerServer is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with for_node(self.node_id):
                    await nursery.start(self.service.run_reaper)
                try:
                    yield
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # Only now: connections still draining need the nursery for their scopes.
            self._nursery = None

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one already-open connection, over any trio stream, until it ends.

        This is how a peer runs on a transport of your own (a Unix socket, an
        in-memory pair in tests). TLS, when configured, is negotiated on it.
        Cancelling it drains the connection as cancelling :meth:`serve` does.

        Raises:
            RuntimeError: the server is not running (see :meth:`running`).
        """
        if self._nursery is None:
            raise RuntimeError(
                "serve_stream needs a running server: use `async with server.running()`"
            )
        with for_node(self.node_id):
            await handle_connection(
                stream,
                self._handler,
                settings=self.limits.h2_settings(server=True),
                ssl_context=self.tls,
                http1_handler=self._http1,
            )

    def _warn_if_open(self, host: str) -> None:
        # TLS without required client certificates encrypts but identifies nobody.
        certificates_required = self.tls is not None and self.tls.verify_mode == ssl.CERT_REQUIRED
        if self.token is not None or certificates_required:
            return
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            self._log.warning(
                "listening on %s without a token or client certificates: anyone who "
                "can reach it can run its steps (set PEERFLOW_PEER_TOKEN, or require mTLS)",
                host,
            )

    async def _serve_json_stream(self, stream: ServerStream) -> None:
        # An HTTP/JSON request on HTTP/2, routed here by the gRPC handler.
        exchange = H2Exchange(stream, self.limits, self._principal_of(stream), self._scope_of)
        await self._json.serve(exchange)

    @classmethod
    def _principal_of(cls, stream: ServerStream) -> str | None:
        return cls._transport_principal(stream.connection.transport)

    @staticmethod
    def _transport_principal(transport: trio.abc.Stream) -> str | None:
        while isinstance(transport, PrefixedStream):
            transport = transport.stream
        if isinstance(transport, trio.SSLStream):
            return peer_principal(transport)
        return None

    def _scope_of(self, stream: ServerStream) -> Hashable:
        return self._scope_for(stream.connection)

    def _scope_for(self, conn: ClosingConnection) -> Hashable:
        # One scope per client connection, whatever its protocol, held until
        # the connection closes and then left to expire after a grace period.
        scope = self._scopes.get(conn)
        if scope is None:
            scope = ("conn", self.node_id, next(self._scope_ids))
            self._scopes[conn] = scope
            self.service.leases.hold(scope)
            assert self._nursery is not None
            self._nursery.start_soon(self._expire_when_closed, conn, scope)
        return scope

    async def _expire_when_closed(self, conn: ClosingConnection, scope: Hashable) -> None:
        try:
            await conn.wait_closed()
        finally:
            del self._scopes[conn]
            self.service.leases.expire_after(scope, self.limits.lease_grace)
