"""A caller that reads a stream slower than its run streams fails its call, not the server.

Steps stream without waiting, so the peer takes their events off the run as
they come and holds at most ``Limits.stream_backlog`` of them unsent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from peer_steps import Probe
from peerflow import Event, Limits, PeerAddress, PeerClient, PeerLimitError, PeerServer
from peerflow._peer.service import Caller
from peerflow._wire.envelopes import InvokeSubWorkflowRequest

BACKLOG = 8


@pytest.fixture
def limits() -> Limits:
    return Limits(stream_backlog=BACKLOG)


async def test_events_that_cannot_go_out_fail_the_call_and_cancel_the_run(
    server: PeerServer, probe: Probe
) -> None:
    sent: list[Event] = []

    async def stalled(event: Event) -> None:
        sent.append(event)
        await trio.sleep_forever()  # the caller's window is full, for good

    request = InvokeSubWorkflowRequest("w", ("chatty",), BACKLOG + 2)
    with trio.fail_after(10), pytest.raises(PeerLimitError, match="too slowly: 8 events"):
        await server.service.invoke(request, Caller("node-a"), on_event=stalled)
    assert len(sent) == 1  # one went out; BACKLOG waited behind it; the next was one too many
    assert probe.cancelled
    assert len(server.refs) == 0


async def test_a_backlog_within_the_limit_is_all_delivered(
    server: PeerServer, probe: Probe
) -> None:
    release = trio.Event()
    sent: list[int] = []

    async def slow(event: Event) -> None:
        await release.wait()
        sent.append(event.n)  # type: ignore[attr-defined]

    async def invoke() -> None:
        request = InvokeSubWorkflowRequest("w", ("chatty",), BACKLOG + 1)
        response = await server.service.invoke(request, Caller("node-a"), on_event=slow)
        assert response.result == "streamed"

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(invoke)
            await probe.started.wait()
            await trio.testing.wait_all_tasks_blocked()  # one event out, BACKLOG waiting
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            probe.gate.set()
    assert sent == list(range(BACKLOG + 1))
    assert not probe.cancelled


async def test_a_caller_that_stops_reading_gets_resource_exhausted_over_tcp(
    address: PeerAddress, probe: Probe
) -> None:
    # The client's small window fills after a few events; the peer then holds
    # the backlog, and one more event fails the call mid-message: the stream
    # is reset with ENHANCE_YOUR_CALM (gRPC's RESOURCE_EXHAUSTED), since
    # trailers after part of a message would read as a truncated message.
    # The caller sees the events that made it, then the error.
    client_limits = Limits(stream_window=16 * 1024, connection_window=16 * 1024)
    received: list[Event] = []

    async def read_all(call: AsyncIterator[Event]) -> None:
        async for event in call:
            received.append(event)

    with trio.fail_after(20):
        async with PeerClient.connect(
            address.url, "node-a", token=None, limits=client_limits
        ) as client:
            async with client.stream_sub_workflow("w", ["chatty"], 200) as call:
                await probe.stopped.wait()  # the peer gave up on this call
                with pytest.raises(PeerLimitError, match="ENHANCE_YOUR_CALM"):
                    await read_all(call)
            assert 0 < len(received) < 200
            assert [event.n for event in received] == list(range(len(received)))  # type: ignore[attr-defined]
            # The connection serves the next call.
            assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
