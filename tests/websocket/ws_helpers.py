"""Helpers for WebSocket tests: clients of a PeerServer over in-memory connections, and frames.

The frames are for a bare trio-websocket client that sends and reads them by hand.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
import trio_websocket

from peerflow import Limits, PeerServer, WebSocketPeerClient
from peerflow._peer.client import Endpoint
from peerflow._peer.ws_client import open_websocket_client_over
from peerflow._wire.codec import encode_message
from peerflow._wire.envelopes import InvokeSubWorkflowRequest
from peerflow.testing import open_memory_connection


def client_over(
    transport: trio.abc.Stream,
    node_id: str = "node-a",
    *,
    token: str | None = None,
    limits: Limits | None = None,
    lease_ttl: float = 30.0,
) -> AbstractAsyncContextManager[WebSocketPeerClient]:
    """A WebSocketPeerClient over ``transport``, an in-memory connection to a peer."""
    return open_websocket_client_over(
        transport,
        Endpoint("http", "memory", 0),
        "",
        node_id,
        token=token,
        limits=limits or Limits(),
        lease_ttl=lease_ttl,
    )


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
        open_memory_connection(server) as transport,
        client_over(transport, node_id, token=token, limits=limits, lease_ttl=lease_ttl) as client,
    ):
        yield client


async def raw_websocket_over(
    nursery: trio.Nursery,
    transport: trio.abc.Stream,
    *,
    node_id: bytes = b"raw",
    subprotocols: list[str] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> trio_websocket.WebSocketConnection:
    """A bare trio-websocket client over ``transport``, its tasks in ``nursery``, handshake done."""
    return await trio_websocket.wrap_client_stream(
        nursery,
        transport,  # type: ignore[arg-type]
        "memory",
        "/peerflow.peer.v1/ws",
        subprotocols=["peerflow.v1"] if subprotocols is None else subprotocols,
        extra_headers=[(b"x-peerflow-peer-node-id", node_id), *(headers or [])],
    )


@asynccontextmanager
async def open_raw_websocket(
    server: PeerServer,
    *,
    subprotocols: list[str] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A bare trio-websocket client, for sending frames by hand."""
    async with open_memory_connection(server) as transport, trio.open_nursery() as nursery:
        ws = await raw_websocket_over(
            nursery, transport, subprotocols=subprotocols, headers=headers
        )
        yield ws
        nursery.cancel_scope.cancel()


# Frames by hand.


def call(frame_id: Any, method: str, body: bytes, **extra: Any) -> bytes:
    return msgpack.packb({"v": 1, "id": frame_id, "method": method, "body": body, **extra})


def invoke(step_ids: list[str], value: Any = None) -> bytes:
    return encode_message(InvokeSubWorkflowRequest("w", tuple(step_ids), value))


def invoke_call(frame_id: int, step_ids: list[str], value: Any = None) -> bytes:
    """An InvokeSubWorkflow call frame of workflow ``w``."""
    return call(frame_id, "InvokeSubWorkflow", invoke(step_ids, value))


async def frame(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    message = await ws.get_message()
    assert isinstance(message, bytes)
    decoded: dict[str, Any] = msgpack.unpackb(message)
    return decoded


async def close_reason(ws: trio_websocket.WebSocketConnection) -> trio_websocket.CloseReason:
    """The server's close, which must be the next thing it sends."""
    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
        await ws.get_message()
    assert closed.value.reason is not None
    return closed.value.reason
