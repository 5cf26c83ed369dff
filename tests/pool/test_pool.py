"""PeerPool over real loopback sockets: spreading, ref routing, failover, health."""

from __future__ import annotations

import collections
import functools
import logging

import attrs
import pytest
import trio
import trio.testing

from peerflow import (
    Context,
    PeerPool,
    PeerRefNotFoundError,
    PeerServer,
    PeerUnavailableError,
    PeerUnknownStepError,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)
from peerflow._transport.h2conn import ErrorCodes, ServerStream, StreamHandler
from peerflow._transport.listener import serve_tcp


@attrs.define
class Peers:
    """Running peers and what their steps saw."""

    servers: list[PeerServer]
    urls: list[str]
    scopes: list[trio.CancelScope]
    started: collections.Counter[str] = attrs.field(factory=collections.Counter)
    gate: trio.Event = attrs.field(factory=trio.Event)
    all_started: trio.Event = attrs.field(factory=trio.Event)
    expected: int = 0


def _registry(peers: Peers) -> StepRegistry:
    registry = StepRegistry()
    wf = Workflow("pool-tests", registry=registry)

    @wf.step("where", accepts=[StartEvent])
    async def where(event: StartEvent, ctx: Context) -> StopEvent:
        return StopEvent(result=ctx.node_id)

    @wf.step("gated", accepts=[StartEvent])
    async def gated(event: StartEvent, ctx: Context) -> StopEvent:
        peers.started[ctx.node_id] += 1
        if sum(peers.started.values()) == peers.expected:
            peers.all_started.set()
        await peers.gate.wait()
        return StopEvent(result=ctx.node_id)

    @wf.step("keep", accepts=[StartEvent])
    async def keep(event: StartEvent, ctx: Context) -> StopEvent:
        value = f"held by {ctx.node_id}".encode()
        return StopEvent(result=ctx.refs.insert(value, lifetime=RefLifetime(event.data)))

    return registry


@pytest.fixture
async def peers(nursery: trio.Nursery) -> Peers:
    found = Peers(servers=[], urls=[], scopes=[])
    registry = _registry(found)
    for index in range(3):
        server = PeerServer(f"node-{index}", registry=registry, token=None)
        scope = trio.CancelScope()

        async def serve(
            server: PeerServer, scope: trio.CancelScope, *, task_status: trio.TaskStatus[str]
        ) -> None:
            with scope:
                await server.serve("127.0.0.1", 0, task_status=task_status)

        address = await nursery.start(serve, server, scope)
        found.servers.append(server)
        found.urls.append(address.url)
        found.scopes.append(scope)
    return found


async def test_calls_go_to_the_least_busy_peer(peers: Peers) -> None:
    peers.expected = 9
    with trio.fail_after(20):
        async with PeerPool(peers.urls, "caller", token=None) as pool:
            results: list[str] = []

            async def call() -> None:
                response = await pool.invoke_sub_workflow("pool-tests", ["gated"], None)
                results.append(response.result)

            async with trio.open_nursery() as nursery:
                for _ in range(9):
                    nursery.start_soon(call)
                await peers.all_started.wait()
                # Least outstanding calls: three in flight on each peer.
                assert peers.started == {"node-0": 3, "node-1": 3, "node-2": 3}
                assert [m.outstanding for m in pool.members()] == [3, 3, 3]
                peers.gate.set()
            assert collections.Counter(results) == {"node-0": 3, "node-1": 3, "node-2": 3}
            assert all(m.healthy and m.outstanding == 0 for m in pool.members())


async def test_refs_are_dereffed_and_released_on_the_node_that_holds_them(peers: Peers) -> None:
    explicit = RefLifetime.UNTIL_EXPLICIT_DROP.value
    with trio.fail_after(20):
        async with PeerPool(peers.urls, "caller", token=None) as pool:
            made = [
                await pool.invoke_sub_workflow("pool-tests", ["keep"], explicit) for _ in range(6)
            ]
            holders = {}
            for response in made:
                (descriptor,) = response.remote_refs.values()
                holders[response.result] = descriptor.origin_node_id
            assert set(holders.values()) == {"node-0", "node-1", "node-2"}
            for ref_uuid, node in holders.items():
                assert await pool.deref_session_ref(ref_uuid) == f"held by {node}".encode()
            assert {frozenset(m.node_ids) for m in pool.members()} == {
                frozenset({"node-0"}),
                frozenset({"node-1"}),
                frozenset({"node-2"}),
            }
            first = next(iter(holders))
            async with pool.open_session_ref(first) as chunks:
                assert b"".join([chunk async for chunk in chunks]).startswith(b"held by")
            for ref_uuid in holders:
                assert await pool.release_session_ref(ref_uuid) is True
            assert all(len(server.refs) == 0 for server in peers.servers)

            with pytest.raises(PeerRefNotFoundError, match="pass origin_node_id"):
                await pool.deref_session_ref("00000000-0000-4000-8000-000000000000")
            with pytest.raises(PeerRefNotFoundError, match="no peer of this pool"):
                await pool.deref_session_ref("x", origin_node_id="node-9")
            # A ref this pool did not hand out, named with its node.
            with pytest.raises(PeerRefNotFoundError):
                await pool.deref_session_ref(first, origin_node_id=holders[first])


