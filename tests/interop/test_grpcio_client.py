"""grpcio, a third-party gRPC stack, calls our PeerServer over a real loopback socket.

Requests and responses are plain msgpack maps written from protocol/README.md;
grpcio does the HTTP/2 and the gRPC framing.
"""

from __future__ import annotations

import uuid

import grpc
import pytest
import trio
import trio.testing
from interop_peer import (
    CHANNEL_OPTIONS,
    SERVICE,
    GrpcioCaller,
    error_details,
    invoke_request,
    pack,
    status_of,
    wait_until,
)

import peerflow
from peer_steps import Probe
from peerflow import Limits, PeerAddress, PeerServer

# Bounds every test that touches a socket; generous because CI machines stall.
TIMEOUT = 20


async def test_invoke_answers_with_a_response_shaped_as_the_spec_says(
    caller: GrpcioCaller,
) -> None:
    value = {"doc": [1, "two", b"3", 4.5, None, True, -(2**63), 2**64 - 1], "nested": {"k": {}}}
    with trio.fail_after(TIMEOUT):
        response = await caller.unary("InvokeSubWorkflow", invoke_request(["echo"], value))
        assert response == {"v": 1, "result": value, "state": {}, "remote_refs": {}, "error": None}
        response = await caller.unary("InvokeSubWorkflow", invoke_request(["stateful"], [1]))
        assert response["state"] == {"seen": [1], "node": "node-b"}
        assert response["result"] == "ok"


async def test_a_failed_run_is_an_ok_status_with_error_set(caller: GrpcioCaller) -> None:
    with trio.fail_after(TIMEOUT):
        response = await caller.unary("InvokeSubWorkflow", invoke_request(["boom"], None))
    assert response["result"] is None
    error = response["error"]
    assert "kaput" in error["message"]
    assert error["step_id"] == "boom"
    assert error["error_type"] == "ValueError"


async def test_refs_come_back_as_descriptors_inline_bytes_and_dropped_ids(
    caller: GrpcioCaller, server: PeerServer
) -> None:
    wanted = [
        ["until_explicit_drop", "bytes"],
        ["until_parent_finish", "bytes"],
        ["until_context_drop", "bytes"],
        ["until_context_drop", "opaque"],
    ]
    with trio.fail_after(TIMEOUT):
        response = await caller.unary("InvokeSubWorkflow", invoke_request(["refs"], wanted))
    explicit, parent, inline, dropped = response["result"]
    assert set(response["remote_refs"]) == {explicit, parent}
    descriptor = response["remote_refs"][explicit]
    assert descriptor["origin_node_id"] == "node-b"
    assert descriptor["type_tag"] == "peerflow.bytes"
    assert descriptor["lifetime"] == "until_explicit_drop"
    assert descriptor["size"] == len(b"value-0")
    assert isinstance(descriptor["created_at_epoch_ms"], int)
    assert descriptor["created_at_epoch_ms"] > 0
    assert response["remote_refs"][parent]["lifetime"] == "until_parent_finish"
    assert set(response["inline_refs"]) == {inline}
    assert response["inline_refs"][inline]["payload"] == b"value-2"
    assert response["inline_refs"][inline]["lifetime"] == "until_context_drop"
    assert response["dropped_refs"] == [dropped]
    assert len(server.refs) == 2


async def test_release_says_whether_the_ref_was_there(
    caller: GrpcioCaller, server: PeerServer
) -> None:
    with trio.fail_after(TIMEOUT):
        response = await caller.unary(
            "InvokeSubWorkflow", invoke_request(["refs"], [["until_explicit_drop", "bytes"]])
        )
        (ref_uuid,) = response["result"]
        release = {"v": 1, "ref_uuid": ref_uuid}
        assert await caller.unary("ReleaseSessionRef", release) == {"v": 1, "released": True}
        assert len(server.refs) == 0
        assert await caller.unary("ReleaseSessionRef", release) == {"v": 1, "released": False}


