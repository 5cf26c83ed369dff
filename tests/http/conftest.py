"""Fixtures for HTTP/JSON tests: a PeerServer on a real loopback socket and an HttpPeerClient."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from peerflow import HttpPeerClient, PeerAddress


@pytest.fixture
async def client(address: PeerAddress, token: str | None) -> AsyncIterator[HttpPeerClient]:
    async with HttpPeerClient(address.url, "node-a", token=token) as client:
        yield client
