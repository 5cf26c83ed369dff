"""Fixtures for WebSocket tests: a server with probe-instrumented steps, a client in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from ws_helpers import open_memory_client

from peerflow import PeerServer, WebSocketPeerClient


@pytest.fixture
async def client(server: PeerServer) -> AsyncIterator[WebSocketPeerClient]:
    async with open_memory_client(server) as client:
        yield client
