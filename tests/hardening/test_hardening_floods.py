"""Peers that send far more than they take: header-block and control-frame floods, and a
streaming caller that stops reading.

Each must cost the server bounded memory and end with a clear reason, while
well-behaved peers are served as before. The network is a memory stream and
time is trio's MockClock, so every bound is checked exactly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import h2.errors
import hyperframe.frame
import pytest
import trio
import trio.testing
from hardening_raw import H2_PREFACE, header_block, parse_frames, raw_frame, settings_frame

from peerflow import (
    Context,
    Event,
    Limits,
    PeerServer,
    PeerTimeoutError,
    PeerTransportError,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)
from peerflow._transport.config import H2Settings
from peerflow._transport.h2conn import (
    H2ServerConnection,
    ServerStream,
    open_h2_client,
    serve_h2_connection,
)
from peerflow.testing import open_memory_peer

Codes = h2.errors.ErrorCodes

HEADERS, PING, CONTINUATION = 1, 6, 9
END_STREAM, END_HEADERS = 0x1, 0x4
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"a")]


async def _echo(stream: ServerStream) -> None:
    # Answers with the request body, and the size of its headers.
    body = await stream.receive_all()
    size = sum(len(name) + len(value) for name, value in stream.headers)
    stream.send_headers([(b":status", b"200"), (b"x-header-bytes", str(size).encode())])
    await stream.send_data(body, end_stream=True)


@asynccontextmanager
async def _served(
    settings: H2Settings,
) -> AsyncIterator[tuple[trio.testing.MemoryReceiveStream, trio.abc.Stream, H2ServerConnection]]:
    """An H2ServerConnection on one end of a lockstep pair: each send waits for a read.

    Yields the client's end and the connection. Lockstep streams have no
    buffer, so a side that stops reading stops the other side's sends, as
    TCP does once its windows fill.
    """
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        conn = await nursery.start(serve_h2_connection, server, _echo, settings)
        yield client, conn
        nursery.cancel_scope.cancel()


async def _read_all(stream: trio.abc.Stream, into: bytearray) -> None:
    while data := await stream.receive_some(65536):
        into += data


# --- CONTINUATION flood ---------------------------------------------------------


@pytest.mark.parametrize("frame_size", [16_384, 1024 * 1024])
async def test_a_continuation_flood_is_refused_once_the_block_passes_the_limit(
    frame_size: int, autojump_clock: trio.testing.MockClock
) -> None:
    # Before, the server buffered up to 64 CONTINUATION frames (64 MiB of
    # 1 MiB frames) and checked the block's size only at END_HEADERS.
    settings = H2Settings()
    flood = 8 * 1024 * 1024
    piece = 4096
    accepted = 0
    received = bytearray()
    async with _served(settings) as (client, conn), trio.open_nursery() as nursery:
        nursery.start_soon(_read_all, client, received)
        await client.send_all(H2_PREFACE + settings_frame())
        payload = b"\0" * frame_size
        frames = raw_frame(HEADERS, 0, 1, payload) + b"".join(
            raw_frame(CONTINUATION, 0, 1, payload) for _ in range(flood // frame_size)
        )
        try:
            # In small pieces, so that what the server read is known to 4 KiB.
            for start in range(0, len(frames), piece):
                await client.send_all(frames[start : start + piece])
                accepted += piece
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await conn.wait_closed()
    # The block's bound is four times max_header_list_size (HPACK's worst
    # case), and a frame that would pass it is refused from its header.
    assert accepted <= 4 * settings.max_header_list_size + 1024 + settings.read_size + piece
    (goaway,) = [f for f in parse_frames(received) if isinstance(f, hyperframe.frame.GoAwayFrame)]
    assert goaway.error_code == Codes.ENHANCE_YOUR_CALM
    assert b"header block" in goaway.additional_data or conn.closed


async def test_a_large_header_block_in_continuation_frames_is_still_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 40 KiB of headers, under max_header_list_size, over three frames.
    headers = [*REQUEST, (b"x-big", b"v" * 40_000)]
    block = header_block(headers)
    step = 16_384
    chunks = [block[i : i + step] for i in range(0, len(block), step)]
    assert len(chunks) == 3
    frames = raw_frame(HEADERS, END_STREAM, 1, chunks[0]) + b"".join(
        raw_frame(CONTINUATION, END_HEADERS if chunk is chunks[-1] else 0, 1, chunk)
        for chunk in chunks[1:]
    )
    received = bytearray()
    async with _served(H2Settings()) as (client, _), trio.open_nursery() as nursery:
        nursery.start_soon(_read_all, client, received)
        await client.send_all(H2_PREFACE + settings_frame() + frames)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    frames_back = parse_frames(received)
    assert not any(isinstance(f, hyperframe.frame.GoAwayFrame) for f in frames_back)
    assert any(isinstance(f, hyperframe.frame.HeadersFrame) for f in frames_back)


# --- control-frame flood from a peer that never reads ---------------------------


async def test_a_ping_flood_from_a_peer_that_never_reads_is_bounded_then_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Before, every PING's ACK was queued however far the peer was behind:
    # 32 MiB in 20 s, and the keepalive never fired on so "active" a peer.
    settings = H2Settings(
        write_buffer_size=64 * 1024, keepalive_interval=30.0, keepalive_timeout=20.0
    )
    ping = raw_frame(PING, 0, 0, b"flooding")
    batch = ping * 1000
    sent = 0
    peak = 0
    async with _served(settings) as (client, conn):
        start = trio.current_time()
        await client.send_all(H2_PREFACE + settings_frame())
        try:
            while sent < 200_000:  # 3.4 MB of PINGs; nothing is ever read
                await client.send_all(batch)
                sent += 1000
                peak = max(peak, conn.statistics().outbound_buffered_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await conn.wait_closed()
        elapsed = trio.current_time() - start
    # Reading stopped once the ACKs passed the write buffer: the queue holds
    # at most that plus the ACKs of one read, and TCP held the peer back.
    assert peak <= settings.write_buffer_size + settings.read_size + len(batch)
    assert sent * len(ping) < 4 * settings.write_buffer_size + 2 * len(batch)
    # Then the peer, silent since, is dropped by the keepalive.
    assert isinstance(conn._error, PeerTimeoutError)
    assert "keepalive" in str(conn._error)
    assert 50 <= elapsed < 51


async def test_a_client_that_reads_is_served_while_pinging_with_a_small_write_buffer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The server pauses its reads while its queue is full; a client that
    # reads its answers (and a large one, sent while its own body is still
    # going out) must never deadlock with it.
    settings = H2Settings(write_buffer_size=16 * 1024, initial_stream_window=2**20)
    body = bytes(range(256)) * 8192  # 2 MiB
    client_end, server_end = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_h2_connection, server_end, _echo, settings)
        async with open_h2_client(client_end, settings) as conn, trio.open_nursery() as pingers:
            for _ in range(50):
                pingers.start_soon(conn.ping)
            async with await conn.open_stream(REQUEST, body=body) as stream:
                headers = await stream.receive_headers()
                echoed = await stream.receive_all()
        nursery.cancel_scope.cancel()
    assert (b":status", b"200") in headers
    assert echoed == body


# --- a StreamSubWorkflow caller that stops reading -------------------------------


@attrs.define
class Chunk(Event, event_type="hardening.Chunk"):
    data: bytes


def _spewing_steps(produced: list[int]) -> StepRegistry:
    registry = StepRegistry()
    wf = Workflow("spew", registry=registry)

    @wf.step("spew", accepts=[StartEvent])
    async def spew(event: StartEvent, ctx: Context) -> StopEvent:
        ctx.refs.insert(b"held by the run", lifetime=RefLifetime.UNTIL_CONTEXT_DROP)
        for i in range(event.data):
            ctx.write_event_to_stream(Chunk(bytes([i % 256]) * 16_384))
            produced[0] += 1
            await trio.sleep(0.01)
        return StopEvent(result="done")

    @wf.step("echo", accepts=[StartEvent])
    async def echo(event: StartEvent, ctx: Context) -> StopEvent:
        return StopEvent(result=event.data)

    return registry


async def test_a_stream_caller_that_stops_reading_is_cut_at_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Before, flow control held the call, and every event the run went on
    # streaming, for as long as the connection lived.
    produced = [0]
    server = PeerServer(
        "node-hard", registry=_spewing_steps(produced), token=None, limits=Limits(request_timeout=5)
    )
    # A 64 KiB window: the server's sends block after four unread events.
    peer = open_memory_peer(server, limits=Limits(stream_window=65_536))
    async with peer as client, client.stream_sub_workflow("spew", ["spew"], 1_000_000) as call:
        await call.__anext__()
        await trio.sleep(10)  # the caller stops reading
        stopped_at = produced[0]
        assert 0 < stopped_at < 1000  # cut after about 5 s of 100 events/s
        await trio.sleep(10)
        assert produced[0] == stopped_at  # the run was cancelled
        assert len(server.refs) == 0  # and its refs purged
        # Other calls on the same connection go on.
        response = await client.invoke_sub_workflow("spew", ["echo"], "still-alive")
        assert response.result == "still-alive"
        # What was sent is still readable; then a typed error: the
        # stream was reset, since it may have ended inside a message.
        with pytest.raises(PeerTransportError, match="reset by the peer"):
            async for _ in call:
                pass
