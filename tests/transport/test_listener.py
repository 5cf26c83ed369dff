"""The TCP listener, connect helper and exception mapping, over real loopback sockets."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from h2_helpers import OK, REQUEST, TRAILERS, RawPeer, echo_handler

from peerflow._transport.config import H2Settings
from peerflow._transport.h2conn import H2ServerConnection, ServerStream, open_h2_client
from peerflow._transport.listener import PrefixedStream, connect_tcp, serve_tcp
from peerflow._transport.mapping import map_exceptions
from peerflow.errors import PeerTimeoutError, PeerTransportError


@asynccontextmanager
async def running_server(**kwargs: object) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(
            lambda task_status: serve_tcp(
                echo_handler, 0, host="127.0.0.1", task_status=task_status, **kwargs
            )
        )
        yield addresses[0][1]
        nursery.cancel_scope.cancel()


async def echo_over(port: int, body: bytes) -> bytes:
    stream = await connect_tcp("127.0.0.1", port)
    async with open_h2_client(stream) as client, await client.open_stream(REQUEST) as call:
        await call.send_data(body, end_stream=True)
        assert (await call.receive_headers())[0] == OK[0]
        data = await call.receive_all()
        assert call.trailers == TRAILERS
        return data


async def test_tcp_request_response() -> None:
    with trio.fail_after(10):
        async with running_server() as port:
            assert await echo_over(port, b"over real tcp") == b"over real tcp"


async def test_tcp_200_concurrent_streams_and_a_big_body() -> None:
    with trio.fail_after(30):
        async with running_server() as port:
            stream = await connect_tcp("127.0.0.1", port)
            async with open_h2_client(stream) as client:
                results: dict[int, bytes] = {}

                async def call(i: int) -> None:
                    async with await client.open_stream(REQUEST) as s:
                        await s.send_data(b"%d;" % i * 100, end_stream=True)
                        await s.receive_headers()
                        results[i] = await s.receive_all()

                async with trio.open_nursery() as nursery:
                    for i in range(200):
                        nursery.start_soon(call, i)
                assert results == {i: b"%d;" % i * 100 for i in range(200)}

                big = bytes(range(256)) * (64 * 1024 * 4)  # 64 MiB
                s = await client.open_stream(REQUEST)
                async with s, trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: s.send_data(memoryview(big), end_stream=True))
                    await s.receive_headers()
                    assert await s.receive_all() == big


async def test_a_fast_sender_waits_within_the_write_buffer_for_a_full_socket() -> None:
    limit = 256 * 1024
    piece = bytes(range(256)) * 1024  # 256 KiB
    pieces = 128
    connections: list[H2ServerConnection] = []

    async def producer(stream: ServerStream) -> None:
        connections.append(stream.connection)
        stream.send_headers(OK)
        for _ in range(pieces):
            await stream.send_data(piece)
        stream.send_trailers(TRAILERS)

    settings = H2Settings(write_buffer_size=limit)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            [(_, port)] = await nursery.start(
                lambda task_status: serve_tcp(
                    producer, 0, host="127.0.0.1", settings=settings, task_status=task_status
                )
            )
            # A raw client with windows larger than the whole body that stops
            # reading: only the server's write buffer can hold the sender back.
            peer = RawPeer(await connect_tcp("127.0.0.1", port), client_side=True)
            # Each piece fits one frame, so no piece is split by frame size.
            codes = h2.settings.SettingCodes
            peer.h2.local_settings = h2.settings.Settings(
                client=True,
                initial_values={
                    codes.INITIAL_WINDOW_SIZE: 2**31 - 1,
                    codes.MAX_FRAME_SIZE: 1024 * 1024,
                },
            )
            peer.h2.max_inbound_frame_size = 1024 * 1024
            peer.h2.initiate_connection()
            peer.h2.increment_flow_control_window(2**31 - 1 - 65535)
            peer.h2.send_headers(1, REQUEST, end_stream=True)
            await peer.flush()
            await trio.testing.wait_all_tasks_blocked()
            queued = connections[0].statistics().outbound_buffered_bytes
            assert 0 < queued <= limit + len(piece)
            received = bytearray()
            while not peer.closed:
                events = await peer.next_events()
                for event in events:
                    if isinstance(event, h2.events.DataReceived):
                        received += event.data
                        peer.h2.acknowledge_received_data(event.flow_controlled_length, 1)
                if any(isinstance(e, h2.events.StreamEnded) for e in events):
                    break
            await peer.stream.aclose()
            assert received == piece * pieces
            nursery.cancel_scope.cancel()


async def test_garbage_preface_is_closed_and_server_keeps_serving() -> None:
    with trio.fail_after(10):
        async with running_server() as port:
            async with await trio.open_tcp_stream("127.0.0.1", port) as garbage:
                await garbage.send_all(b"\x16\x03\x01 definitely not http\r\n\r\n")
                reply = b""
                while chunk := await garbage.receive_some():
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 400 ")
            assert await echo_over(port, b"others unaffected") == b"others unaffected"


async def test_a_failing_connection_handler_ends_its_connection_not_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(stream: trio.abc.Stream) -> None:
        raise KeyError("a bug in a handler")

    with trio.fail_after(10):
        async with running_server(http1_handler=broken) as port:
            async with await trio.open_tcp_stream("127.0.0.1", port) as conn:
                await conn.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                assert await conn.receive_some() == b""  # closed, unanswered
            assert await echo_over(port, b"others unaffected") == b"others unaffected"
    (record,) = [r for r in caplog.records if r.name == "peerflow.transport"]
    assert "connection handler failed" in record.getMessage()
    assert record.exc_info is not None


async def test_http1_request_gets_505() -> None:
    with trio.fail_after(10):
        async with running_server() as port:
            async with await trio.open_tcp_stream("127.0.0.1", port) as conn:
                await conn.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                reply = b""
                while chunk := await conn.receive_some():
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 505 ")
            assert b"HTTP/2" in reply


async def test_custom_http1_handler_sees_the_sniffed_bytes() -> None:
    seen: list[bytes] = []

    async def http1(stream: trio.abc.Stream) -> None:
        seen.append(await stream.receive_some())
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await stream.aclose()

    with trio.fail_after(10):
        async with (
            running_server(http1_handler=http1) as port,
            await trio.open_tcp_stream("127.0.0.1", port) as conn,
        ):
            await conn.send_all(b"GET /x HTTP/1.1\r\n\r\n")
            assert (await conn.receive_some()).startswith(b"HTTP/1.1 200 OK")
    assert seen[0].startswith(b"GET /x HTTP/1.1")


async def test_silent_connection_is_closed_after_handshake_timeout() -> None:
    with trio.fail_after(10):
        async with (
            running_server(settings=H2Settings(handshake_timeout=0.2)) as port,
            await trio.open_tcp_stream("127.0.0.1", port) as silent,
        ):
            assert await silent.receive_some() == b""


async def test_max_connections_makes_accept_wait() -> None:
    with trio.fail_after(10):
        async with running_server(max_connections=1) as port:
            first = await trio.open_tcp_stream("127.0.0.1", port)
            await first.send_all(b"PRI * HTTP/2.0\r\n")  # half a preface: holds its slot
            async with await trio.open_tcp_stream("127.0.0.1", port) as second:
                await second.send_all(b"GET / HTTP/1.1\r\n\r\n")
                with trio.move_on_after(0.3) as waited:
                    await second.receive_some()
                assert waited.cancelled_caught  # not served while the slot is taken
                await first.aclose()
                assert (await second.receive_some()).startswith(b"HTTP/1.1 505")


async def test_cancelling_serve_tcp_drains_in_flight_calls() -> None:
    release = trio.Event()

    async def slow(stream: ServerStream) -> None:
        await release.wait()
        await stream.send_response(OK, b"finished during drain", TRAILERS)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def run(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
                with scope:
                    await serve_tcp(slow, 0, host="127.0.0.1", task_status=task_status)

            [(_, port)] = await nursery.start(run)
            stream = await connect_tcp("127.0.0.1", port)
            async with open_h2_client(stream) as client:
                call = await client.open_stream(REQUEST, end_stream=True)
                await trio.sleep(0.05)
                scope.cancel()
                await trio.sleep(0.05)
                with pytest.raises(PeerTransportError, match="GOAWAY"):
                    await client.open_stream(REQUEST)
                release.set()
                await call.receive_headers()
                assert await call.receive_all() == b"finished during drain"


async def test_connection_refused_names_the_address() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with trio.fail_after(10), pytest.raises(PeerTransportError, match=f"127.0.0.1:{port}") as info:
        await connect_tcp("127.0.0.1", port)
    assert isinstance(info.value.__cause__, OSError)


async def test_prefixed_stream_replays_then_reads() -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = PrefixedStream(right, b"abcdef")
    await left.send_all(b"tail")
    assert await wrapped.receive_some(4) == b"abcd"
    assert await wrapped.receive_some() == b"ef"
    assert await wrapped.receive_some() == b"tail"
    await wrapped.send_all(b"back")
    assert await left.receive_some() == b"back"


def test_map_exceptions_table() -> None:
    with pytest.raises(PeerTimeoutError, match="doing x") as timeout, map_exceptions("doing x"):
        raise trio.TooSlowError
    assert isinstance(timeout.value.__cause__, trio.TooSlowError)
    with pytest.raises(PeerTransportError, match="doing y: broken"), map_exceptions("doing y"):
        raise trio.BrokenResourceError("broken")
    with pytest.raises(PeerTransportError), map_exceptions("z"):
        raise ConnectionResetError("reset")
    with pytest.raises(KeyError), map_exceptions("not ours"):
        raise KeyError("bug")
