"""Cancelling ``serve`` drains every variant on its port, over real sockets, and then returns.

The grace period here is far longer than the tests may take: a ``serve``
that returns in time returned because its connections drained, not because
the grace period ran out. (The grace period itself is tested per variant
under MockClock: tests/http/test_http_drain.py, tests/websocket/test_ws_drain.py,
tests/transport/test_h2conn.py.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from peer_steps import Probe
from peerflow import (
    HttpPeerClient,
    Limits,
    PeerAddress,
    PeerClient,
    PeerServer,
    WebSocketPeerClient,
)


@pytest.fixture
def limits() -> Limits:
    return Limits(drain_grace=60)


@attrs.define
class Serving:
    """``server.serve`` on a loopback port, until ``shut_down``; ``stopped`` once it returned."""

    address: PeerAddress
    scope: trio.CancelScope
    stopped: trio.Event

    def shut_down(self) -> None:
        self.scope.cancel()


@asynccontextmanager
async def serving(server: PeerServer) -> AsyncIterator[Serving]:
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def serve(task_status: trio.TaskStatus[PeerAddress]) -> None:
        with scope:
            await server.serve("127.0.0.1", 0, task_status=task_status)
        stopped.set()

    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve)
        yield Serving(address, scope, stopped)
        scope.cancel()


def connect(kind: str, url: str) -> AbstractAsyncContextManager[Any]:
    if kind == "grpc":
        return PeerClient.connect(url, "node-a", token=None)
    if kind == "http":
        return HttpPeerClient(url, "node-a", token=None)
    return WebSocketPeerClient.connect(url, "node-a", token=None)


KINDS = ["grpc", "http", "websocket"]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_call_in_flight_finishes_and_serve_returns(
    server: PeerServer, probe: Probe, kind: str
) -> None:
    with trio.fail_after(10):
        async with serving(server) as served, connect(kind, served.address.url) as client:
            async with trio.open_nursery() as nursery:
                results: list[object] = []

                async def gated() -> None:
                    results.append((await client.invoke_sub_workflow("w", ["gated"])).result)

                nursery.start_soon(gated)
                await probe.started.wait()
                served.shut_down()
                await trio.testing.wait_all_tasks_blocked()  # the drain has begun
                assert not served.stopped.is_set()
                probe.gate.set()
            assert results == ["through the gate"]
            await served.stopped.wait()


async def test_idle_connections_do_not_hold_up_the_drain(server: PeerServer) -> None:
    with trio.fail_after(10):
        async with serving(server) as served:
            url = served.address.url
            async with (
                connect("grpc", url) as grpc_client,
                connect("http", url) as http_client,
                connect("websocket", url) as ws_client,
            ):
                # One call each, so that every client holds an open, idle connection.
                for client in (grpc_client, http_client, ws_client):
                    assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
                raw = await trio.open_tcp_stream("127.0.0.1", served.address.port)
                async with raw:
                    await raw.send_all(
                        b"POST /peerflow.peer.v1/ReleaseSessionRef HTTP/1.1\r\nhost: p\r\n"
                        b"content-type: application/json\r\ncontent-length: 25\r\n"
                        b"x-peerflow-peer-node-id: raw\r\n\r\n"
                        b'{"v": 1, "ref_uuid": "x"}'
                    )
                    answer = b""
                    while b"released" not in answer:
                        answer += await raw.receive_some()
                    served.shut_down()
                    await served.stopped.wait()
                    # The kept-alive connection was closed, not left open.
                    while data := await raw.receive_some():
                        answer += data
                    assert answer.startswith(b"HTTP/1.1 200 ")
