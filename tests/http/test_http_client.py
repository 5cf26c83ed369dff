"""HttpPeerClient against a real PeerServer over loopback sockets: every method, every error."""

from __future__ import annotations

import contextlib
import math
import socket

import pytest
import trio
import trio.testing

import peerflow
from peer_steps import Probe
from peerflow import (
    Context,
    DynamicEvent,
    HttpPeerClient,
    Limits,
    PeerAddress,
    PeerServer,
    StartEvent,
    StopEvent,
    Workflow,
)
from peerflow._peer import http_client
from peerflow._peer.http_json import error_body

TIMEOUT = 20
CONTEXT = "until_context_drop"
PARENT = "until_parent_finish"
EXPLICIT = "until_explicit_drop"


def assert_no_trace(server: PeerServer) -> None:
    assert len(server.refs) == 0
    stats = server.refs.statistics()
    assert (stats.runs, stats.scopes) == (0, 0)


async def settle(stopped: trio.Event) -> None:
    """Wait for a cancelled remote step to stop, then for the peer to finish unwinding."""
    await stopped.wait()
    await trio.testing.wait_all_tasks_blocked()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "url", ["127.0.0.1:80", "ftp://127.0.0.1:1", "http://", "http://h:99999", "http://h/?q=1", 7]
)
def test_a_bad_base_url_fails_at_once(url: object) -> None:
    with pytest.raises(peerflow.PeerTransportError) as info:
        HttpPeerClient(url, "node-a", token=None)  # type: ignore[arg-type]
    # The message names the URL as it was given, not a piece of it.
    assert repr(url) in str(info.value) or not isinstance(url, str)


async def test_creating_a_client_opens_no_connection() -> None:
    port = free_port()
    client = HttpPeerClient(f"http://127.0.0.1:{port}", "node-a", token=None)
    # Nothing listens there, and nothing was tried yet: the first call says so.
    # As during a peer's drain, when its listener is closed, the call never
    # started: unavailable, and so safe to retry.
    with trio.fail_after(TIMEOUT), pytest.raises(peerflow.PeerUnavailableError) as info:
        await client.release_session_ref("x")
    assert f"127.0.0.1:{port}" in str(info.value)
    await client.aclose()


async def test_invoke_round_trips_values_state_and_failures(
    client: HttpPeerClient, server: PeerServer
) -> None:
    value = {"doc": [1, "two", b"\x00\xff", 4.5, None, True, -(2**63), 2**64 - 1], "k": {}}
    with trio.fail_after(TIMEOUT):
        response = await client.invoke_sub_workflow("w", ["echo"], value)
        assert response.result == value
        assert response.error is None
        stateful = await client.invoke_sub_workflow("w", ["stateful"], [1, b"2"])
        assert stateful.state == {"seen": [1, b"2"], "node": "node-b"}
        failed = await client.invoke_sub_workflow("w", ["boom"], None)
    assert failed.result is None
    assert failed.error_step_id == "boom"
    assert failed.error_type == "ValueError"
    with pytest.raises(peerflow.PeerWorkflowError, match="kaput"):
        failed.raise_for_error()


async def test_refs_travel_as_descriptors_inline_bytes_and_dropped_ids(
    client: HttpPeerClient, server: PeerServer
) -> None:
    wanted = [[EXPLICIT, "bytes"], [PARENT, "bytes"], [CONTEXT, "bytes"], [CONTEXT, "opaque"]]
    with trio.fail_after(TIMEOUT):
        response = await client.invoke_sub_workflow("w", ["refs"], wanted)
        explicit, parent, inline, dropped = response.result
        assert set(response.remote_refs) == {explicit, parent}
        descriptor = response.remote_refs[explicit]
        assert descriptor.origin_node_id == "node-b"
        assert descriptor.lifetime is peerflow.RefLifetime.UNTIL_EXPLICIT_DROP
        assert response.inline_refs[inline].payload == b"value-2"
        assert response.dropped_refs == (dropped,)
        assert await client.deref_session_ref(parent) == b"value-1"
        assert await client.release_session_ref(explicit) is True
        assert await client.release_session_ref(explicit) is False
        with pytest.raises(peerflow.PeerRefNotFoundError):
            await client.deref_session_ref(explicit)
    assert len(server.refs) == 1  # the parent-scoped ref, until the client closes


