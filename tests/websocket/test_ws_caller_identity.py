"""A WebSocket handshake must name the caller's node id, as every gRPC call must."""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket

from peerflow import PeerServer
from peerflow.testing import open_memory_connection


@pytest.mark.parametrize(
    "headers", [[], [(b"x-peerflow-peer-node-id", b"")]], ids=["missing", "empty"]
)
async def test_a_handshake_that_names_no_caller_is_refused(
    server: PeerServer, headers: list[tuple[bytes, bytes]]
) -> None:
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with open_memory_connection(server) as transport, trio.open_nursery() as nursery:
            await trio_websocket.wrap_client_stream(
                nursery,
                transport,  # type: ignore[arg-type]
                "memory",
                "/peerflow.peer.v1/ws",
                subprotocols=["peerflow.v1"],
                extra_headers=headers,
            )
    assert rejected.value.status_code == 400
    error = json.loads(rejected.value.body or b"{}")["error"]
    assert (error["code"], error["path"]) == ("encode", "x-peerflow-peer-node-id")