async def test_closing_the_pool_releases_parent_scoped_refs_everywhere(peers: Peers) -> None:
    parent = RefLifetime.UNTIL_PARENT_FINISH.value
    with trio.fail_after(20):
        async with PeerPool(peers.urls, "caller", token=None) as pool:
            for _ in range(3):
                await pool.invoke_sub_workflow("pool-tests", ["keep"], parent)
            assert sorted(len(server.refs) for server in peers.servers) == [1, 1, 1]
        assert all(len(server.refs) == 0 for server in peers.servers)


async def test_an_unreachable_endpoint_is_skipped(peers: Peers) -> None:
    dead = "http://127.0.0.1:1"
    with trio.fail_after(20):
        async with PeerPool([dead, peers.urls[0]], "caller", token=None) as pool:
            for _ in range(4):
                response = await pool.invoke_sub_workflow("pool-tests", ["where"], None)
                assert response.result == "node-0"
            down, up = pool.members()
            assert not down.healthy
            assert down.failure is not None
            assert "127.0.0.1:1" in down.failure
            assert up.healthy
        with pytest.raises(PeerUnavailableError, match="no peer of the pool is reachable"):
            async with PeerPool([dead], "caller", token=None):
                pytest.fail("entered a pool with no reachable peer")


async def test_calls_fail_over_when_a_peer_shuts_down(peers: Peers) -> None:
    peers.expected = 2
    with trio.fail_after(20):
        async with PeerPool(peers.urls[:2], "caller", token=None) as pool:
            assert {
                (await pool.invoke_sub_workflow("pool-tests", ["where"], None)).result
                for _ in range(4)
            } == {"node-0", "node-1"}
            gated: list[str] = []

            async def gated_call() -> None:
                gated.append((await pool.invoke_sub_workflow("pool-tests", ["gated"], None)).result)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(gated_call)
                nursery.start_soon(gated_call)
                await peers.all_started.wait()  # one call in flight on each peer
                # node-0 drains (GOAWAY): no call may fail because of it.
                peers.scopes[0].cancel()
                for _ in range(6):
                    response = await pool.invoke_sub_workflow("pool-tests", ["where"], None)
                    assert response.result == "node-1"
                # The call node-0 took before draining still finishes there.
                peers.gate.set()
            assert sorted(gated) == ["node-0", "node-1"]
            with pytest.raises(PeerUnknownStepError):
                await pool.invoke_sub_workflow("pool-tests", ["no-such-step"], None)


async def test_streamed_calls_are_spread_and_their_refs_remembered(peers: Peers) -> None:
    explicit = RefLifetime.UNTIL_EXPLICIT_DROP.value
    with trio.fail_after(20):
        async with PeerPool(peers.urls, "caller", token=None) as pool:
            nodes = set()
            for _ in range(3):
                async with pool.stream_sub_workflow("pool-tests", ["keep"], explicit) as call:
                    assert [event async for event in call] == []
                assert call.response is not None
                ref_uuid = call.response.result
                nodes.add(call.response.remote_refs[ref_uuid].origin_node_id)
                assert await pool.release_session_ref(ref_uuid) is True
            assert nodes == {"node-0", "node-1", "node-2"}


class _TakenOut(logging.Handler):
    """Sets an event when the pool logs that it took a peer out."""

    def __init__(self) -> None:
        super().__init__()
        self.event = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "taken out" in record.getMessage():
            self.event.set()


