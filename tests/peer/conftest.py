"""Fixtures for peer tests: a server with probe-instrumented steps, and a client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from peer_steps import Probe, build_steps
from peerflow import Limits, PeerClient, PeerServer
from peerflow.testing import open_memory_peer


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def limits() -> Limits:
    return Limits()


@pytest.fixture
def server(probe: Probe, limits: Limits) -> PeerServer:
    return PeerServer("node-b", registry=build_steps(probe), token=None, limits=limits)


@pytest.fixture
async def client(server: PeerServer) -> AsyncIterator[PeerClient]:
    async with open_memory_peer(server, "node-a") as client:
        yield client