async def test_a_lease_binds_refs_and_closing_it_releases_them(
    caller: GrpcioCaller, server: PeerServer
) -> None:
    lease_id = str(uuid.uuid4())
    with trio.fail_after(TIMEOUT):
        opened = await caller.unary("Lease", {"v": 1, "lease_id": lease_id, "ttl_ms": 5000})
        assert opened["lease_id"] == lease_id
        assert opened["ttl_ms"] == 5000
        wanted = [["until_parent_finish", "bytes"], ["until_explicit_drop", "bytes"]]
        response = await caller.unary(
            "InvokeSubWorkflow", invoke_request(["refs"], wanted, lease_id=lease_id)
        )
        _, explicit = response["result"]
        assert len(server.refs) == 2
        closed = await caller.unary(
            "Lease", {"v": 1, "lease_id": lease_id, "ttl_ms": 0, "close": True}
        )
        assert closed == {"v": 1, "lease_id": lease_id, "ttl_ms": 0, "released": 1}
        # An UNTIL_EXPLICIT_DROP ref is never bound to a lease.
        assert len(server.refs) == 1
        released = await caller.unary("ReleaseSessionRef", {"v": 1, "ref_uuid": explicit})
        assert released["released"] is True


@pytest.mark.parametrize("limits", [Limits(max_deref_chunk=64 * 1024)])
async def test_deref_chunks_concatenate_to_the_value(caller: GrpcioCaller) -> None:
    size = 1024 * 1024 + 512
    with trio.fail_after(TIMEOUT):
        response = await caller.unary("InvokeSubWorkflow", invoke_request(["big"], size))
        chunks = await caller.server_stream(
            "DerefSessionRef", {"v": 1, "ref_uuid": response["result"]}
        )
    assert len(chunks) == 17
    first, *rest = chunks
    assert first["type_tag"] == "peerflow.bytes"
    assert first["total_size"] == size
    # type_tag and total_size ride on the first chunk only.
    assert all(set(chunk) == {"v", "payload"} for chunk in rest)
    assert all(len(chunk["payload"]) <= 64 * 1024 for chunk in chunks)
    assert b"".join(chunk["payload"] for chunk in chunks) == bytes(range(256)) * (size // 256)


async def test_deref_of_an_empty_value_is_one_empty_chunk(caller: GrpcioCaller) -> None:
    with trio.fail_after(TIMEOUT):
        response = await caller.unary("InvokeSubWorkflow", invoke_request(["big"], 0))
        chunks = await caller.server_stream(
            "DerefSessionRef", {"v": 1, "ref_uuid": response["result"]}
        )
    assert [chunk["payload"] for chunk in chunks] == [b""]


async def test_stream_sub_workflow_sends_events_as_they_happen_then_the_response(
    caller: GrpcioCaller, probe: Probe
) -> None:
    def on_message(message: dict[str, object]) -> None:
        # The run waits on the gate after its first event: reaching here at all
        # shows that event travelled before the run ended.
        probe.gate.set()

    with trio.fail_after(TIMEOUT):
        messages = await caller.server_stream(
            "StreamSubWorkflow", invoke_request(["progress"], None), on_message=on_message
        )
    assert messages[:2] == [
        {"v": 1, "kind": "event", "event": {"event_type": "tests.Progress", "data": {"n": 1}}},
        {"v": 1, "kind": "event", "event": {"event_type": "tests.Progress", "data": {"n": 2}}},
    ]
    assert messages[2]["kind"] == "response"
    assert messages[2]["result"] == "done"
    assert messages[2]["error"] is None
    assert len(messages) == 3


async def test_one_channel_carries_many_concurrent_calls(
    caller: GrpcioCaller, probe: Probe
) -> None:
    with trio.fail_after(TIMEOUT):
        responses = await caller.unary_concurrently(
            "InvokeSubWorkflow", [invoke_request(["echo"], i) for i in range(200)]
        )
    assert [r["result"] for r in responses] == list(range(200))
    assert probe.ran.count("echo") == 200


async def test_refs_belong_to_the_node_id_in_the_metadata(
    channel: grpc.Channel, server: PeerServer
) -> None:
    mine = GrpcioCaller(channel, node_id="node-a")
    theirs = GrpcioCaller(channel, node_id="node-c")
    with trio.fail_after(TIMEOUT):
        response = await mine.unary(
            "InvokeSubWorkflow", invoke_request(["refs"], [["until_explicit_drop", "bytes"]])
        )
        (ref_uuid,) = response["result"]
        request = {"v": 1, "ref_uuid": ref_uuid}
        with pytest.raises(grpc.RpcError) as info:
            await theirs.server_stream("DerefSessionRef", request)
        assert status_of(info.value) == grpc.StatusCode.NOT_FOUND
        assert error_details(info.value)["code"] == "ref_not_found"
        assert error_details(info.value)["ref_uuid"] == ref_uuid
        assert await theirs.unary("ReleaseSessionRef", request) == {"v": 1, "released": False}
        chunks = await mine.server_stream("DerefSessionRef", request)
        assert b"".join(c["payload"] for c in chunks) == b"value-0"
        assert len(server.refs) == 1


async def test_unknown_step_is_not_found_with_details(caller: GrpcioCaller, probe: Probe) -> None:
    with trio.fail_after(TIMEOUT):
        for method in ("InvokeSubWorkflow", "StreamSubWorkflow"):
            with pytest.raises(grpc.RpcError) as info:
                await caller.server_stream(method, invoke_request(["echo", "no-such-step"], 1))
            assert status_of(info.value) == grpc.StatusCode.NOT_FOUND
            details = error_details(info.value)
            assert details["v"] == 1
            assert details["code"] == "unknown_step"
            assert details["step_id"] == "no-such-step"
            assert isinstance(details["message"], str)
    assert probe.ran.count("echo") == 0


async def test_a_newer_envelope_version_is_a_failed_precondition(caller: GrpcioCaller) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(grpc.RpcError) as info:
            await caller.unary("InvokeSubWorkflow", {**invoke_request(["echo"], 1), "v": 99})
        assert status_of(info.value) == grpc.StatusCode.FAILED_PRECONDITION
        details = error_details(info.value)
        assert (details["code"], details["got"], details["supported"]) == (
            "envelope_version",
            99,
            1,
        )
        # Unknown keys at the current version are ignored, as the spec promises.
        response = await caller.unary(
            "InvokeSubWorkflow", invoke_request(["echo"], 1, added_later={"x": 1})
        )
        assert response["result"] == 1


@pytest.mark.parametrize(
    ("method", "body", "path"),
    [
        ("InvokeSubWorkflow", b"\xc1", None),
        ("InvokeSubWorkflow", pack([1, 2]), None),  # type: ignore[arg-type]
        ("InvokeSubWorkflow", pack({"v": 1, "workflow_name": "w", "input": 1}), "step_ids"),
        ("InvokeSubWorkflow", pack({"workflow_name": "w", "step_ids": [], "input": 1}), "v"),
        ("ReleaseSessionRef", pack({"v": 1, "ref_uuid": 7}), "ref_uuid"),
        ("Lease", b"", None),
    ],
)
async def test_undecodable_requests_are_invalid_argument(
    caller: GrpcioCaller, method: str, body: bytes, path: str | None
) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(grpc.RpcError) as info:
            await caller.unary_raw(method, body)
        assert status_of(info.value) == grpc.StatusCode.INVALID_ARGUMENT
        details = error_details(info.value)
        assert details["code"] == "encode"
        if path is not None:
            assert details["path"] == path
        # A bad call never hurts the connection.
        response = await caller.unary("InvokeSubWorkflow", invoke_request(["echo"], "still here"))
        assert response["result"] == "still here"


@pytest.mark.parametrize(
    "path", ["/peerflow.peer.v1.Peer/NoSuchMethod", "/grpc.health.v1.Health/Check"]
)
async def test_unknown_method_is_unimplemented(channel: grpc.Channel, path: str) -> None:
    call = channel.unary_unary(path)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(grpc.RpcError) as info:
            await trio.to_thread.run_sync(
                lambda: call(
                    pack({"v": 1}), timeout=10, metadata=[("x-peerflow-peer-node-id", "a")]
                )
            )
    assert status_of(info.value) == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("token", ["s3cret"])
async def test_only_an_authenticated_caller_learns_a_method_is_unknown(
    channel: grpc.Channel,
) -> None:
    call = channel.unary_unary("/peerflow.peer.v1.Peer/NoSuchMethod")
    node_id = ("x-peerflow-peer-node-id", "a")
    statuses = []
    with trio.fail_after(TIMEOUT):
        for metadata in ([node_id], [node_id, ("authorization", "Bearer s3cret")]):
            with pytest.raises(grpc.RpcError) as info:
                await trio.to_thread.run_sync(
                    lambda: call(pack({"v": 1}), timeout=10, metadata=metadata)  # noqa: B023
                )
            statuses.append(status_of(info.value))
    assert statuses == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED]


