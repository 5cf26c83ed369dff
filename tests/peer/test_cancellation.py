"""Cancellation and deadlines: a caller giving up stops the remote run, leaving no trace."""

from __future__ import annotations

import math

import pytest
import trio

import peerflow
from peer_steps import Probe
from peerflow import PeerServer
from peerflow.testing import open_memory_peer


def assert_no_trace(server: PeerServer) -> None:
    assert len(server.refs) == 0
    stats = server.refs.statistics()
    assert (stats.runs, stats.scopes) == (0, 0)


async def test_cancelling_the_caller_cancels_the_remote_run(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_memory_peer(server) as client:
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                await client.invoke_sub_workflow("w", ["slow"], 100)

            nursery.start_soon(call)
            await probe.started.wait()
            nursery.cancel_scope.cancel()
        # The RST_STREAM reaches the peer, whose run nursery is cancelled.
        await trio.testing.wait_all_tasks_blocked()
        assert probe.cancelled
        assert not probe.finished
        # The UNTIL_PARENT_FINISH ref of a run that never answered is purged too.
        assert len(server.refs) == 0
        # The connection is fine for the next call.
        assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
    assert_no_trace(server)


async def test_a_client_timeout_raises_and_stops_the_remote_work(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_memory_peer(server) as client:
        start = trio.current_time()
        with pytest.raises(peerflow.PeerTimeoutError):
            await client.invoke_sub_workflow("w", ["slow"], 100, timeout=2.5)
        assert trio.current_time() - start == pytest.approx(2.5)
        await trio.testing.wait_all_tasks_blocked()
        assert probe.cancelled
        assert not probe.finished
        # The peer ran the step under the caller's deadline.
        assert probe.deadline is not None
        assert probe.deadline == pytest.approx(start + 2.5, abs=0.01)
    assert_no_trace(server)


async def test_the_caller_s_effective_deadline_travels_as_grpc_timeout(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_memory_peer(server) as client:
        start = trio.current_time()
        with trio.move_on_after(7):
            await client.invoke_sub_workflow("w", ["slow"], 100)
        assert probe.deadline == pytest.approx(start + 7, abs=0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert probe.cancelled
        assert not probe.finished
    assert_no_trace(server)


async def test_without_a_deadline_the_peer_runs_without_one(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_memory_peer(server) as client:
        response = await client.invoke_sub_workflow("w", ["slow"], 3)
        assert response.result == "slept"
        assert probe.deadline == math.inf
        assert probe.finished


async def test_cancelling_a_stream_call_cancels_the_remote_run(
    server: PeerServer, probe: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_memory_peer(server) as client:
        async with client.stream_sub_workflow("w", ["progress"], None) as call:
            async for event in call:
                assert event.n == 1  # type: ignore[attr-defined]
                break  # leave early: the gate is never opened
        await trio.testing.wait_all_tasks_blocked()
        assert call.response is None
    assert_no_trace(server)
