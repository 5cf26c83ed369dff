"""PeerPool.ref_scope(), and a pool's life: closed, opened again."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import attrs
import pytest
import trio

from peerflow import (
    Context,
    PeerPool,
    PeerRefNotFoundError,
    PeerServer,
    PeerUnavailableError,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)
from peerflow._peer import pool as pool_module

PARENT = RefLifetime.UNTIL_PARENT_FINISH.value
EXPLICIT = RefLifetime.UNTIL_EXPLICIT_DROP.value


def _registry() -> StepRegistry:
    registry = StepRegistry()
    wf = Workflow("scopes", registry=registry)

    @wf.step("keep", accepts=[StartEvent])
    async def keep(event: StartEvent, ctx: Context) -> StopEvent:
        return StopEvent(result=ctx.refs.insert(b"kept", lifetime=RefLifetime(event.data)))

    return registry


@attrs.define
class Peers:
    servers: list[PeerServer]
    urls: list[str]

    def refs(self) -> int:
        return sum(len(server.refs) for server in self.servers)

    def holding(self, ref_uuid: str) -> bool:
        return any(_holds(server, ref_uuid) for server in self.servers)


def _holds(server: PeerServer, ref_uuid: str) -> bool:
    # Whoever owns it: the registry's own lookups all check the owner.
    return ref_uuid in server.refs._entries


@pytest.fixture
async def peers(nursery: trio.Nursery) -> Peers:
    registry = _registry()
    found = Peers([], [])
    for index in range(2):
        server = PeerServer(f"node-{index}", registry=registry, token=None)
        with trio.fail_after(10):
            address = await nursery.start(server.serve, "127.0.0.1", 0)
        found.servers.append(server)
        found.urls.append(address.url)
    return found


async def _keep(pool: PeerPool, lifetime: str = PARENT) -> str:
    response = await pool.invoke_sub_workflow("scopes", ["keep"], lifetime)
    ref_uuid: str = response.result
    return ref_uuid


async def test_a_ref_scope_releases_its_refs_on_every_peer_when_it_ends(peers: Peers) -> None:
    with trio.fail_after(20):
        async with PeerPool(peers.urls, "caller", token=None) as pool:
            outside = await _keep(pool)
            async with pool.ref_scope():
                inside = [await _keep(pool) for _ in range(4)]
                # Calls from tasks started inside the block belong to it too.
                async with trio.open_nursery() as nursery:
                    for _ in range(2):
                        nursery.start_soon(_keep, pool)
                async with pool.stream_sub_workflow("scopes", ["keep"], PARENT) as call:
                    assert [event async for event in call] == []
                explicit = await _keep(pool, EXPLICIT)
                assert all(server.refs for server in peers.servers)  # both peers used
                assert peers.refs() == 1 + 4 + 2 + 1 + 1
            assert peers.refs() == 2
            assert not any(peers.holding(ref_uuid) for ref_uuid in inside)
            # The pool's own ref and an UNTIL_EXPLICIT_DROP ref are untouched.
            assert await pool.deref_session_ref(outside) == b"kept"
            assert await pool.release_session_ref(explicit) is True
        assert peers.refs() == 0


async def test_ref_scopes_nest(peers: Peers) -> None:
    with trio.fail_after(20):
        async with PeerPool(peers.urls, "caller", token=None) as pool:
            async with pool.ref_scope():
                outer = [await _keep(pool) for _ in range(2)]
                async with pool.ref_scope():
                    inner = [await _keep(pool) for _ in range(2)]
                    assert peers.refs() == 4
                assert peers.refs() == 2
                assert all(peers.holding(ref_uuid) for ref_uuid in outer)
                assert not any(peers.holding(ref_uuid) for ref_uuid in inner)
                assert await _keep(pool)  # the outer scope still takes refs
                assert peers.refs() == 3
            assert peers.refs() == 0
            leases = [server.service.leases.statistics().leases for server in peers.servers]
        # The scopes' leases were closed, not left to be renewed.
        assert leases == [1, 1]  # each member connection's own


async def test_a_task_that_outlives_its_scope_calls_into_the_enclosing_one(
    peers: Peers,
) -> None:
    made: list[str] = []
    with trio.fail_after(20):
        async with PeerPool(peers.urls, "caller", token=None) as pool:
            scope_ended = trio.Event()

            async def late_call() -> None:
                await scope_ended.wait()
                made.append(await _keep(pool))

            async with trio.open_nursery() as nursery:
                async with pool.ref_scope():
                    nursery.start_soon(late_call)
                scope_ended.set()
            # Its ref belongs to the pool's block, so it lives until that ends.
            assert peers.holding(made[0])
        assert peers.refs() == 0


class _Events(logging.Handler):
    """Sets an event when the pool logs a message containing ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@attrs.define
class Relay:
    """A TCP relay to one peer whose connections can all be cut at once."""

    url: str
    cuts: list[trio.CancelScope] = attrs.field(factory=list)

    def cut(self) -> None:
        for scope in self.cuts:
            scope.cancel()


