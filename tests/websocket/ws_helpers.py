"""Helpers for WebSocket tests: clients of a PeerServer over in-memory connections."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio
import trio.testing
import trio_websocket

from peerflow import Limits, PeerServer, WebSocketPeerClient
from peerflow._peer.client import Endpoint
from peerflow._peer.ws_client import open_websocket_client_over
from peerflow._transport.mapping import collapse_excgroups


@asynccontextmanager
async def memory_transport(server: PeerServer) -> AsyncIterator[trio.abc.Stream]:
    """The client end of an in-memory connection that ``server`` serves (MockClock friendly)."""
    with collapse_excgroups():  # a test sees the one error its client raised
        async with AsyncExitStack() as stack:
            if not server.running_now:
                await stack.enter_async_context(server.running())
            client_stream, server_stream = trio.testing.memory_stream_pair()
            nursery = await stack.enter_async_context(trio.open_nursery())
            nursery.start_soon(server.serve_stream, server_stream)
            yield client_stream
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_memory_client(
    server: PeerServer,
    node_id: str = "node-a",
    *,
    token: str | None = None,
    limits: Limits | None = None,
    lease_ttl: float = 30.0,
) -> AsyncIterator[WebSocketPeerClient]:
    async with (
        memory_transport(server) as transport,
        open_websocket_client_over(
            transport,
            Endpoint("http", "memory", 0),
            "",
            node_id,
            token=token,
            limits=limits or Limits(),
            lease_ttl=lease_ttl,
        ) as client,
    ):
        yield client


@asynccontextmanager
async def open_raw_websocket(
    server: PeerServer,
    *,
    subprotocols: list[str] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A bare trio-websocket client, for sending frames by hand."""
    async with memory_transport(server) as transport, trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(
            nursery,
            transport,  # type: ignore[arg-type]
            "memory",
            "/peerflow.peer.v1/ws",
            subprotocols=["peerflow.v1"] if subprotocols is None else subprotocols,
            extra_headers=[(b"x-peerflow-peer-node-id", b"raw"), *(headers or [])],
        )
        yield ws
        nursery.cancel_scope.cancel()
