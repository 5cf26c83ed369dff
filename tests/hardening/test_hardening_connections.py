"""Bad connections: garbage, protocol errors, stream floods and absurd SETTINGS.

Each offending connection must get a clear answer (an HTTP/1.1 error, a
GOAWAY with the right code, a stream reset) and the server must keep serving
everyone else.
"""

from __future__ import annotations

import contextlib
import struct
import time

import h2.errors
import hyperframe.frame
import pytest
import trio
import trio.testing
from hardening_raw import (
    H2_PREFACE,
    FrameReader,
    RawH2Client,
    assert_good_call,
    build_steps,
    grpc_headers,
    grpc_message,
    header_block,
    invoke_envelope,
    open_raw,
    parse_frames,
    raw_frame,
    read_until_eof,
    running_server,
    server_connections,
    settings_frame,
)

from peerflow import Limits, PeerServer
from peerflow._wire.grpc import Status

Codes = h2.errors.ErrorCodes

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0,
    1,
    2,
    3,
    4,
    6,
    7,
    8,
    9,
)
END_STREAM, END_HEADERS = 0x1, 0x4


# --- 1. garbage instead of the preface -----------------------------------------


@pytest.mark.parametrize(
    ("garbage", "answer"),
    [
        (b"GET / HTTP/1.1\r\nHost: peer\r\n\r\n", b"HTTP/1.1 404 "),  # not a route
        (b"hello, is this the peer?\r\n\r\n", b"HTTP/1.1 400 "),
        (b"PRI * HTTP/2.0\r\n\r\nXY\r\n\r\n", b"HTTP/1.1 400 "),  # a broken preface
    ],
)
async def test_text_garbage_instead_of_the_preface_gets_an_http_error(
    garbage: bytes, answer: bytes
) -> None:
    with trio.fail_after(10):
        async with running_server() as (_, address):
            stream = await trio.open_tcp_stream(address.host, address.port)
            async with stream:
                await stream.send_all(garbage)
                reply = await read_until_eof(stream)
            assert reply.startswith(answer)
            assert b"connection: close" in reply
            await assert_good_call(address)


async def test_binary_garbage_instead_of_the_preface_is_refused_in_time() -> None:
    with trio.fail_after(10):
        async with running_server(Limits(handshake_timeout=0.5)) as (_, address):
            stream = await trio.open_tcp_stream(address.host, address.port)
            async with stream:
                await stream.send_all(bytes(range(256)) * 4)
                start = time.monotonic()
                reply = await read_until_eof(stream)
                elapsed = time.monotonic() - start
            # A 400 at once is best; at worst, silence until the handshake timeout.
            assert reply == b"" or reply.startswith(b"HTTP/1.1 400 ")
            assert elapsed < 2
            await assert_good_call(address)


