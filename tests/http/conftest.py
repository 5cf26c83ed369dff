"""Fixtures for HTTP/JSON tests: a PeerServer on a real loopback socket and an HttpPeerClient."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from peer_steps import Probe, build_steps
from peerflow import HttpPeerClient, Limits, PeerAddress, PeerServer


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
async def address(server: PeerServer, nursery: trio.Nursery) -> PeerAddress:
    with trio.fail_after(10):
        address: PeerAddress = await nursery.start(server.serve, "127.0.0.1", 0)
    return address


@pytest.fixture
async def client(address: PeerAddress, token: str | None) -> AsyncIterator[HttpPeerClient]:
    async with HttpPeerClient(address.url, "node-a", token=token) as client:
        yield client
