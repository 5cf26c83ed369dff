"""InvokeSubWorkflow, ReleaseSessionRef and DerefSessionRef over the in-memory pair."""

from __future__ import annotations

import pytest
import trio

import peerflow
from peer_steps import Probe
from peerflow import Limits, PeerClient, PeerServer
from peerflow.testing import open_memory_peer


async def test_invoke_returns_result_and_exported_state(client: PeerClient) -> None:
    response = await client.invoke_sub_workflow("w", ["echo"], {"doc": [1, "two", b"3"]})
    assert response.error is None
    assert response.result == {"doc": [1, "two", b"3"]}
    response = await client.invoke_sub_workflow("w", ["stateful"], {"x": 1.5})
    assert response.state == {"seen": {"x": 1.5}, "node": "node-b"}
    response.raise_for_error()


async def test_a_failed_run_comes_back_as_an_error_field(
    client: PeerClient, server: PeerServer
) -> None:
    response = await client.invoke_sub_workflow("w", ["boom"], None)
    assert response.result is None
    assert response.error is not None
    assert "kaput" in response.error
    assert response.error_step_id == "boom"
    assert response.error_type == "ValueError"
    with pytest.raises(peerflow.PeerWorkflowError) as info:
        response.raise_for_error()
    assert info.value.step_id == "boom"
    assert info.value.error_type == "ValueError"
    # Even an UNTIL_EXPLICIT_DROP ref of a failed run is purged: nobody was told of it.
    assert len(server.refs) == 0


async def test_unknown_step_raises_before_anything_runs(client: PeerClient, probe: Probe) -> None:
    with pytest.raises(peerflow.PeerUnknownStepError) as info:
        await client.invoke_sub_workflow("w", ["echo", "no-such-step"], {})
    assert info.value.step_id == "no-such-step"
    assert probe.ran == []


async def test_a_repeated_step_id_runs_the_step_once_on_every_call(
    client: PeerClient, probe: Probe
) -> None:
    for n in range(3):  # the second call reuses the workflow built by the first
        response = await client.invoke_sub_workflow("w", ["echo", "echo"], n)
        assert response.result == n
    assert probe.ran == ["echo"] * 3


async def test_input_that_cannot_travel_names_its_path(client: PeerClient) -> None:
    with pytest.raises(peerflow.PeerEncodeError) as info:
        await client.invoke_sub_workflow("w", ["echo"], {"rows": [1, 2, {"when": {1, 2}}]})
    assert info.value.path == 'input["rows"][2]["when"]'
    with pytest.raises(TypeError):
        await client.invoke_sub_workflow("w", "echo", {})


async def test_a_result_that_cannot_travel_is_an_error_that_keeps_the_refs(
    client: PeerClient, server: PeerServer
) -> None:
    response = await client.invoke_sub_workflow("w", ["unsendable"], None)
    assert response.error is not None
    assert 'result["when"]' in response.error
    assert response.error_type == "PeerEncodeError"
    (ref_uuid,) = response.remote_refs
    assert await client.release_session_ref(ref_uuid) is True
    assert len(server.refs) == 0


async def test_one_connection_carries_many_concurrent_calls(client: PeerClient) -> None:
    results: dict[int, object] = {}

    async def call(i: int) -> None:
        response = await client.invoke_sub_workflow("w", ["echo"], i)
        results[i] = response.result

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(call, i)
    assert results == {i: i for i in range(200)}


async def test_release_says_whether_the_ref_was_there(
    client: PeerClient, server: PeerServer
) -> None:
    response = await client.invoke_sub_workflow("w", ["refs"], [["until_explicit_drop", "bytes"]])
    (ref_uuid,) = response.result
    assert ref_uuid in response.remote_refs
    assert await client.release_session_ref(ref_uuid) is True
    assert await client.release_session_ref(ref_uuid) is False
    assert len(server.refs) == 0


