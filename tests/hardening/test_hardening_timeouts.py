"""Slow and vanished clients: slowloris, half-open connections and readers that never read.

These need real sockets (the kernel's buffers and a silent peer are the
point), so they use small real timeouts and check elapsed time loosely.
"""

from __future__ import annotations

import time

import hyperframe.frame
import psutil
import pytest
import trio
import trio.testing
from hardening_raw import (
    DEREF,
    H2_PREFACE,
    RawH2Client,
    assert_good_call,
    grpc_headers,
    grpc_message,
    invoke_envelope,
    open_raw,
    parse_frames,
    read_until_eof,
    running_server,
    server_connections,
    settings_frame,
)

from peerflow import Limits, PeerAddress, PeerClient
from peerflow._transport.config import H2Settings
from peerflow._wire.grpc import Status

# --- 9. slowloris -----------------------------------------------------------------


async def _trickle(stream: trio.SocketStream, data: bytes, interval: float) -> None:
    for byte in data:
        try:
            await stream.send_all(bytes([byte]))
        except trio.BrokenResourceError:
            return
        await trio.sleep(interval)


@pytest.mark.parametrize(
    ("prompt", "trickled"),
    [
        pytest.param(b"", H2_PREFACE + settings_frame(), id="preface"),
        pytest.param(H2_PREFACE, settings_frame((4, 1 << 20)), id="settings-after-the-preface"),
    ],
)
async def test_a_slowloris_handshake_is_cut_at_the_handshake_timeout(
    prompt: bytes, trickled: bytes
) -> None:
    with trio.fail_after(10):
        async with running_server(Limits(handshake_timeout=0.5)) as (_, address):
            stream = await trio.open_tcp_stream(address.host, address.port)
            async with stream, trio.open_nursery() as nursery:
                start = time.monotonic()
                await stream.send_all(prompt)
                nursery.start_soon(_trickle, stream, trickled, 0.1)
                await assert_good_call(address)  # others are served meanwhile
                reply = await read_until_eof(stream)
                elapsed = time.monotonic() - start
                nursery.cancel_scope.cancel()
            # Cut without an answer: a client that never finished its
            # handshake gets no GOAWAY, only the server's own SETTINGS.
            assert not any(isinstance(f, hyperframe.frame.GoAwayFrame) for f in parse_frames(reply))
            assert 0.4 < elapsed < 2.5
            await assert_good_call(address)


async def test_a_trickled_request_body_does_not_hold_the_server_forever() -> None:
    limits = Limits(
        max_connections=1,
        request_timeout=0.5,
        handshake_timeout=0.5,
        idle_timeout=0.5,
        keepalive_interval=0.5,
        keepalive_timeout=0.5,
    )
    body = grpc_message(invoke_envelope(value="x" * 200))
    with trio.fail_after(10):
        async with running_server(limits) as (_, address), open_raw(address) as raw:
            await raw.pump()
            stream_id = await raw.request(body[:1], end_stream=False)
            served = False
            async with trio.open_nursery() as nursery:

                async def trickle() -> None:
                    for byte in body[1:]:
                        await trio.sleep(0.2)
                        raw.h2.send_data(stream_id, bytes([byte]))
                        await raw.flush()

                nursery.start_soon(trickle)
                with trio.move_on_after(3):
                    await assert_good_call(address)
                    served = True
                nursery.cancel_scope.cancel()
            assert served


# --- 10. a reader that never reads --------------------------------------------------


async def _big_ref(address: PeerAddress, size: int) -> str:
    # The raw client's node id, so that it owns the ref it derefs.
    async with PeerClient.connect(address.url, "node-raw", token=None) as client:
        response = await client.invoke_sub_workflow("hardening", ["big"], size)
    assert isinstance(response.result, str)
    return response.result


