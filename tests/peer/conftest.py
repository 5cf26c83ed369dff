"""Fixtures for peer tests: a server with probe-instrumented steps, and a client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from peerflow import PeerClient, PeerServer
from peerflow.testing import open_memory_peer


@pytest.fixture
async def client(server: PeerServer) -> AsyncIterator[PeerClient]:
    async with open_memory_peer(server, "node-a") as client:
        yield client
