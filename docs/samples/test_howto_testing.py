"""How-to: test your steps against a peer in memory (docs/how-to/testing.md).

Run: python3 -m pytest docs/samples/test_howto_testing.py
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from peerflow import (
    Context,
    PeerClient,
    PeerServer,
    PeerTimeoutError,
    RefLifetime,
    SessionRefRegistry,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)
from peerflow.testing import open_memory_peer, sever


# --8<-- [start:steps]
def build_steps() -> StepRegistry:
    """The steps under test, in a registry of their own (not the process-wide one)."""
    registry = StepRegistry()
    wf = Workflow("under-test", registry=registry)

    @wf.step("embed", accepts=[StartEvent])
    async def embed(event: StartEvent, ctx: Context) -> StopEvent:
        await trio.sleep(event.data["seconds"])  # stands in for slow work
        vector = bytes(len(event.data["text"]))
        ref = ctx.refs.insert(vector, lifetime=RefLifetime.UNTIL_PARENT_FINISH)
        return StopEvent(result=ref)

    return registry


@pytest.fixture
def server() -> PeerServer:
    return PeerServer("node-b", registry=build_steps(), token=None)


@pytest.fixture
async def client(server: PeerServer) -> AsyncIterator[PeerClient]:
    async with open_memory_peer(server, "node-a") as client:
        yield client


# --8<-- [end:steps]


# --8<-- [start:tests]
async def test_embed_returns_a_fetchable_ref(client: PeerClient) -> None:
    response = await client.invoke_sub_workflow("w", ["embed"], {"text": "abc", "seconds": 0})
    response.raise_for_error()
    assert await client.deref_session_ref(response.result) == bytes(3)


async def test_a_slow_embed_times_out_in_virtual_time(
    client: PeerClient, server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    with pytest.raises(PeerTimeoutError):
        await client.invoke_sub_workflow("w", ["embed"], {"text": "x", "seconds": 600}, timeout=5)
    assert trio.current_time() - start == pytest.approx(5)  # no real waiting
    await trio.testing.wait_all_tasks_blocked()
    assert len(server.refs) == 0  # the remote run was cancelled and left nothing


async def test_a_crashed_caller_leaks_nothing(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with server.running():  # keep the peer up after the client is gone
        async with open_memory_peer(server, "node-a", lease_ttl=10) as client:
            await client.invoke_sub_workflow("w", ["embed"], {"text": "abc", "seconds": 0})
            await sever(client)  # the connection drops with no goodbye
        assert len(server.refs) == 1  # the lease has not run out yet
        await trio.sleep(11)
        assert len(server.refs) == 0


# --8<-- [end:tests]


# --8<-- [start:local]
async def test_embed_locally(autojump_clock: trio.testing.MockClock) -> None:
    registry = build_steps()
    workflow = Workflow.from_steps("local", [registry["embed"]])
    refs = SessionRefRegistry("test-node")
    run = await workflow.run({"text": "abcd", "seconds": 30}, refs=refs)
    assert refs.get(run.result) == bytes(4)
    assert run.refs[run.result].origin_node_id == "test-node"


# --8<-- [end:local]