async def test_closing_the_client_releases_its_parent_scoped_refs(
    address: PeerAddress, server: PeerServer
) -> None:
    with trio.fail_after(TIMEOUT):
        async with HttpPeerClient(address.url, "node-a", token=None) as client:
            outer = await client.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"]])
            async with client.ref_scope():
                inner = await client.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"]])
                assert len(server.refs) == 2
            with pytest.raises(peerflow.PeerRefNotFoundError):
                await client.deref_session_ref(inner.result[0])
            assert await client.deref_session_ref(outer.result[0]) == b"value-0"
        assert_no_trace(server)
        # Without `async with`, aclose does the same.
        bare = HttpPeerClient(address.url, "node-a", token=None)
        await bare.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"]])
        assert len(server.refs) == 1
        await bare.aclose()
        assert_no_trace(server)
        with pytest.raises(peerflow.PeerTransportError, match="closed"):
            await bare.invoke_sub_workflow("w", ["echo"], 1)


async def test_explicit_drop_refs_outlive_the_client(
    address: PeerAddress, server: PeerServer
) -> None:
    with trio.fail_after(TIMEOUT):
        async with HttpPeerClient(address.url, "node-a", token=None) as client:
            response = await client.invoke_sub_workflow("w", ["refs"], [[EXPLICIT, "bytes"]])
        (ref_uuid,) = response.result
        assert len(server.refs) == 1
        # Another caller identity cannot see it; the same one can.
        async with HttpPeerClient(address.url, "node-x", token=None) as stranger:
            with pytest.raises(peerflow.PeerRefNotFoundError):
                await stranger.deref_session_ref(ref_uuid)
            assert await stranger.release_session_ref(ref_uuid) is False
        async with HttpPeerClient(address.url, "node-a", token=None) as owner:
            assert await owner.deref_session_ref(ref_uuid) == b"value-0"
            assert await owner.release_session_ref(ref_uuid) is True
    assert_no_trace(server)


async def test_a_peer_without_leases_gets_refs_released_one_by_one(
    address: PeerAddress, server: PeerServer
) -> None:
    del server._json._methods[b"Lease"]  # a minimal peer: Lease answers 501
    with trio.fail_after(TIMEOUT):
        async with HttpPeerClient(address.url, "node-a", token=None) as client:
            response = await client.invoke_sub_workflow(
                "w", ["refs"], [[PARENT, "bytes"], [PARENT, "bytes"]]
            )
            assert len(server.refs) == 2
            assert not client._scopes.leases_supported
            assert await client.deref_session_ref(response.result[0]) == b"value-0"
    assert len(server.refs) == 0


async def test_stream_yields_events_as_they_happen_then_the_response(
    client: HttpPeerClient, probe: Probe
) -> None:
    with trio.fail_after(TIMEOUT):
        async with client.stream_sub_workflow("w", ["progress"], None) as call:
            seen = []
            async for event in call:
                seen.append(event)
                probe.gate.set()  # the second event only comes after the first arrived
    assert [event.n for event in seen] == [1, 2]  # type: ignore[attr-defined]
    assert call.response is not None
    assert call.response.result == "done"


async def test_leaving_a_stream_early_cancels_the_remote_run(
    client: HttpPeerClient, server: PeerServer
) -> None:
    stopped = trio.Event()

    @Workflow("ticks", registry=server.service.steps).step("tick", accepts=[StartEvent])
    async def tick(event: StartEvent, ctx: Context) -> None:
        ctx.write_event_to_stream(DynamicEvent("tests.Tick", {}))
        try:
            await trio.sleep_forever()
        finally:
            stopped.set()

    with trio.fail_after(TIMEOUT):
        async with client.stream_sub_workflow("w", ["tick"], None) as call:
            async for _ in call:
                break
        await settle(stopped)
    assert call.response is None
    assert_no_trace(server)


async def test_an_error_after_the_stream_began_is_raised_from_the_last_line(
    client: HttpPeerClient, server: PeerServer
) -> None:
    wf = Workflow("json-limits", registry=server.service.steps)

    @wf.step("nan-event", accepts=[StartEvent])
    async def nan_event(event: StartEvent, ctx: Context) -> StopEvent:
        ctx.write_event_to_stream(DynamicEvent("tests.Reading", {"value": 1.0}))
        ctx.write_event_to_stream(DynamicEvent("tests.Reading", {"value": math.nan}))
        return StopEvent(result="unreachable over JSON")

    with trio.fail_after(TIMEOUT):
        async with client.stream_sub_workflow("w", ["nan-event"], None) as call:
            first = await call.__anext__()
            assert first.data == {"value": 1.0}  # type: ignore[attr-defined]
            # The status line went out long ago: the failure is the last line.
            with pytest.raises(peerflow.PeerEncodeError, match="NaN"):
                await call.__anext__()
        # A result JSON cannot carry becomes the run's error, refs kept listed.
        response = await client.invoke_sub_workflow("w", ["echo"], [1.0])
        assert response.result == [1.0]


