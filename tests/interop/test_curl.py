"""curl, a third-party HTTP client, calls our PeerServer's HTTP/JSON routes over a real socket.

Over HTTP/1.1 and over HTTP/2 (``--http2-prior-knowledge``) on the port that
also serves gRPC. Bodies are JSON written from protocol/README.md section 6.
"""

from __future__ import annotations

import base64
import json
import shutil
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from peer_steps import Probe
from peerflow import (
    Context,
    PeerAddress,
    PeerServer,
    StartEvent,
    StepRegistry,
    StopEvent,
    TraceContext,
    Workflow,
    current_trace_context,
)

CURL = shutil.which("curl")
pytestmark = pytest.mark.skipif(CURL is None, reason="curl is not installed")

TIMEOUT = 20
HTTP_VERSIONS = [pytest.param([], id="http1.1"), pytest.param(["--http2-prior-knowledge"], id="h2")]


@attrs.frozen
class CurlReply:
    status: int
    http_version: str
    body: bytes
    stderr: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines()]


async def curl(
    address: PeerAddress,
    method: str,
    body: dict[str, Any] | bytes,
    *args: str,
    headers: dict[str, str] | None = None,
) -> CurlReply:
    assert CURL is not None
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    fields = {
        "content-type": "application/json",
        "x-peerflow-peer-node-id": "curl",
        **(headers or {}),
    }
    command = [CURL, "-sS", "--data-binary", "@-", "-w", "\n%{http_code} %{http_version}"]
    for name, value in fields.items():
        command += ["-H", f"{name}: {value}"]
    command += [*args, f"{address.url}/peerflow.peer.v1/{method}"]
    result = await trio.run_process(
        command, stdin=data, capture_stdout=True, capture_stderr=True, check=False
    )
    body_out, _, trailer = result.stdout.rpartition(b"\n")
    status, version = trailer.decode().split()
    return CurlReply(int(status), version, body_out, result.stderr)


def invoke(step_ids: list[str], value: Any = None) -> dict[str, Any]:
    return {"v": 1, "workflow_name": "w", "step_ids": step_ids, "input": value}


@pytest.mark.parametrize("http", HTTP_VERSIONS)
async def test_curl_invokes_with_json_values(address: PeerAddress, http: list[str]) -> None:
    value = {"doc": [1, "two", {"$bytes": "AP8="}, 4.5, None, True, -(2**63), 2**64 - 1]}
    with trio.fail_after(TIMEOUT):
        reply = await curl(address, "InvokeSubWorkflow", invoke(["echo"], value), *http)
    assert reply.http_version == ("2" if http else "1.1")
    assert reply.status == 200
    assert reply.json == {"v": 1, "result": value, "state": {}, "remote_refs": {}, "error": None}


@pytest.mark.parametrize("http", HTTP_VERSIONS)
async def test_curl_streams_events_as_ndjson(
    address: PeerAddress, probe: Probe, http: list[str]
) -> None:
    probe.gate.set()
    with trio.fail_after(TIMEOUT):
        reply = await curl(address, "StreamSubWorkflow", invoke(["progress"]), *http)
    assert reply.status == 200
    first, second, last = reply.lines
    assert first == {
        "v": 1,
        "kind": "event",
        "event": {"event_type": "tests.Progress", "data": {"n": 1}},
    }
    assert second["event"]["data"] == {"n": 2}
    assert (last["kind"], last["result"]) == ("response", "done")


