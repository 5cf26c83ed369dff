"""The server's HTTP/1.1 side, poked with raw bytes: routes, statuses, limits, timeouts."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from raw_http import invoke, memory_connection, post

from peer_steps import Probe
from peerflow import Limits, PeerServer


@pytest.fixture
def limits() -> Limits:
    return Limits(
        max_message_size=4096,
        max_header_list_size=2048,
        request_timeout=5,
        idle_timeout=60,
    )


def assert_no_trace(server: PeerServer) -> None:
    assert len(server.refs) == 0
    stats = server.refs.statistics()
    assert (stats.runs, stats.scopes) == (0, 0)


@pytest.mark.parametrize("version", [2**64, -(2**70)])
async def test_a_version_no_wire_int_can_hold_is_a_400(server: PeerServer, version: int) -> None:
    # JSON ints have no bound; the answer must still be written, and the
    # connection serve on.
    body = b'{"v":%d,"workflow_name":"w","step_ids":["echo"],"input":1}' % version
    async with memory_connection(server) as conn:
        reply = await conn.call(post("InvokeSubWorkflow", body))
        after = await conn.call(post("InvokeSubWorkflow", invoke(["echo"], 2)))
    assert (reply.status, reply.error_code) == (400, "encode")
    assert reply.json["error"]["path"] == "v"
    assert after.json["result"] == 2


async def test_invoke_answers_json_and_keeps_the_connection(server: PeerServer) -> None:
    async with memory_connection(server) as conn:
        reply = await conn.call(
            post("InvokeSubWorkflow", invoke(["echo"], {"b": {"$bytes": "AP8="}}))
        )
        assert reply.status == 200
        assert reply.headers[b"content-type"] == b"application/json"
        assert reply.json == {
            "v": 1,
            "result": {"b": {"$bytes": "AP8="}},
            "state": {},
            "remote_refs": {},
            "error": None,
        }
        # Same connection, next request.
        reply = await conn.call(post("ReleaseSessionRef", {"v": 1, "ref_uuid": "x"}))
        assert reply.json == {"v": 1, "released": False}


async def test_pipelined_requests_are_answered_in_order(server: PeerServer) -> None:
    async with memory_connection(server) as conn:
        await conn.send(
            post("InvokeSubWorkflow", invoke(["echo"], 1))
            + post("InvokeSubWorkflow", invoke(["echo"], 2))
            + post("InvokeSubWorkflow", invoke(["echo"], 3))
        )
        assert [(await conn.reply()).json["result"] for _ in range(3)] == [1, 2, 3]


async def test_streams_answer_ndjson(server: PeerServer, probe: Probe) -> None:
    probe.gate.set()
    async with memory_connection(server) as conn:
        reply = await conn.call(post("StreamSubWorkflow", invoke(["progress"])))
        assert reply.status == 200
        assert reply.headers[b"content-type"] == b"application/x-ndjson"
        assert reply.headers[b"transfer-encoding"] == b"chunked"
        events, response = reply.lines[:2], reply.lines[2]
        assert [e["event"] for e in events] == [
            {"event_type": "tests.Progress", "data": {"n": 1}},
            {"event_type": "tests.Progress", "data": {"n": 2}},
        ]
        assert response["kind"] == "response"
        assert response["result"] == "done"


async def test_deref_answers_base64_chunks_then_an_end_line(server: PeerServer) -> None:
    async with memory_connection(server) as conn:
        made = await conn.call(
            post("InvokeSubWorkflow", invoke(["refs"], [["until_explicit_drop", "bytes"]]))
        )
        (ref_uuid,) = made.json["result"]
        reply = await conn.call(post("DerefSessionRef", {"v": 1, "ref_uuid": ref_uuid}))
        assert reply.lines == [
            {"v": 1, "type_tag": "peerflow.bytes", "total_size": 7, "payload": "dmFsdWUtMA=="},
            {"end": True},
        ]
        reply = await conn.call(post("ReleaseSessionRef", {"v": 1, "ref_uuid": ref_uuid}))
        assert reply.json == {"v": 1, "released": True}


@pytest.mark.parametrize(
    ("body", "status", "code", "path"),
    [
        (b"{not json", 400, "encode", None),
        (b"[1, 2]", 400, "encode", None),
        (
            b'{"v": 1, "workflow_name": "w", "step_ids": [1], "input": 1}',
            400,
            "encode",
            "step_ids[0]",
        ),
        (b'{"v": 1, "workflow_name": "w", "input": 1}', 400, "encode", "step_ids"),
        (
            b'{"v": 1, "workflow_name": "w", "step_ids": ["echo"], "input": NaN}',
            400,
            "encode",
            None,
        ),
        (
            b'{"v": 1, "workflow_name": "w", "step_ids": ["echo"], "input": {"$bytes": "!"}}',
            400,
            "encode",
            'input["$bytes"]',
        ),
        (
            b'{"v": 1, "workflow_name": "w", "step_ids": ["nope"], "input": 1}',
            404,
            "unknown_step",
            None,
        ),
        (b'{"v": 9, "workflow_name": "w"}', 412, "envelope_version", None),
        (b'{"workflow_name": "w"}', 400, "encode", "v"),
        (b"\xff\xfe", 400, "encode", None),
    ],
)
async def test_bad_requests_get_the_documented_status(
    server: PeerServer, body: bytes, status: int, code: str, path: str | None
) -> None:
    async with memory_connection(server) as conn:
        reply = await conn.call(post("InvokeSubWorkflow", body))
        assert (reply.status, reply.error_code) == (status, code)
        assert reply.json["error"].get("path") == path
        if code == "envelope_version":
            assert (reply.json["error"]["got"], reply.json["error"]["supported"]) == (9, 1)
        # The connection carries on.
        assert (await conn.call(post("InvokeSubWorkflow", invoke(["echo"], 1)))).status == 200


async def test_routes_methods_and_content_types(server: PeerServer) -> None:
    async with memory_connection(server) as conn:
        reply = await conn.call(post("NoSuchMethod", {"v": 1}))
        assert (reply.status, reply.error_code) == (501, "unimplemented")
        reply = await conn.call(
            b"GET /peerflow.peer.v1/InvokeSubWorkflow HTTP/1.1\r\nhost: p\r\n"
            b"x-peerflow-peer-node-id: a\r\n\r\n"
        )
        assert reply.status == 405
        assert reply.headers[b"allow"] == b"POST"
        await conn.send(
            b"HEAD /peerflow.peer.v1/InvokeSubWorkflow HTTP/1.1\r\nhost: p\r\n"
            b"x-peerflow-peer-node-id: a\r\n\r\n"
        )
        reply = await conn.reply(head=True)
        assert reply.status == 405
        assert int(reply.headers[b"content-length"]) > 0  # what a GET would have had
        reply = await conn.call(
            post("InvokeSubWorkflow", invoke(["echo"]), content_type="text/plain")
        )
        assert reply.status == 415
        reply = await conn.call(
            post(
                "InvokeSubWorkflow",
                invoke(["echo"], 1),
                content_type="Application/JSON; charset=utf-8",
            )
        )
        assert reply.status == 200
        # A query string does not change the route.
        raw = post("InvokeSubWorkflow", invoke(["echo"], 2)).replace(
            b"Workflow HTTP", b"Workflow?x=1 HTTP"
        )
        assert (await conn.call(raw)).json["result"] == 2
    async with memory_connection(server) as conn:
        # Not a peerflow client at all: answered, and the connection closed.
        reply = await conn.call(b"GET / HTTP/1.1\r\nhost: p\r\n\r\n")
        assert (reply.status, reply.error_code) == (404, "not_found")
        assert reply.headers[b"connection"] == b"close"
        assert await conn.closed()
    async with memory_connection(server) as conn:
        # Nor is a broken HTTP/2 preface, which parses as an HTTP/2.0 request line.
        reply = await conn.call(b"PRI * HTTP/2.0\r\n\r\nXY\r\n\r\n")
        assert (reply.status, reply.error_code) == (400, "encode")
        assert await conn.closed()


async def test_malformed_http_gets_400_and_a_closed_connection(server: PeerServer) -> None:
    async with memory_connection(server) as conn:
        reply = await conn.call(b"POST /x HTTP/1.1\r\nbad header line\r\n\r\n")
        assert reply.status == 400
        assert reply.headers[b"connection"] == b"close"
        assert await conn.closed()
    async with memory_connection(server) as conn:
        reply = await conn.call(post("InvokeSubWorkflow", invoke(["echo"], 1)))
        assert reply.status == 200


async def test_a_header_block_above_the_limit_gets_431(server: PeerServer) -> None:
    async with memory_connection(server) as conn:
        raw = post("InvokeSubWorkflow", invoke(["echo"], 1), headers={"x-big": "a" * 3000})
        reply = await conn.call(raw)
        assert (reply.status, reply.error_code) == (431, "limit")
        assert await conn.closed()


async def test_a_body_above_the_limit_gets_413_before_it_is_read(server: PeerServer) -> None:
    async with memory_connection(server) as conn:
        head = (
            b"POST /peerflow.peer.v1/InvokeSubWorkflow HTTP/1.1\r\nhost: p\r\n"
            b"x-peerflow-peer-node-id: raw\r\n"
            b"content-type: application/json\r\ncontent-length: 5000\r\n\r\n"
        )
        reply = await conn.call(head)  # not one body byte sent
        assert (reply.status, reply.error_code) == (413, "limit")
        assert reply.headers[b"connection"] == b"close"


async def test_a_chunked_body_above_the_limit_gets_413(server: PeerServer) -> None:
    async with memory_connection(server) as conn:
        head = (
            b"POST /peerflow.peer.v1/InvokeSubWorkflow HTTP/1.1\r\nhost: p\r\n"
            b"x-peerflow-peer-node-id: raw\r\n"
            b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        chunk = b"800\r\n" + b" " * 0x800 + b"\r\n"
        reply = await conn.call(head + chunk * 3)
        assert (reply.status, reply.error_code) == (413, "limit")


async def test_a_slow_body_gets_408(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_connection(server) as conn:
        raw = post("InvokeSubWorkflow", invoke(["echo"], 1))
        start = trio.current_time()
        reply = await conn.call(raw[:-5])  # the body never completes
        assert (reply.status, reply.error_code) == (408, "timeout")
        assert trio.current_time() - start == pytest.approx(5)
        assert await conn.closed()


async def test_a_slow_head_gets_408_and_an_idle_connection_is_closed(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_connection(server) as conn:
        assert (await conn.call(post("InvokeSubWorkflow", invoke(["echo"], 1)))).status == 200
        start = trio.current_time()
        reply = await conn.call(b"POST /peerflow.peer.v1/InvokeSubWorkflow HTTP/1.1\r\nhost:")
        assert reply.status == 408
        assert trio.current_time() - start == pytest.approx(5)
    async with memory_connection(server) as conn:
        assert (await conn.call(post("InvokeSubWorkflow", invoke(["echo"], 1)))).status == 200
        start = trio.current_time()
        assert await conn.closed()  # nothing more sent: closed when idle
        assert trio.current_time() - start == pytest.approx(60)


async def test_expect_100_continue_is_answered(server: PeerServer) -> None:
    async with memory_connection(server) as conn:
        raw = post("InvokeSubWorkflow", invoke(["echo"], 1), headers={"expect": "100-continue"})
        head, body = raw.split(b"\r\n\r\n", 1)
        await conn.send(head + b"\r\n\r\n")
        assert (await conn.reply()).status == 100
        await conn.send(body)
        assert (await conn.reply()).json["result"] == 1


@pytest.mark.parametrize("token", ["s3cret"])
async def test_a_refused_call_keeps_the_connection(server: PeerServer) -> None:
    async with memory_connection(server) as conn:
        reply = await conn.call(post("InvokeSubWorkflow", invoke(["echo"], 1)))
        assert (reply.status, reply.error_code) == (401, "auth")
        good = post(
            "InvokeSubWorkflow", invoke(["echo"], 2), headers={"authorization": "Bearer s3cret"}
        )
        assert (await conn.call(good)).json["result"] == 2


async def test_the_timeout_header_is_the_deadline(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_connection(server) as conn:
        start = trio.current_time()
        raw = post(
            "InvokeSubWorkflow", invoke(["slow"], 100), headers={"x-peerflow-timeout-ms": "2500"}
        )
        reply = await conn.call(raw)
        assert (reply.status, reply.error_code) == (504, "timeout")
        assert probe.deadline == pytest.approx(start + 2.5)
        assert probe.cancelled
        assert_no_trace(server)
        raw = post("InvokeSubWorkflow", invoke(["slow"], 1))
        assert (await conn.call(raw)).json["result"] == "slept"
        assert probe.deadline == math.inf
        for bad in ("soon", "-1", "1.5", "9" * 40):
            raw = post(
                "InvokeSubWorkflow", invoke(["echo"], 1), headers={"x-peerflow-timeout-ms": bad}
            )
            reply = await conn.call(raw)
            assert (reply.status, reply.json["error"]["path"]) == (400, "x-peerflow-timeout-ms")


async def test_a_client_that_hangs_up_cancels_its_call(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_connection(server) as conn:
        await conn.send(post("InvokeSubWorkflow", invoke(["slow"], 100)))
        await probe.started.wait()
        await conn.stream.aclose()
        await probe.stopped.wait()
        await trio.testing.wait_all_tasks_blocked()
    assert probe.cancelled
    assert not probe.finished
    assert_no_trace(server)


async def test_half_a_call_then_silence_does_not_stop_other_connections(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_connection(server) as stuck, memory_connection(server) as other:
        await stuck.send(b"POST /peerflow.peer.v1/InvokeSubWorkflow HTTP/1.1\r\n")
        reply = await other.call(post("InvokeSubWorkflow", invoke(["echo"], 1)))
        assert reply.status == 200