# --- 2. protocol errors after a valid preface -----------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param(settings_frame(), None, id="empty-settings-is-fine"),
        pytest.param(
            raw_frame(SETTINGS, 0, 0, b"\0" * 5), Codes.FRAME_SIZE_ERROR, id="settings-5-bytes"
        ),
        pytest.param(raw_frame(PING, 0, 0, b"123"), Codes.FRAME_SIZE_ERROR, id="ping-3-bytes"),
        pytest.param(raw_frame(DATA, 0, 0, b"abc"), Codes.PROTOCOL_ERROR, id="data-on-stream-0"),
        pytest.param(raw_frame(DATA, 0, 7, b"abc"), Codes.PROTOCOL_ERROR, id="data-on-idle-stream"),
        pytest.param(
            raw_frame(HEADERS, END_HEADERS, 1, b"\xff" * 5), Codes.PROTOCOL_ERROR, id="bad-hpack"
        ),
        pytest.param(
            raw_frame(HEADERS, END_HEADERS, 2, header_block(grpc_headers())),
            Codes.PROTOCOL_ERROR,
            id="even-stream-id",
        ),
        pytest.param(
            raw_frame(CONTINUATION, END_HEADERS, 1, b""),
            Codes.PROTOCOL_ERROR,
            id="continuation-alone",
        ),
        pytest.param(
            raw_frame(HEADERS, 0, 1, header_block(grpc_headers()))
            + raw_frame(PING, 0, 0, b"8" * 8),
            Codes.PROTOCOL_ERROR,
            id="ping-inside-header-block",
        ),
        pytest.param(
            raw_frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), Codes.PROTOCOL_ERROR, id="window-update-0"
        ),
        pytest.param(
            raw_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1)),
            Codes.FLOW_CONTROL_ERROR,
            id="window-overflow",
        ),
        pytest.param(
            raw_frame(PRIORITY, 0, 1, struct.pack(">IB", 1, 5)),
            Codes.PROTOCOL_ERROR,
            id="priority-on-itself",
        ),
        pytest.param(
            raw_frame(RST_STREAM, 0, 9, struct.pack(">I", 8)),
            Codes.PROTOCOL_ERROR,
            id="rst-idle-stream",
        ),
        pytest.param(
            raw_frame(5, END_HEADERS, 1, b"\0\0\0\2"), Codes.PROTOCOL_ERROR, id="push-promise"
        ),
    ],
)
async def test_protocol_errors_end_only_the_offending_connection(
    frame: bytes, code: Codes | None
) -> None:
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            await raw.pump()  # the server's SETTINGS: our frame goes in a later read
            await raw.send_raw(frame)
            if code is None:
                await raw.ping()
                assert raw.goaway is None
                return
            await raw.wait_closed()
            assert raw.goaway is not None
            assert raw.goaway.error_code == code
            await assert_good_call(address)


async def test_unknown_frame_types_and_flags_are_ignored() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            await raw.send_raw(raw_frame(0x42, 0xFF, 1, b"extension"))
            await raw.send_raw(raw_frame(0xFA, 0xFF, 0, b""))
            await raw.send_raw(raw_frame(PING, 0xFE, 0, b"12345678"))  # unknown flags
            stream_id = await raw.request(grpc_message(invoke_envelope(value="through")))
            response = await raw.wait_done(stream_id)
            assert response.grpc_status == Status.OK
            assert raw.goaway is None


async def test_a_frame_over_max_frame_size_is_refused_from_its_header() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            await raw.pump()
            await raw.send_raw(struct.pack(">BHBBI", 0xFF, 0xFFFF, DATA, 0, 1) + b"x" * 1000)
            with trio.move_on_after(3):
                await raw.wait_closed()
            assert raw.goaway is not None
            assert raw.goaway.error_code == Codes.FRAME_SIZE_ERROR
            await assert_good_call(address)


async def test_a_protocol_error_sent_with_the_preface_closes_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = PeerServer("node-hard", registry=build_steps(), token=None)
    client_side, server_side = trio.testing.memory_stream_pair()
    async with server.running(), trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_side)
        raw = RawH2Client(client_side)
        raw.h2.initiate_connection()
        # One write (so the listener reads it all with the preface): preface,
        # SETTINGS and a frame that breaks the protocol. Then silence: no
        # SETTINGS ack, nothing that could trip the server a second time.
        await raw.send_raw(
            raw.h2.data_to_send() + raw_frame(PRIORITY, 0, 1, struct.pack(">IB", 1, 5))
        )
        with trio.fail_after(1):
            reply = await read_until_eof(client_side)
    goaways = [f for f in parse_frames(reply) if isinstance(f, hyperframe.frame.GoAwayFrame)]
    assert [f.error_code for f in goaways] == [Codes.PROTOCOL_ERROR]


async def test_the_preface_split_byte_by_byte_is_served() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, address):
            stream = await trio.open_tcp_stream(address.host, address.port)
            async with stream:
                raw = RawH2Client(stream)
                raw.h2.initiate_connection()
                for byte in raw.h2.data_to_send():
                    await raw.send_raw(bytes([byte]))
                stream_id = await raw.request(grpc_message(invoke_envelope(value=1)))
                assert (await raw.wait_done(stream_id)).grpc_status == Status.OK