async def test_a_16_mib_ref_streams_as_ndjson_chunks(client: HttpPeerClient) -> None:
    size = 16 * 1024 * 1024
    with trio.fail_after(60):
        response = await client.invoke_sub_workflow("w", ["big"], size)
        ref_uuid = response.result
        assert response.remote_refs[ref_uuid].size == size
        chunks = 0
        total = 0
        async with client.open_session_ref(ref_uuid) as stream:
            async for chunk in stream:
                assert len(chunk) <= Limits().max_deref_chunk
                assert chunk[:4] == bytes(range(4))  # chunks are 256-byte aligned slices
                chunks += 1
                total += len(chunk)
        assert (chunks, total) == (16, size)
        data = await client.deref_session_ref(ref_uuid)
        assert data == bytes(range(256)) * (size // 256)
        assert await client.release_session_ref(ref_uuid)


async def test_errors_map_to_the_typed_peer_errors(client: HttpPeerClient) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(peerflow.PeerUnknownStepError) as unknown:
            await client.invoke_sub_workflow("w", ["echo", "nope"], 1)
        assert unknown.value.step_id == "nope"
        with pytest.raises(peerflow.PeerRefNotFoundError):
            await client.deref_session_ref("no-such-ref")
        response = await client.invoke_sub_workflow("w", ["refs"], [[EXPLICIT, "opaque"]])
        (opaque,) = response.result
        with pytest.raises(peerflow.PeerRefNotSerializableError) as live:
            await client.deref_session_ref(opaque)
        assert live.value.value_type.endswith("Opaque")
        assert await client.release_session_ref(opaque)
        with pytest.raises(peerflow.PeerUnknownStepError):
            await drain_stream(client, ["nope"])


async def drain_stream(client: HttpPeerClient, step_ids: list[str]) -> None:
    async with client.stream_sub_workflow("w", step_ids, None) as call:
        async for _ in call:
            pass


async def test_bad_input_fails_before_anything_is_sent(client: HttpPeerClient) -> None:
    with pytest.raises(peerflow.PeerEncodeError) as bad:
        await client.invoke_sub_workflow("w", ["echo"], {"rows": [1, {2, 3}]})
    assert bad.value.path == 'input["rows"][1]'
    with pytest.raises(peerflow.PeerEncodeError, match="bytes") as looks_like_bytes:
        await client.invoke_sub_workflow("w", ["echo"], {"x": {"$bytes": "AA=="}})
    assert looks_like_bytes.value.path == 'input["x"]'
    with pytest.raises(TypeError):
        await client.invoke_sub_workflow("w", "echo", 1)


async def test_a_timeout_raises_and_stops_the_remote_run(
    client: HttpPeerClient, server: PeerServer, probe: Probe
) -> None:
    with trio.fail_after(TIMEOUT):
        start = trio.current_time()
        with pytest.raises(peerflow.PeerTimeoutError):
            await client.invoke_sub_workflow("w", ["slow"], 100, timeout=0.5)
        await settle(probe.stopped)
    assert not probe.finished
    # The peer ran the step under the caller's deadline (X-Peerflow-Timeout-Ms).
    assert probe.deadline == pytest.approx(start + 0.5, abs=0.2)
    assert len(server.refs) == 0


async def test_the_effective_deadline_travels_with_the_call(
    client: HttpPeerClient, probe: Probe
) -> None:
    with trio.fail_after(TIMEOUT):
        start = trio.current_time()
        with trio.move_on_after(0.5):
            await client.invoke_sub_workflow("w", ["slow"], 100)
        await settle(probe.stopped)
    assert probe.deadline == pytest.approx(start + 0.5, abs=0.2)
    with trio.fail_after(TIMEOUT):
        start = trio.current_time()
        assert (await client.invoke_sub_workflow("w", ["slow"], 0)).result == "slept"
    assert probe.deadline == pytest.approx(start + TIMEOUT, abs=0.2)


async def test_cancelling_the_caller_cancels_the_remote_run(
    client: HttpPeerClient, server: PeerServer, probe: Probe
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.invoke_sub_workflow, "w", ["slow"], 100)
            await probe.started.wait()
            nursery.cancel_scope.cancel()
        # The closed connection reaches the peer, whose run nursery is cancelled,
        # and the parent-scoped ref of a run that never answered goes with it.
        await settle(probe.stopped)
        assert not probe.finished
        assert len(server.refs) == 0
        assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1


async def test_concurrent_calls_share_a_bounded_pool(address: PeerAddress) -> None:
    with trio.fail_after(TIMEOUT):
        async with HttpPeerClient(address.url, "node-a", token=None, max_connections=3) as client:
            results: dict[int, object] = {}

            async def call(i: int) -> None:
                results[i] = (await client.invoke_sub_workflow("w", ["echo"], i)).result

            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(call, i)
            assert results == {i: i for i in range(30)}
            assert 1 <= len(client._idle) <= 3
            # Sequential calls keep reusing the kept-alive connections.
            idle = list(client._idle)
            await client.invoke_sub_workflow("w", ["echo"], 1)
            assert client._idle[-1] in idle


@pytest.mark.parametrize("limits", [Limits(idle_timeout=0.2)])
async def test_a_connection_the_peer_closed_while_idle_is_replaced(
    client: HttpPeerClient,
) -> None:
    with trio.fail_after(TIMEOUT):
        assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
        (stale,) = client._idle
        await trio.sleep(0.5)  # the peer's idle timeout closes it
        assert (await client.invoke_sub_workflow("w", ["echo"], 2)).result == 2
        assert client._idle[0] is not stale


async def test_an_answer_above_the_client_limit_is_refused(address: PeerAddress) -> None:
    with trio.fail_after(TIMEOUT):
        limits = Limits(max_message_size=1024)
        async with HttpPeerClient(address.url, "node-a", token=None, limits=limits) as client:
            with pytest.raises(peerflow.PeerLimitError):
                await client.invoke_sub_workflow("w", ["echo"], "x" * 1100)
            assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1


@pytest.mark.parametrize("token", ["s3cret"])
async def test_token_auth(address: PeerAddress, client: HttpPeerClient) -> None:
    with trio.fail_after(TIMEOUT):
        assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
        for token in (None, "wrong"):
            async with HttpPeerClient(address.url, "node-a", token=token) as other:
                with pytest.raises(peerflow.PeerAuthError):
                    await other.invoke_sub_workflow("w", ["echo"], 1)


async def test_a_base_url_path_is_a_route_prefix(address: PeerAddress) -> None:
    with trio.fail_after(TIMEOUT):
        async with HttpPeerClient(address.url + "/behind/proxy/", "n", token=None) as client:
            # The peer itself serves no prefix: the route is not found.
            with pytest.raises(peerflow.PeerTransportError, match="NOT_FOUND"):
                await client.invoke_sub_workflow("w", ["echo"], 1)


class CuttingProxy:
    """A TCP proxy in front of the peer that can cut every connection it carries.

    It stands for whatever drops a connection on the way (a proxy, a NAT, the
    peer's host): the client sees its connection end, the peer sees its own.
    """

    def __init__(self, upstream: PeerAddress) -> None:
        self.upstream = upstream
        self._links: list[_Link] = []

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        task_status.started(f"http://{host}:{port}")
        await trio.serve_listeners(self._carry, listeners)

    async def _carry(self, downstream: trio.SocketStream) -> None:
        link = _Link()
        self._links.append(link)
        try:
            upstream = await trio.open_tcp_stream(self.upstream.host, self.upstream.port)
            async with downstream, upstream:
                with link.scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_pump, downstream, upstream)
                        nursery.start_soon(_pump, upstream, downstream)
                if link.goodbye:
                    await downstream.send_all(link.goodbye)
        finally:
            link.done.set()

    async def cut(self, goodbye: bytes = b"") -> None:
        """Close every connection so far, on both sides, after sending ``goodbye`` to the client."""
        links, self._links = self._links, []
        for link in links:
            link.goodbye = goodbye
            link.scope.cancel()
        for link in links:
            await link.done.wait()


