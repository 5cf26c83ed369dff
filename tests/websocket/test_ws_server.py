"""The server's WebSocket side, fed frames by hand: handshake, frames, bad input, close codes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
import wsproto.events
from ws_helpers import call, frame, invoke
from ws_helpers import open_raw_websocket as open_abandoned_websocket

from peer_steps import Probe, build_steps
from peerflow import Limits, PeerServer
from peerflow._wire.codec import decode_message
from peerflow._wire.envelopes import ErrorDetails
from peerflow.testing import open_memory_connection


@asynccontextmanager
async def open_raw_websocket(
    server: PeerServer, **options: Any
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A bare client that closes its WebSocket when done, as a real client does.

    One that just stops reading would leave the server waiting, when it
    drains, for the reply to its close frame.
    """
    async with open_abandoned_websocket(server, **options) as ws:
        yield ws
        await ws.aclose()


def details(error_frame: dict[str, Any]) -> ErrorDetails:
    return decode_message(ErrorDetails, error_frame["error"])


async def close_code(ws: trio_websocket.WebSocketConnection) -> int | None:
    """Read until the server closes the connection; return its close code.

    Unlike ``ws_helpers.close_reason``, frames that come before the close are passed over.
    """
    while True:
        try:
            await ws.get_message()
        except trio_websocket.ConnectionClosed as closed:
            return None if closed.reason is None else closed.reason.code


async def test_a_call_answers_a_message_then_an_end(server: PeerServer) -> None:
    async with open_raw_websocket(server) as ws:
        assert ws.subprotocol == "peerflow.v1"
        await ws.send_message(call(7, "InvokeSubWorkflow", invoke(["echo"], [1, b"2"])))
        message = await frame(ws)
        assert (message["v"], message["id"]) == (1, 7)
        assert msgpack.unpackb(message["body"])["result"] == [1, b"2"]
        assert await frame(ws) == {"v": 1, "id": 7, "end": True}


async def test_frames_of_concurrent_calls_interleave(server: PeerServer, probe: Probe) -> None:
    async with open_raw_websocket(server) as ws:
        await ws.send_message(call(1, "InvokeSubWorkflow", invoke(["gated"])))
        await ws.send_message(call(2, "InvokeSubWorkflow", invoke(["echo"], 2)))
        assert (await frame(ws))["id"] == 2
        assert await frame(ws) == {"v": 1, "id": 2, "end": True}
        probe.gate.set()
        assert (await frame(ws))["id"] == 1


@pytest.mark.parametrize(
    ("raw", "status", "code", "path"),
    [
        (call(3, "Frobnicate", b""), 12, "unimplemented", None),
        (call(3, "InvokeSubWorkflow", b"\xc1"), 3, "encode", None),
        (call(3, "InvokeSubWorkflow", invoke(["nope"])), 5, "unknown_step", None),
        (msgpack.packb({"v": 1, "id": 3, "method": 5, "body": b""}), 3, "encode", "method"),
        (msgpack.packb({"v": 1, "id": 3, "method": "Lease"}), 3, "encode", "body"),
        (call(3, "InvokeSubWorkflow", b"", timeout_ms=-5), 3, "encode", "timeout_ms"),
        (msgpack.packb({"v": 9, "id": 3}), 9, "envelope_version", None),
        (msgpack.packb({"id": 3, "method": "Lease", "body": b""}), 3, "encode", "v"),
    ],
)
async def test_a_bad_call_gets_an_error_frame_for_its_id(
    server: PeerServer, raw: bytes, status: int, code: str, path: str | None
) -> None:
    async with open_raw_websocket(server) as ws:
        await ws.send_message(raw)
        error = await frame(ws)
        assert (error["id"], error["status"]) == (3, status)
        assert (details(error).code, details(error).path) == (code, path)
        # The connection carries on.
        await ws.send_message(call(4, "InvokeSubWorkflow", invoke(["echo"], 4)))
        assert (await frame(ws))["id"] == 4


@pytest.mark.parametrize(
    "raw",
    [b"\xc1", b"\x93\x01\x02\x03", msgpack.packb({"v": 1, "id": "7"}), msgpack.packb({"v": 1})],
)
async def test_a_frame_without_a_readable_id_closes_with_1007(
    server: PeerServer, raw: bytes
) -> None:
    async with open_raw_websocket(server) as ws:
        await ws.send_message(raw)
        assert await close_code(ws) == 1007


async def test_a_text_message_closes_with_1003(server: PeerServer, probe: Probe) -> None:
    async with open_raw_websocket(server) as ws:
        await ws.send_message(call(1, "InvokeSubWorkflow", invoke(["slow"], 100)))
        await probe.started.wait()
        await ws.send_message('{"v": 1}')
        assert await close_code(ws) == 1003
    # Closing cancelled the call that was running.
    await probe.stopped.wait()
    assert probe.cancelled


async def test_a_message_above_the_limit_closes_with_1009(probe: Probe) -> None:
    limits = Limits(max_message_size=1024)
    server = PeerServer("node-b", registry=build_steps(probe), token=None, limits=limits)
    async with open_raw_websocket(server) as ws:
        await ws.send_message(call(1, "InvokeSubWorkflow", invoke(["echo"], "x" * 2000)))
        assert await close_code(ws) == 1009


