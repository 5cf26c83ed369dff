"""HTTP/1.1 connections drain when the server shuts down: answer what is in flight, refuse the rest.

The server is a ``memory_peer``: shutting it down starts its drain, and
MockClock makes the grace period exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from raw_http import RawConnection, invoke, post

from memory_peer import MemoryPeer, assert_no_trace, memory_peer, shutting_down_once_started
from peer_steps import Probe
from peerflow import HttpPeerClient, Limits, PeerServer, PeerTransportError
from peerflow._peer import http_client

GRACE = 5.0
# The longest an HTTP/1.1 connection lingers after answering with Connection: close.
LINGER = 1.0


@pytest.fixture
def limits() -> Limits:
    return Limits(drain_grace=GRACE)


async def shut_down_during_a_slow_call(
    peer: MemoryPeer, probe: Probe, seconds: float
) -> tuple[RawConnection, float]:
    """Start a ``slow`` call of ``seconds``, then shut ``peer`` down once it runs.

    Returns the call's connection and the time the drain began.
    """
    conn = RawConnection(peer.connect())
    await conn.send(post("InvokeSubWorkflow", invoke(["slow"], seconds)))
    await probe.started.wait()
    start = trio.current_time()
    peer.shut_down()
    return conn, start


async def test_a_call_in_flight_finishes_and_its_answer_closes_the_connection(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer:
        conn, start = await shut_down_during_a_slow_call(peer, probe, 3)
        reply = await conn.reply()
        assert (reply.status, reply.json["result"]) == (200, "slept")
        assert reply.headers[b"connection"] == b"close"
        assert trio.current_time() - start == pytest.approx(3)
        assert await conn.closed()
        await peer.stopped.wait()
        # Closed after a brief linger for bytes the client may still send.
        assert trio.current_time() - start < 3 + LINGER


async def test_an_idle_connection_closes_at_once(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer:
        conn = RawConnection(peer.connect())
        reply = await conn.call(post("InvokeSubWorkflow", invoke(["echo"], 1)))
        assert b"connection" not in reply.headers  # kept alive until the drain
        start = trio.current_time()
        peer.shut_down()
        assert await conn.closed()
        await peer.stopped.wait()
        assert trio.current_time() == start


@pytest.mark.parametrize(
    "request_bytes",
    [
        post("InvokeSubWorkflow", invoke(["echo"], 1)),
        b"GET /peerflow.peer.v1/ws HTTP/1.1\r\nhost: p\r\nupgrade: websocket\r\n"
        b"connection: upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"sec-websocket-version: 13\r\nsec-websocket-protocol: peerflow.v1\r\n\r\n",
    ],
    ids=["call", "websocket-upgrade"],
)
async def test_a_request_that_arrives_during_the_drain_is_refused_with_503(
    server: PeerServer, probe: Probe, request_bytes: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer:
        conn = RawConnection(peer.connect())
        await conn.send(request_bytes[:20])  # begun before the drain...
        await trio.testing.wait_all_tasks_blocked()
        peer.shut_down()
        await trio.testing.wait_all_tasks_blocked()
        await conn.send(request_bytes[20:])  # ...and complete after it began
        reply = await conn.reply()
        assert (reply.status, reply.error_code) == (503, "unavailable")
        assert "shutting down" in reply.json["error"]["message"]
        assert reply.headers[b"connection"] == b"close"
        assert await conn.closed()
        await peer.stopped.wait()
    assert probe.ran == []


async def test_a_call_past_the_grace_period_is_cancelled_and_answered_499(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer:
        conn, start = await shut_down_during_a_slow_call(peer, probe, 100)
        reply = await conn.reply()
        assert trio.current_time() - start == pytest.approx(GRACE)
        assert (reply.status, reply.error_code) == (499, "cancelled")
        assert "drain grace period of 5s" in reply.json["error"]["message"]
        assert reply.headers[b"connection"] == b"close"
        assert await conn.closed()
        await peer.stopped.wait()
        assert trio.current_time() - start < GRACE + LINGER
    assert probe.cancelled
    assert not probe.finished
    assert_no_trace(server)


async def test_a_stream_past_the_grace_period_ends_with_an_error_line(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer:
        conn = RawConnection(peer.connect())
        # The step streams one event, then waits at a gate that never opens.
        await conn.send(post("StreamSubWorkflow", invoke(["progress"])))
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        peer.shut_down()
        reply = await conn.reply()  # the whole chunked body, to its end
        assert trio.current_time() - start == pytest.approx(GRACE)
        assert reply.status == 200
        first, last = reply.lines
        assert first["kind"] == "event"
        assert last["error"]["code"] == "cancelled"
        assert await conn.closed()
    assert_no_trace(server)


async def test_whatever_still_runs_after_the_grace_period_is_cancelled(
    server: PeerServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with memory_peer(server) as peer:
        conn = RawConnection(peer.connect())
        # A request head that began before the drain and never ends: the
        # request timeout (30 s) would wait longer than the drain does.
        await conn.send(b"POST /peerflow.peer.v1/InvokeSubWorkflow HTTP/1.1\r\nhost:")
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        peer.shut_down()
        assert await conn.closed()
        await peer.stopped.wait()
        # The grace period, then the second that goodbyes get.
        assert trio.current_time() - start == pytest.approx(GRACE + 1)


@asynccontextmanager
async def memory_http_client(
    peer: MemoryPeer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[HttpPeerClient]:
    """An HttpPeerClient whose connections go to ``peer`` in memory."""

    async def connect(host: str, port: int, **_: object) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        return peer.connect()

    monkeypatch.setattr(http_client, "connect_tcp", connect)
    async with HttpPeerClient("http://peer:1", "node-a", token=None) as client:
        yield client


async def test_the_client_gets_the_result_of_a_call_that_finishes_in_the_drain(
    server: PeerServer,
    probe: Probe,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_peer(server) as peer, memory_http_client(peer, monkeypatch) as client:
        async with shutting_down_once_started(peer, probe):
            response = await client.invoke_sub_workflow("w", ["slow"], 3)
        assert response.result == "slept"
        await peer.stopped.wait()


async def test_the_client_gets_a_typed_error_for_a_call_cut_off_by_the_drain(
    server: PeerServer,
    probe: Probe,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with memory_peer(server) as peer, memory_http_client(peer, monkeypatch) as client:
        async with shutting_down_once_started(peer, probe):
            start = trio.current_time()
            with pytest.raises(PeerTransportError, match=r"CANCELLED.*drain grace period") as info:
                await client.invoke_sub_workflow("w", ["slow"], 100)
        assert type(info.value) is PeerTransportError  # not "unavailable": the call had run
        assert trio.current_time() - start == pytest.approx(GRACE)
    assert probe.cancelled
