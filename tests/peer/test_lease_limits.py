"""Leases are bounded per caller and in all, and expire without scanning the table."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import peerflow
from peerflow import Limits, PeerServer
from peerflow._peer.leases import MAX_LEASE_ID_LENGTH, LeaseTable
from peerflow._peer.service import Caller
from peerflow._refs.registry import SessionRefRegistry
from peerflow._wire.envelopes import InvokeSubWorkflowRequest, LeaseRequest
from peerflow.testing import open_memory_peer

PARENT = "until_parent_finish"
A = ("node-a", None)
B = ("node-b", None)


def new_id() -> str:
    return str(uuid.uuid4())


class RecordingRegistry(SessionRefRegistry):
    """A registry that notes when each scope was dropped."""

    def __init__(self) -> None:
        super().__init__("node-test")
        self.dropped: list[tuple[float, Hashable]] = []

    def drop_scope(self, parent_scope: Hashable) -> int:
        self.dropped.append((trio.current_time(), parent_scope))
        return super().drop_scope(parent_scope)


# -- the caps, end to end --------------------------------------------------------


@pytest.mark.parametrize("limits", [Limits(leases_per_caller=3)])
async def test_a_caller_at_its_lease_cap_can_renew_and_close_but_not_open(
    server: PeerServer,
) -> None:
    async with open_memory_peer(server, "node-a") as client:
        # A client opens one lease when it connects (its own scope), so two more fill the cap.
        ids = [new_id(), new_id()]
        for lease_id in ids:
            await client._lease(LeaseRequest(lease_id, 10_000))
        with pytest.raises(peerflow.PeerLimitError) as info:
            await client._lease(LeaseRequest(new_id(), 10_000))
        assert str(info.value) == (
            "this caller already holds 3 open leases (Limits.leases_per_caller); "
            "close one, or let one expire, first"
        )
        # The leases it holds stay usable.
        renewed = await client._lease(LeaseRequest(ids[0], 20_000))
        assert renewed.ttl_ms == 20_000
        # A call from elsewhere with the same identity is the same caller.
        with pytest.raises(peerflow.PeerLimitError, match="leases_per_caller"):
            server.service.lease(LeaseRequest(new_id(), 10_000), Caller("node-a"))
        # Another caller is untouched.
        async with open_memory_peer(server, "node-c") as other:
            await other._lease(LeaseRequest(new_id(), 10_000))
            assert (await other.invoke_sub_workflow("w", ["echo"], 1)).result == 1
        # Closing one frees a slot.
        closed = await client._lease(LeaseRequest(ids[1], 0, close=True))
        assert closed.ttl_ms == 0
        await client._lease(LeaseRequest(new_id(), 10_000))
        # node-a's three, and the one node-c opened and left to expire.
        assert server.service.leases.statistics().leases == 4


@pytest.mark.parametrize("limits", [Limits(leases_per_caller=2)])
async def test_a_ref_scope_past_the_cap_fails_with_a_limit_error(server: PeerServer) -> None:
    async with open_memory_peer(server, "node-a") as client:
        await client.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"]])
        async with client.ref_scope():  # the client's own scope was the first lease
            with pytest.raises(peerflow.PeerLimitError, match="leases_per_caller"):
                async with client.ref_scope():
                    pass  # pragma: no cover
            # The scope that is open still works.
            response = await client.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"]])
            assert response.error is None
            assert len(server.refs) == 2
        assert len(server.refs) == 1
    assert len(server.refs) == 0
    assert server.service.leases.statistics().leases == 0


@pytest.mark.parametrize("limits", [Limits(leases_per_caller=2, lease_capacity=3)])
async def test_the_peer_wide_lease_capacity_is_enforced(server: PeerServer) -> None:
    # Each client's connection opens one lease: two so far.
    async with open_memory_peer(server, "node-a") as a, open_memory_peer(server, "node-b") as b:
        held = new_id()
        await a._lease(LeaseRequest(held, 10_000))
        with pytest.raises(peerflow.PeerLimitError) as info:
            await b._lease(LeaseRequest(new_id(), 10_000))
        assert "3 open leases (Limits.lease_capacity)" in str(info.value)
        await a._lease(LeaseRequest(held, 10_000))  # renewing still works


async def test_an_overlong_lease_id_is_an_encode_error(server: PeerServer) -> None:
    async with open_memory_peer(server, "node-a") as client:
        with pytest.raises(peerflow.PeerEncodeError) as info:
            await client._lease(LeaseRequest("x" * (MAX_LEASE_ID_LENGTH + 1), 10_000))
        assert info.value.path == "lease_id"
        await client._lease(LeaseRequest("x" * MAX_LEASE_ID_LENGTH, 10_000))
    assert server.service.leases.statistics().leases == 1  # the ok one, left to expire


@pytest.mark.parametrize("limits", [Limits(leases_per_caller=1)])
async def test_an_invoke_naming_a_new_lease_past_the_cap_is_refused(server: PeerServer) -> None:
    service = server.service
    caller = Caller("node-a")
    service.lease(LeaseRequest("first", 10_000), caller)
    request = InvokeSubWorkflowRequest("w", ("echo",), 1, lease_id="second")
    with pytest.raises(peerflow.PeerLimitError):
        await service.invoke(request, caller)
    named = InvokeSubWorkflowRequest("w", ("echo",), 1, lease_id="first")
    assert (await service.invoke(named, caller)).result == 1


async def test_callers_are_node_id_plus_principal() -> None:
    table = LeaseTable(SessionRefRegistry("n"), per_caller=1)
    table.renew(("node-a", None), "l", 10)
    table.renew(("node-a", "CN=alice"), "l", 10)
    with pytest.raises(peerflow.PeerLimitError):
        table.renew(("node-a", "CN=alice"), "m", 10)
    assert len(table) == 2


def test_limits_validate_the_lease_caps() -> None:
    assert Limits().leases_per_caller == 1024
    with pytest.raises(ValueError, match="leases_per_caller"):
        Limits(leases_per_caller=0)
    with pytest.raises(ValueError, match="lease_capacity"):
        Limits(lease_capacity=-1)


# -- expiry ----------------------------------------------------------------------


@asynccontextmanager
async def reaping(table: LeaseTable) -> AsyncIterator[None]:
    """``table``'s reaper runs while the block does."""
    async with trio.open_nursery() as nursery:
        await nursery.start(table.run_reaper)
        yield
        nursery.cancel_scope.cancel()


