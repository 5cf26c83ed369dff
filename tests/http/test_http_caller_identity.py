"""An HTTP/JSON call must name its caller's node id, as a gRPC call must."""

from __future__ import annotations

import pytest
from raw_http import invoke, memory_connection, post

from peer_steps import Probe
from peerflow import PeerServer


def without_node_id(raw: bytes) -> bytes:
    return raw.replace(b"x-peerflow-peer-node-id: raw\r\n", b"")


@pytest.mark.parametrize(
    "request_bytes",
    [
        without_node_id(post("InvokeSubWorkflow", invoke(["echo"], 1))),
        post("InvokeSubWorkflow", invoke(["echo"], 1), headers={"x-peerflow-peer-node-id": ""}),
    ],
    ids=["missing", "empty"],
)
async def test_a_call_that_names_no_caller_is_refused(
    server: PeerServer, probe: Probe, request_bytes: bytes
) -> None:
    async with memory_connection(server) as conn:
        reply = await conn.call(request_bytes)
        # The connection goes on serving calls that do name one.
        after = await conn.call(post("InvokeSubWorkflow", invoke(["echo"], 2)))
    assert (reply.status, reply.error_code) == (400, "encode")
    assert reply.json["error"]["path"] == "x-peerflow-peer-node-id"
    assert "node id" in reply.json["error"]["message"]
    assert after.json["result"] == 2
    assert probe.ran.count("echo") == 1


@pytest.mark.parametrize("token", ["s3cret"])
async def test_a_missing_token_is_reported_before_a_missing_node_id(server: PeerServer) -> None:
    async with memory_connection(server) as conn:
        reply = await conn.call(without_node_id(post("InvokeSubWorkflow", invoke(["echo"], 1))))
    assert (reply.status, reply.error_code) == (401, "auth")


@pytest.mark.parametrize("token", ["s3cret"])
@pytest.mark.parametrize(
    "request_bytes",
    [
        post("NoSuchMethod", {"v": 1}),
        b"GET /peerflow.peer.v1/InvokeSubWorkflow HTTP/1.1\r\nhost: p\r\n\r\n",
        post("InvokeSubWorkflow", invoke(["echo"]), content_type="text/plain"),
    ],
    ids=["unknown-route", "wrong-verb", "wrong-content-type"],
)
async def test_only_an_authenticated_caller_learns_about_routes(
    server: PeerServer, request_bytes: bytes
) -> None:
    # As on gRPC: the token first, so an unknown caller cannot map the routes.
    async with memory_connection(server) as conn:
        reply = await conn.call(request_bytes)
    assert (reply.status, reply.error_code) == (401, "auth")
