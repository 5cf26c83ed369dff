"""HTTP/JSON on HTTP/2 streams: the same routes beside gRPC, over an in-memory connection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from peer_steps import Probe, build_steps
from peerflow import Limits, PeerServer, PeerTransportError
from peerflow._transport.config import H2Settings
from peerflow._transport.h2conn import ClientStream, H2ClientConnection, open_h2_client

Headers = list[tuple[bytes, bytes]]


@pytest.fixture
def limits() -> Limits:
    return Limits(max_message_size=4096, request_timeout=5)


@asynccontextmanager
async def h2_connection(server: PeerServer) -> AsyncIterator[H2ClientConnection]:
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(server.running())
        client_stream, server_stream = trio.testing.memory_stream_pair()
        nursery = await stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(server.serve_stream, server_stream)
        async with open_h2_client(client_stream) as conn:
            yield conn
        nursery.cancel_scope.cancel()


def headers(method: str, content_type: bytes = b"application/json", **extra: str) -> Headers:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"peer"),
        (b":path", f"/peerflow.peer.v1/{method}".encode()),
        (b"content-type", content_type),
        (b"x-peerflow-peer-node-id", b"h2-json"),
        *((name.replace("_", "-").encode(), value.encode()) for name, value in extra.items()),
    ]


async def answer(stream: ClientStream) -> tuple[int, dict[bytes, bytes], bytes]:
    fields = dict(await stream.receive_headers())
    return int(fields[b":status"]), fields, await stream.receive_all()


async def call(
    conn: H2ClientConnection,
    method: str,
    body: Any,
    content_type: bytes = b"application/json",
) -> tuple[int, dict[bytes, bytes], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with await conn.open_stream(headers(method, content_type), body=data) as stream:
        return await answer(stream)


def invoke(step_ids: list[str], value: Any = None) -> dict[str, Any]:
    return {"v": 1, "workflow_name": "w", "step_ids": step_ids, "input": value}


async def test_json_and_grpc_share_one_connection(server: PeerServer) -> None:
    async with h2_connection(server) as conn:
        status, fields, body = await call(conn, "InvokeSubWorkflow", invoke(["echo"], [1]))
        assert (status, fields[b"content-type"]) == (200, b"application/json")
        assert json.loads(body)["result"] == [1]
        assert int(fields[b"content-length"]) == len(body)
        # A gRPC content type on a JSON path is a gRPC call with no such method.
        grpc = headers("InvokeSubWorkflow", b"application/grpc+msgpack", te="trailers")
        async with await conn.open_stream(grpc, end_stream=True) as stream:
            fields = dict(await stream.receive_headers())
            assert fields[b"grpc-status"] == b"12"


async def test_streaming_answers_are_ndjson(server: PeerServer, probe: Probe) -> None:
    probe.gate.set()
    async with h2_connection(server) as conn:
        status, fields, body = await call(conn, "StreamSubWorkflow", invoke(["progress"]))
        assert (status, fields[b"content-type"]) == (200, b"application/x-ndjson")
        lines = [json.loads(line) for line in body.splitlines()]
        assert [line["kind"] for line in lines] == ["event", "event", "response"]


async def test_limits_and_errors(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with h2_connection(server) as conn:
        status, _, body = await call(conn, "InvokeSubWorkflow", b"x" * 5000)
        assert (status, json.loads(body)["error"]["code"]) == (413, "limit")
        status, _, body = await call(conn, "InvokeSubWorkflow", invoke(["nope"]))
        assert (status, json.loads(body)["error"]["step_id"]) == (404, "nope")
        status, _, _ = await call(conn, "InvokeSubWorkflow", b"{}", b"text/plain")
        assert status == 415
        # A wrong verb is answered as on HTTP/1.1: 405, Allow and an error body.
        get = [(b":method", b"GET"), *headers("InvokeSubWorkflow")[1:]]
        async with await conn.open_stream(get, end_stream=True) as stream:
            status, fields, body = await answer(stream)
        assert (status, fields[b"allow"]) == (405, b"POST")
        assert json.loads(body)["error"]["code"] == "method_not_allowed"
        # A body that never ends: 408 after the request timeout.
        start = trio.current_time()
        async with await conn.open_stream(headers("InvokeSubWorkflow")) as stream:
            await stream.send_data(b'{"v": 1')
            status, _, body = await answer(stream)
        assert (status, json.loads(body)["error"]["code"]) == (408, "timeout")
        assert trio.current_time() - start == pytest.approx(5)
        # The connection is fine.
        status, _, _ = await call(conn, "InvokeSubWorkflow", invoke(["echo"], 1))
        assert status == 200


async def test_resetting_the_stream_cancels_the_run(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with h2_connection(server) as conn:
        data = json.dumps(invoke(["slow"], 100)).encode()
        async with await conn.open_stream(headers("InvokeSubWorkflow"), body=data):
            await probe.started.wait()
        # Leaving the block early sent RST_STREAM(CANCEL).
        await probe.stopped.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert len(server.refs) == 0
        assert server.refs.statistics().runs == 0


async def _read_into(stream: ClientStream, received: bytearray) -> None:
    while chunk := await stream.receive_data():
        received += chunk


async def test_a_stream_cut_mid_line_is_reset_not_ended_with_an_error_line(probe: Probe) -> None:
    # The caller's small window fills mid-line; its backlog then overflows.
    # An error line after the cut part would read as one garbled line, so the
    # stream is reset instead, as on gRPC.
    server = PeerServer("node-b", registry=build_steps(probe), limits=Limits(stream_backlog=8))
    settings = H2Settings(initial_stream_window=16 * 1024)
    received = bytearray()
    with trio.fail_after(10):
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(server.running())
            client_stream, server_stream = trio.testing.memory_stream_pair()
            nursery = await stack.enter_async_context(trio.open_nursery())
            nursery.start_soon(server.serve_stream, server_stream)
            conn = await stack.enter_async_context(open_h2_client(client_stream, settings))
            data = json.dumps(invoke(["chatty"], 200)).encode()
            async with await conn.open_stream(headers("StreamSubWorkflow"), body=data) as stream:
                assert (await stream.receive_headers())[0] == (b":status", b"200")
                await probe.stopped.wait()  # the peer gave up on the call
                with pytest.raises(PeerTransportError, match="reset by the peer"):
                    await _read_into(stream, received)
            nursery.cancel_scope.cancel()
    *lines, rest = bytes(received).split(b"\n")
    assert lines  # whole lines...
    assert rest  # ...then the part of the one that was cut
    assert all(json.loads(line)["kind"] == "event" for line in lines)
