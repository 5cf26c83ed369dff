"""A WebSocket with no call in flight for ``idle_timeout`` is closed, as idle HTTP/2 is.

The connections are in-memory streams served by ``serve_stream`` and the
clock is a MockClock, so the idle timeout is exact. The clients answer the
server's pings: liveness alone does not keep a connection open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
from ws_helpers import close_reason, frame, invoke_call, open_memory_client, raw_websocket_over

from peer_steps import Probe, build_steps
from peerflow import Limits, PeerServer, PeerTransportError

IDLE = 10.0
NORMAL_CLOSURE = 1000


@pytest.fixture
def limits() -> Limits:
    return Limits(idle_timeout=IDLE)


@asynccontextmanager
async def open_websocket(
    server: PeerServer, served: trio.Event
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A bare client; ``served`` is set once the server is done with its connection."""

    async def serve(stream: trio.abc.Stream) -> None:
        await server.serve_stream(stream)
        served.set()

    client_stream, server_stream = trio.testing.memory_stream_pair()
    # In virtual time: a server that never closes fails the test instead of
    # pinging its client forever.
    with trio.fail_after(10 * IDLE):
        async with server.running(), trio.open_nursery() as nursery:
            nursery.start_soon(serve, server_stream)
            ws = await raw_websocket_over(nursery, client_stream)
            yield ws
            await ws.aclose()
            nursery.cancel_scope.cancel()


async def answer(
    ws: trio_websocket.WebSocketConnection, *ids: int
) -> dict[int, list[dict[str, Any]]]:
    """Read frames until the calls ``ids`` have ended (end or error frame); by call id."""
    frames: dict[int, list[dict[str, Any]]] = {}
    while not all(frames.get(i) and _ends(frames[i][-1]) for i in ids):
        got = await frame(ws)
        frames.setdefault(got["id"], []).append(got)
    return frames


def _ends(got: dict[str, Any]) -> bool:
    return bool(got.get("end")) or "status" in got


async def test_an_unused_websocket_closes_at_the_idle_timeout_with_1000(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    served = trio.Event()
    async with open_websocket(server, served) as ws:
        start = trio.current_time()
        reason = await close_reason(ws)
        assert (reason.code, reason.reason) == (
            NORMAL_CLOSURE,
            "no call for 10s (idle timeout)",
        )
        assert trio.current_time() - start == pytest.approx(IDLE)
        await served.wait()  # the connection's slot is free
        assert trio.current_time() - start == pytest.approx(IDLE)


async def test_the_idle_clock_restarts_when_the_last_call_ends(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    served = trio.Event()
    async with open_websocket(server, served) as ws:
        await trio.sleep(IDLE - 1)
        await ws.send_message(invoke_call(1, ["echo"], 1))
        assert (await answer(ws, 1)).keys() == {1}
        ended = trio.current_time()
        assert (await close_reason(ws)).code == NORMAL_CLOSURE
        assert trio.current_time() - ended == pytest.approx(IDLE)


async def test_a_long_call_in_flight_keeps_the_websocket_open(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    served = trio.Event()
    async with open_websocket(server, served) as ws:
        start = trio.current_time()
        # Two overlapping calls: the connection is idle only after the later one.
        await ws.send_message(invoke_call(1, ["slow"], 3 * IDLE))
        await ws.send_message(invoke_call(2, ["slow"], IDLE / 2))
        frames = await answer(ws, 1, 2)
        assert [got["id"] for got in frames[1]] == [1, 1]  # a message, then the end
        assert frames[1][-1] == {"v": 1, "id": 1, "end": True}
        assert trio.current_time() - start == pytest.approx(3 * IDLE)
        assert (await close_reason(ws)).code == NORMAL_CLOSURE
        assert trio.current_time() - start == pytest.approx(4 * IDLE)
        await served.wait()


async def test_the_client_sees_a_clean_close_and_its_next_call_fails(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    # Renewing its lease is a call: here the first renewal is due after the close.
    async with open_memory_client(server, lease_ttl=10 * IDLE) as client:
        assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
        await trio.sleep(IDLE + 1)
        with pytest.raises(PeerTransportError, match=r"\(1000 NORMAL_CLOSURE: .*idle timeout\)"):
            await client.invoke_sub_workflow("w", ["echo"], 2)


async def test_without_an_idle_timeout_a_websocket_stays_open(
    probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    limits = Limits(idle_timeout=None)
    server = PeerServer("node-b", registry=build_steps(probe), token=None, limits=limits)
    async with open_memory_client(server) as client:
        await trio.sleep(5 * IDLE)
        assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
