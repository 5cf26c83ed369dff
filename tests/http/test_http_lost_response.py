"""HttpPeerClient: an answer its caller gave up on leaves no refs on the peer (HTTP/1.1).

A close cannot tell the peer whether its answer was read. So a call left
before its answer was read, after its request went out whole, half-closes
its connection (the peer cancels a run still going, as on a close), reads
the rest of the answer in the background and releases the refs a complete
response hands out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import attrs
import pytest
import trio
import trio.testing

from peerflow import (
    Context,
    DynamicEvent,
    HttpPeerClient,
    PeerAddress,
    PeerServer,
    RefLifetime,
    StartEvent,
    StopEvent,
    Workflow,
)
from peerflow._peer import http_client

TIMEOUT = 20


@attrs.define
class Hold:
    """Holds back the client's reading, so that an answer waits unread in its socket."""

    holding: bool = False
    released: trio.Event = attrs.field(factory=trio.Event)
    eofs: int = 0


class HeldStream(trio.abc.HalfCloseableStream):
    """A client's TCP stream that reads only when its :class:`Hold` lets it."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, hold: Hold) -> None:
        self._stream = stream
        self._hold = hold

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        self._hold.eofs += 1
        await self._stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._hold.holding:
            await self._hold.released.wait()
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


@pytest.fixture
def hold(monkeypatch: pytest.MonkeyPatch) -> Hold:
    hold = Hold()
    real_connect = http_client.connect_tcp

    async def connect(host: str, port: int, **kwargs: object) -> trio.abc.Stream:
        stream = await real_connect(host, port, **kwargs)  # type: ignore[arg-type]
        assert isinstance(stream, trio.SocketStream)
        return HeldStream(stream, hold)

    monkeypatch.setattr(http_client, "connect_tcp", connect)
    return hold


@attrs.define
class Step:
    """The test's step: it keeps an UNTIL_EXPLICIT_DROP ref, then waits for ``go``."""

    started: trio.Event = attrs.field(factory=trio.Event)
    go: trio.Event = attrs.field(factory=trio.Event)
    returned: trio.Event = attrs.field(factory=trio.Event)
    stopped: trio.Event = attrs.field(factory=trio.Event)


@pytest.fixture
def step(server: PeerServer) -> Step:
    step = Step()

    @Workflow("lost", registry=server.service.steps).step("keep", accepts=[StartEvent])
    async def keep(event: StartEvent, ctx: Context) -> StopEvent:
        try:
            ref_id = ctx.refs.insert(b"kept", lifetime=RefLifetime.UNTIL_EXPLICIT_DROP)
            ctx.write_event_to_stream(DynamicEvent("tests.Kept", {}))
            step.started.set()
            await step.go.wait()
        finally:
            step.stopped.set()
        step.returned.set()
        return StopEvent(result=ref_id)

    return step


@pytest.fixture
async def client(address: PeerAddress, hold: Hold) -> AsyncIterator[HttpPeerClient]:
    async with HttpPeerClient(address.url, "node-a", token=None) as client:
        # A first call opens the client's lease, so that later ones are the invoke alone.
        assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
        yield client


async def wait_for(condition: Callable[[], bool]) -> None:
    """Let the background work run until ``condition`` holds (bounded by the test's fail_after)."""
    while not condition():
        await trio.testing.wait_all_tasks_blocked()
        await trio.lowlevel.checkpoint()


