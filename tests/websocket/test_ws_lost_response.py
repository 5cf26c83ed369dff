"""A WebSocket call given up as its answer arrives leaves no refs on the peer.

The peer may send a call's answer before it reads the call's cancel frame.
A cancel frame for a call it has answered makes it drop the refs the answer
hands out; an answer that arrived whole, unread, is released by the client
(no cancel frame goes out for it). These tests give up a call at each moment
of that window, with the connection in memory and the client's reading held
by a gate, and check that the peer's registry ends empty.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from ws_helpers import client_over

from gated_stream import Gate
from peerflow import (
    Context,
    PeerServer,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    WebSocketPeerClient,
    Workflow,
)
from peerflow._peer.ws_frames import EndFrame, encode_frame
from peerflow._peer.ws_server import _Session
from peerflow.testing import open_memory_connection

pytestmark = pytest.mark.usefixtures("mock_clock")  # time stands still: no keepalive pings


class Hold:
    """The step ``hold``: inserts an UNTIL_EXPLICIT_DROP ref, then waits for ``finish``."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.finish = trio.Event()

    async def step(self, event: StartEvent, ctx: Context) -> StopEvent:
        ctx.refs.insert(b"kept", lifetime=RefLifetime.UNTIL_EXPLICIT_DROP)
        self.started.set()
        await self.finish.wait()
        return StopEvent("done")


@pytest.fixture
def hold() -> Hold:
    return Hold()


@pytest.fixture
def server(hold: Hold) -> PeerServer:
    registry = StepRegistry()
    Workflow("w", registry=registry).add_step("hold", [StartEvent], hold.step)
    return PeerServer("node-b", registry=registry, token=None)


@pytest.fixture
async def gate(server: PeerServer) -> AsyncIterator[Gate]:
    async with open_memory_connection(server) as transport:
        yield Gate(transport)


@pytest.fixture
async def client(gate: Gate) -> AsyncIterator[WebSocketPeerClient]:
    async with client_over(gate) as client:
        try:
            yield client
        finally:
            gate.release()  # a failed test must not leave the client's exit waiting


async def start_invoke(
    nursery: trio.Nursery, client: WebSocketPeerClient, hold: Hold
) -> trio.CancelScope:
    """Start an invoke of ``hold`` in ``nursery``; its scope, once the step runs."""
    scope = trio.CancelScope()

    async def call() -> None:
        with scope:
            await client.invoke_sub_workflow("w", ["hold"])
        assert scope.cancelled_caught, "the call was meant to be given up"

    nursery.start_soon(call)
    await hold.started.wait()
    return scope


def end_frame_bytes(call_id: int) -> bytes:
    """An end frame as the server puts it on the wire (a short, unmasked binary message)."""
    payload = encode_frame(EndFrame(call_id))
    return bytes([0x82, len(payload)]) + payload


async def test_a_call_read_whole_keeps_its_refs(
    server: PeerServer, client: WebSocketPeerClient, hold: Hold
) -> None:
    hold.finish.set()
    response = await client.invoke_sub_workflow("w", ["hold"])
    await trio.testing.wait_all_tasks_blocked()
    assert len(response.remote_refs) == 1
    assert len(server.refs) == 1
    (ref_uuid,) = response.remote_refs
    assert await client.release_session_ref(ref_uuid)


async def test_a_call_cancelled_before_its_outcome_leaves_nothing(
    server: PeerServer, client: WebSocketPeerClient, hold: Hold
) -> None:
    async with trio.open_nursery() as nursery:
        scope = await start_invoke(nursery, client, hold)
        assert len(server.refs) == 1
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
    assert len(server.refs) == 0  # the peer cancelled the run and purged its ref


@pytest.fixture
def peer_keeps_answered_refs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the peer ignore a cancel frame for a call it has answered.

    Then a ref that goes must have been released by the client.
    """
    monkeypatch.setattr(_Session, "_watcher", lambda self, frame_id: lambda on_lost: None)


async def test_a_cancel_frame_after_the_answer_makes_the_peer_drop_its_refs(
    server: PeerServer, client: WebSocketPeerClient, gate: Gate, hold: Hold
) -> None:
    async with trio.open_nursery() as nursery:
        scope = await start_invoke(nursery, client, hold)
        gate.hold_at()
        hold.finish.set()
        await trio.testing.wait_all_tasks_blocked()  # the peer sent the response
        assert len(server.refs) == 1
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
    # The cancel frame named a call the peer had answered: it dropped the refs.
    assert len(server.refs) == 0
    gate.release()
    await trio.testing.wait_all_tasks_blocked()
    assert len(server.refs) == 0


async def test_a_response_read_before_its_end_frame_is_dropped_by_the_peer(
    server: PeerServer, client: WebSocketPeerClient, gate: Gate, hold: Hold
) -> None:
    async with trio.open_nursery() as nursery:
        scope = await start_invoke(nursery, client, hold)
        gate.hold_at(end_frame_bytes(2))  # call 1 opened the client's lease
        hold.finish.set()
        await trio.testing.wait_all_tasks_blocked()  # the caller has read the response
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
    # Not the whole answer: the cancel frame goes out, and the peer drops the ref.
    assert len(server.refs) == 0
    gate.release()


@pytest.mark.usefixtures("peer_keeps_answered_refs")
async def test_an_answer_that_arrived_whole_unread_is_released_by_the_client(
    server: PeerServer, client: WebSocketPeerClient, hold: Hold
) -> None:
    with trio.CancelScope() as scope:
        async with client.stream_sub_workflow("w", ["hold"]):
            await hold.started.wait()
            hold.finish.set()
            # The response and the end frame arrive while nobody reads them.
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.refs) == 1
            scope.cancel()
            await trio.sleep_forever()
    await trio.testing.wait_all_tasks_blocked()
    assert len(server.refs) == 0


@pytest.mark.usefixtures("peer_keeps_answered_refs")
async def test_leaving_the_client_waits_for_the_release_of_an_unread_answer(
    server: PeerServer, gate: Gate, hold: Hold
) -> None:
    async with client_over(gate) as client, client.stream_sub_workflow("w", ["hold"]):
        await hold.started.wait()
        hold.finish.set()
        await trio.testing.wait_all_tasks_blocked()
    assert len(server.refs) == 0