# --- 8. too many streams at once -----------------------------------------------


async def test_10000_streams_at_once_get_refused_not_a_dead_server() -> None:
    block = header_block(grpc_headers())
    # HEADERS without END_STREAM: every stream stays open, waiting for its request.
    flood = b"".join(raw_frame(HEADERS, END_HEADERS, 2 * i + 1, block) for i in range(10_000))
    with trio.fail_after(20):
        async with running_server() as (_, address):
            stream = await trio.open_tcp_stream(address.host, address.port)
            async with stream:
                await stream.send_all(H2_PREFACE + settings_frame())
                reader = FrameReader(stream)
                sender_done = trio.Event()

                async def send_flood() -> None:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(flood)  # the server may hang up mid-flood
                    sender_done.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_flood)
                    refused: set[int] = set()
                    goaway: hyperframe.frame.GoAwayFrame | None = None
                    while not reader.closed:
                        for frame in await reader.frames():
                            if isinstance(frame, hyperframe.frame.GoAwayFrame):
                                goaway = frame
                            elif isinstance(frame, hyperframe.frame.RstStreamFrame):
                                refused.add(frame.stream_id)
                    await sender_done.wait()
            # The streams over the limit were refused one by one, or the
            # connection was ended with a GOAWAY naming what it processed.
            if goaway is not None:
                assert goaway.error_code in (Codes.PROTOCOL_ERROR, Codes.REFUSED_STREAM)
                assert goaway.last_stream_id <= 2 * 1000 + 1
            else:
                assert len(refused) >= 9_000
            assert reader.closed
            await assert_good_call(address)


async def test_streams_beyond_a_small_limit_are_refused_and_the_rest_served() -> None:
    limits = Limits(max_concurrent_streams=4)
    with trio.fail_after(10):
        async with running_server(limits) as (_, address), open_raw(address) as raw:
            await raw.pump()
            # Honest about the limit: four calls held open, then a fifth is refused.
            held = [
                await raw.request(grpc_message(invoke_envelope(["sleep"], 0.2)), end_stream=False)
                for _ in range(4)
            ]
            await raw.send_raw(
                raw_frame(HEADERS, END_HEADERS | END_STREAM, 11, header_block(grpc_headers()))
            )
            await raw.wait_closed()
            assert raw.goaway is not None
            assert raw.goaway.error_code in (Codes.PROTOCOL_ERROR, Codes.REFUSED_STREAM)
            assert raw.goaway.last_stream_id == held[-1]
            await assert_good_call(address)


# --- 12. RST_STREAM flood ---------------------------------------------------------


@pytest.mark.parametrize("budget", [100, 1_000_000])
async def test_a_rst_stream_flood_leaves_no_runs_and_others_are_served(budget: int) -> None:
    # With a small reset budget the flooder is cut off (refilling 100 a
    # second, 5,000 resets would take 49 s); with a huge one, every reset
    # stream must still be forgotten.
    block = header_block(grpc_headers())
    body = grpc_message(invoke_envelope(["sleep"], 30))
    streams = 5_000
    with trio.fail_after(30):
        async with running_server(Limits(reset_budget=budget)) as (server, address):
            stream = await trio.open_tcp_stream(address.host, address.port)
            async with stream:
                await stream.send_all(H2_PREFACE + settings_frame())
                reader = FrameReader(stream)
                for batch in range(0, streams, 500):
                    # Each stream starts a 30 s run, then is reset at once.
                    try:
                        await stream.send_all(
                            b"".join(
                                raw_frame(HEADERS, END_HEADERS, sid, block)
                                + raw_frame(DATA, END_STREAM, sid, body)
                                + raw_frame(RST_STREAM, 0, sid, struct.pack(">I", Codes.CANCEL))
                                for sid in range(2 * batch + 1, 2 * (batch + 500) + 1, 2)
                            )
                        )
                    except trio.BrokenResourceError:
                        break  # the reset budget ran out: GOAWAY, then closed
                    # Others are served while the flood goes on.
                    await assert_good_call(address, batch)
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(raw_frame(PING, 0, 0, b"flooding"))
                goaway = None
                while not reader.closed:
                    frames = await reader.frames()
                    if any(isinstance(f, hyperframe.frame.GoAwayFrame) for f in frames):
                        goaway = frames
                        break
                    if any(
                        isinstance(f, hyperframe.frame.PingFrame) and "ACK" in f.flags
                        for f in frames
                    ):
                        break
                assert (goaway is not None) == (budget < streams)
                if goaway is not None:
                    (frame,) = [f for f in goaway if isinstance(f, hyperframe.frame.GoAwayFrame)]
                    assert frame.error_code == Codes.ENHANCE_YOUR_CALM
                else:
                    # Every reset stream is forgotten: no handler, no run, no ref.
                    (conn,) = [c for c in server_connections(server) if not c.closed]
                    await trio.testing.wait_all_tasks_blocked()
                    assert conn.statistics().open_streams == 0
                    assert conn.statistics().inbound_buffered_bytes == 0
            assert len(server.refs) == 0
            await assert_good_call(address)


