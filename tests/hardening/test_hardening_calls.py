"""Bad calls on a healthy connection: each gets a clear answer, and the server serves on."""

from __future__ import annotations

import h2.errors
import trio
from hardening_raw import (
    INVOKE,
    assert_good_call,
    grpc_headers,
    grpc_message,
    invoke_envelope,
    open_raw,
    prefix_only,
    raw_frame,
    running_server,
    server_connections,
)

from peerflow import Limits
from peerflow._wire.grpc import Status


async def test_headers_without_path_reset_the_stream_only() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            headers = [(k, v) for k, v in grpc_headers() if k != b":path"]
            refused = await raw.request(grpc_message(invoke_envelope()), headers=headers)
            response = await raw.wait_done(refused)
            assert response.reset_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
            assert response.headers is None
            # Only the stream failed: the same connection still carries calls.
            good = await raw.request(grpc_message(invoke_envelope(value="again")))
            assert (await raw.wait_done(good)).grpc_status == Status.OK
            assert raw.goaway is None
            await assert_good_call(address)


async def test_a_non_grpc_content_type_gets_http_415() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            stream_id = await raw.request(
                b'{"v": 1}', headers=grpc_headers(content_type=b"application/json")
            )
            response = await raw.wait_done(stream_id)
            assert response.http_status == 415
            assert b"application/grpc" in response.data
            assert response.grpc_status is None
            await assert_good_call(address)


async def test_a_truncated_message_is_invalid_argument() -> None:
    body = grpc_message(invoke_envelope())
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            for cut in (3, len(body) - 1):  # inside the prefix, then inside the body
                stream_id = await raw.request(body[:cut])
                response = await raw.wait_done(stream_id)
                assert response.grpc_status == Status.INVALID_ARGUMENT
                assert "stream ended inside a gRPC message" in response.grpc_message
                details = response.details
                assert details is not None
                assert details.code == "encode"
            await assert_good_call(address)


async def test_an_empty_request_is_invalid_argument() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            response = await raw.wait_done(await raw.request(b""))
            assert response.grpc_status == Status.INVALID_ARGUMENT
            assert "no message" in response.grpc_message
            await assert_good_call(address)


async def test_an_oversized_message_is_refused_from_its_prefix() -> None:
    limits = Limits(max_message_size=1024)
    announced = 10 * 1024 * 1024
    with trio.fail_after(10):
        async with running_server(limits) as (server, address), open_raw(address) as raw:
            # The prefix announces 10 MB; only 100 bytes follow, and the
            # stream stays open: the answer must not wait for the rest.
            stream_id = await raw.request(prefix_only(announced) + b"x" * 100, end_stream=False)
            response = await raw.wait_done(stream_id)
            assert response.grpc_status == Status.RESOURCE_EXHAUSTED
            assert f"{announced} bytes exceeds the limit of 1024" in response.grpc_message
            details = response.details
            assert details is not None
            assert details.code == "limit"
            (conn,) = server_connections(server)
            assert conn.statistics().inbound_buffered_bytes == 0
            # The client keeps sending the announced body regardless (raw DATA
            # frames, whatever the stream's state): the server drops it.
            for _ in range(4):
                await raw.send_raw(raw_frame(0, 0, stream_id, b"y" * 16_000))
            await raw.ping()
            await assert_good_call(address)
            assert conn.statistics().inbound_buffered_bytes == 0
            assert not conn.closed


async def test_a_message_just_under_the_limit_is_served() -> None:
    # The check above is on the right boundary: limit-sized messages pass.
    limits = Limits(max_message_size=1024)
    with trio.fail_after(10):
        async with running_server(limits) as (_, address), open_raw(address) as raw:
            envelope = invoke_envelope(value="")
            overhead = len(grpc_message(envelope)) - 5
            envelope["input"] = "z" * (1024 - overhead - 2)  # str8 header grows by 1 byte
            body = grpc_message(envelope)
            assert len(body) - 5 <= 1024
            response = await raw.wait_done(await raw.request(body))
            assert response.grpc_status == Status.OK


async def test_wrong_field_types_are_invalid_argument_naming_the_field() -> None:
    cases: dict[str, dict[str, object]] = {
        "step_ids": {"step_ids": 5},
        "step_ids[1]": {"step_ids": ["echo", 7]},
        "workflow_name": {"workflow_name": 3},
        "timeout_ms": {"timeout_ms": "soon"},
    }
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            for path, override in cases.items():
                stream_id = await raw.request(grpc_message({**invoke_envelope(), **override}))
                response = await raw.wait_done(stream_id)
                assert response.grpc_status == Status.INVALID_ARGUMENT, path
                assert response.grpc_message.startswith(f"{path}: expected ")
                details = response.details
                assert details is not None
                assert details.code == "encode"
                assert details.path == path
            await assert_good_call(address)


async def test_msgpack_that_is_not_a_map_is_invalid_argument() -> None:
    bodies = [b"\x00\x00\x00\x00\x01\xc1", grpc_message([1, 2]), grpc_message({1: 2})]
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            for body in bodies:
                response = await raw.wait_done(await raw.request(body))
                assert response.grpc_status == Status.INVALID_ARGUMENT, body
            await assert_good_call(address)


async def test_a_compressed_flag_is_invalid_argument() -> None:
    body = bytearray(grpc_message(invoke_envelope()))
    body[0] = 1
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            response = await raw.wait_done(await raw.request(bytes(body)))
            assert response.grpc_status == Status.INVALID_ARGUMENT
            assert "compressed" in response.grpc_message
            await assert_good_call(address)


async def test_two_messages_on_a_unary_call_are_invalid_argument() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            body = grpc_message(invoke_envelope()) * 2
            response = await raw.wait_done(await raw.request(body))
            assert response.grpc_status == Status.INVALID_ARGUMENT
            assert "exactly one message" in response.grpc_message
            await assert_good_call(address)


async def test_a_malformed_grpc_timeout_is_invalid_argument() -> None:
    headers = grpc_headers(INVOKE, extra=((b"grpc-timeout", b"soon"),))
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            stream_id = await raw.request(grpc_message(invoke_envelope()), headers=headers)
            response = await raw.wait_done(stream_id)
            assert response.grpc_status == Status.INVALID_ARGUMENT
            assert "grpc-timeout" in response.grpc_message
            await assert_good_call(address)


async def test_a_non_utf8_node_id_does_not_break_the_call() -> None:
    headers = grpc_headers(extra=((b"x-peerflow-peer-node-id", b"\xff\xfe"),))
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            stream_id = await raw.request(grpc_message(invoke_envelope()), headers=headers)
            response = await raw.wait_done(stream_id)
            assert response.grpc_status == Status.OK
            await assert_good_call(address)