async def test_a_peer_that_stops_answering_pings_is_taken_out(
    peers: Peers, nursery: trio.Nursery
) -> None:
    # A relay in front of node-1 that can be frozen: the TCP connection stays
    # up but nothing crosses it, as with a hung host.
    frozen = trio.Event()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    relay_port = listeners[0].socket.getsockname()[1]
    target = peers.urls[1].rsplit(":", 1)[1]

    async def pump(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        async for data in source:
            if frozen.is_set():
                await trio.sleep_forever()
            await sink.send_all(data)

    async def relay(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", int(target))
        async with client, upstream, trio.open_nursery() as both:
            both.start_soon(pump, client, upstream)
            both.start_soon(pump, upstream, client)

    nursery.start_soon(trio.serve_listeners, relay, listeners)
    urls = [peers.urls[0], f"http://127.0.0.1:{relay_port}"]
    with trio.fail_after(20):
        async with PeerPool(
            urls, "caller", token=None, health_interval=0.05, health_timeout=0.2
        ) as pool:
            assert {
                (await pool.invoke_sub_workflow("pool-tests", ["where"], None)).result
                for _ in range(4)
            } == {"node-0", "node-1"}
            taken_out = _TakenOut()
            logging.getLogger("peerflow.peer.pool").addHandler(taken_out)
            try:
                frozen.set()
                await taken_out.event.wait()
            finally:
                logging.getLogger("peerflow.peer.pool").removeHandler(taken_out)
            assert not pool.members()[1].healthy
            assert "PING" in (pool.members()[1].failure or "")
            for _ in range(4):
                response = await pool.invoke_sub_workflow("pool-tests", ["where"], None)
                assert response.result == "node-0"
        nursery.cancel_scope.cancel()


def test_a_pool_needs_endpoints_and_checks_them_at_once() -> None:
    with pytest.raises(ValueError, match="one or more"):
        PeerPool([], "caller")
    with pytest.raises(ValueError, match="one or more"):
        PeerPool("http://127.0.0.1:1", "caller")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="ftp"):
        PeerPool(["ftp://nowhere"], "caller")


_GRPC_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc+msgpack")]


async def _no_leases(stream: ServerStream) -> bool:
    """Answer a Lease call UNIMPLEMENTED (as a minimal peer would); True if it was one."""
    if stream.path.endswith(b"/Lease"):
        stream.send_headers([*_GRPC_HEAD, (b"grpc-status", b"12")], end_stream=True)
        return True
    await trio.lowlevel.checkpoint()
    return False


async def refuse_the_stream(stream: ServerStream) -> None:
    if not await _no_leases(stream):
        stream.reset(ErrorCodes.REFUSED_STREAM)  # "not processed": safe to retry


async def answer_unavailable(stream: ServerStream) -> None:
    if not await _no_leases(stream):
        status = [(b"grpc-status", b"14"), (b"grpc-message", b"draining")]
        stream.send_headers([*_GRPC_HEAD, *status], end_stream=True)


async def never_answer(stream: ServerStream) -> None:
    await trio.sleep_forever()


async def _bare_h2_peer(nursery: trio.Nursery, handler: StreamHandler) -> str:
    addresses = await nursery.start(functools.partial(serve_tcp, handler, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{addresses[0][1]}"


@pytest.mark.parametrize("refusal", [refuse_the_stream, answer_unavailable])
async def test_a_stream_refused_before_its_answer_began_moves_to_another_peer(
    peers: Peers, nursery: trio.Nursery, refusal: StreamHandler
) -> None:
    explicit = RefLifetime.UNTIL_EXPLICIT_DROP.value
    refusing = await _bare_h2_peer(nursery, refusal)
    with trio.fail_after(20):
        async with PeerPool([peers.urls[0], refusing], "caller", token=None) as pool:
            # Ties take turns, so some of these go to the refusing peer first.
            for _ in range(4):
                async with pool.stream_sub_workflow("pool-tests", ["keep"], explicit) as call:
                    assert [event async for event in call] == []
                assert call.response is not None
                ref = call.response.remote_refs[call.response.result]
                assert ref.origin_node_id == "node-0"
            assert not pool.members()[1].healthy


async def test_a_silent_peer_does_not_hold_up_the_pool(peers: Peers, nursery: trio.Nursery) -> None:
    # Its HTTP/2 stack answers (SETTINGS, PINGs); its service never does, so
    # connecting to it lasts the whole handshake timeout (10 s by default).
    silent = await _bare_h2_peer(nursery, never_answer)
    with trio.fail_after(5):
        async with PeerPool(
            [silent, peers.urls[0]], "caller", token=None, health_timeout=0.2
        ) as pool:
            silent_member, good = pool.members()
            assert not silent_member.healthy
            assert "did not connect within 0.2s" in (silent_member.failure or "")
            assert good.healthy
            for _ in range(3):
                response = await pool.invoke_sub_workflow("pool-tests", ["where"], None)
                assert response.result == "node-0"