@pytest.fixture
async def relay(peers: Peers, nursery: trio.Nursery) -> AsyncIterator[Relay]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    target = int(peers.urls[1].rsplit(":", 1)[1])
    found = Relay(f"http://127.0.0.1:{port}")

    async def pump(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        async for data in source:
            await sink.send_all(data)

    async def serve(client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            found.cuts.append(scope)
            upstream = await trio.open_tcp_stream("127.0.0.1", target)
            async with client, upstream, trio.open_nursery() as both:
                both.start_soon(pump, client, upstream)
                both.start_soon(pump, upstream, client)

    nursery.start_soon(trio.serve_listeners, serve, listeners)
    yield found
    nursery.cancel_scope.cancel()


async def test_a_member_that_reconnects_mid_scope_keeps_the_scope_s_refs(
    peers: Peers, relay: Relay
) -> None:
    # node-1 is reached through the relay; cutting it makes the pool
    # reconnect there while the scope is open.
    back = _Events("is back")
    log = logging.getLogger("peerflow.peer.pool")
    level = log.level
    log.setLevel(logging.INFO)  # "is back" is INFO
    log.addHandler(back)
    node_1 = peers.servers[1]
    try:
        with trio.fail_after(20):
            async with PeerPool(
                [peers.urls[0], relay.url],
                "caller",
                token=None,
                lease_ttl=1.0,
                health_interval=0.05,
                reconnect_delay=0.01,
            ) as pool:
                outside = await _keep(pool)
                leases_before = node_1.service.leases.statistics().leases
                async with pool.ref_scope():
                    before = [await _keep(pool) for _ in range(4)]  # ties take turns
                    on_node_1 = [ref_uuid for ref_uuid in before if _holds(node_1, ref_uuid)]
                    assert on_node_1
                    relay.cut()
                    await back.event.wait()
                    assert pool.members()[1].healthy
                    # Not a synchronisation: a lease not renewed over the new
                    # connection would lapse (1 s) and take the refs with it.
                    await trio.sleep(1.5)
                    # Refs bound over the old connection are still there.
                    for ref_uuid in on_node_1:
                        assert await pool.deref_session_ref(ref_uuid) == b"kept"
                    after = [await _keep(pool) for _ in range(4)]
                    assert any(_holds(node_1, ref_uuid) for ref_uuid in after)
                # Released everywhere, over both connections of node-1.
                assert not any(peers.holding(ref_uuid) for ref_uuid in before + after)
                assert peers.holding(outside)
                # The scope's lease is closed; the new connection's own lease
                # stands for the cut one's, which lapsed.
                assert node_1.service.leases.statistics().leases == leases_before
            assert peers.refs() == 0
    finally:
        log.removeHandler(back)
        log.setLevel(level)


async def test_calls_on_a_pool_that_is_not_open_say_so(peers: Peers) -> None:
    pool = PeerPool(peers.urls, "caller", token=None)
    with trio.fail_after(20):
        with pytest.raises(PeerUnavailableError, match="not open"):
            await _keep(pool)
        async with pool:
            ref_uuid = await _keep(pool, EXPLICIT)
        for call in (
            _keep(pool),
            pool.deref_session_ref(ref_uuid),
            pool.release_session_ref(ref_uuid),
        ):
            with pytest.raises(PeerUnavailableError, match="this PeerPool is not open"):
                await call
        with pytest.raises(PeerUnavailableError, match="not open"):
            async with pool.stream_sub_workflow("scopes", ["keep"], PARENT):
                pytest.fail("streamed from a closed pool")
        with pytest.raises(PeerUnavailableError, match="not open"):
            async with pool.ref_scope():
                pytest.fail("opened a ref scope on a closed pool")


async def test_a_closed_pool_can_be_opened_again(peers: Peers) -> None:
    pool = PeerPool(peers.urls, "caller", token=None)
    with trio.fail_after(20):
        async with pool:
            kept = await _keep(pool, EXPLICIT)
            await _keep(pool)
            with pytest.raises(RuntimeError, match="already open"):
                async with pool:
                    pytest.fail("opened an open pool")
        assert peers.refs() == 1
        async with pool:
            assert all(member.healthy for member in pool.members())
            assert all(member.outstanding == 0 for member in pool.members())
            async with pool.ref_scope():
                await _keep(pool)
            await _keep(pool)
            # A ref from the last opening still goes home without its node.
            assert await pool.release_session_ref(kept) is True
            assert peers.refs() == 1
        assert peers.refs() == 0


async def test_a_pool_that_failed_to_open_can_be_entered_again() -> None:
    pool = PeerPool(["http://127.0.0.1:1"], "caller", token=None)
    with trio.fail_after(20):
        for _ in range(2):  # not "already open" the second time
            with pytest.raises(PeerUnavailableError, match="no peer of the pool is reachable"):
                async with pool:
                    pytest.fail("entered a pool with no reachable peer")


async def test_a_released_ref_is_forgotten_by_its_scope(peers: Peers) -> None:
    # A long-lived pool releasing its refs one by one must not remember them all.
    with trio.fail_after(20):
        async with PeerPool(peers.urls, "caller", token=None) as pool:
            for _ in range(5):
                assert await pool.release_session_ref(await _keep(pool)) is True
            root = pool._root
            assert root is not None
            assert root.refs == set()
            assert pool._ref_nodes == {}
        assert peers.refs() == 0


async def test_a_ref_released_again_answers_false_as_on_a_client(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "_RELEASED_KEPT", 2)
    with trio.fail_after(20):
        async with PeerPool(peers.urls, "caller", token=None) as pool:
            refs = [await _keep(pool) for _ in range(3)]
            for ref_uuid in refs:
                assert await pool.release_session_ref(ref_uuid) is True
            # The latest two are still routed to their nodes, which no longer
            # hold them.
            assert await pool.release_session_ref(refs[2]) is False
            with pytest.raises(PeerRefNotFoundError, match="not found"):
                await pool.deref_session_ref(refs[1])
            # The oldest was forgotten: the pool cannot say where it lived.
            with pytest.raises(PeerRefNotFoundError, match="released it long ago"):
                await pool.release_session_ref(refs[0])
            assert len(pool._released) == 2
