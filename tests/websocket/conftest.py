"""Fixtures for WebSocket tests: a server with probe-instrumented steps, a client in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from ws_helpers import open_memory_client

from peer_steps import Probe, build_steps
from peerflow import Limits, PeerServer, WebSocketPeerClient


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def limits() -> Limits:
    return Limits()


@pytest.fixture
def token() -> str | None:
    return None


@pytest.fixture
def server(probe: Probe, limits: Limits, token: str | None) -> PeerServer:
    return PeerServer("node-b", registry=build_steps(probe), token=token, limits=limits)


@pytest.fixture
async def client(server: PeerServer) -> AsyncIterator[WebSocketPeerClient]:
    async with open_memory_client(server) as client:
        yield client