class _Link:
    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.goodbye = b""
        self.done = trio.Event()


async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError):
        while data := await source.receive_some():
            await sink.send_all(data)


def count_runs(server: PeerServer) -> tuple[list[object], trio.Event]:
    """Register step ``charge``, a side effect that must happen once per call.

    Its first run waits until cancelled; any later one returns at once.
    """
    runs: list[object] = []
    started = trio.Event()

    @Workflow("charges", registry=server.service.steps).step("charge", accepts=[StartEvent])
    async def charge(event: StartEvent, ctx: Context) -> StopEvent:
        runs.append(event.data)
        started.set()
        if len(runs) == 1:
            await trio.sleep_forever()
        return StopEvent(result="charged again")

    return runs, started


async def test_a_connection_lost_after_the_request_went_out_is_not_sent_again(
    address: PeerAddress, server: PeerServer, nursery: trio.Nursery
) -> None:
    runs, started = count_runs(server)
    proxy = CuttingProxy(address)
    with trio.fail_after(TIMEOUT):
        url = await nursery.start(proxy.serve)
        async with HttpPeerClient(url, "node-a", token=None) as client:
            assert await client.release_session_ref("x") is False
            (kept,) = client._idle  # the call goes out on this kept-alive connection

            async def cut_once_running() -> None:
                await started.wait()
                await proxy.cut()

            async with trio.open_nursery() as cutter:
                cutter.start_soon(cut_once_running)
                # The peer got the request and started the run: sending it
                # again would charge twice.
                with pytest.raises(peerflow.PeerTransportError) as info:
                    await client.invoke_sub_workflow("w", ["charge"], "card-1")
            assert not isinstance(info.value, peerflow.PeerUnavailableError)
            assert str(info.value) == (
                f"{url.removeprefix('http://')} closed the connection before answering; "
                "the request may have reached it, so it is not sent again"
            )
            assert runs == ["card-1"]
            assert kept.stream.socket.fileno() == -1  # the call's connection, closed
            assert client._idle == []
            # The client goes on with a new connection.
            assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
    assert runs == ["card-1"]


