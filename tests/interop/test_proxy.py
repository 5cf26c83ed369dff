"""A real HTTP/2 proxy (haproxy) between PeerClient and PeerServer.

The wire is plain gRPC, so a standard HTTP/2 reverse proxy must carry every
method unchanged: trailers, server streaming, large bodies under flow
control, grpc-timeout and RST_STREAM. haproxy terminates HTTP/2 on both
sides, so nothing reaches our server byte for byte as our client sent it.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from peer_steps import Probe, Progress
from peerflow import (
    PeerAddress,
    PeerClient,
    PeerServer,
    PeerTimeoutError,
    PeerUnknownStepError,
    RefLifetime,
)

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None,
    reason="haproxy is not installed (Debian/Ubuntu: apt-get install haproxy)",
)

_CONFIG = """\
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend grpc_in
  bind 127.0.0.1:{listen} proto h2
  default_backend peers
backend peers
  server peer 127.0.0.1:{upstream} proto h2
"""


def _free_port() -> int:
    # haproxy cannot report a port it chose itself; this one is free now
    # and nobody else on the loopback races for it during a test.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def proxy_url(
    address: PeerAddress, nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[str]:
    listen = _free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(_CONFIG.format(listen=listen, upstream=address.port))
    log = tmp_path / "haproxy.log"
    with log.open("wb") as sink:
        process = await trio.lowlevel.open_process(
            ["haproxy", "-f", str(config), "-db"], stdout=sink, stderr=sink
        )
    try:
        with trio.fail_after(10):
            # Accepting connections means it has parsed its config and bound.
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", listen)).aclose()
                    break
                except OSError:
                    assert process.poll() is None, f"haproxy failed: {log.read_text()}"
                    await trio.sleep(0.02)
        yield f"http://127.0.0.1:{listen}"
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        process.kill()


async def test_every_method_goes_through_haproxy(
    proxy_url: str, server: PeerServer, probe: Probe
) -> None:
    with trio.fail_after(30):
        async with PeerClient.connect(proxy_url, "node-a", token=None) as client:
            echoed = await client.invoke_sub_workflow("peer-tests", ["echo"], {"a": [1, b"\x00"]})
            assert echoed.result == {"a": [1, b"\x00"]}
            stateful = await client.invoke_sub_workflow("peer-tests", ["stateful"], "x")
            assert stateful.state == {"seen": "x", "node": "node-b"}

            size = 4 * 1024 * 1024 + 17
            made = await client.invoke_sub_workflow("peer-tests", ["big"], size)
            assert await client.deref_session_ref(made.result) == bytes(range(256)) * (size // 256)
            assert await client.release_session_ref(made.result) is True
            assert await client.release_session_ref(made.result) is False

            with pytest.raises(PeerUnknownStepError):
                await client.invoke_sub_workflow("peer-tests", ["no-such-step"], None)

            async with client.stream_sub_workflow("peer-tests", ["progress"], None) as call:
                events = []
                async for event in call:
                    events.append(event)
                    probe.gate.set()
                response = call.response
            assert events == [Progress(1), Progress(2)]
            assert response.result == "done"

            refs = await client.invoke_sub_workflow(
                "peer-tests", ["refs"], [[RefLifetime.UNTIL_PARENT_FINISH.value, "bytes"]]
            )
            assert len(refs.remote_refs) == 1
            assert len(server.refs) == 1
        # The client's lease ended with its context: the proxy carried that too.
        assert len(server.refs) == 0


async def test_deadlines_and_cancellation_cross_haproxy(
    proxy_url: str, server: PeerServer, probe: Probe
) -> None:
    with trio.fail_after(30):
        async with PeerClient.connect(proxy_url, "node-a", token=None) as client:
            with pytest.raises(PeerTimeoutError):
                await client.invoke_sub_workflow("peer-tests", ["slow"], 30, timeout=0.5)
            # grpc-timeout reached the peer through the proxy: the run had a deadline.
            assert probe.deadline is not None
            await probe.stopped.wait()
            await trio.testing.wait_all_tasks_blocked()
            # A cancelled run purges every ref it made, UNTIL_PARENT_FINISH too.
            assert len(server.refs) == 0
