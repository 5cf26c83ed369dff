"""Every client against a peer that never answers: a typed error within its timeouts.

The peers here accept a connection and then say nothing (or only what their
protocol stack says by itself: SETTINGS and PING acks, the WebSocket
handshake). Nothing a client waits for may outlast the call's ``timeout``,
lease set-up included, nor the ``handshake_timeout`` of opening.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

import peerflow
from peer_steps import Probe, build_steps
from peerflow import HttpPeerClient, Limits, PeerClient, PeerServer
from peerflow._peer import http_client
from peerflow._peer.client import Endpoint, open_client_over
from peerflow._peer.grpc_server import GrpcHandler
from peerflow._peer.ws_client import open_websocket_client_over
from peerflow._peer.ws_frames import SUBPROTOCOL
from peerflow._transport.h2conn import ServerStream, serve_h2_connection
from peerflow.testing import open_memory_peer

HANDSHAKE = 3.0
LIMITS = Limits(handshake_timeout=HANDSHAKE)


async def read_forever(stream: trio.abc.Stream) -> None:
    """A peer that reads whatever comes and never writes a byte."""
    while await stream.receive_some():
        pass
    await trio.sleep_forever()


async def test_opening_a_peer_client_is_bounded_when_the_peer_never_answers_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Its HTTP/2 stack acks SETTINGS and PINGs; its service never answers.
    async def never(stream: ServerStream) -> None:
        await trio.sleep_forever()

    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_h2_connection, server_stream, never)
        start = trio.current_time()
        with pytest.raises(peerflow.PeerTimeoutError, match="did not answer a Lease call") as info:
            async with open_client_over(
                client_stream,
                Endpoint("http", "memory", 1),
                "node-a",
                token=None,
                limits=LIMITS,
                lease_ttl=30,
            ):
                pass
        assert trio.current_time() - start == pytest.approx(HANDSHAKE)
        assert "handshake_timeout" in str(info.value)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("stuck", ["ref_scope", "renewal"])
async def test_a_lease_call_the_peer_sits_on_does_not_hold_the_client(
    stuck: str, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # The client's opening Lease is answered; later ones never are.
    answered = GrpcHandler._lease
    lease_calls = 0

    async def lease(self: GrpcHandler, *args: Any) -> None:
        nonlocal lease_calls
        lease_calls += 1
        if lease_calls == 1:
            await answered(self, *args)
        else:
            await trio.sleep_forever()

    monkeypatch.setattr(GrpcHandler, "_lease", lease)
    server = PeerServer("node-b", registry=build_steps(Probe()), token=None)
    async with open_memory_peer(server, "node-a", limits=LIMITS, lease_ttl=30) as client:
        start = trio.current_time()
        if stuck == "ref_scope":
            with pytest.raises(peerflow.PeerTimeoutError, match="handshake_timeout"):
                async with client.ref_scope():
                    pass
            assert trio.current_time() - start == pytest.approx(HANDSHAKE)
        else:
            # Renewals come every lease_ttl / 3; one the peer sits on is given
            # up after keepalive_timeout, and the next still goes out.
            await trio.sleep(60)
            assert lease_calls >= 3
        # Either way the client still calls.
        response = await client.invoke_sub_workflow("w", ["echo"], 1, timeout=5)
        assert response.result == 1


async def test_a_tls_handshake_the_peer_never_answers_times_out(nursery: trio.Nursery) -> None:
    # A real socket (TLS runs over TCP here): a short real timeout.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, read_forever, listeners)
    tls = ssl.create_default_context()
    limits = Limits(handshake_timeout=0.2)
    with trio.fail_after(5), pytest.raises(peerflow.PeerTimeoutError) as info:
        async with PeerClient.connect(
            f"https://127.0.0.1:{port}", "node-a", tls=tls, token=None, limits=limits
        ):
            pass
    assert str(info.value) == (
        f"cannot connect to 127.0.0.1:{port}: no connection and TLS handshake within 0.2s"
    )


@asynccontextmanager
async def silent_http_client(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HttpPeerClient]:
    """An HttpPeerClient whose connections go, in memory, to a peer that never answers."""
    async with trio.open_nursery() as nursery:

        async def connect(host: str, port: int, **_: object) -> trio.abc.Stream:
            client_stream, server_stream = trio.testing.memory_stream_pair()
            nursery.start_soon(read_forever, server_stream)
            await trio.lowlevel.checkpoint()
            return client_stream

        monkeypatch.setattr(http_client, "connect_tcp", connect)
        yield HttpPeerClient("http://peer:1", "node-a", token=None, limits=LIMITS)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def silent_ws_client() -> AsyncIterator[peerflow.WebSocketPeerClient]:
    """A WebSocketPeerClient of a peer that accepts the WebSocket and never answers a frame."""
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def mute_peer() -> None:
        async with trio.open_nursery() as ws_tasks:
            request = await trio_websocket.wrap_server_stream(ws_tasks, server_stream)
            ws = await request.accept(subprotocol=SUBPROTOCOL)
            try:
                while True:
                    await ws.get_message()
            except trio_websocket.ConnectionClosed:
                pass  # the client said goodbye

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mute_peer)
        async with open_websocket_client_over(
            client_stream,
            Endpoint("http", "memory", 1),
            "",
            "node-a",
            token=None,
            limits=LIMITS,
            lease_ttl=30,
        ) as client:
            yield client
        nursery.cancel_scope.cancel()


Call = Callable[[peerflow.HttpPeerClient | peerflow.WebSocketPeerClient], Awaitable[object]]


async def invoke(client: peerflow.HttpPeerClient | peerflow.WebSocketPeerClient) -> object:
    # The first invoke of a scope opens its lease first: the timeout covers that.
    return await client.invoke_sub_workflow("w", ["echo"], 1, timeout=1)


async def stream(client: peerflow.HttpPeerClient | peerflow.WebSocketPeerClient) -> object:
    async with client.stream_sub_workflow("w", ["echo"], 1, timeout=1) as call:
        return [event async for event in call]


async def invoke_in_a_ref_scope(
    client: peerflow.HttpPeerClient | peerflow.WebSocketPeerClient,
) -> object:
    async with client.ref_scope():
        return await client.invoke_sub_workflow("w", ["echo"], 1, timeout=1)


async def release(client: peerflow.HttpPeerClient | peerflow.WebSocketPeerClient) -> object:
    return await client.release_session_ref("no-such-ref", timeout=1)


CALLS = pytest.mark.parametrize(
    ("call", "method"),
    [
        (invoke, "InvokeSubWorkflow"),
        (stream, "StreamSubWorkflow"),
        (invoke_in_a_ref_scope, "InvokeSubWorkflow"),
        (release, "ReleaseSessionRef"),
    ],
)


@CALLS
async def test_an_http_call_times_out_lease_included(
    call: Call, method: str, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async with silent_http_client(monkeypatch) as client:
        start = trio.current_time()
        with pytest.raises(peerflow.PeerTimeoutError) as info:
            await call(client)
        assert trio.current_time() - start == pytest.approx(1)
        assert str(info.value) == f"{method} timed out after 1s"


@CALLS
async def test_a_websocket_call_times_out_lease_included(
    call: Call, method: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with silent_ws_client() as client:
        start = trio.current_time()
        with pytest.raises(peerflow.PeerTimeoutError) as info:
            await call(client)
        assert trio.current_time() - start == pytest.approx(1)
        assert str(info.value) == f"{method} timed out after 1s"


async def test_a_due_lease_renewal_counts_against_the_call_timeout(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # Without ``async with``, an HttpPeerClient renews its leases in its calls.
    async with silent_http_client(monkeypatch) as client:
        root = client._scopes.root
        root.opened = True  # as if an earlier call had opened the lease
        client._scopes._open[root.lease_id] = root
        start = trio.current_time()
        with pytest.raises(peerflow.PeerTimeoutError):
            await client.release_session_ref("no-such-ref", timeout=1)
        assert trio.current_time() - start == pytest.approx(1)
