"""A WebSocket drains when the server shuts down: calls in flight finish, new ones are refused.

The connections are in-memory streams served by ``serve_stream``; cancelling
them is what cancelling ``serve`` does to each connection, and MockClock
makes the grace period exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import msgpack
import pytest
import trio
import trio.testing
import trio_websocket

from peer_steps import Probe
from peerflow import (
    Limits,
    PeerServer,
    PeerTransportError,
    PeerUnavailableError,
    WebSocketPeerClient,
)
from peerflow._peer.client import Endpoint
from peerflow._peer.ws_client import open_websocket_client_over
from peerflow._wire.codec import decode_message, encode_message
from peerflow._wire.envelopes import ErrorDetails, InvokeSubWorkflowRequest

GRACE = 5.0
GOING_AWAY = 1001


@pytest.fixture
def limits() -> Limits:
    return Limits(drain_grace=GRACE)


@attrs.define
class MemoryPeer:
    """A running server whose connections are in-memory streams.

    ``shut_down`` cancels every connection, as cancelling ``serve`` does;
    ``stopped`` is set once all of them have ended.
    """

    server: PeerServer
    stopped: trio.Event = attrs.field(factory=trio.Event)
    connections: trio.Nursery | None = None

    def connect(self, *, lockstep: bool = False) -> trio.abc.Stream:
        """A new connection; with ``lockstep``, a send waits until the other end reads."""
        assert self.connections is not None
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client_stream, server_stream = pair()
        self.connections.start_soon(self.server.serve_stream, server_stream)
        return client_stream

    def shut_down(self) -> None:
        assert self.connections is not None
        self.connections.cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as connections:
            self.connections = connections
            task_status.started()
            await trio.sleep_forever()
        self.stopped.set()


@asynccontextmanager
async def memory_peer(server: PeerServer) -> AsyncIterator[MemoryPeer]:
    async with server.running(), trio.open_nursery() as nursery:
        peer = MemoryPeer(server)
        await nursery.start(peer.run)
        yield peer
        peer.shut_down()


@asynccontextmanager
async def ws_client(peer: MemoryPeer) -> AsyncIterator[WebSocketPeerClient]:
    async with open_websocket_client_over(
        peer.connect(),
        Endpoint("http", "memory", 0),
        "",
        "node-a",
        token=None,
        limits=Limits(),
        lease_ttl=30.0,
    ) as client:
        yield client


@asynccontextmanager
async def raw_websocket(peer: MemoryPeer) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(
            nursery,
            peer.connect(),  # type: ignore[arg-type]
            "memory",
            "/peerflow.peer.v1/ws",
            subprotocols=["peerflow.v1"],
            extra_headers=[(b"x-peerflow-peer-node-id", b"raw")],
        )
        yield ws
        await ws.aclose()


def call(frame_id: int, step_ids: list[str], value: Any = None) -> bytes:
    body = encode_message(InvokeSubWorkflowRequest("w", tuple(step_ids), value))
    return msgpack.packb({"v": 1, "id": frame_id, "method": "InvokeSubWorkflow", "body": body})


async def frame(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    message = await ws.get_message()
    assert isinstance(message, bytes)
    decoded: dict[str, Any] = msgpack.unpackb(message)
    return decoded


async def close_code(ws: trio_websocket.WebSocketConnection) -> int | None:
    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
        await ws.get_message()
    reason = closed.value.reason
    return None if reason is None else reason.code


async def shut_down_once_started(peer: MemoryPeer, probe: Probe) -> None:
    await probe.started.wait()
    peer.shut_down()


def assert_no_trace(server: PeerServer) -> None:
    assert len(server.refs) == 0
    assert server.refs.statistics().runs == 0


async def test_a_call_in_flight_finishes_then_the_connection_closes_with_1001(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer, ws_client(peer) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shut_down_once_started, peer, probe)
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
    async with memory_peer(server) as peer, ws_client(peer) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shut_down_once_started, peer, probe)
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
        await ws.send_message(call(1, ["gated"]))
        await probe.started.wait()
        peer.shut_down()
        await trio.testing.wait_all_tasks_blocked()
        await ws.send_message(call(2, ["echo"], 2))
        refused = await frame(ws)
        assert (refused["id"], refused["status"]) == (2, 14)
        assert decode_message(ErrorDetails, refused["error"]).code == "unavailable"
        probe.gate.set()
        assert (await frame(ws))["id"] == 1
        assert await frame(ws) == {"v": 1, "id": 1, "end": True}
        assert await close_code(ws) == GOING_AWAY


async def test_a_call_past_the_grace_period_is_cancelled_with_an_error(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer, ws_client(peer) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shut_down_once_started, peer, probe)
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
        await ws.send_message(call(1, ["slow"], 100))
        await probe.started.wait()
        peer.shut_down()
        cut = await frame(ws)
        assert (cut["id"], cut["status"]) == (1, 1)
        assert decode_message(ErrorDetails, cut["error"]).code == "cancelled"
        assert await close_code(ws) == GOING_AWAY


async def test_an_idle_connection_closes_at_once_with_1001(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer, raw_websocket(peer) as ws:
        await ws.send_message(call(1, ["echo"], 1))
        assert (await frame(ws))["id"] == 1
        assert (await frame(ws))["end"]
        start = trio.current_time()
        peer.shut_down()
        assert await close_code(ws) == GOING_AWAY
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
            ws = await trio_websocket.wrap_client_stream(
                client,
                peer.connect(lockstep=True),  # type: ignore[arg-type]
                "memory",
                "/peerflow.peer.v1/ws",
                subprotocols=["peerflow.v1"],
                extra_headers=[(b"x-peerflow-peer-node-id", b"stuck")],
            )
            for frame_id in range(4):
                await ws.send_message(call(frame_id, ["echo"], frame_id))
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            peer.shut_down()
            await peer.stopped.wait()
            assert trio.current_time() - start == pytest.approx(GRACE + goodbye)
            client.cancel_scope.cancel()  # a client that never reads cannot close either
