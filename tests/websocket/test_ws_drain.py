"""A WebSocket drains when the server shuts down: calls in flight finish, new ones are refused.

The server is a ``memory_peer``: shutting it down starts its drain, and
MockClock makes the grace period exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trio_websocket
from ws_helpers import client_over, close_reason, frame, invoke_call, raw_websocket_over

from memory_peer import MemoryPeer, assert_no_trace, memory_peer, shutting_down_once_started
from peer_steps import Probe
from peerflow import Limits, PeerServer, PeerTransportError, PeerUnavailableError
from peerflow._wire.codec import decode_message
from peerflow._wire.envelopes import ErrorDetails

GRACE = 5.0
GOING_AWAY = 1001


@pytest.fixture
def limits() -> Limits:
    return Limits(drain_grace=GRACE)


@asynccontextmanager
async def raw_websocket(peer: MemoryPeer) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    async with trio.open_nursery() as nursery:
        ws = await raw_websocket_over(nursery, peer.connect())
        yield ws
        await ws.aclose()


async def test_a_call_in_flight_finishes_then_the_connection_closes_with_1001(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer, client_over(peer.connect()) as client:
        async with shutting_down_once_started(peer, probe):
            start = trio.current_time()
            response = await client.invoke_sub_workflow("w", ["slow"], 3)
        assert response.result == "slept"
        assert trio.current_time() - start == pytest.approx(3)
        await peer.stopped.wait()
        assert trio.current_time() - start == pytest.approx(3)
        with pytest.raises(PeerTransportError, match="1001 GOING_AWAY"):
            await client.invoke_sub_workflow("w", ["echo"], 1)


async def test_a_new_call_during_the_drain_is_refused_as_unavailable(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer, client_over(peer.connect()) as client:
        async with shutting_down_once_started(peer, probe) as nursery:
            results: list[object] = []

            async def gated() -> None:
                results.append((await client.invoke_sub_workflow("w", ["gated"])).result)

            nursery.start_soon(gated)
            await probe.started.wait()
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(PeerUnavailableError, match="shutting down"):
                await client.invoke_sub_workflow("w", ["echo"], 1)
            probe.gate.set()
        assert results == ["through the gate"]
        await peer.stopped.wait()
    assert "echo" not in probe.ran


async def test_the_frames_of_a_drain(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer, raw_websocket(peer) as ws:
        await ws.send_message(invoke_call(1, ["gated"]))
        await probe.started.wait()
        peer.shut_down()
        await trio.testing.wait_all_tasks_blocked()
        await ws.send_message(invoke_call(2, ["echo"], 2))
        refused = await frame(ws)
        assert (refused["id"], refused["status"]) == (2, 14)
        assert decode_message(ErrorDetails, refused["error"]).code == "unavailable"
        probe.gate.set()
        assert (await frame(ws))["id"] == 1
        assert await frame(ws) == {"v": 1, "id": 1, "end": True}
        assert (await close_reason(ws)).code == GOING_AWAY


async def test_a_call_past_the_grace_period_is_cancelled_with_an_error(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer, client_over(peer.connect()) as client:
        async with shutting_down_once_started(peer, probe):
            start = trio.current_time()
            with pytest.raises(PeerTransportError, match=r"CANCELLED.*drain grace period") as info:
                await client.invoke_sub_workflow("w", ["slow"], 100)
        assert type(info.value) is PeerTransportError  # not "unavailable": the call had run
        assert trio.current_time() - start == pytest.approx(GRACE)
        await peer.stopped.wait()
        assert trio.current_time() - start == pytest.approx(GRACE)
    assert probe.cancelled
    assert not probe.finished
    assert_no_trace(server)


async def test_a_cut_off_call_gets_a_cancelled_frame_then_1001(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer, raw_websocket(peer) as ws:
        await ws.send_message(invoke_call(1, ["slow"], 100))
        await probe.started.wait()
        peer.shut_down()
        cut = await frame(ws)
        assert (cut["id"], cut["status"]) == (1, 1)
        assert decode_message(ErrorDetails, cut["error"]).code == "cancelled"
        assert (await close_reason(ws)).code == GOING_AWAY


async def test_an_idle_connection_closes_at_once_with_1001(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer, raw_websocket(peer) as ws:
        await ws.send_message(invoke_call(1, ["echo"], 1))
        assert (await frame(ws))["id"] == 1
        assert (await frame(ws))["end"]
        start = trio.current_time()
        peer.shut_down()
        assert (await close_reason(ws)).code == GOING_AWAY
        await peer.stopped.wait()
        assert trio.current_time() == start


async def test_a_client_that_stops_reading_is_cut_off_when_the_drain_ends(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    # Sending a frame is shielded (half a frame would break the connection),
    # yet the drain must end at grace + goodbye, not at the request timeout.
    goodbye = min(GRACE, 1.0)
    with trio.fail_after(2 * server.limits.request_timeout):
        async with memory_peer(server) as peer, trio.open_nursery() as client:
            # Over a lockstep stream a send waits for the other end to read,
            # and this client reads no message: with one in its queue and one
            # in its reader's hands, the server's next send blocks.
            ws = await raw_websocket_over(client, peer.connect(lockstep=True), node_id=b"stuck")
            for frame_id in range(4):
                await ws.send_message(invoke_call(frame_id, ["echo"], frame_id))
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            peer.shut_down()
            await peer.stopped.wait()
            assert trio.current_time() - start == pytest.approx(GRACE + goodbye)
            client.cancel_scope.cancel()  # a client that never reads cannot close either
