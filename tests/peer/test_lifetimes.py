"""Ref lifetimes across machines: what survives a call, a scope, and a vanished caller."""

from __future__ import annotations

import pytest
import trio

import peerflow
from peerflow import Limits, PeerServer
from peerflow.testing import open_memory_peer, sever

CONTEXT = "until_context_drop"
PARENT = "until_parent_finish"
EXPLICIT = "until_explicit_drop"


async def test_context_drop_refs_travel_inline_or_are_dropped(server: PeerServer) -> None:
    async with open_memory_peer(server) as client:
        response = await client.invoke_sub_workflow(
            "w", ["refs"], [[CONTEXT, "bytes"], [CONTEXT, "opaque"]]
        )
        shipped, lost = response.result
        assert response.remote_refs == {}
        inline = response.inline_refs[shipped]
        assert inline.payload == b"value-0"
        assert inline.descriptor.type_tag == "peerflow.bytes"
        assert inline.descriptor.lifetime is peerflow.RefLifetime.UNTIL_CONTEXT_DROP
        assert response.dropped_refs == (lost,)
        assert len(server.refs) == 0
        with pytest.raises(peerflow.PeerRefNotFoundError):
            await client.deref_session_ref(shipped)


async def test_parent_finish_refs_live_until_the_client_scope_ends(server: PeerServer) -> None:
    async with open_memory_peer(server) as client:
        response = await client.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"]])
        (ref_uuid,) = response.result
        assert response.remote_refs[ref_uuid].lifetime is peerflow.RefLifetime.UNTIL_PARENT_FINISH
        assert await client.deref_session_ref(ref_uuid) == b"value-0"
        assert len(server.refs) == 1
    assert len(server.refs) == 0


async def test_ref_scope_releases_its_refs_when_the_block_ends(server: PeerServer) -> None:
    async with open_memory_peer(server) as client:
        outer = await client.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"]])
        async with client.ref_scope():
            inner = await client.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"]])
            assert len(server.refs) == 2
        (inner_ref,) = inner.result
        (outer_ref,) = outer.result
        with pytest.raises(peerflow.PeerRefNotFoundError):
            await client.deref_session_ref(inner_ref)
        assert await client.deref_session_ref(outer_ref) == b"value-0"
    assert len(server.refs) == 0


async def test_explicit_drop_refs_outlive_the_client_until_released(server: PeerServer) -> None:
    async with open_memory_peer(server, "node-a") as client:
        response = await client.invoke_sub_workflow("w", ["refs"], [[EXPLICIT, "bytes"]])
        (ref_uuid,) = response.result
    assert len(server.refs) == 1
    # Same caller identity, new connection: the ref is still theirs to release.
    async with open_memory_peer(server, "node-a") as client:
        assert await client.deref_session_ref(ref_uuid) == b"value-0"
        assert await client.release_session_ref(ref_uuid) is True
    assert len(server.refs) == 0


async def test_a_vanished_caller_s_parent_refs_expire_with_its_lease(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with server.running():
        async with open_memory_peer(server, lease_ttl=10) as client:
            await client.invoke_sub_workflow(
                "w", ["refs"], [[PARENT, "bytes"], [EXPLICIT, "bytes"]]
            )
            assert len(server.refs) == 2
            await sever(client)
        # The lease was never closed, so the parent ref waits out its TTL.
        assert len(server.refs) == 2
        await trio.sleep(11)
        assert len(server.refs) == 1  # only the UNTIL_EXPLICIT_DROP ref is left


@pytest.mark.parametrize("limits", [Limits(lease_grace=5.0)])
async def test_without_a_lease_parent_refs_follow_the_connection(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with server.running():
        async with open_memory_peer(server) as client:
            client._leases_supported = False  # behave like a client that knows no leases
            response = await client.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"]])
            (ref_uuid,) = response.result
            assert await client.deref_session_ref(ref_uuid) == b"value-0"
            await sever(client)
        assert len(server.refs) == 1
        await trio.sleep(6)
        assert len(server.refs) == 0


@pytest.mark.parametrize("limits", [Limits(refs_per_caller=2)])
async def test_a_caller_over_its_ref_quota_gets_a_clear_error(server: PeerServer) -> None:
    async with open_memory_peer(server) as client:
        response = await client.invoke_sub_workflow(
            "w", ["refs"], [[EXPLICIT, "bytes"], [EXPLICIT, "bytes"], [EXPLICIT, "bytes"]]
        )
        assert response.error is not None
        assert response.error_type == "RefCapacityError"
    assert len(server.refs) == 0
