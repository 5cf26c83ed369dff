"""Our PeerClient calls a grpcio server that implements the Peer service from the spec alone.

Every test runs against two flavours of that server: one with the optional
``Lease`` method and a minimal one without it (grpcio answers UNIMPLEMENTED),
which our client must cope with.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from interop_grpcio_server import ReferencePeer
from interop_peer import wait_until

import peerflow
from peer_steps import Progress
from peerflow import PeerClient, RefLifetime, RemoteRefDescriptor

TIMEOUT = 20


@pytest.fixture(params=[True, False], ids=["with-lease", "without-lease"])
def leases(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def peer(leases: bool) -> Iterator[ReferencePeer]:
    peer = ReferencePeer(leases=leases)
    peer.start()
    yield peer
    peer.stop()


async def test_invoke_decodes_result_state_and_every_kind_of_ref(peer: ReferencePeer) -> None:
    value = {"doc": [1, "two", b"3", 4.5, None, True, -(2**63), 2**64 - 1]}
    wanted = ["until_explicit_drop", "until_parent_finish", "until_context_drop", "dropped"]
    with trio.fail_after(TIMEOUT):
        async with PeerClient.connect(peer.url, "node-a", token=None) as client:
            response = await client.invoke_sub_workflow("w", ["echo"], value)
            refs = await client.invoke_sub_workflow("w", ["refs"], wanted)
    response.raise_for_error()
    assert response.result == value
    # The peer's extra "added_later" key is ignored, as unknown keys must be.
    assert response.state == {"node": "grpcio-peer", "seen": value}
    explicit, parent, inline, dropped = refs.result
    assert set(refs.remote_refs) == {explicit, parent}
    descriptor = refs.remote_refs[explicit]
    assert isinstance(descriptor, RemoteRefDescriptor)
    assert descriptor.origin_node_id == "grpcio-peer"
    assert descriptor.type_tag == "peerflow.bytes"
    assert descriptor.lifetime is RefLifetime.UNTIL_EXPLICIT_DROP
    assert descriptor.size == len(b"value-0")
    assert descriptor.created_at_epoch_ms > 0
    assert refs.remote_refs[parent].lifetime is RefLifetime.UNTIL_PARENT_FINISH
    assert set(refs.inline_refs) == {inline}
    assert refs.inline_refs[inline].payload == b"value-2"
    assert refs.inline_refs[inline].descriptor.lifetime is RefLifetime.UNTIL_CONTEXT_DROP
    assert refs.dropped_refs == (dropped,)


async def test_requests_carry_what_the_spec_asks_for(peer: ReferencePeer, leases: bool) -> None:
    with trio.fail_after(TIMEOUT):
        async with PeerClient.connect(peer.url, "node-a", token="s3cret") as client:
            await client.invoke_sub_workflow("w", ["echo"], [1], timeout=5)
    (seen,) = peer.requests("Invoke")
    assert seen.metadata["x-peerflow-peer-node-id"] == "node-a"
    assert seen.metadata["authorization"] == "Bearer s3cret"
    expected = {
        "v": 1,
        "workflow_name": "w",
        "step_ids": ["echo"],
        "input": [1],
        "timeout_ms": 5000,
    }
    if leases:
        (opened, _) = peer.requests("Lease")
        expected["lease_id"] = opened.request["lease_id"]
    assert seen.request == expected
    # The timeout also travelled as grpc-timeout, which grpcio turns into its deadline.
    assert seen.time_remaining is not None
    assert 0 < seen.time_remaining <= 5


async def test_deref_joins_the_chunks_and_release_drops_the_ref(peer: ReferencePeer) -> None:
    size = 10 * 1024
    with trio.fail_after(TIMEOUT):
        async with PeerClient.connect(peer.url, "node-a", token=None) as client:
            ref_uuid = (await client.invoke_sub_workflow("w", ["big"], size)).result
            async with client.open_session_ref(ref_uuid) as chunks:
                parts = [chunk async for chunk in chunks]
            assert [len(part) for part in parts] == [1000] * 10 + [240]
            expected = bytes(range(256)) * (size // 256)
            assert b"".join(parts) == expected
            assert await client.deref_session_ref(ref_uuid) == expected
            assert await client.release_session_ref(ref_uuid) is True
            assert await client.release_session_ref(ref_uuid) is False
            with pytest.raises(peerflow.PeerRefNotFoundError) as info:
                await client.deref_session_ref(ref_uuid)
            assert info.value.ref_uuid == ref_uuid
            empty = (await client.invoke_sub_workflow("w", ["big"], 0)).result
            assert await client.deref_session_ref(empty) == b""
    assert ref_uuid not in peer.refs


async def test_until_parent_finish_refs_are_released_when_their_scope_ends(
    peer: ReferencePeer, leases: bool
) -> None:
    with trio.fail_after(TIMEOUT):
        async with PeerClient.connect(peer.url, "node-a", token=None) as client:
            outer = await client.invoke_sub_workflow(
                "w", ["refs"], ["until_parent_finish", "until_explicit_drop"]
            )
            async with client.ref_scope():
                inner = await client.invoke_sub_workflow("w", ["refs"], ["until_parent_finish"])
                assert set(inner.result) <= set(peer.refs)
            assert not set(inner.result) & set(peer.refs)
            assert set(outer.result) <= set(peer.refs)
            # The client keeps working after the scope's release.
            assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
    parent, explicit = outer.result
    assert set(peer.refs) == {explicit}
    invokes = peer.requests("Invoke")
    if leases:
        # Open the client's lease, then the block's; each invoke names its own.
        root, block, block_closed, root_closed = (s.request for s in peer.requests("Lease"))
        assert root["ttl_ms"] == block["ttl_ms"] == 30_000
        assert [s.request["lease_id"] for s in invokes] == [
            root["lease_id"],
            block["lease_id"],
            root["lease_id"],
        ]
        assert (block_closed["lease_id"], block_closed["close"]) == (block["lease_id"], True)
        assert (root_closed["lease_id"], root_closed["close"]) == (root["lease_id"], True)
        assert peer.requests("Release") == []
        assert peer.open_leases == {}
    else:
        # No leases: no lease_id is sent, and the refs go one ReleaseSessionRef at a time.
        assert all("lease_id" not in s.request for s in invokes)
        released = [s.request["ref_uuid"] for s in peer.requests("Release")]
        assert released == [*inner.result, parent]


async def test_stream_sub_workflow_yields_typed_events_then_the_response(
    peer: ReferencePeer,
) -> None:
    events = []
    with trio.fail_after(TIMEOUT):
        async with PeerClient.connect(peer.url, "node-a", token=None) as client:
            async with client.stream_sub_workflow("w", ["progress"], None) as call:
                async for event in call:
                    events.append(event)
                    assert call.response is None
                    # The peer holds its second event until this one has arrived.
                    peer.gate.set()
            async with client.stream_sub_workflow("w", ["echo"], "quiet") as quiet:
                assert [event async for event in quiet] == []
    assert events == [Progress(1), Progress(2)]
    assert call.response is not None
    assert call.response.result == "done"
    assert quiet.response is not None
    assert quiet.response.result == "quiet"


async def test_error_statuses_become_the_errors_the_spec_names(peer: ReferencePeer) -> None:
    with trio.fail_after(TIMEOUT):
        async with PeerClient.connect(peer.url, "node-a", token=None) as client:
            with pytest.raises(peerflow.PeerUnknownStepError) as unknown:
                await client.invoke_sub_workflow("w", ["nope"], None)
            assert unknown.value.step_id == "nope"

            async def stream_nope() -> None:
                async with client.stream_sub_workflow("w", ["nope"], None) as call:
                    async for _ in call:
                        pass

            with pytest.raises(peerflow.PeerUnknownStepError):
                await stream_nope()

            with pytest.raises(peerflow.PeerTransportError) as unavailable:
                await client.invoke_sub_workflow("w", ["unavailable"], None)
            # UNAVAILABLE: the call may be retried elsewhere (PeerPool does).
            assert type(unavailable.value) is peerflow.PeerUnavailableError
            assert "UNAVAILABLE" in str(unavailable.value)
            assert "going away" in str(unavailable.value)

            # NOT_FOUND with no details is only a transport error: nothing says what is missing.
            with pytest.raises(peerflow.PeerTransportError) as plain:
                await client.invoke_sub_workflow("w", ["not-found-plain"], None)
            assert type(plain.value) is peerflow.PeerTransportError

            with pytest.raises(peerflow.PeerEnvelopeVersionError) as version:
                await client.invoke_sub_workflow("w", ["future"], None)
            assert (version.value.got, version.value.supported) == (99, 1)

            failed = await client.invoke_sub_workflow("w", ["fail"], None)
            with pytest.raises(peerflow.PeerWorkflowError) as workflow:
                failed.raise_for_error()
            assert (workflow.value.step_id, workflow.value.error_type) == ("fail", "ValueError")

            # None of that hurt the connection.
            assert (await client.invoke_sub_workflow("w", ["echo"], "ok")).result == "ok"


async def test_a_client_timeout_raises_and_the_grpcio_peer_sees_the_call_end(
    peer: ReferencePeer,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with PeerClient.connect(peer.url, "node-a", token=None) as client:
            with pytest.raises(peerflow.PeerTimeoutError):
                await client.invoke_sub_workflow("w", ["hang"], None, timeout=0.5)
            assert await trio.to_thread.run_sync(peer.hang_ended.wait, 5.0)
            assert (await client.invoke_sub_workflow("w", ["echo"], 2)).result == 2
    (hang, _) = peer.requests("Invoke")
    assert hang.request["timeout_ms"] == 500
    assert hang.time_remaining is not None
    assert hang.time_remaining <= 0.5


async def test_one_connection_carries_many_concurrent_calls(peer: ReferencePeer) -> None:
    results: dict[int, object] = {}
    with trio.fail_after(TIMEOUT):
        async with PeerClient.connect(peer.url, "node-a", token=None) as client:

            async def call(i: int) -> None:
                results[i] = (await client.invoke_sub_workflow("w", ["echo"], i)).result

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(call, i)
    assert results == {i: i for i in range(100)}


async def test_cancelling_the_caller_ends_the_call_on_the_grpcio_peer(peer: ReferencePeer) -> None:
    with trio.fail_after(TIMEOUT):
        async with PeerClient.connect(peer.url, "node-a", token=None) as client:
            with trio.move_on_after(0.2) as scope:
                await client.invoke_sub_workflow("w", ["hang"], None)
            assert scope.cancelled_caught
            # RST_STREAM(CANCEL) reached grpcio, which ended the call's context.
            assert await trio.to_thread.run_sync(peer.hang_ended.wait, 5.0)
            assert (await client.invoke_sub_workflow("w", ["echo"], 3)).result == 3


async def test_large_messages_cross_grpcio_flow_control_both_ways() -> None:
    peer = ReferencePeer(max_receive_message_length=64 * 1024 * 1024)
    peer.start()
    value = bytes(range(256)) * (8 * 4096)  # 8 MiB, far beyond any initial window
    try:
        with trio.fail_after(TIMEOUT):
            async with PeerClient.connect(peer.url, "node-a", token=None) as client:
                response = await client.invoke_sub_workflow("w", ["echo"], value)
    finally:
        await trio.to_thread.run_sync(peer.stop)
    assert response.result == value


async def test_our_client_refuses_an_oversized_message_and_keeps_the_connection(
    peer: ReferencePeer,
) -> None:
    limits = peerflow.Limits(max_message_size=512)
    with trio.fail_after(TIMEOUT):
        async with PeerClient.connect(peer.url, "node-a", token=None, limits=limits) as client:
            ref_uuid = (await client.invoke_sub_workflow("w", ["big"], 4096)).result
            with pytest.raises(peerflow.PeerLimitError):
                await client.deref_session_ref(ref_uuid)
            assert (await client.invoke_sub_workflow("w", ["echo"], 4)).result == 4


async def test_a_peer_that_stopped_fails_the_next_call_with_a_transport_error(
    peer: ReferencePeer,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with PeerClient.connect(peer.url, "node-a", token=None) as client:
            assert (await client.invoke_sub_workflow("w", ["echo"], 5)).result == 5
            await trio.to_thread.run_sync(peer.stop)
            with pytest.raises(peerflow.PeerTransportError):
                await client.invoke_sub_workflow("w", ["echo"], 6)


async def test_a_call_in_flight_finishes_while_grpcio_shuts_down_gracefully(
    peer: ReferencePeer,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with PeerClient.connect(peer.url, "node-a", token=None) as client:
            results = []

            async def call() -> None:
                results.append((await client.invoke_sub_workflow("w", ["gated"], None)).result)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await wait_until(lambda: len(peer.requests("Invoke")) == 1)
                await trio.to_thread.run_sync(peer.begin_graceful_stop, 5.0)
                peer.gate.set()
    assert results == ["through the gate"]


async def test_an_early_error_answer_wins_over_the_request_still_being_sent() -> None:
    # grpcio refuses an oversized request as soon as its length prefix arrives:
    # a complete RESOURCE_EXHAUSTED answer, then RST_STREAM(NO_ERROR) to stop
    # the upload (RFC 9113 8.1). The client must report the answer.
    peer = ReferencePeer(max_receive_message_length=1024)
    peer.start()
    try:
        with trio.fail_after(TIMEOUT):
            async with PeerClient.connect(peer.url, "node-a", token=None) as client:
                with pytest.raises(peerflow.PeerLimitError):
                    await client.invoke_sub_workflow("w", ["echo"], bytes(8 * 1024 * 1024))
    finally:
        await trio.to_thread.run_sync(peer.stop)
