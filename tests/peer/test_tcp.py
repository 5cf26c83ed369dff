"""PeerServer and PeerClient over real loopback sockets."""

from __future__ import annotations

import socket

import pytest
import trio

import peerflow
from peer_steps import Probe
from peerflow import PeerClient, PeerServer


@pytest.mark.parametrize(
    "endpoint",
    ["127.0.0.1:80", "ftp://127.0.0.1:1", "http://", "http://h:99999", "http://h:1/path", 7],
)
def test_a_bad_endpoint_fails_at_once(endpoint: object) -> None:
    with pytest.raises(peerflow.PeerTransportError, match="endpoint"):
        PeerClient.connect(endpoint, "node-a")  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connection_refused_names_the_address() -> None:
    port = _free_port()
    # Nothing reached the peer: unavailable, and so safe to retry.
    with trio.fail_after(10), pytest.raises(peerflow.PeerUnavailableError) as info:
        async with PeerClient.connect(f"http://127.0.0.1:{port}", "node-a", token=None):
            pass
    assert f"127.0.0.1:{port}" in str(info.value)


async def test_calls_over_tcp(server: PeerServer) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)
            assert address.url == f"http://127.0.0.1:{address.port}"
            async with PeerClient.connect(address.url, "node-a", token=None) as client:
                response = await client.invoke_sub_workflow(
                    "w", ["refs"], [["until_parent_finish", "bytes"]]
                )
                (ref_uuid,) = response.result
                assert await client.deref_session_ref(ref_uuid) == b"value-0"
                assert await client.ping() >= 0
            assert len(server.refs) == 0
            nursery.cancel_scope.cancel()


async def test_a_server_serves_once_at_a_time(server: PeerServer) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, "127.0.0.1", 0)
            with pytest.raises(RuntimeError, match="already running"):
                await server.serve("127.0.0.1", 0)
            nursery.cancel_scope.cancel()
        # Once stopped, it can serve again.
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, "127.0.0.1", 0)
            nursery.cancel_scope.cancel()


async def test_shutdown_lets_in_flight_calls_finish(server: PeerServer, probe: Probe) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            serving = trio.CancelScope()

            async def serve(task_status: trio.TaskStatus[peerflow.PeerAddress]) -> None:
                with serving:
                    await server.serve("127.0.0.1", 0, task_status=task_status)

            address = await outer.start(serve)
            async with PeerClient.connect(address.url, "node-a", token=None) as client:
                result: list[object] = []

                async def call() -> None:
                    response = await client.invoke_sub_workflow("w", ["slow"], 0.2)
                    result.append(response.result)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    await probe.started.wait()
                    serving.cancel()  # GOAWAY; the in-flight call may finish
                assert result == ["slept"]
                with pytest.raises(peerflow.PeerTransportError):
                    await client.invoke_sub_workflow("w", ["echo"], 1)