@pytest.mark.parametrize(
    "goodbye",
    [b"", b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"],
    ids=["eof", "408-then-eof"],
)
async def test_an_idle_connection_the_peer_closed_is_replaced_before_sending(
    address: PeerAddress, nursery: trio.Nursery, goodbye: bytes
) -> None:
    proxy = CuttingProxy(address)
    with trio.fail_after(TIMEOUT):
        url = await nursery.start(proxy.serve)
        async with HttpPeerClient(url, "node-a", token=None) as client:
            assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
            (stale,) = client._idle
            assert isinstance(stale.stream, trio.SocketStream)
            await proxy.cut(goodbye)
            await trio.lowlevel.wait_readable(stale.stream.socket)  # the goodbye has arrived
            assert stale.closed_while_idle()
            response = await client.invoke_sub_workflow("w", ["echo"], 2)
            assert response.result == 2
            assert client._idle[0] is not stale
            assert stale.stream.socket.fileno() == -1  # closed, not left open


async def test_a_body_refused_before_it_was_sent_raises_the_answer_s_error(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # A peer that answers 413 from the head alone and closes without reading
    # the body: sending it all first would end in a broken connection and
    # lose the answer. The request travels in lockstep (no buffer), so the
    # body blocks as soon as the peer stops reading.
    body = error_body("resource_exhausted", "the request body is too large")
    answer = (
        b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    heads: list[bytes] = []

    async def refusing_peer(stream: trio.abc.Stream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(1024)
        heads.append(head)
        await stream.send_all(answer)
        await stream.aclose()

    async with trio.open_nursery() as nursery:

        async def connect(host: str, port: int, **_: object) -> trio.abc.Stream:
            request_out, request_in = trio.testing.lockstep_stream_one_way_pair()
            answer_out, answer_in = trio.testing.memory_stream_one_way_pair()
            nursery.start_soon(refusing_peer, trio.StapledStream(answer_out, request_in))
            client_stream = trio.StapledStream(request_out, answer_in)
            await trio.lowlevel.checkpoint()
            return client_stream

        monkeypatch.setattr(http_client, "connect_tcp", connect)
        client = HttpPeerClient("http://peer:1", "node-a", token=None)
        client._scopes.leases_supported = False  # one request: the invoke
        with pytest.raises(peerflow.PeerLimitError, match="too large"):
            await client.invoke_sub_workflow("w", ["echo"], "x" * (8 * 1024 * 1024))
        assert len(heads) == 1
        assert heads[0].startswith(b"POST /peerflow.peer.v1/InvokeSubWorkflow ")
        await client.aclose()