@pytest.mark.parametrize("window", ["default", "huge"])
async def test_a_client_that_never_reads_a_deref_costs_bounded_memory(window: str) -> None:
    size = 64 * 1024 * 1024
    write_buffer = H2Settings().write_buffer_size
    with trio.fail_after(30):
        async with running_server() as (server, address):
            ref = await _big_ref(address, size)
            rss_before = psutil.Process().memory_info().rss
            stream = await trio.open_tcp_stream(address.host, address.port)
            async with stream:
                raw = RawH2Client(stream)
                if window == "huge":
                    # Flow control lets everything through: only the socket,
                    # which nobody reads, holds the server back.
                    await raw.handshake(INITIAL_WINDOW_SIZE=2**31 - 1)
                    raw.h2.increment_flow_control_window(2**31 - 1 - 65535)
                else:
                    await raw.handshake()  # 64 KiB windows, never updated
                await raw.request(
                    grpc_message({"v": 1, "ref_uuid": ref}), headers=grpc_headers(DEREF)
                )
                # Let the server write all it can, until it is stuck.
                await trio.testing.wait_all_tasks_blocked(cushion=0.2)
                (conn,) = [c for c in server_connections(server) if not c.closed]
                stats = conn.statistics()
                assert stats.open_streams == 1
                growth = psutil.Process().memory_info().rss - rss_before
                if window == "default":
                    assert stats.outbound_buffered_bytes <= 65_535
                else:
                    assert stats.outbound_buffered_bytes <= write_buffer + 16_384 + 1024
                assert growth < size // 4, f"RSS grew by {growth} bytes"
                await assert_good_call(address)  # the stuck reader hurts nobody else
            # The reader hangs up: the server forgets the connection and its stream.
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert conn.closed
            assert conn.statistics().open_streams == 0
            assert conn not in server_connections(server)
            await assert_good_call(address)


# --- 11. half-open connections ------------------------------------------------------


async def test_a_silent_client_with_a_call_in_flight_is_dropped_by_keepalive() -> None:
    limits = Limits(keepalive_interval=0.5, keepalive_timeout=0.5, idle_timeout=60)
    with trio.fail_after(10):
        async with running_server(limits) as (server, address), open_raw(address) as raw:
            await raw.pump()
            stream_id = await raw.request(grpc_message(invoke_envelope(["sleep"], 30)))
            # From here on the client is gone without a FIN: it neither sends
            # nor acknowledges anything (the server's PINGs go unanswered).
            start = time.monotonic()
            await assert_good_call(address)
            reply = await read_until_eof(raw.stream)
            elapsed = time.monotonic() - start
            pings = [f for f in parse_frames(reply) if isinstance(f, hyperframe.frame.PingFrame)]
            assert pings, "the server never probed the silent client"
            assert 0.8 < elapsed < 3
            assert raw.responses[stream_id].grpc_status is None
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert server_connections(server) == []  # the call and its scope are gone
            await assert_good_call(address)


async def test_a_silent_idle_client_is_sent_away_by_the_idle_timeout() -> None:
    limits = Limits(keepalive_interval=None, idle_timeout=0.5)
    with trio.fail_after(10):
        async with running_server(limits) as (_, address), open_raw(address) as raw:
            start = time.monotonic()
            reply = await read_until_eof(raw.stream)
            elapsed = time.monotonic() - start
            goaways = [
                f for f in parse_frames(reply) if isinstance(f, hyperframe.frame.GoAwayFrame)
            ]
            assert [f.error_code for f in goaways] == [0]
            assert 0.4 < elapsed < 3
            await assert_good_call(address)


async def test_a_keepalive_answering_client_stays_connected() -> None:
    # The other side of the coin: a live but quiet client is not cut off.
    limits = Limits(keepalive_interval=0.2, keepalive_timeout=0.5, idle_timeout=60)
    with trio.fail_after(10):
        async with running_server(limits) as (_, address), open_raw(address) as raw:
            pings = 0
            while pings < 3:
                events = await raw.pump()
                pings += sum(type(e).__name__ == "PingReceived" for e in events)
            assert not raw.closed
            stream_id = await raw.request(grpc_message(invoke_envelope(value="later")))
            assert (await raw.wait_done(stream_id)).grpc_status == Status.OK
