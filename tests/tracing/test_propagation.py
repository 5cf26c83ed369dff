"""traceparent travels on every variant, over real sockets, and on to the next peer.

The steps of tracing/conftest.py record the trace context they run in. The
OpenTelemetry API is installed here but no tracer provider is set, so peers
pass the context through unchanged; ``otel_api`` also runs the tests as if
the API were not installed.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
import trio
import trio_websocket
from tracing_helpers import VARIANTS, Recorder, open_client

from peerflow import PeerAddress, PeerClient, PeerPool, TraceContext, use_trace_context
from peerflow._transport.h2conn import open_h2_client
from peerflow._transport.listener import connect_tcp
from peerflow._wire.codec import decode_message, encode_message
from peerflow._wire.envelopes import InvokeSubWorkflowRequest, SubWorkflowResponse
from peerflow._wire.framing import encode_frame

TIMEOUT = 20
CONTEXT = TraceContext("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "rojo=1,congo=2")
INVALID_HEADERS = [
    pytest.param({"traceparent": "00-not-hex-01"}, id="malformed"),
    pytest.param({"traceparent": CONTEXT.traceparent.upper()}, id="uppercase"),
    pytest.param({"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"}, id="zero-trace"),
    pytest.param({"traceparent": CONTEXT.traceparent + "-" + "x" * 6000}, id="oversized"),
]


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_call_carries_the_callers_context(
    variant: str, otel_api: str, peer_b: PeerAddress, recorder: Recorder
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(variant, peer_b.url, "node-a") as client:
            with use_trace_context(CONTEXT):
                response = await client.invoke_sub_workflow("tracing", ["record"])
            untraced = await client.invoke_sub_workflow("tracing", ["record"])
    assert response.result == CONTEXT.traceparent
    assert untraced.result is None
    assert recorder.on("node-b") == [CONTEXT, None]


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_step_forwards_the_context_to_the_next_peer(
    variant: str, otel_api: str, peer_b: PeerAddress, peer_c: PeerAddress, recorder: Recorder
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(variant, peer_b.url, "node-a") as client:
            with use_trace_context(CONTEXT):
                response = await client.invoke_sub_workflow(
                    "tracing", ["forward"], {"variant": variant, "url": peer_c.url}
                )
    response.raise_for_error()
    # parent -> node-b -> node-c: one trace, passed through unchanged.
    assert recorder.on("node-b") == [CONTEXT]
    assert recorder.on("node-c") == [CONTEXT]
    assert response.result == CONTEXT.traceparent


async def test_streamed_calls_and_the_pool_carry_it_too(
    peer_b: PeerAddress, recorder: Recorder
) -> None:
    with trio.fail_after(TIMEOUT):
        async with PeerPool([peer_b.url], "node-a", token=None) as pool:
            with use_trace_context(CONTEXT):
                await pool.invoke_sub_workflow("tracing", ["record"])
        async with PeerClient.connect(peer_b.url, "node-a", token=None) as client:
            with use_trace_context(CONTEXT):
                async with client.stream_sub_workflow("tracing", ["record"]) as call:
                    assert [event async for event in call] == []
    assert recorder.on("node-b") == [CONTEXT, CONTEXT]


# -- from the wire, by hand ----------------------------------------------------------


def _invoke_body() -> bytes:
    return encode_message(InvokeSubWorkflowRequest("tracing", ("record",), None))


def _h2_headers(
    path: bytes, content_type: bytes, extra: dict[str, str]
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"peer"),
        (b":path", path),
        (b"content-type", content_type),
        (b"x-peerflow-peer-node-id", b"raw"),
        *((name.encode(), value.encode()) for name, value in extra.items()),
    ]


async def _grpc_call(address: PeerAddress, extra: dict[str, str]) -> Any:
    transport = await connect_tcp(address.host, address.port)
    async with open_h2_client(transport) as conn:
        headers = _h2_headers(
            b"/peerflow.peer.v1.Peer/InvokeSubWorkflow",
            b"application/grpc+msgpack",
            {"te": "trailers", **extra},
        )
        async with await conn.open_stream(headers, body=encode_frame(_invoke_body())) as stream:
            assert dict(await stream.receive_headers())[b":status"] == b"200"
            body = await stream.receive_all()
            assert dict(stream.trailers or ())[b"grpc-status"] == b"0"
    return decode_message(SubWorkflowResponse, body[5:]).result


async def _h2_json_call(
    address: PeerAddress, extra: dict[str, str], step: str = "record", value: Any = None
) -> Any:
    transport = await connect_tcp(address.host, address.port)
    async with open_h2_client(transport) as conn:
        headers = _h2_headers(b"/peerflow.peer.v1/InvokeSubWorkflow", b"application/json", extra)
        body = json.dumps({"v": 1, "workflow_name": "t", "step_ids": [step], "input": value})
        async with await conn.open_stream(headers, body=body.encode()) as stream:
            assert dict(await stream.receive_headers())[b":status"] == b"200"
            return json.loads(await stream.receive_all())["result"]


async def _http1_call(address: PeerAddress, extra: dict[str, str]) -> Any:
    body = json.dumps({"v": 1, "workflow_name": "t", "step_ids": ["record"], "input": None})
    head = [
        "POST /peerflow.peer.v1/InvokeSubWorkflow HTTP/1.1",
        "host: peer",
        "content-type: application/json",
        "x-peerflow-peer-node-id: raw",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in extra.items()),
    ]
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n" + body).encode())
        answer = b""
        while data := await stream.receive_some():
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 200"), answer[:200]
    return json.loads(rest.partition(b"\r\n\r\n")[2])["result"]


async def _websocket_call(address: PeerAddress, extra: dict[str, str]) -> Any:
    async with trio_websocket.open_websocket(
        address.host,
        address.port,
        "/peerflow.peer.v1/ws",
        use_ssl=False,
        subprotocols=["peerflow.v1"],
        extra_headers=[(b"x-peerflow-peer-node-id", b"raw")],
    ) as ws:
        frame = {"v": 1, "id": 1, "method": "InvokeSubWorkflow", "body": _invoke_body(), **extra}
        await ws.send_message(msgpack.packb(frame))
        reply = msgpack.unpackb(await ws.get_message())
    assert "body" in reply, reply
    return decode_message(SubWorkflowResponse, reply["body"]).result


RAW_CALLS = [
    pytest.param(_grpc_call, id="grpc"),
    pytest.param(_h2_json_call, id="http-json-h2"),
    pytest.param(_http1_call, id="http-json-h1.1"),
    pytest.param(_websocket_call, id="websocket"),
]


@pytest.mark.parametrize("call", RAW_CALLS)
async def test_a_traceparent_from_the_wire_reaches_the_step(
    call: Any, peer_b: PeerAddress, recorder: Recorder
) -> None:
    later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
    with trio.fail_after(TIMEOUT):
        assert await call(peer_b, {"traceparent": later, "tracestate": "rojo=1,congo=2"}) == (
            CONTEXT.traceparent
        )
        # A tracestate past the limit is dropped; the traceparent still counts.
        await call(peer_b, {"traceparent": CONTEXT.traceparent, "tracestate": "a=" + "b" * 600})
    assert recorder.on("node-b") == [CONTEXT, TraceContext(CONTEXT.traceparent)]


async def test_http_json_on_http2_forwards_the_context_too(
    peer_b: PeerAddress, peer_c: PeerAddress, recorder: Recorder
) -> None:
    # No peerflow client speaks HTTP/JSON on HTTP/2: the caller here is raw h2.
    headers = {"traceparent": CONTEXT.traceparent, "tracestate": "rojo=1,congo=2"}
    with trio.fail_after(TIMEOUT):
        result = await _h2_json_call(
            peer_b, headers, "forward", {"variant": "grpc", "url": peer_c.url}
        )
    assert result == CONTEXT.traceparent
    assert recorder.on("node-b") == recorder.on("node-c") == [CONTEXT]


@pytest.mark.parametrize("call", RAW_CALLS)
@pytest.mark.parametrize("extra", INVALID_HEADERS)
async def test_an_invalid_traceparent_is_ignored_and_the_call_succeeds(
    call: Any, extra: dict[str, str], peer_b: PeerAddress, recorder: Recorder
) -> None:
    with trio.fail_after(TIMEOUT):
        assert await call(peer_b, {**extra, "tracestate": "rojo=1"}) is None
    assert recorder.on("node-b") == [None]


async def test_a_mistyped_traceparent_in_a_websocket_frame_is_ignored(
    peer_b: PeerAddress, recorder: Recorder
) -> None:
    with trio.fail_after(TIMEOUT):
        extra: Any = {"traceparent": CONTEXT.traceparent.encode(), "tracestate": 5}
        assert await _websocket_call(peer_b, extra) is None
    assert recorder.on("node-b") == [None]


async def test_keep_alive_requests_do_not_inherit_a_previous_context(
    peer_b: PeerAddress, recorder: Recorder
) -> None:
    # One HTTP/1.1 connection serves both calls, in the same server task.
    with trio.fail_after(TIMEOUT):
        async with open_client("http", peer_b.url, "node-a") as client:
            with use_trace_context(CONTEXT):
                await client.invoke_sub_workflow("tracing", ["record"])
            await client.invoke_sub_workflow("tracing", ["record"])
    assert recorder.on("node-b") == [CONTEXT, None]
