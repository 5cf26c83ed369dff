"""h2load (nghttp2's load generator) drives our PeerServer with real HTTP/2 POSTs.

h2load knows nothing of gRPC: it posts the same prebuilt body (a gRPC frame
holding an InvokeSubWorkflowRequest) many times over several connections,
with many streams in flight on each, and counts HTTP statuses.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import trio
from interop_peer import grpc_frame, invoke_request, pack

from peer_steps import Probe
from peerflow import PeerAddress, PeerClient

REQUESTS = 2000

pytestmark = pytest.mark.skipif(
    shutil.which("h2load") is None,
    reason="h2load is not installed (Debian/Ubuntu: apt-get install nghttp2-client)",
)


async def test_h2load_posts_all_succeed_and_the_server_keeps_serving(
    address: PeerAddress, probe: Probe, tmp_path: Path
) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(grpc_frame(pack(invoke_request(["echo"], {"n": 1}))))
    command = [
        "h2load",
        "-n", str(REQUESTS),
        "-c", "4",
        "-m", "16",
        "-d", str(body),
        "-H", "content-type: application/grpc+msgpack",
        "-H", "te: trailers",
        "-H", "x-peerflow-peer-node-id: h2load",
        f"{address.url}/peerflow.peer.v1.Peer/InvokeSubWorkflow",
    ]  # fmt: skip
    with trio.fail_after(120):
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
        report = done.stdout.decode()
        requests = re.search(r"^requests: (.*)$", report, re.MULTILINE)
        statuses = re.search(r"^status codes: (.*)$", report, re.MULTILINE)
        assert requests is not None, report
        assert statuses is not None, report
        assert requests[1] == (
            f"{REQUESTS} total, {REQUESTS} started, {REQUESTS} done, {REQUESTS} succeeded, "
            "0 failed, 0 errored, 0 timeout"
        ), report
        assert statuses[1] == f"{REQUESTS} 2xx, 0 3xx, 0 4xx, 0 5xx", report
        # h2load cannot read grpc-status; every request reaching the step shows
        # each one was a well-formed call, not an HTTP 200 carrying an error.
        assert probe.ran.count("echo") == REQUESTS

        async with PeerClient.connect(address.url, "node-a", token=None) as client:
            response = await client.invoke_sub_workflow("w", ["echo"], "after the load")
        assert response.result == "after the load"
