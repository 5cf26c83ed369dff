"""WebSocketPeerClient against a PeerServer: every method, multiplexing, errors, cancellation."""

from __future__ import annotations

import contextlib
import functools
import math
import re
import socket
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from ws_helpers import client_over, open_memory_client

import peerflow
from peer_steps import Probe
from peerflow import (
    Context,
    DynamicEvent,
    Limits,
    PeerServer,
    StartEvent,
    WebSocketPeerClient,
    Workflow,
)
from peerflow.testing import open_memory_connection

TIMEOUT = 20
CONTEXT = "until_context_drop"
PARENT = "until_parent_finish"
EXPLICIT = "until_explicit_drop"


def assert_no_trace(server: PeerServer) -> None:
    assert len(server.refs) == 0
    stats = server.refs.statistics()
    assert (stats.runs, stats.scopes) == (0, 0)


async def test_invoke_carries_every_wire_value(client: WebSocketPeerClient) -> None:
    # msgpack, not JSON: NaN, infinities and maps that look like $bytes travel.
    value = {"f": [math.inf, -0.0, 1e308], "b": b"\x00\xff", "$bytes": "not bytes", "i": 2**64 - 1}
    response = await client.invoke_sub_workflow("w", ["echo"], value)
    assert response.result == value
    nan = await client.invoke_sub_workflow("w", ["echo"], math.nan)
    assert math.isnan(nan.result)
    stateful = await client.invoke_sub_workflow("w", ["stateful"], [1])
    assert stateful.state == {"seen": [1], "node": "node-b"}
    failed = await client.invoke_sub_workflow("w", ["boom"], None)
    with pytest.raises(peerflow.PeerWorkflowError, match="kaput"):
        failed.raise_for_error()


async def test_refs_and_their_lifetimes(server: PeerServer) -> None:
    wanted = [[EXPLICIT, "bytes"], [PARENT, "bytes"], [CONTEXT, "bytes"], [CONTEXT, "opaque"]]
    async with open_memory_client(server) as client:
        response = await client.invoke_sub_workflow("w", ["refs"], wanted)
        explicit, parent, inline, dropped = response.result
        assert set(response.remote_refs) == {explicit, parent}
        assert response.inline_refs[inline].payload == b"value-2"
        assert response.dropped_refs == (dropped,)
        assert await client.deref_session_ref(parent) == b"value-1"
        async with client.ref_scope():
            inner = await client.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"]])
            assert len(server.refs) == 3
        with pytest.raises(peerflow.PeerRefNotFoundError):
            await client.deref_session_ref(inner.result[0])
    # The client's block ended: its parent-scoped ref went; the explicit one stays.
    assert len(server.refs) == 1
    async with open_memory_client(server, "node-x") as stranger:
        with pytest.raises(peerflow.PeerRefNotFoundError):
            await stranger.deref_session_ref(explicit)
    async with open_memory_client(server) as owner:
        assert await owner.release_session_ref(explicit) is True
        assert await owner.release_session_ref(explicit) is False
    assert_no_trace(server)


async def test_a_peer_without_leases_gets_refs_released_one_by_one(server: PeerServer) -> None:
    del server._http1.websocket.methods["Lease"]  # type: ignore[union-attr]  # a minimal peer
    async with open_memory_client(server) as client:
        await client.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"], [PARENT, "bytes"]])
        assert not client._scopes.leases_supported
        assert len(server.refs) == 2
    assert len(server.refs) == 0


async def test_stream_yields_events_as_they_happen(
    client: WebSocketPeerClient, probe: Probe
) -> None:
    async with client.stream_sub_workflow("w", ["progress"], None) as call:
        seen = []
        async for event in call:
            seen.append(event)
            probe.gate.set()
    assert [event.n for event in seen] == [1, 2]  # type: ignore[attr-defined]
    assert call.response is not None
    assert call.response.result == "done"