async def test_a_call_cancelled_before_the_outcome_leaves_no_refs(
    client: HttpPeerClient, server: PeerServer, step: Step, hold: Hold
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as caller:
            caller.start_soon(client.invoke_sub_workflow, "w", ["keep"], None)
            await step.started.wait()
            assert len(server.refs) == 1
            caller.cancel_scope.cancel()
        # The half-close reached the peer, which cancelled the run; its ref went with it.
        await step.stopped.wait()
        await wait_for(lambda: len(server.refs) == 0)
    assert not step.returned.is_set()
    assert hold.eofs == 1


async def test_an_answer_sent_but_unread_has_its_refs_released_by_the_client(
    client: HttpPeerClient, server: PeerServer, step: Step, hold: Hold
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as caller:
            hold.holding = True  # before the client waits for its answer
            caller.start_soon(client.invoke_sub_workflow, "w", ["keep"], None)
            await step.started.wait()
            step.go.set()
            await step.returned.wait()
            # The peer has sent the whole answer; it waits in the client's socket.
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.refs) == 1
            caller.cancel_scope.cancel()
        # The caller left at once; its answer's reader keeps the connection's
        # pool slot until it is done.
        assert client._limiter.borrowed_tokens == 1
        assert len(server.refs) == 1
        hold.released.set()
        await wait_for(lambda: len(server.refs) == 0)
        await wait_for(lambda: client._limiter.borrowed_tokens == 0)
    assert hold.eofs == 1


async def test_a_stream_left_before_its_final_response_has_its_refs_released(
    client: HttpPeerClient, server: PeerServer, step: Step, hold: Hold
) -> None:
    with trio.fail_after(TIMEOUT):
        async with client.stream_sub_workflow("w", ["keep"], None) as call:
            async for event in call:
                assert event.event_type == "tests.Kept"
                step.go.set()
                await step.returned.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert len(server.refs) == 1
                break  # the final response is in the socket, never read
        assert call.response is None
        await wait_for(lambda: len(server.refs) == 0)
    assert hold.eofs == 1


async def test_a_stream_cancelled_before_the_outcome_leaves_no_refs(
    client: HttpPeerClient, server: PeerServer, step: Step
) -> None:
    with trio.fail_after(TIMEOUT):
        with trio.CancelScope() as caller:
            async with client.stream_sub_workflow("w", ["keep"], None) as call:
                async for _ in call:
                    caller.cancel()
                    await trio.lowlevel.checkpoint()
        await step.stopped.wait()
        await wait_for(lambda: len(server.refs) == 0)
    assert not step.returned.is_set()


async def test_a_call_read_to_its_end_keeps_its_refs(
    client: HttpPeerClient, server: PeerServer, step: Step, hold: Hold
) -> None:
    step.go.set()
    with trio.fail_after(TIMEOUT):
        response = await client.invoke_sub_workflow("w", ["keep"], None)
        async with client.stream_sub_workflow("w", ["keep"], None) as call:
            async for _ in call:
                pass
        await trio.testing.wait_all_tasks_blocked()
        assert call.response is not None
        assert len(server.refs) == 2
        assert await client.release_session_ref(response.result)
        assert await client.release_session_ref(call.response.result)
    assert hold.eofs == 0


async def test_without_async_with_a_cancelled_call_closes_its_connection_at_once(
    address: PeerAddress, server: PeerServer, step: Step, hold: Hold
) -> None:
    client = HttpPeerClient(address.url, "node-a", token=None)
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as caller:
                caller.start_soon(client.invoke_sub_workflow, "w", ["keep"], None)
                await step.started.wait()
                caller.cancel_scope.cancel()
            # The close reached the peer, which cancelled the run, as before.
            await step.stopped.wait()
            await wait_for(lambda: len(server.refs) == 0)
    finally:
        await client.aclose()
    assert hold.eofs == 0


async def test_leaving_the_client_waits_for_a_lost_answer(
    address: PeerAddress, server: PeerServer, step: Step, hold: Hold
) -> None:
    with trio.fail_after(TIMEOUT):
        async with HttpPeerClient(address.url, "node-a", token=None) as client:
            await client.invoke_sub_workflow("w", ["echo"], 1)  # its lease, opened
            async with trio.open_nursery() as caller:
                hold.holding = True
                caller.start_soon(client.invoke_sub_workflow, "w", ["keep"], None)
                await step.started.wait()
                step.go.set()
                await step.returned.wait()
                await trio.testing.wait_all_tasks_blocked()
                caller.cancel_scope.cancel()
            hold.released.set()
        # Leaving the block read the answer and released its ref before the goodbyes.
        assert len(server.refs) == 0