@pytest.mark.parametrize("metadata", [[], [("x-peerflow-peer-node-id", "")]])
async def test_a_call_that_names_no_caller_node_id_is_refused(
    channel: grpc.Channel, caller: GrpcioCaller, probe: Probe, metadata: list[tuple[str, str]]
) -> None:
    # Callers without one would share one identity, and so each other's refs.
    call = channel.unary_unary(SERVICE + "InvokeSubWorkflow")
    request = pack(invoke_request(["echo"], 1))
    with trio.fail_after(TIMEOUT):
        with pytest.raises(grpc.RpcError) as info:
            await trio.to_thread.run_sync(lambda: call(request, timeout=10, metadata=metadata))
        # The connection serves the next caller as ever.
        response = await caller.unary("InvokeSubWorkflow", invoke_request(["echo"], 2))
    assert status_of(info.value) == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(info.value)
    assert details["code"] == "encode"
    assert details["path"] == "x-peerflow-peer-node-id"
    assert "node id" in details["message"]
    assert response["result"] == 2
    assert probe.ran.count("echo") == 1


async def test_a_grpcio_deadline_cancels_the_remote_run_and_purges_its_refs(
    caller: GrpcioCaller, server: PeerServer, probe: Probe
) -> None:
    with trio.fail_after(TIMEOUT):
        # Connect first, so the deadline below is spent on the call, not the handshake.
        await caller.unary("InvokeSubWorkflow", invoke_request(["echo"], None))
        statuses = []

        async def call() -> None:
            with pytest.raises(grpc.RpcError) as info:
                await caller.unary("InvokeSubWorkflow", invoke_request(["slow"], 600), timeout=1)
            statuses.append(status_of(info.value))

        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            nursery.start_soon(call)
            await probe.started.wait()
            started_at = trio.current_time()
            assert len(server.refs) == 2  # the run's scratch ref and its UNTIL_PARENT_FINISH ref
        assert statuses == [grpc.StatusCode.DEADLINE_EXCEEDED]
        await wait_until(lambda: probe.cancelled and len(server.refs) == 0)
    assert not probe.finished
    # grpc-timeout reached the run: its deadline is grpcio's, give or take the unit rounding.
    assert probe.deadline is not None
    assert start + 0.99 <= probe.deadline <= started_at + 1.01


