"""Fixtures for tracing tests: two peers on loopback (tracing_helpers.py has their steps)."""

from __future__ import annotations

import pytest
import trio
from tracing_helpers import Recorder, build_steps

from peerflow import PeerAddress, PeerServer, StepRegistry
from peerflow._peer import trace


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def registry(recorder: Recorder) -> StepRegistry:
    return build_steps(recorder)


async def _serve(nursery: trio.Nursery, node_id: str, registry: StepRegistry) -> PeerAddress:
    server = PeerServer(node_id, registry=registry, token=None)
    with trio.fail_after(10):
        address: PeerAddress = await nursery.start(server.serve, "127.0.0.1", 0)
    return address


@pytest.fixture
async def peer_b(nursery: trio.Nursery, registry: StepRegistry) -> PeerAddress:
    return await _serve(nursery, "node-b", registry)


@pytest.fixture
async def peer_c(nursery: trio.Nursery, registry: StepRegistry) -> PeerAddress:
    return await _serve(nursery, "node-c", registry)


@pytest.fixture(params=["installed", "absent"])
def otel_api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the OpenTelemetry API importable (no provider set) and as if absent."""
    if request.param == "absent":
        monkeypatch.setattr(trace, "_otel", lambda: None)
    return str(request.param)
