"""The HTTP/2 driver, client against server in one process over memory streams."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import h2.errors
import h2.events
import hpack
import pytest
import trio
import trio.lowlevel
import trio.testing
from h2_helpers import OK, REQUEST, TRAILERS, RawPeer, connected, echo_handler
from hypothesis import given
from hypothesis import strategies as st

from peerflow._transport import h2conn
from peerflow._transport.config import H2Settings
from peerflow._transport.h2conn import (
    ErrorCodes,
    ServerStream,
    _CachingDecoder,
    _CachingEncoder,
    open_h2_client,
    serve_h2_connection,
)
from peerflow.errors import PeerTimeoutError, PeerTransportError, PeerUnavailableError


async def _raw_peer(*, as_client: bool) -> tuple[RawPeer, trio.abc.Stream]:
    """A RawPeer that has sent its preface, and the other end of its stream for the driver."""
    ours, theirs = trio.testing.memory_stream_pair()
    peer = RawPeer(ours, client_side=as_client)
    peer.h2.initiate_connection()
    await peer.flush()
    return peer, theirs


async def test_request_response_with_data_and_trailers() -> None:
    seen: list[ServerStream] = []

    async def handler(stream: ServerStream) -> None:
        seen.append(stream)
        body = await stream.receive_all()
        stream.send_headers([*OK, (b"content-type", b"application/grpc+msgpack")])
        await stream.send_data(body.upper())
        await stream.send_data(b"!")
        stream.send_trailers([(b"grpc-status", b"0"), (b"grpc-message", b"fine")])

    async with connected(handler) as (client, _), await client.open_stream(REQUEST) as stream:
        await stream.send_data(b"hello ")
        await stream.send_data(b"world", end_stream=True)
        headers = await stream.receive_headers()
        assert headers[0] == (b":status", b"200")
        assert await stream.receive_all() == b"HELLO WORLD!"
        assert stream.trailers == [(b"grpc-status", b"0"), (b"grpc-message", b"fine")]
    (request,) = seen
    assert request.path == b"/peerflow.test/Echo"
    assert request.method == b"POST"
    assert request.content_type == b"application/grpc+msgpack"
    assert request.authority == b"test"
    assert request.header(b"x-missing") is None
    assert request.stream_id == 1


async def test_send_response_without_trailers_and_headers_only() -> None:
    async def handler(stream: ServerStream) -> None:
        await stream.receive_all()
        if stream.path == b"/empty":
            await stream.send_response([(b":status", b"204")])
        else:
            await stream.send_response(OK, b"body")

    async with connected(handler) as (client, _):
        stream = await client.open_stream(REQUEST, end_stream=True)
        await stream.receive_headers()
        assert await stream.receive_all() == b"body"
        assert stream.trailers is None
        empty = [(k, b"/empty" if k == b":path" else v) for k, v in REQUEST]
        stream = await client.open_stream(empty, end_stream=True)
        assert (await stream.receive_headers())[0] == (b":status", b"204")
        assert await stream.receive_data() == b""


async def test_200_concurrent_streams_on_one_connection() -> None:
    active = 0
    peak = 0

    async def handler(stream: ServerStream) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        body = await stream.receive_all()
        await trio.lowlevel.checkpoint()
        active -= 1
        await stream.send_response(OK, body, TRAILERS)

    results: dict[int, bytes] = {}
    async with connected(handler) as (client, server):

        async def call(i: int) -> None:
            async with await client.open_stream(REQUEST) as stream:
                await stream.send_data(b"%d" % i * 50, end_stream=True)
                await stream.receive_headers()
                results[i] = await stream.receive_all()

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(call, i)
        await trio.testing.wait_all_tasks_blocked()
        assert client.statistics().open_streams == 0
        # h2 no longer prunes its stream table on its own below the stream
        # limit; the driver must, or every finished stream stays in memory.
        assert not client._h2.streams
        assert not server._h2.streams
    assert results == {i: b"%d" % i * 50 for i in range(200)}
    assert peak > 100  # they really overlapped on the one connection


async def test_flow_control_bounds_buffering_for_a_64mib_body() -> None:
    window = 64 * 1024
    settings = H2Settings(
        initial_stream_window=window, initial_connection_window=2 * window, max_frame_size=16384
    )
    total = 64 * 1024 * 1024
    gate = trio.Event()
    max_buffered = 0
    received = 0

    async def handler(stream: ServerStream) -> None:
        nonlocal max_buffered, received
        await gate.wait()
        while data := await stream.receive_data():
            max_buffered = max(max_buffered, stream.buffered_bytes + len(data))
            received += len(data)
        await stream.send_response(OK, b"done")

    payload = memoryview(bytes(total))
    async with connected(handler, server_settings=settings, client_settings=settings) as (
        client,
        server,
    ):
        stream = await client.open_stream(REQUEST)
        sent = trio.Event()

        async def sender() -> None:
            await stream.send_data(payload, end_stream=True)
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            # Nobody reads: the sender must stall once the window is full.
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()
            stats = server.statistics()
            assert stats.inbound_buffered_bytes == window
            gate.set()
            await stream.receive_headers()
            assert await stream.receive_all() == b"done"
    assert sent.is_set()
    assert received == total
    assert max_buffered <= window


async def test_unread_data_is_credited_back_when_the_stream_closes() -> None:
    # Each handler ignores the whole request body; without crediting it back
    # on close the connection window would run dry after a few calls.
    window = 64 * 1024
    settings = H2Settings(initial_stream_window=window, initial_connection_window=window)

    async def handler(stream: ServerStream) -> None:
        await trio.testing.wait_all_tasks_blocked()
        assert stream.buffered_bytes == window // 2
        await stream.send_response(OK, b"ignored your body")

    async with connected(handler, server_settings=settings) as (client, server):
        for _ in range(10):
            stream = await client.open_stream(REQUEST)
            await stream.send_data(bytes(window // 2))
            await stream.receive_headers()
            assert await stream.receive_all() == b"ignored your body"
            await stream.aclose()
        assert server.statistics().inbound_buffered_bytes == 0


async def test_client_reset_cancels_the_server_handler() -> None:
    cancelled = trio.Event()
    started = trio.Event()
    handler_streams: list[ServerStream] = []

    async def handler(stream: ServerStream) -> None:
        handler_streams.append(stream)
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with connected(handler) as (client, server):
        stream = await client.open_stream(REQUEST)
        await started.wait()
        stream.reset()
        await cancelled.wait()
        assert handler_streams[0].reset_code == ErrorCodes.CANCEL
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().open_streams == 0


async def test_client_cancellation_sends_rst_and_server_sees_it() -> None:
    cancelled = trio.Event()
    codes: list[int | None] = []

    async def handler(stream: ServerStream) -> None:
        try:
            await stream.receive_all()
        except PeerTransportError:
            codes.append(stream.reset_code)
            raise
        finally:
            cancelled.set()

    async with connected(handler) as (client, _):
        with trio.move_on_after(1):
            async with await client.open_stream(REQUEST) as stream:
                await stream.receive_headers()
        await cancelled.wait()
    assert codes in ([ErrorCodes.CANCEL], [])


async def test_server_reset_wakes_client_with_error() -> None:
    async def handler(stream: ServerStream) -> None:
        stream.reset(ErrorCodes.REFUSED_STREAM)

    async with connected(handler) as (client, _):
        stream = await client.open_stream(REQUEST, end_stream=True)
        with pytest.raises(PeerTransportError, match="REFUSED_STREAM"):
            await stream.receive_headers()
        assert stream.reset_code == ErrorCodes.REFUSED_STREAM
        # The connection is unaffected.
        other = await client.open_stream(REQUEST, end_stream=True)
        with pytest.raises(PeerTransportError):
            await other.receive_headers()


async def test_handler_exception_resets_only_its_stream(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(stream: ServerStream) -> None:
        if stream.path == b"/boom":
            raise RuntimeError("handler bug")
        await echo_handler(stream)

    boom = [(k, b"/boom" if k == b":path" else v) for k, v in REQUEST]
    async with connected(handler) as (client, _):
        bad = await client.open_stream(boom, end_stream=True)
        with pytest.raises(PeerTransportError, match="INTERNAL_ERROR"):
            await bad.receive_headers()
        good = await client.open_stream(REQUEST)
        await good.send_data(b"still fine", end_stream=True)
        await good.receive_headers()
        assert await good.receive_all() == b"still fine"
    assert "handler bug" in caplog.text


async def test_ping_measures_rtt_both_ways() -> None:
    async with connected() as (client, server):
        assert await client.ping() >= 0.0
        assert await server.ping() >= 0.0


async def test_graceful_close_lets_in_flight_streams_finish(autojump_clock: object) -> None:
    release = trio.Event()
    started = trio.Event()

    async def handler(stream: ServerStream) -> None:
        started.set()
        await release.wait()
        await stream.send_response(OK, b"late but complete", TRAILERS)

    async with connected(handler) as (client, server):
        stream = await client.open_stream(REQUEST, end_stream=True)
        await started.wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.aclose, 30.0)
            await trio.sleep(1)
            with pytest.raises(PeerTransportError, match="GOAWAY"):
                await client.open_stream(REQUEST)
            release.set()
            await stream.receive_headers()
            assert await stream.receive_all() == b"late but complete"
            assert stream.trailers == TRAILERS
        assert server.closed


async def test_graceful_close_cancels_stragglers_after_grace(autojump_clock: object) -> None:
    cancelled_at: list[float] = []

    async def handler(stream: ServerStream) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled_at.append(trio.current_time())

    async with connected(handler) as (client, server):
        stream = await client.open_stream(REQUEST, end_stream=True)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await server.aclose(grace_period=5.0)
        assert cancelled_at == [pytest.approx(start + 5.0)]
        # Reset, not just dropped with the connection: the client can tell
        # the call was cut off (gRPC clients report CANCELLED, not UNAVAILABLE).
        with pytest.raises(PeerTransportError, match="reset by the peer"):
            await stream.receive_headers()
        assert stream.reset_code == ErrorCodes.CANCEL


async def test_cancelling_serve_drains_gracefully(autojump_clock: object) -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    release = trio.Event()

    async def handler(stream: ServerStream) -> None:
        await release.wait()
        await stream.send_response(OK, b"drained")

    async with trio.open_nursery() as outer:
        server_scope = trio.CancelScope()

        async def run_server() -> None:
            with server_scope:
                await serve_h2_connection(server_side, handler)

        outer.start_soon(run_server)
        async with open_h2_client(client_side) as client:
            stream = await client.open_stream(REQUEST, end_stream=True)
            await trio.testing.wait_all_tasks_blocked()
            server_scope.cancel()
            await trio.sleep(1)
            release.set()
            await stream.receive_headers()
            assert await stream.receive_all() == b"drained"


async def test_max_concurrent_streams_makes_the_client_wait() -> None:
    settings = H2Settings(max_concurrent_streams=3)
    active = 0
    peak = 0

    async def handler(stream: ServerStream) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await trio.sleep(0.01)
        active -= 1
        await echo_handler(stream)

    async with connected(handler, server_settings=settings) as (client, _):

        async def call(i: int) -> None:
            async with await client.open_stream(REQUEST) as stream:
                await stream.send_data(b"x", end_stream=True)
                await stream.receive_headers()
                assert await stream.receive_all() == b"x"

        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(call, i)
    assert peak == 3


async def test_keepalive_declares_a_silent_peer_dead(autojump_clock: object) -> None:
    peer, client_side = await _raw_peer(as_client=False)
    settings = H2Settings(keepalive_interval=10.0, keepalive_timeout=5.0)
    async with open_h2_client(client_side, settings) as client:
        await peer.wait_for(h2.events.RemoteSettingsChanged)
        stream = await client.open_stream(REQUEST, end_stream=True)
        # The peer now stops reading and answering anything.
        start = trio.current_time()
        with pytest.raises(PeerTimeoutError, match="keepalive"):
            await stream.receive_headers()
        assert trio.current_time() - start == pytest.approx(15.0)
        assert client.closed
        # Nothing was sent: a call on the dead connection may go elsewhere.
        with pytest.raises(PeerUnavailableError, match="keepalive"):
            await client.open_stream(REQUEST)


async def test_keepalive_keeps_a_live_connection(autojump_clock: object) -> None:
    settings = H2Settings(keepalive_interval=1.0, keepalive_timeout=1.0)
    async with connected(client_settings=settings, server_settings=settings) as (client, _):
        await trio.sleep(60)
        stream = await client.open_stream(REQUEST)
        await stream.send_data(b"alive", end_stream=True)
        await stream.receive_headers()
        assert await stream.receive_all() == b"alive"


async def test_handshake_timeout_closes_a_silent_client(autojump_clock: object) -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    start = trio.current_time()
    await serve_h2_connection(server_side, echo_handler, H2Settings(handshake_timeout=3.0))
    assert trio.current_time() - start == pytest.approx(3.0)
    # The server wrote its SETTINGS, then closed its end.
    data = b""
    while chunk := await client_side.receive_some():
        data += chunk
    assert data  # SETTINGS (and nothing after a close)


async def test_idle_timeout_closes_an_unused_connection(autojump_clock: object) -> None:
    settings = H2Settings(idle_timeout=10.0)
    async with connected(server_settings=settings) as (client, server):
        stream = await client.open_stream(REQUEST)
        await trio.sleep(30)  # an open stream is not idle
        await stream.send_data(b"x", end_stream=True)
        await stream.receive_headers()
        await stream.receive_all()
        finished = trio.current_time()
        await server.wait_closed()
        assert trio.current_time() - finished == pytest.approx(10.0)
        with pytest.raises(PeerTransportError):
            await client.open_stream(REQUEST)


async def test_client_honours_goaway_last_stream_id() -> None:
    peer, client_side = await _raw_peer(as_client=False)
    async with open_h2_client(client_side) as client:
        first = await client.open_stream(REQUEST, end_stream=True)
        second = await client.open_stream(REQUEST, end_stream=True)
        requests = 0
        while requests < 2:
            events = await peer.next_events()
            requests += sum(isinstance(e, h2.events.RequestReceived) for e in events)
        # GOAWAY saying only stream 1 will be processed, then answer stream 1.
        goaway = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + (1).to_bytes(4, "big") + bytes(4)
        await peer.send_raw(goaway)
        with pytest.raises(PeerTransportError, match="safe to retry"):
            await second.receive_headers()
        with pytest.raises(PeerTransportError, match="GOAWAY"):
            await client.open_stream(REQUEST)
        peer.h2.send_headers(1, OK)
        peer.h2.send_data(1, b"finished after goaway", end_stream=True)
        await peer.flush()
        await first.receive_headers()
        assert await first.receive_all() == b"finished after goaway"


def _goaway(last_stream_id: int) -> bytes:
    return b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + last_stream_id.to_bytes(4, "big") + bytes(4)


async def test_client_finishes_a_stream_answered_in_the_same_read_as_goaway() -> None:
    peer, client_side = await _raw_peer(as_client=False)
    async with open_h2_client(client_side) as client:
        stream = await client.open_stream(REQUEST, end_stream=True)
        await peer.wait_for(h2.events.RequestReceived)
        # A draining server's GOAWAY and its last response often share a read.
        peer.h2.send_headers(1, OK)
        peer.h2.send_data(1, b"answered", end_stream=True)
        await peer.send_raw(_goaway(1) + peer.h2.data_to_send())
        await stream.receive_headers()
        assert await stream.receive_all() == b"answered"


async def test_body_queued_when_goaway_arrives_still_reaches_the_peer(
    autojump_clock: object,
) -> None:
    async def attempt() -> bytes:
        peer, client_side = await _raw_peer(as_client=False)
        async with open_h2_client(client_side) as client:
            stream = await client.open_stream(REQUEST)
            await peer.wait_for(h2.events.RequestReceived)
            await trio.testing.wait_all_tasks_blocked()
            # The GOAWAY becomes readable and the body is sent in one
            # scheduler step. h2 drops output it still holds when a GOAWAY
            # arrives, so a driver that defers writes to its writer task loses
            # the body whenever trio runs the reader first (the order is random).
            client_side.receive_stream.put_data(_goaway(1))
            await stream.send_data(b"body", end_stream=True)
            received = b""
            ended = False
            with trio.fail_after(1):
                while not ended:
                    for event in await peer.next_events():
                        if isinstance(event, h2.events.DataReceived):
                            received += event.data
                        ended = ended or isinstance(event, h2.events.StreamEnded)
                    assert not peer.closed
            return received

    for _ in range(10):
        assert await attempt() == b"body"


async def test_peer_vanishing_fails_waiting_streams() -> None:
    peer, client_side = await _raw_peer(as_client=False)
    async with open_h2_client(client_side) as client:
        stream = await client.open_stream(REQUEST, end_stream=True)
        await peer.wait_for(h2.events.RequestReceived)
        await peer.stream.aclose()
        with pytest.raises(PeerTransportError, match=r"closed the connection|connection lost"):
            await stream.receive_headers()


async def test_raw_headers_without_path_get_rst_protocol_error() -> None:
    peer, server_side = await _raw_peer(as_client=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_h2_connection, server_side, echo_handler)
        bad = [(k, v) for k, v in REQUEST if k != b":path"]
        peer.h2.send_headers(1, bad, end_stream=True)
        await peer.flush()
        reset = await peer.wait_for(h2.events.StreamReset)
        assert reset.stream_id == 1
        assert reset.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
        # The connection goes on serving good requests.
        peer.h2.send_headers(3, REQUEST)
        peer.h2.send_data(3, b"ok", end_stream=True)
        await peer.flush()
        response = await peer.wait_for(h2.events.DataReceived)
        assert response.data == b"ok"
        nursery.cancel_scope.cancel()


async def test_raw_oversized_header_list_is_refused() -> None:
    peer, server_side = await _raw_peer(as_client=True)
    settings = H2Settings(max_header_list_size=4096)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_h2_connection, server_side, echo_handler, settings)
        await peer.wait_for(h2.events.RemoteSettingsChanged)
        peer.h2.send_headers(1, [*REQUEST, (b"x-big", b"a" * 8000)], end_stream=True)
        await peer.flush()
        events = await peer.read_until_closed()
        assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events) or any(
            isinstance(e, h2.events.StreamReset) for e in events
        )
        nursery.cancel_scope.cancel()


async def test_raw_garbage_frame_gets_goaway_and_close() -> None:
    peer, server_side = await _raw_peer(as_client=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_h2_connection, server_side, echo_handler)
        await peer.wait_for(h2.events.RemoteSettingsChanged)
        # A DATA frame on stream 0 is a connection error.
        await peer.send_raw(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
        terminated = await peer.wait_for(h2.events.ConnectionTerminated)
        assert terminated.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
        await peer.read_until_closed()
        assert peer.closed


async def test_raw_data_for_reset_streams_is_credited() -> None:
    # The handler refuses each request at once; the peer's body then arrives
    # for a stream the server no longer tracks. Without crediting it the
    # 65535-byte connection window would overflow on the third stream.
    settings = H2Settings(initial_connection_window=65535, initial_stream_window=65535)

    async def handler(stream: ServerStream) -> None:
        if stream.path == b"/refuse":
            stream.reset(ErrorCodes.REFUSED_STREAM)
        else:
            await stream.send_response(OK, b"still serving")

    refuse = [(k, b"/refuse" if k == b":path" else v) for k, v in REQUEST]
    peer, server_side = await _raw_peer(as_client=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_h2_connection, server_side, handler, settings)
        await peer.wait_for(h2.events.RemoteSettingsChanged)
        for stream_id in (1, 3, 5):
            peer.h2.send_headers(stream_id, refuse)
            await peer.flush()
            await peer.wait_for(h2.events.StreamReset)
            # Hand-built DATA frame: h2 would not let us send on a reset stream.
            size = 30000
            header = size.to_bytes(3, "big") + b"\x00\x01" + stream_id.to_bytes(4, "big")
            await peer.send_raw(header + bytes(size))
        peer.h2.send_headers(7, REQUEST, end_stream=True)
        await peer.flush()
        data = await peer.wait_for(h2.events.DataReceived)
        assert data.data == b"still serving"
        nursery.cancel_scope.cancel()


async def test_raw_padded_prioritised_and_continued_frames_are_served() -> None:
    # The driver cuts plain DATA and single-frame HEADERS itself and leaves
    # every other shape to h2; each shape must still be served, and plain
    # frames after them must take the short path again.
    settings = H2Settings(max_frame_size=16384)
    peer, server_side = await _raw_peer(as_client=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_h2_connection, server_side, echo_handler, settings)
        await peer.wait_for(h2.events.RemoteSettingsChanged)
        peer.h2.send_headers(1, REQUEST, priority_weight=200)
        peer.h2.send_data(1, b"padded", end_stream=True, pad_length=7)
        # 20 KB of header values span a HEADERS and a CONTINUATION frame.
        peer.h2.send_headers(3, [*REQUEST, (b"x-long", b"v" * 20000)])
        peer.h2.send_data(3, b"continued", end_stream=True)
        peer.h2.send_headers(5, REQUEST)
        peer.h2.send_data(5, b"plain", end_stream=True)
        await peer.flush()
        bodies: dict[int, bytes] = {}
        while len(bodies) < 3:
            for event in await peer.next_events():
                if isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] = event.data
                    peer.h2.acknowledge_received_data(event.flow_controlled_length, 1)
            assert not peer.closed
        assert bodies == {1: b"padded", 3: b"continued", 5: b"plain"}
        nursery.cancel_scope.cancel()


async def test_raw_request_fed_one_byte_at_a_time() -> None:
    peer, server_side = await _raw_peer(as_client=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_h2_connection, server_side, echo_handler)
        await peer.wait_for(h2.events.RemoteSettingsChanged)
        peer.h2.send_headers(1, REQUEST)
        peer.h2.send_data(1, b"one byte at a time", end_stream=True)
        for byte in peer.h2.data_to_send():
            await peer.send_raw(bytes([byte]))
        response = await peer.wait_for(h2.events.DataReceived)
        assert response.data == b"one byte at a time"
        nursery.cancel_scope.cancel()


async def test_response_header_block_larger_than_a_frame_is_continued() -> None:
    long_value = b"w" * 40000

    async def handler(stream: ServerStream) -> None:
        await stream.receive_all()
        await stream.send_response([*OK, (b"x-long", long_value)], b"body", TRAILERS)

    client_settings = H2Settings(max_frame_size=16384)
    async with (
        connected(handler, client_settings=client_settings) as (client, _),
        await client.open_stream(REQUEST, body=b"") as stream,
    ):
        headers = await stream.receive_headers()
        assert (b"x-long", long_value) in headers
        assert await stream.receive_all() == b"body"
        assert stream.trailers == TRAILERS


async def test_raw_reset_budget_refills_then_cuts_off_a_flood(autojump_clock: object) -> None:
    async def sleeper(stream: ServerStream) -> None:
        await trio.sleep_forever()

    settings = H2Settings(reset_budget=5)
    peer, server_side = await _raw_peer(as_client=True)
    stream_ids = iter(range(1, 1000, 2))

    async def open_and_reset(count: int) -> None:
        for _ in range(count):
            stream_id = next(stream_ids)
            peer.h2.send_headers(stream_id, REQUEST)
            peer.h2.reset_stream(stream_id)
        await peer.flush()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_h2_connection, server_side, sleeper, settings)
        await peer.wait_for(h2.events.RemoteSettingsChanged)
        await open_and_reset(5)
        await trio.sleep(1)  # the budget refills by 5 a second
        await open_and_reset(5)
        assert peer.h2.ping(b"still ok") is None
        await peer.flush()
        await peer.wait_for(h2.events.PingAckReceived)
        await open_and_reset(6)
        terminated = await peer.wait_for(h2.events.ConnectionTerminated)
        assert terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        await peer.read_until_closed()
        nursery.cancel_scope.cancel()


async def test_an_early_answer_waits_for_the_rest_of_the_request(autojump_clock: object) -> None:
    # Answering before the request has ended must not cut off a client that
    # is still sending (curl 7.x drops the answer on RST_STREAM); one that
    # goes on too long is asked to stop with RST_STREAM(NO_ERROR).
    async def early(stream: ServerStream) -> None:
        await stream.send_response(OK, b"early", TRAILERS)

    peer, server_side = await _raw_peer(as_client=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_h2_connection, server_side, early)
        await peer.wait_for(h2.events.RemoteSettingsChanged)
        peer.h2.send_headers(1, REQUEST)
        peer.h2.send_data(1, b"first half")
        await peer.flush()
        await peer.wait_for(h2.events.TrailersReceived)
        peer.h2.send_data(1, b"second half", end_stream=True)
        await peer.flush()
        peer.h2.ping(b"no reset")
        await peer.flush()
        events = []
        while not any(isinstance(e, h2.events.PingAckReceived) for e in events):
            events += await peer.next_events()
        assert not any(isinstance(e, h2.events.StreamReset) for e in events)

        peer.h2.send_headers(3, REQUEST)
        await peer.flush()
        start = trio.current_time()
        reset = await peer.wait_for(h2.events.StreamReset)
        assert (reset.stream_id, reset.error_code) == (3, ErrorCodes.NO_ERROR)
        assert trio.current_time() - start == pytest.approx(1.0)
        nursery.cancel_scope.cancel()


def test_settings_reject_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        H2Settings(max_frame_size=1000)
    with pytest.raises(ValueError, match="initial_stream_window"):
        H2Settings(initial_stream_window=2**31)
    with pytest.raises(ValueError, match="keepalive_interval"):
        H2Settings(keepalive_interval=0)
    assert H2Settings().initial_stream_window == 16 * 1024 * 1024


_HEADER_POOL = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc+msgpack"),
    (b"grpc-status", b"0"),
    (b"grpc-message", b"one"),
    (b"grpc-message", b"two"),
    (b"x-long", b"v" * 300),
    (b"x-other", b"w" * 100),
]


_FIELDS = st.one_of(
    st.sampled_from(_HEADER_POOL),
    # A value that differs per call, as a call id does.
    st.integers(0, 30).map(lambda n: (b"x-call-id", b"%d" % n)),
    st.just(hpack.NeverIndexedHeaderTuple(b"authorization", b"secret")),
    st.just((b"authorization", b"secret")),
)


@given(
    st.lists(
        st.one_of(
            st.lists(_FIELDS, min_size=1, max_size=5),
            st.sampled_from([256, 512, 4096]),
        ),
        max_size=40,
    )
)
def test_cached_hpack_blocks_decode_like_a_plain_codec(steps: list[object]) -> None:
    # Repeated header lists hit the caches; table evictions (a 256-byte
    # table cannot hold x-long) and size changes must invalidate them. A
    # plain decoder fed the same blocks checks that the encoder's table
    # stays in step with what it announced.
    encoder, caching_decoder, plain_decoder = (
        _CachingEncoder(),
        _CachingDecoder(65536),
        hpack.Decoder(65536),
    )
    for step in steps:
        if isinstance(step, int):
            # hpack forgets a pending size update when set to the same size
            # twice; h2 only sets it when the peer's setting changes.
            if step != encoder.header_table_size:
                encoder.header_table_size = step
            continue
        assert isinstance(step, list)
        block = encoder.encode(list(step))
        for decoded in (
            caching_decoder.decode(block, raw=True),
            plain_decoder.decode(block, raw=True),
        ):
            assert decoded == step
            # Plain fields are never turned into never-indexed (sensitive) ones.
            for sent, got in zip(step, decoded, strict=True):
                if type(got) is hpack.NeverIndexedHeaderTuple:
                    assert type(sent) is hpack.NeverIndexedHeaderTuple


def test_hpack_indexes_a_field_from_its_second_use() -> None:
    encoder, decoder = _CachingEncoder(), hpack.Decoder()
    for call in range(3):
        decoder.decode(encoder.encode([(b"x-call-id", b"%d" % call), (b"x-app", b"same")]))
    # Only the repeated field made it into the table.
    assert decoder.header_table.dynamic_entries == deque([(b"x-app", b"same")])


def test_hpack_decoder_checks_the_whole_block_when_reusing_its_start() -> None:
    head = b"\x82\x86\x84"  # :method GET, :scheme http, :path / (42 + 43 + 38 bytes)
    size_update = b"\x3f\xe1\x1f"  # table size 4096
    literal = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(b"x-big", b"v" * 40)])
    for decoder in (_CachingDecoder(190), hpack.Decoder(190)):
        assert len(decoder.decode(head + b"\x87", raw=True)) == 4  # warms the reused start
        with pytest.raises(hpack.HPACKDecodingError, match="start of the block"):
            decoder.decode(head + size_update, raw=True)
        assert len(decoder.decode(literal, raw=True)) == 1  # 77 bytes alone fit
        with pytest.raises(hpack.OversizedHeaderListError):
            decoder.decode(head + literal, raw=True)


def _rst_stream_frame(stream_id: int) -> bytes:
    # Hand-built: h2 will not let a client reset a stream that has ended.
    return (
        b"\x00\x00\x04\x03\x00"
        + stream_id.to_bytes(4, "big")
        + int(ErrorCodes.CANCEL).to_bytes(4, "big")
    )


def _watched_handler(lost: list[int]) -> Callable[[ServerStream], Awaitable[None]]:
    """A handler whose response is watched: a stream counted lost is appended to ``lost``."""

    async def handler(stream: ServerStream) -> None:
        await stream.receive_all()
        await stream.send_response(OK, b"hands out refs", TRAILERS)
        stream.watch_delivery(lambda: lost.append(stream.stream_id))

    return handler


async def _reset_after_the_response(*, before_ack: bool) -> list[int]:
    """Serve one watched response to a raw client that resets the ended stream.

    Returns the stream ids whose response the server counted as lost.
    """
    lost: list[int] = []
    handler = _watched_handler(lost)

    peer, server_side = await _raw_peer(as_client=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_h2_connection, server_side, handler)
        await peer.wait_for(h2.events.RemoteSettingsChanged)
        peer.h2.send_headers(1, REQUEST, end_stream=True)
        await peer.flush()
        # Read the response and the PING after it, without answering yet.
        events: list[h2.events.Event] = []
        while not any(isinstance(event, h2.events.PingReceived) for event in events):
            events += peer.h2.receive_data(await peer.stream.receive_some(65536))
        assert any(isinstance(event, h2.events.StreamEnded) for event in events)
        if before_ack:
            await peer.send_raw(_rst_stream_frame(1))
            await peer.flush()  # the PING's ACK, after the reset
        else:
            await peer.flush()
            await trio.testing.wait_all_tasks_blocked()
            await peer.send_raw(_rst_stream_frame(1))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return lost


async def test_a_reset_of_an_ended_stream_before_the_ping_ack_counts_the_response_lost() -> None:
    assert await _reset_after_the_response(before_ack=True) == [1]


async def test_a_ping_ack_after_the_response_confirms_its_delivery() -> None:
    assert await _reset_after_the_response(before_ack=False) == []


async def test_watched_responses_are_confirmed_by_the_next_ping_ack() -> None:
    # Many calls, one fence at a time: every response is confirmed, and a
    # late reset of any of them then changes nothing.
    lost: list[int] = []

    async def handler(stream: ServerStream) -> None:
        body = await stream.receive_all()
        await stream.send_response(OK, body, TRAILERS)
        stream.watch_delivery(lambda: lost.append(stream.stream_id))

    async def call(n: int) -> None:
        async with await client.open_stream(REQUEST, body=b"%d" % n) as stream:
            await stream.receive_headers()
            assert await stream.receive_all() == b"%d" % n

    async with connected(handler) as (client, server):
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(call, n)
        await trio.testing.wait_all_tasks_blocked()
        assert not server._undelivered
        assert not server._fences
    assert lost == []


async def test_a_client_that_never_acks_pings_has_its_oldest_responses_counted_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Bounded memory: beyond the cap the oldest watches are dropped, and a
    # late reset for one of them then drops nothing (a leak rather than a loss).
    monkeypatch.setattr(h2conn, "_MAX_UNDELIVERED", 2)
    lost: list[int] = []
    handler = _watched_handler(lost)

    peer, server_side = await _raw_peer(as_client=True)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_h2_connection, server_side, handler)
        await peer.wait_for(h2.events.RemoteSettingsChanged)
        for stream_id in (1, 3, 5):
            peer.h2.send_headers(stream_id, REQUEST, end_stream=True)
        await peer.send_raw(peer.h2.data_to_send())  # no PING ack goes out from here on
        await trio.testing.wait_all_tasks_blocked()
        kept = sorted(server._undelivered)
        assert len(kept) == 2
        await peer.send_raw(b"".join(_rst_stream_frame(stream_id) for stream_id in (1, 3, 5)))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert sorted(lost) == kept  # the oldest watch was dropped: its reset changed nothing