async def test_leaving_a_stream_early_cancels_the_remote_run(
    client: WebSocketPeerClient, server: PeerServer
) -> None:
    stopped = trio.Event()

    @Workflow("ticks", registry=server.service.steps).step("tick", accepts=[StartEvent])
    async def tick(event: StartEvent, ctx: Context) -> None:
        ctx.write_event_to_stream(DynamicEvent("tests.Tick", {}))
        try:
            await trio.sleep_forever()
        finally:
            stopped.set()

    async with client.stream_sub_workflow("w", ["tick"], None) as call:
        async for _ in call:
            break
    await stopped.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert call.response is None
    assert server.refs.statistics().runs == 0


async def test_a_16_mib_ref_arrives_in_chunks(client: WebSocketPeerClient) -> None:
    size = 16 * 1024 * 1024
    response = await client.invoke_sub_workflow("w", ["big"], size)
    ref_uuid = response.result
    sizes = []
    async with client.open_session_ref(ref_uuid) as chunks:
        async for chunk in chunks:
            sizes.append(len(chunk))
    assert sizes == [1024 * 1024] * 16
    assert await client.deref_session_ref(ref_uuid) == bytes(range(256)) * (size // 256)
    assert await client.release_session_ref(ref_uuid)


async def test_errors_map_to_the_typed_peer_errors(client: WebSocketPeerClient) -> None:
    with pytest.raises(peerflow.PeerUnknownStepError) as unknown:
        await client.invoke_sub_workflow("w", ["nope"], 1)
    assert unknown.value.step_id == "nope"
    with pytest.raises(peerflow.PeerRefNotFoundError):
        await client.deref_session_ref("no-such-ref")
    response = await client.invoke_sub_workflow("w", ["refs"], [[EXPLICIT, "opaque"]])
    with pytest.raises(peerflow.PeerRefNotSerializableError):
        await client.deref_session_ref(response.result[0])
    assert await client.release_session_ref(response.result[0])
    with pytest.raises(peerflow.PeerEncodeError) as bad:
        await client.invoke_sub_workflow("w", ["echo"], {"k": {1, 2}})
    assert bad.value.path == 'input["k"]'
    # The connection is fine after all of that.
    assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1


async def test_calls_are_multiplexed_on_the_one_connection(
    client: WebSocketPeerClient, probe: Probe
) -> None:
    results: list[object] = []

    async def gated() -> None:
        results.append((await client.invoke_sub_workflow("w", ["gated"], None)).result)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(gated)
        await probe.started.wait()
        # The gated call is in flight; others overtake it on the same socket.
        for i in range(10):
            assert (await client.invoke_sub_workflow("w", ["echo"], i)).result == i
        probe.gate.set()
    assert results == ["through the gate"]


async def test_a_timeout_raises_and_stops_the_remote_run(
    client: WebSocketPeerClient,
    server: PeerServer,
    probe: Probe,
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    with pytest.raises(peerflow.PeerTimeoutError):
        await client.invoke_sub_workflow("w", ["slow"], 100, timeout=2.5)
    await probe.stopped.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert probe.deadline == pytest.approx(start + 2.5, abs=0.01)
    assert not probe.finished
    assert len(server.refs) == 0


async def test_the_effective_deadline_travels_and_none_means_none(
    client: WebSocketPeerClient, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    with trio.move_on_after(7):
        await client.invoke_sub_workflow("w", ["slow"], 100)
    assert probe.deadline == pytest.approx(start + 7, abs=0.01)
    assert (await client.invoke_sub_workflow("w", ["slow"], 3)).result == "slept"
    assert probe.deadline == math.inf


async def test_cancelling_a_call_sends_a_cancel_frame(
    client: WebSocketPeerClient,
    server: PeerServer,
    probe: Probe,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.invoke_sub_workflow, "w", ["slow"], 100)
        await probe.started.wait()
        nursery.cancel_scope.cancel()
    await probe.stopped.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert probe.cancelled
    assert len(server.refs) == 0
    assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1


async def test_closing_the_connection_cancels_every_call(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    stopped: list[int] = []
    started = trio.Event()

    @Workflow("waits", registry=server.service.steps).step("wait", accepts=[StartEvent])
    async def wait(event: StartEvent, ctx: Context) -> None:
        try:
            if event.data == 2:
                started.set()
            await trio.sleep_forever()
        finally:
            stopped.append(event.data)

    failures: list[Exception] = []

    async def call(client: WebSocketPeerClient, i: int) -> None:
        try:
            await client.invoke_sub_workflow("w", ["wait"], i)
        except peerflow.PeerTransportError as exc:
            failures.append(exc)

    async with open_memory_client(server) as client:
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(call, client, i)
            await started.wait()
            await trio.testing.wait_all_tasks_blocked()
            await trio.aclose_forcefully(client._transport)  # the connection drops
        assert [str(exc) for exc in failures] == [
            "the WebSocket connection closed (1006 ABNORMAL_CLOSURE)"
        ] * 3
        with pytest.raises(peerflow.PeerTransportError, match="closed"):
            await client.invoke_sub_workflow("w", ["echo"], 1)
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(stopped) == [0, 1, 2]
    assert server.refs.statistics().runs == 0


@pytest.mark.parametrize("token", ["s3cret"])
async def test_token_auth_at_the_handshake(server: PeerServer) -> None:
    async with open_memory_client(server, token="s3cret") as client:
        assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
    for token in (None, "wrong"):
        with pytest.raises(peerflow.PeerAuthError):
            async with open_memory_client(server, token=token):
                pass


async def test_limits_bound_the_messages(server: PeerServer) -> None:
    limits = Limits(max_message_size=4096)
    async with open_memory_client(server, limits=limits) as client:
        with pytest.raises(peerflow.PeerTransportError, match="1009"):
            await client.invoke_sub_workflow("w", ["echo"], "x" * 5000)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connect_over_tcp(server: PeerServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)
            url = address.url.replace("http://", "ws://")
            async with WebSocketPeerClient.connect(url, "node-a", token=None) as client:
                response = await client.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"]])
                assert await client.deref_session_ref(response.result[0]) == b"value-0"
            assert len(server.refs) == 0
            nursery.cancel_scope.cancel()


async def test_connection_refused_names_the_address() -> None:
    port = free_port()
    with trio.fail_after(TIMEOUT), pytest.raises(peerflow.PeerUnavailableError) as info:
        async with WebSocketPeerClient.connect(f"http://127.0.0.1:{port}", "n", token=None):
            pass
    assert f"127.0.0.1:{port}" in str(info.value)


@pytest.mark.parametrize("url", ["127.0.0.1:80", "ftp://h:1", "ws://", "http://h/?q", 7])
def test_a_bad_url_fails_at_once(url: object) -> None:
    with pytest.raises(peerflow.PeerTransportError) as info:
        WebSocketPeerClient.connect(url, "node-a")  # type: ignore[arg-type]
    # The message names the URL as it was given, not a piece of it.
    assert repr(url) in str(info.value) or not isinstance(url, str)


async def test_a_peer_that_stops_answering_pings_fails_the_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    limits = Limits(keepalive_interval=5, keepalive_timeout=2)

    async def silent_peer() -> None:
        # Accepts the WebSocket, then never reads or answers again.
        peer = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        while True:
            peer.receive_data(await server_stream.receive_some())
            for event in peer.events():
                if isinstance(event, wsproto.events.Request):
                    accept = wsproto.events.AcceptConnection(subprotocol="peerflow.v1")
                    await server_stream.send_all(peer.send(accept))
                    await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(silent_peer)
        async with client_over(client_stream, limits=limits) as client:
            start = trio.current_time()
            with pytest.raises(peerflow.PeerTimeoutError, match="pings"):
                await client.release_session_ref("x")
            assert trio.current_time() - start == pytest.approx(7)
        nursery.cancel_scope.cancel()


# Peers that get the handshake wrong, for a real client over a real socket.


async def read_request(stream: trio.SocketStream) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        data = await stream.receive_some()
        assert data, "the client closed before its upgrade request ended"
        request += data


async def wait_for_the_client_to_leave(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError):
        while await stream.receive_some():
            pass


async def answers_junk(stream: trio.SocketStream) -> None:
    await stream.send_all(b"\x00\x01garbage" * 100)
    await wait_for_the_client_to_leave(stream)


async def accepts_with_a_wrong_key(stream: trio.SocketStream) -> None:
    await read_request(stream)
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: bm90IHRoZSBrZXk=\r\nSec-WebSocket-Protocol: peerflow.v1\r\n\r\n"
    )
    await wait_for_the_client_to_leave(stream)


async def closes_at_once(stream: trio.SocketStream) -> None:
    await stream.aclose()


async def closes_mid_answer(stream: trio.SocketStream) -> None:
    await read_request(stream)
    await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n")
    await stream.aclose()


@pytest.mark.parametrize(
    ("peer", "error", "message"),
    [
        (
            answers_junk,
            peerflow.PeerTransportError,
            "{where} sent a malformed answer to the WebSocket handshake: Bad HTTP message: .+",
        ),
        (
            accepts_with_a_wrong_key,
            peerflow.PeerTransportError,
            "{where} sent a malformed answer to the WebSocket handshake: Bad accept token",
        ),
        (
            closes_at_once,
            peerflow.PeerUnavailableError,
            # The request may meet the closed socket: then the close is a reset.
            r"{where} closed the connection before answering the WebSocket handshake(: .+)?",
        ),
        (
            closes_mid_answer,
            peerflow.PeerUnavailableError,
            "{where} closed the connection in the middle of its answer to the WebSocket handshake",
        ),
    ],
    ids=["junk", "wrong-key", "close-at-once", "close-mid-answer"],
)
async def test_a_failed_handshake_raises_one_typed_error_at_once(
    nursery: trio.Nursery,
    peer: Callable[[trio.SocketStream], Awaitable[None]],
    error: type[peerflow.PeerError],
    message: str,
) -> None:
    with trio.fail_after(TIMEOUT):
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, peer, 0, host="127.0.0.1")
        )
        where = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        start = trio.current_time()
        with pytest.raises(peerflow.PeerError) as info:
            async with WebSocketPeerClient.connect(f"http://{where}", "node-a", token=None):
                pass
    assert type(info.value) is error
    assert re.fullmatch(message.format(where=re.escape(where)), str(info.value))
    # Not a timeout: nothing waited for the handshake timeout (10 s).
    assert trio.current_time() - start < TIMEOUT / 2


async def test_a_peer_that_never_answers_the_handshake_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    limits = Limits(handshake_timeout=3)

    async def mute_peer() -> None:
        while await server_stream.receive_some():  # reads the request, says nothing
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mute_peer)
        start = trio.current_time()
        with pytest.raises(peerflow.PeerTimeoutError) as info:
            async with client_over(client_stream, limits=limits):
                pass
        assert trio.current_time() - start == pytest.approx(3)
        assert str(info.value) == "the WebSocket handshake with memory:0 did not complete within 3s"
        nursery.cancel_scope.cancel()


async def test_a_peer_that_closes_before_the_request_is_sent_is_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await server_stream.aclose()
    with trio.fail_after(TIMEOUT), pytest.raises(peerflow.PeerUnavailableError) as info:
        async with client_over(client_stream):
            pass
    assert str(info.value).startswith(
        "memory:0 closed the connection before answering the WebSocket handshake"
    )


async def test_a_client_block_cancelled_from_outside_still_says_goodbye_promptly(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    # The connection's reader must outlive the caller's cancellation for the
    # root scope's Lease close and the closing handshake to be answered:
    # each would otherwise wait out keepalive_timeout.
    async with open_memory_connection(server) as transport:
        with trio.move_on_after(5) as outside:
            async with client_over(transport) as client:
                response = await client.invoke_sub_workflow("w", ["refs"], [[PARENT, "bytes"]])
                assert len(response.remote_refs) == 1
                await trio.sleep_forever()
        assert outside.cancelled_caught
        assert trio.current_time() - outside.deadline < 1
        await trio.testing.wait_all_tasks_blocked()
        assert_no_trace(server)  # the lease closed, and its ref went with it