async def test_a_cancel_frame_stops_the_call_and_its_frames(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_raw_websocket(server) as ws:
        await ws.send_message(call(1, "InvokeSubWorkflow", invoke(["slow"], 100)))
        await probe.started.wait()
        await ws.send_message(msgpack.packb({"v": 1, "id": 1, "cancel": True}))
        await probe.stopped.wait()
        # Nothing more comes for id 1; the next call's frames come next.
        await ws.send_message(call(2, "InvokeSubWorkflow", invoke(["echo"], 2)))
        assert (await frame(ws))["id"] == 2
        # Cancelling a call that is not running is not an error.
        await ws.send_message(msgpack.packb({"v": 1, "id": 99, "cancel": True}))


async def test_a_running_id_cannot_be_reused(server: PeerServer, probe: Probe) -> None:
    async with open_raw_websocket(server) as ws:
        await ws.send_message(call(1, "InvokeSubWorkflow", invoke(["gated"])))
        await probe.started.wait()
        await ws.send_message(call(1, "InvokeSubWorkflow", invoke(["echo"], 1)))
        error = await frame(ws)
        assert (error["id"], details(error).code, details(error).path) == (1, "encode", "id")
        probe.gate.set()
        assert msgpack.unpackb((await frame(ws))["body"])["result"] == "through the gate"


async def test_the_call_deadline_is_timeout_ms(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_raw_websocket(server) as ws:
        start = trio.current_time()
        await ws.send_message(call(1, "InvokeSubWorkflow", invoke(["slow"], 100), timeout_ms=1500))
        error = await frame(ws)
        assert (error["status"], details(error).code) == (4, "timeout")
        assert probe.deadline == pytest.approx(start + 1.5)


async def test_the_handshake_needs_the_subprotocol(server: PeerServer) -> None:
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with open_raw_websocket(server, subprotocols=[]):
            pass
    assert rejected.value.status_code == 400
    assert b"peerflow.v1" in (rejected.value.body or b"")


@pytest.mark.parametrize("token", ["s3cret"])
async def test_the_handshake_checks_the_token(server: PeerServer) -> None:
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with open_raw_websocket(server):
            pass
    assert rejected.value.status_code == 401
    headers = [(b"authorization", b"Bearer s3cret")]
    async with open_raw_websocket(server, headers=headers) as ws:
        await ws.send_message(call(1, "InvokeSubWorkflow", invoke(["echo"], 1)))
        assert (await frame(ws))["id"] == 1


async def test_a_malformed_upgrade_is_refused_by_http(server: PeerServer) -> None:
    async with open_memory_connection(server) as transport:
        await transport.send_all(
            b"GET /peerflow.peer.v1/ws HTTP/1.1\r\nhost: p\r\nconnection: upgrade\r\n"
            b"upgrade: websocket\r\n\r\n"  # no key, no version
        )
        reply = b""
        while chunk := await transport.receive_some():
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b'"code":"encode"' in reply


async def test_too_many_calls_at_once_get_a_limit_error(probe: Probe) -> None:
    limits = Limits(max_concurrent_streams=2)
    server = PeerServer("node-b", registry=build_steps(probe), token=None, limits=limits)
    async with open_raw_websocket(server) as ws:
        await ws.send_message(call(1, "InvokeSubWorkflow", invoke(["gated"])))
        await ws.send_message(call(2, "InvokeSubWorkflow", invoke(["gated"])))
        await ws.send_message(call(3, "InvokeSubWorkflow", invoke(["echo"], 3)))
        error = await frame(ws)
        assert (error["id"], error["status"], details(error).code) == (3, 8, "limit")
        probe.gate.set()
        assert {(await frame(ws))["id"] for _ in range(4)} == {1, 2}


async def test_a_client_that_stops_answering_pings_is_dropped(
    probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    limits = Limits(keepalive_interval=5, keepalive_timeout=2)
    server = PeerServer("node-b", registry=build_steps(probe), token=None, limits=limits)
    async with open_memory_connection(server) as transport:
        # A client that speaks just enough WebSocket to start a call, then
        # never reads again: no pong ever comes back.
        client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await transport.send_all(
            client.send(
                wsproto.events.Request(
                    host="memory",
                    target="/peerflow.peer.v1/ws",
                    subprotocols=["peerflow.v1"],
                    extra_headers=[(b"x-peerflow-peer-node-id", b"silent")],
                )
            )
        )
        client.receive_data(await transport.receive_some())
        assert isinstance(next(client.events()), wsproto.events.AcceptConnection)
        await transport.send_all(
            client.send(
                wsproto.events.BytesMessage(call(1, "InvokeSubWorkflow", invoke(["slow"], 100)))
            )
        )
        await probe.started.wait()
        start = trio.current_time()
        await probe.stopped.wait()  # the connection was dropped, the call cancelled
        assert trio.current_time() - start == pytest.approx(7)
        await trio.testing.wait_all_tasks_blocked()
    assert len(server.refs) == 0