async def test_the_request_s_timeout_ms_bounds_the_run_and_the_peer_says_so(
    caller: GrpcioCaller, server: PeerServer, probe: Probe
) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(grpc.RpcError) as info:
            await caller.unary("InvokeSubWorkflow", invoke_request(["slow"], 600, timeout_ms=200))
        # The peer's own status, not grpcio's: grpcio's deadline is still far off.
        assert status_of(info.value) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error_details(info.value)["code"] == "timeout"
        await wait_until(lambda: len(server.refs) == 0)
    assert probe.cancelled
    assert not probe.finished


async def test_cancelling_a_grpcio_call_cancels_the_remote_run(
    caller: GrpcioCaller, server: PeerServer, probe: Probe
) -> None:
    call = caller.channel.unary_unary(SERVICE + "InvokeSubWorkflow")
    request = pack(invoke_request(["slow"], 600))
    with trio.fail_after(TIMEOUT):
        future = await trio.to_thread.run_sync(
            lambda: call.future(request, timeout=TIMEOUT, metadata=caller.metadata())
        )
        await probe.started.wait()
        assert len(server.refs) == 2
        future.cancel()
        await wait_until(lambda: probe.cancelled and len(server.refs) == 0)
    assert not probe.finished
    assert future.cancelled()


async def test_a_deadline_on_a_streaming_call_cancels_the_remote_run(
    caller: GrpcioCaller, server: PeerServer, probe: Probe
) -> None:
    with trio.fail_after(TIMEOUT):
        await caller.unary("InvokeSubWorkflow", invoke_request(["echo"], None))
        # The run parks on the gate after its first event, until the deadline.
        with pytest.raises(grpc.RpcError) as info:
            await caller.server_stream(
                "StreamSubWorkflow", invoke_request(["progress"], None), timeout=0.5
            )
        assert status_of(info.value) == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: server.refs.statistics().runs == 0)


