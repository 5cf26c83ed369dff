"""A response lost to its caller's cancel leaves no refs behind (gRPC).

The window: the remote run has its outcome and the peer sends the response,
but the caller is cancelled before it reads it. The refs the response hands
out must not stay on the peer with nobody knowing their ids. Either the
caller's RST_STREAM reaches the peer before the peer learns the response
arrived (the peer drops them), or the response arrived whole and the client
releases them itself.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from gated_stream import Gate
from peer_steps import Progress
from peerflow import (
    Context,
    Event,
    Limits,
    PeerClient,
    PeerServer,
    PeerTransportError,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)
from peerflow._peer.client import Endpoint, open_client_over
from peerflow._peer.service import Caller
from peerflow._wire.envelopes import InvokeSubWorkflowRequest
from peerflow.testing import open_memory_connection


@attrs.define
class Keeper:
    started: trio.Event = attrs.field(factory=trio.Event)
    gate: trio.Event = attrs.field(factory=trio.Event)


@pytest.fixture
def keeper() -> Keeper:
    return Keeper()


@pytest.fixture
def server(keeper: Keeper) -> PeerServer:
    registry = StepRegistry()
    wf = Workflow("lost", registry=registry)

    @wf.step("keep", accepts=[StartEvent])
    async def keep(event: StartEvent, ctx: Context) -> StopEvent:
        kept = ctx.refs.insert(b"kept", lifetime=RefLifetime.UNTIL_EXPLICIT_DROP)
        scoped = ctx.refs.insert(b"scoped", lifetime=RefLifetime.UNTIL_PARENT_FINISH)
        keeper.started.set()
        await keeper.gate.wait()
        return StopEvent(result=[kept, scoped])

    return PeerServer("node-b", registry=registry, token=None)


@asynccontextmanager
async def gated_client(server: PeerServer) -> AsyncIterator[tuple[PeerClient, Gate]]:
    async with open_memory_connection(server) as stream:
        gate = Gate(stream)
        async with open_client_over(
            gate,
            Endpoint("http", "memory", 0),
            "node-a",
            token=None,
            limits=Limits(),
            lease_ttl=30,
        ) as client:
            yield client, gate


class CancelOnWake(trio.abc.Instrument):
    """Cancels ``scope`` when ``task`` is next woken: after the reader handed it the response."""

    def __init__(self, task: trio.lowlevel.Task, scope: trio.CancelScope) -> None:
        self.task = task
        self.scope = scope

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.scope.cancel()
            trio.lowlevel.remove_instrument(self)


async def start_held_answer(
    nursery: trio.Nursery, client: PeerClient, gate: Gate, keeper: Keeper, server: PeerServer
) -> tuple[trio.CancelScope, trio.lowlevel.Task]:
    """Start a call whose answer the peer then sends, held back on its way to the client.

    Returns the call's cancel scope and its task.
    """
    scope = trio.CancelScope()
    task: list[trio.lowlevel.Task] = []

    async def call() -> None:
        task.append(trio.lowlevel.current_task())
        with scope:
            await client.invoke_sub_workflow("lost", ["keep"])
        assert scope.cancelled_caught

    nursery.start_soon(call)
    await keeper.started.wait()
    gate.hold_at()
    keeper.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert len(server.refs) == 2  # the response is out; its refs wait for word
    return scope, task[0]


async def test_a_reset_that_beats_the_ping_ack_makes_the_peer_drop_the_refs(
    server: PeerServer, keeper: Keeper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="peerflow")
    with trio.fail_after(10):
        async with gated_client(server) as (client, gate):
            async with trio.open_nursery() as nursery:
                scope, _ = await start_held_answer(nursery, client, gate, keeper, server)
                scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                # The reset reached the peer before the PING's ack could.
                assert len(server.refs) == 0
                gate.release()
            # The connection serves the next call; its refs stay.
            keeper.gate = trio.Event()
            keeper.gate.set()
            response = await client.invoke_sub_workflow("lost", ["keep"])
            assert set(response.remote_refs) == set(response.result)
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.refs) == 2
    assert "dropped 2 refs of a response the caller never received" in caplog.text


async def test_a_response_that_arrived_whole_is_released_by_the_client(
    server: PeerServer, keeper: Keeper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="peerflow")
    with trio.fail_after(10):
        async with gated_client(server) as (client, gate):
            async with trio.open_nursery() as nursery:
                scope, task = await start_held_answer(nursery, client, gate, keeper, server)
                # The reader takes the whole response in one read and wakes
                # the caller, which is cancelled before it can read it.
                trio.lowlevel.add_instrument(CancelOnWake(task, scope))
                gate.release()
            await trio.testing.wait_all_tasks_blocked()
            # No reset went out (the stream had ended): the client released them.
            assert len(server.refs) == 0
    assert "never received" not in caplog.text


async def test_a_stream_left_with_its_final_response_unread_releases_its_refs(
    server: PeerServer, keeper: Keeper
) -> None:
    with trio.fail_after(10):
        async with gated_client(server) as (client, _):
            keeper.gate.set()
            async with client.stream_sub_workflow("lost", ["keep"]) as call:
                # The run ends and its whole answer arrives before the block is left.
                await trio.testing.wait_all_tasks_blocked()
                assert call.response is None
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.refs) == 0


async def test_a_call_cancelled_before_its_outcome_still_leaves_nothing(
    server: PeerServer, keeper: Keeper
) -> None:
    with trio.fail_after(10):
        async with gated_client(server) as (client, _):
            with trio.move_on_after(1):
                await client.invoke_sub_workflow("lost", ["keep"])
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.refs) == 0


async def test_a_streamed_run_whose_answer_fails_after_its_outcome_leaves_nothing(
    server: PeerServer, keeper: Keeper
) -> None:
    # The run has finished while its last event is still being forwarded;
    # the forward then fails (the caller stopped reading): no response will
    # name the run's refs, so they all go.
    request = InvokeSubWorkflowRequest("lost", ("chatty",))
    forwarded = trio.Event()

    async def forward(event: Event) -> None:
        forwarded.set()
        await keeper.gate.wait()
        raise PeerTransportError("the caller stopped reading")

    registry = server.service.steps
    wf = Workflow("lost", registry=registry)

    @wf.step("chatty", accepts=[StartEvent])
    async def chatty(event: StartEvent, ctx: Context) -> StopEvent:
        ctx.write_event_to_stream(Progress(1))
        return StopEvent(ctx.refs.insert(b"kept", lifetime=RefLifetime.UNTIL_EXPLICIT_DROP))

    async def invoke() -> None:
        with pytest.raises(PeerTransportError):
            await server.service.invoke(request, Caller("node-a"), on_event=forward)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(invoke)
        await forwarded.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert len(server.refs) == 1  # the run is over; its ref waits for the answer
        keeper.gate.set()
    assert len(server.refs) == 0