@pytest.mark.parametrize("http", HTTP_VERSIONS)
async def test_curl_derefs_and_releases_a_ref(
    address: PeerAddress, server: PeerServer, http: list[str]
) -> None:
    size = 3 * 1024 * 1024 + 5
    with trio.fail_after(TIMEOUT):
        made = await curl(address, "InvokeSubWorkflow", invoke(["big"], size), *http)
        ref_uuid = made.json["result"]
        assert made.json["remote_refs"][ref_uuid]["size"] == size - size % 256
        reply = await curl(address, "DerefSessionRef", {"v": 1, "ref_uuid": ref_uuid}, *http)
        *chunks, end = reply.lines
        assert end == {"end": True}
        assert len(chunks) == 3  # 1 MiB slices
        assert chunks[0]["type_tag"] == "peerflow.bytes"
        payload = b"".join(base64.b64decode(chunk["payload"]) for chunk in chunks)
        assert payload == bytes(range(256)) * (size // 256)
        reply = await curl(address, "ReleaseSessionRef", {"v": 1, "ref_uuid": ref_uuid}, *http)
        assert reply.json == {"v": 1, "released": True}
    assert len(server.refs) == 0


@pytest.mark.parametrize("http", HTTP_VERSIONS)
async def test_curl_opens_and_closes_a_lease(
    address: PeerAddress, server: PeerServer, http: list[str]
) -> None:
    lease = {"v": 1, "lease_id": "curl-lease", "ttl_ms": 60_000}
    with trio.fail_after(TIMEOUT):
        reply = await curl(address, "Lease", lease, *http)
        assert reply.json == {"v": 1, "lease_id": "curl-lease", "ttl_ms": 60_000}
        body = {**invoke(["refs"], [["until_parent_finish", "bytes"]]), "lease_id": "curl-lease"}
        await curl(address, "InvokeSubWorkflow", body, *http)
        assert len(server.refs) == 1
        reply = await curl(address, "Lease", {**lease, "ttl_ms": 0, "close": True}, *http)
    assert reply.json == {"v": 1, "lease_id": "curl-lease", "ttl_ms": 0, "released": 1}
    assert len(server.refs) == 0


@pytest.mark.parametrize("http", HTTP_VERSIONS)
async def test_curl_sees_errors_as_statuses_and_json_bodies(
    address: PeerAddress, http: list[str]
) -> None:
    with trio.fail_after(TIMEOUT):
        reply = await curl(address, "InvokeSubWorkflow", invoke(["nope"]), *http)
        assert reply.status == 404
        assert reply.json["error"] == {
            "v": 1,
            "code": "unknown_step",
            "message": "peer has no step registered as 'nope'",
            "step_id": "nope",
        }
        reply = await curl(address, "InvokeSubWorkflow", b'{"v": 1, "step_ids": 3}', *http)
        assert (reply.status, reply.json["error"]["code"]) == (400, "encode")
        reply = await curl(address, "DerefSessionRef", {"v": 1, "ref_uuid": "x"}, *http)
        assert (reply.status, reply.json["error"]["code"]) == (404, "ref_not_found")
        reply = await curl(address, "Frobnicate", {"v": 1}, *http)
        assert reply.status == 501
        reply = await curl(
            address, "InvokeSubWorkflow", invoke(["echo"]), *http, headers={"content-type": "x/y"}
        )
        assert reply.status == 415


@pytest.mark.parametrize("http", HTTP_VERSIONS)
async def test_curl_deadline_header_and_none(
    address: PeerAddress, probe: Probe, http: list[str]
) -> None:
    with trio.fail_after(TIMEOUT):
        reply = await curl(
            address,
            "InvokeSubWorkflow",
            invoke(["slow"], 100),
            *http,
            headers={"x-peerflow-timeout-ms": "300"},
        )
        assert (reply.status, reply.json["error"]["code"]) == (504, "timeout")
        assert probe.cancelled
        reply = await curl(address, "InvokeSubWorkflow", invoke(["slow"], 0), *http)
    assert reply.json["result"] == "slept"
    assert probe.deadline == float("inf")  # curl sent no deadline: the run had none


@pytest.mark.parametrize("http", HTTP_VERSIONS)
async def test_curl_giving_up_cancels_the_remote_run(
    address: PeerAddress, server: PeerServer, probe: Probe, http: list[str]
) -> None:
    with trio.fail_after(TIMEOUT):
        # curl's own timeout: it closes the connection (HTTP/1.1) or resets the
        # stream (HTTP/2) without a deadline header.
        await curl(address, "InvokeSubWorkflow", invoke(["slow"], 100), "--max-time", "1", *http)
        await probe.stopped.wait()
        await trio.testing.wait_all_tasks_blocked()
    assert not probe.finished
    assert probe.deadline == float("inf")
    assert server.refs.statistics().runs == 0


@pytest.mark.parametrize("token", ["s3cret"])
@pytest.mark.parametrize("http", HTTP_VERSIONS)
async def test_curl_with_and_without_the_token(address: PeerAddress, http: list[str]) -> None:
    with trio.fail_after(TIMEOUT):
        reply = await curl(address, "InvokeSubWorkflow", invoke(["echo"], 1), *http)
        assert (reply.status, reply.json["error"]["code"]) == (401, "auth")
        reply = await curl(
            address,
            "InvokeSubWorkflow",
            invoke(["echo"], 1),
            *http,
            headers={"authorization": "Bearer s3cret"},
        )
    assert reply.json["result"] == 1


async def test_curl_reuses_one_kept_alive_connection(address: PeerAddress) -> None:
    assert CURL is not None
    url = f"{address.url}/peerflow.peer.v1/ReleaseSessionRef"
    body = json.dumps({"v": 1, "ref_uuid": "x"})
    one = ["-H", "content-type: application/json", "-H", "x-peerflow-peer-node-id: curl"]
    one += ["--data-binary", body, url]
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(
            [CURL, "-sS", "-v", *one, "--next", *one], capture_stdout=True, capture_stderr=True
        )
    assert result.stdout == b'{"v":1,"released":false}' * 2
    assert b"Re-using existing connection" in result.stderr


@pytest.mark.parametrize("http", HTTP_VERSIONS)
async def test_curl_traceparent_reaches_the_step(nursery: trio.Nursery, http: list[str]) -> None:
    seen: list[TraceContext | None] = []
    registry = StepRegistry()

    @Workflow("traced", registry=registry).step("record", accepts=[StartEvent])
    async def record(event: StartEvent, ctx: Context) -> StopEvent:
        seen.append(current_trace_context())
        return StopEvent(result=None)

    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with trio.fail_after(TIMEOUT):
        server = PeerServer("node-t", registry=registry, token=None)
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        headers = {"traceparent": traceparent, "tracestate": "congo=t61rcWkgMzE"}
        reply = await curl(address, "InvokeSubWorkflow", invoke(["record"]), *http, headers=headers)
        assert reply.status == 200, reply
        # A malformed one is ignored: the call still succeeds.
        reply = await curl(
            address, "InvokeSubWorkflow", invoke(["record"]), *http, headers={"traceparent": "00-x"}
        )
        assert reply.status == 200, reply
    assert seen == [TraceContext(traceparent, "congo=t61rcWkgMzE"), None]