async def test_a_compressed_message_is_invalid_argument(caller: GrpcioCaller) -> None:
    call = caller.channel.unary_unary(SERVICE + "InvokeSubWorkflow")
    # Large and repetitive, so grpcio really compresses it (flag 1).
    request = pack(invoke_request(["echo"], "a" * 100_000))
    with trio.fail_after(TIMEOUT):
        with pytest.raises(grpc.RpcError) as info:
            await trio.to_thread.run_sync(
                lambda: call(
                    request,
                    timeout=TIMEOUT,
                    metadata=caller.metadata(),
                    compression=grpc.Compression.Gzip,
                )
            )
    assert status_of(info.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(info.value)["code"] == "encode"


@pytest.mark.parametrize("limits", [Limits(max_message_size=1024)])
async def test_an_oversized_request_is_resource_exhausted(caller: GrpcioCaller) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(grpc.RpcError) as info:
            await caller.unary("InvokeSubWorkflow", invoke_request(["echo"], b"x" * 2000))
        assert status_of(info.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_details(info.value)["code"] == "limit"
        response = await caller.unary("InvokeSubWorkflow", invoke_request(["echo"], "small"))
        assert response["result"] == "small"


@pytest.mark.parametrize("count", [0, 2])
async def test_a_unary_method_wants_exactly_one_request_message(
    caller: GrpcioCaller, probe: Probe, count: int
) -> None:
    call = caller.channel.stream_unary(SERVICE + "InvokeSubWorkflow")
    messages = [pack(invoke_request(["echo"], 1))] * count
    with trio.fail_after(TIMEOUT):
        with pytest.raises(grpc.RpcError) as info:
            await trio.to_thread.run_sync(
                lambda: call(iter(messages), timeout=TIMEOUT, metadata=caller.metadata())
            )
    assert status_of(info.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(info.value)["code"] == "encode"
    assert probe.ran.count("echo") == 0


@pytest.mark.parametrize("limits", [Limits(stream_window=65_535, connection_window=65_535)])
async def test_large_messages_cross_small_flow_control_windows(address: PeerAddress) -> None:
    big = 64 * 1024 * 1024
    options = (
        *CHANNEL_OPTIONS,
        ("grpc.max_receive_message_length", big),
        ("grpc.max_send_message_length", big),
    )
    channel = grpc.insecure_channel(f"{address.host}:{address.port}", options=options)
    value = bytes(range(256)) * (8 * 4096)  # 8 MiB through 64 KiB windows
    try:
        with trio.fail_after(TIMEOUT):
            response = await GrpcioCaller(channel).unary(
                "InvokeSubWorkflow", invoke_request(["echo"], value)
            )
    finally:
        await trio.to_thread.run_sync(channel.close)
    assert response["result"] == value


@pytest.mark.parametrize("limits", [Limits(max_concurrent_streams=4)])
async def test_grpcio_queues_calls_beyond_max_concurrent_streams(caller: GrpcioCaller) -> None:
    with trio.fail_after(TIMEOUT):
        responses = await caller.unary_concurrently(
            "InvokeSubWorkflow", [invoke_request(["echo"], i) for i in range(100)]
        )
    assert [r["result"] for r in responses] == list(range(100))


async def stop_serving_during_a_call(
    server: PeerServer, probe: Probe, step_id: str
) -> tuple[object, grpc.StatusCode]:
    """Stop the server while a grpcio call to ``step_id`` runs, then open the gate.

    Returns what that call got (its result, or its status) and the status of a
    call made once the server has stopped.
    """
    serving = trio.CancelScope()
    stopped = trio.Event()
    outcome: list[object] = []

    async def serve(task_status: trio.TaskStatus[PeerAddress]) -> None:
        with serving:
            await server.serve("127.0.0.1", 0, task_status=task_status)
        stopped.set()

    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve)
        channel = grpc.insecure_channel(f"{address.host}:{address.port}", options=CHANNEL_OPTIONS)
        caller = GrpcioCaller(channel)

        async def call() -> None:
            try:
                response = await caller.unary("InvokeSubWorkflow", invoke_request([step_id], 60))
                outcome.append(response["result"])
            except grpc.RpcError as exc:
                outcome.append(status_of(exc))

        try:
            async with trio.open_nursery() as calls:
                calls.start_soon(call)
                await probe.started.wait()
                serving.cancel()
                # Let the drain begin (GOAWAY out) before the run may finish.
                await trio.testing.wait_all_tasks_blocked()
                probe.gate.set()
            await stopped.wait()
            with pytest.raises(grpc.RpcError) as info:
                await caller.unary("InvokeSubWorkflow", invoke_request(["echo"], 1), timeout=5)
        finally:
            await trio.to_thread.run_sync(channel.close)
    return outcome[0], status_of(info.value)


async def test_a_call_in_flight_finishes_while_the_server_drains(
    server: PeerServer, probe: Probe
) -> None:
    with trio.fail_after(TIMEOUT):
        outcome, after = await stop_serving_during_a_call(server, probe, "gated")
    assert outcome == "through the gate"
    assert after == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("limits", [Limits(drain_grace=0.3)])
async def test_a_call_that_outlasts_the_drain_grace_is_cancelled_without_trace(
    server: PeerServer, probe: Probe
) -> None:
    with trio.fail_after(TIMEOUT):
        outcome, after = await stop_serving_during_a_call(server, probe, "slow")
    # Cut off, so reset (CANCEL): UNAVAILABLE would say it never started.
    assert outcome == grpc.StatusCode.CANCELLED
    assert after == grpc.StatusCode.UNAVAILABLE
    assert probe.cancelled
    assert not probe.finished
    assert len(server.refs) == 0


@pytest.mark.parametrize("token", ["s3cret"])
@pytest.mark.parametrize(
    "method",
    ["InvokeSubWorkflow", "StreamSubWorkflow", "DerefSessionRef", "ReleaseSessionRef", "Lease"],
)
async def test_a_server_with_a_token_refuses_calls_without_it(
    channel: grpc.Channel, probe: Probe, method: str
) -> None:
    wrong = GrpcioCaller(channel, extra_metadata=[("authorization", "Bearer nope")])
    with trio.fail_after(TIMEOUT):
        for caller in (GrpcioCaller(channel), wrong):
            with pytest.raises(grpc.RpcError) as info:
                await caller.server_stream(method, invoke_request(["echo"], 1))
            assert status_of(info.value) == grpc.StatusCode.UNAUTHENTICATED
            assert error_details(info.value)["code"] == "auth"
    assert probe.ran.count("echo") == 0


@pytest.mark.parametrize("token", ["s3cret"])
async def test_a_server_with_a_token_serves_calls_that_carry_it(
    channel: grpc.Channel, server: PeerServer
) -> None:
    caller = GrpcioCaller(channel, extra_metadata=[("authorization", "Bearer s3cret")])
    with trio.fail_after(TIMEOUT):
        response = await caller.unary(
            "InvokeSubWorkflow", invoke_request(["refs"], [["until_explicit_drop", "bytes"]])
        )
        (ref_uuid,) = response["result"]
        chunks = await caller.server_stream("DerefSessionRef", {"v": 1, "ref_uuid": ref_uuid})
        assert chunks[0]["payload"] == b"value-0"
        released = await caller.unary("ReleaseSessionRef", {"v": 1, "ref_uuid": ref_uuid})
        assert released["released"] is True
    assert len(server.refs) == 0


@pytest.mark.parametrize("limits", [Limits(lease_grace=0.2)])
async def test_a_leaseless_caller_s_refs_are_purged_a_grace_after_its_connection_closes(
    address: PeerAddress, server: PeerServer
) -> None:
    target = f"{address.host}:{address.port}"
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    wanted = [["until_parent_finish", "bytes"], ["until_explicit_drop", "bytes"]]
    with trio.fail_after(TIMEOUT):
        try:
            response = await GrpcioCaller(channel).unary(
                "InvokeSubWorkflow", invoke_request(["refs"], wanted)
            )
        finally:
            before_close = trio.current_time()
            await trio.to_thread.run_sync(channel.close)
        parent, explicit = response["result"]
        assert len(server.refs) == 2
        await wait_until(lambda: len(server.refs) == 1)
        assert trio.current_time() - before_close >= 0.2
        # Only the connection-bound ref went; the explicit one waits for its release.
        again = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        try:
            caller = GrpcioCaller(again)
            gone = await caller.unary("ReleaseSessionRef", {"v": 1, "ref_uuid": parent})
            kept = await caller.unary("ReleaseSessionRef", {"v": 1, "ref_uuid": explicit})
        finally:
            await trio.to_thread.run_sync(again.close)
    assert (gone["released"], kept["released"]) == (False, True)


async def test_our_client_still_works_beside_grpcio_callers(
    caller: GrpcioCaller, address: PeerAddress
) -> None:
    with trio.fail_after(TIMEOUT):
        await caller.unary("InvokeSubWorkflow", invoke_request(["echo"], 1))
        async with peerflow.PeerClient.connect(address.url, "node-a", token=None) as client:
            response = await client.invoke_sub_workflow("w", ["echo"], {"same": "server"})
        assert response.result == {"same": "server"}