# --- 13. absurd SETTINGS ----------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "code"),
    [
        pytest.param([(5, 100)], Codes.PROTOCOL_ERROR, id="max-frame-size-below-16k"),
        pytest.param([(5, 2**24)], Codes.PROTOCOL_ERROR, id="max-frame-size-above-16m"),
        pytest.param([(4, 2**31)], Codes.FLOW_CONTROL_ERROR, id="initial-window-2**31"),
        pytest.param([(2, 2)], Codes.PROTOCOL_ERROR, id="enable-push-2"),
    ],
)
async def test_out_of_range_settings_get_goaway(pairs: list[tuple[int, int]], code: Codes) -> None:
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            await raw.pump()
            await raw.send_raw(settings_frame(*pairs))
            await raw.wait_closed()
            assert raw.goaway is not None
            assert raw.goaway.error_code == code
            await assert_good_call(address)


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param([(1, 0)], id="header-table-size-0"),
        pytest.param([(1, 2**32 - 1)], id="header-table-size-huge"),
        pytest.param([(3, 0)], id="max-concurrent-streams-0"),
        pytest.param([(6, 1)], id="max-header-list-size-1"),
        pytest.param([(8, 1)], id="enable-connect-protocol"),
        pytest.param([(0x99, 7), (0xFFFF, 2**32 - 1)], id="unknown-ids"),
        pytest.param([(5, 2**24 - 1), (4, 2**31 - 1)], id="largest-legal"),
    ],
)
async def test_odd_but_legal_settings_still_serve_calls(pairs: list[tuple[int, int]]) -> None:
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            await raw.pump()
            # Sent behind h2's back (it would refuse some), so tell its decoder
            # what table size the server may now use.
            await raw.send_raw(settings_frame(*pairs))
            raw.h2.decoder.max_allowed_table_size = max([v for k, v in pairs if k == 1] + [4096])
            raw.h2.decoder.max_header_list_size = 2**31
            stream_id = await raw.request(grpc_message(invoke_envelope(value="odd")))
            response = await raw.wait_done(stream_id)
            assert response.grpc_status == Status.OK
            assert raw.goaway is None
            await assert_good_call(address)


async def test_an_initial_window_of_zero_waits_for_window_updates() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, address), open_raw(address) as raw:
            await raw.pump()
            await raw.send_raw(settings_frame((4, 0)))
            stream_id = await raw.request(grpc_message(invoke_envelope(value="slow")))
            await raw.ping()
            await raw.ping()  # the server answered what it could: headers, no body
            response = raw.responses[stream_id]
            assert not response.done
            assert bytes(response.data) == b""
            await assert_good_call(address)  # meanwhile, others are served
            await raw.send_raw(raw_frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", 1 << 16)))
            response = await raw.wait_done(stream_id)
            assert response.grpc_status == Status.OK