async def test_deref_returns_the_bytes_and_the_descriptor_describes_them(
    client: PeerClient,
) -> None:
    response = await client.invoke_sub_workflow("w", ["refs"], [["until_explicit_drop", "bytes"]])
    (ref_uuid,) = response.result
    descriptor = response.remote_refs[ref_uuid]
    assert descriptor.origin_node_id == "node-b"
    assert descriptor.type_tag == "peerflow.bytes"
    assert descriptor.lifetime is peerflow.RefLifetime.UNTIL_EXPLICIT_DROP
    assert descriptor.size == len(b"value-0")
    assert descriptor.created_at_epoch_ms > 0
    assert await client.deref_session_ref(ref_uuid) == b"value-0"


@pytest.mark.parametrize("limits", [Limits(max_deref_chunk=64 * 1024)])
async def test_deref_of_a_large_value_streams_in_chunks(client: PeerClient) -> None:
    size = 5 * 1024 * 1024
    response = await client.invoke_sub_workflow("w", ["big"], size)
    ref_uuid = response.result
    async with client.open_session_ref(ref_uuid) as stream:
        chunks = [chunk async for chunk in stream]
    assert len(chunks) == size // (64 * 1024)
    assert b"".join(chunks) == bytes(range(256)) * (size // 256)
    assert await client.deref_session_ref(ref_uuid) == b"".join(chunks)


async def test_deref_of_a_live_only_value_says_so(client: PeerClient) -> None:
    response = await client.invoke_sub_workflow("w", ["refs"], [["until_explicit_drop", "opaque"]])
    (ref_uuid,) = response.result
    assert response.remote_refs[ref_uuid].serializable is False
    with pytest.raises(peerflow.PeerRefNotSerializableError) as info:
        await client.deref_session_ref(ref_uuid)
    assert info.value.ref_uuid == ref_uuid
    assert await client.release_session_ref(ref_uuid) is True


async def test_unknown_ref_is_not_found(client: PeerClient) -> None:
    with pytest.raises(peerflow.PeerRefNotFoundError):
        await client.deref_session_ref("00000000-0000-4000-8000-000000000000")


async def test_another_caller_cannot_touch_my_refs(server: PeerServer) -> None:
    async with (
        open_memory_peer(server, "node-a") as mine,
        open_memory_peer(server, "node-c") as theirs,
    ):
        response = await mine.invoke_sub_workflow("w", ["refs"], [["until_explicit_drop", "bytes"]])
        (ref_uuid,) = response.result
        with pytest.raises(peerflow.PeerRefNotFoundError):
            await theirs.deref_session_ref(ref_uuid)
        assert await theirs.release_session_ref(ref_uuid) is False
        assert await mine.deref_session_ref(ref_uuid) == b"value-0"
        assert await mine.release_session_ref(ref_uuid) is True


async def test_streamed_events_arrive_while_the_remote_run_is_still_going(
    client: PeerClient, probe: Probe
) -> None:
    seen = []
    async with client.stream_sub_workflow("w", ["progress"], None) as call:
        async for event in call:
            seen.append(event)
            # The run is parked on the gate: this event arrived before its end.
            assert call.response is None
            probe.gate.set()
    assert [type(e).__name__ for e in seen] == ["Progress", "Progress"]
    assert [e.n for e in seen] == [1, 2]  # type: ignore[attr-defined]
    assert call.response is not None
    assert call.response.result == "done"


async def test_streaming_an_unknown_step_raises(client: PeerClient) -> None:
    async def consume() -> None:
        async with client.stream_sub_workflow("w", ["nope"], None) as call:
            async for _ in call:
                pass

    with pytest.raises(peerflow.PeerUnknownStepError):
        await consume()


def test_a_server_needs_a_node_id() -> None:
    # Every ref descriptor names its origin by it: "" would name none.
    with pytest.raises(ValueError, match="node_id cannot be empty"):
        PeerServer("", token=None)
    with pytest.raises(TypeError, match="node_id must be a str"):
        PeerServer(7, token=None)  # type: ignore[arg-type]