async def test_leases_expire_in_deadline_order_and_renewals_push_them_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refs = RecordingRegistry()
    table = LeaseTable(refs)
    async with reaping(table):
        table.renew(A, "ten", 10)
        table.renew(A, "five", 5)
        table.renew(B, "twenty", 20)
        table.scope(B, "named", 7)  # a lease a call names before opening it
        await trio.sleep(4)
        table.renew(A, "five", 10)  # now due at 14
        table.renew(B, "twenty", 1)  # brought forward: due at 5
        await trio.sleep(30)
    assert refs.dropped == [
        (5.0, LeaseTable.key(B, "twenty")),
        (7.0, LeaseTable.key(B, "named")),
        (10.0, LeaseTable.key(A, "ten")),
        (14.0, LeaseTable.key(A, "five")),
    ]
    assert len(table) == 0
    assert table.statistics().leases == 0


async def test_a_new_earlier_deadline_wakes_the_sleeping_reaper(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refs = RecordingRegistry()
    table = LeaseTable(refs)
    async with reaping(table):
        table.hold("connection")  # never due: the reaper sleeps with no deadline
        table.renew(A, "late", 100)
        await trio.sleep(1)
        table.renew(A, "soon", 2)
        table.expire_after("connection", 4)
        await trio.sleep(200)
    assert refs.dropped == [
        (3.0, LeaseTable.key(A, "soon")),
        (5.0, "connection"),
        (100.0, LeaseTable.key(A, "late")),
    ]


async def test_closed_leases_free_their_slot_and_are_not_expired_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refs = RecordingRegistry()
    table = LeaseTable(refs, per_caller=1)
    table.renew(A, "one", 5)
    table.close(A, "one")
    table.renew(A, "two", 10)
    await trio.sleep(20)
    refs.dropped.clear()
    table.expire_due()
    assert refs.dropped == [(20.0, LeaseTable.key(A, "two"))]


# -- cost ------------------------------------------------------------------------


async def test_expiry_examines_only_what_came_due(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refs = RecordingRegistry()
    table = LeaseTable(refs, per_caller=20_000)
    for n in range(10_000):
        table.renew(A, f"long-{n}", 3600)
    for n in range(10):
        table.renew(A, f"short-{n}", 1)
    await trio.sleep(2)
    assert table.expire_due() == 0  # no refs were bound to them
    stats = table.statistics()
    assert stats.examined == 10
    assert stats.leases == 10_000
    assert len(refs.dropped) == 10
    # Renewals that push deadlines back queue nothing new...
    for _ in range(5):
        for n in range(10_000):
            table.renew(A, f"long-{n}", 3600)
    assert table.statistics().queued == 10_000
    # ...and cost one look each when the old deadline comes, not one per renewal.
    await trio.sleep(3599)  # past the first deadlines, before the renewed ones
    table.expire_due()
    assert table.statistics().examined == 10 + 10_000
    assert table.statistics().leases == 10_000


async def test_the_heap_stays_bounded_under_open_close_churn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = LeaseTable(SessionRefRegistry("n"))
    table.renew(B, "kept", 3600)
    for n in range(50_000):
        table.renew(A, str(n), 3600)
        table.close(A, str(n))
        # Bringing a deadline forward leaves a stale entry behind too.
        table.renew(B, "kept", 3600 - n / 100)
    stats = table.statistics()
    assert stats.leases == 1
    assert stats.queued <= 2 * stats.scopes + 64
