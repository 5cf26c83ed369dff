"""Fixtures for interop tests: our PeerServer on a real loopback socket, a grpcio channel to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import trio
from interop_peer import CHANNEL_OPTIONS, GrpcioCaller

from peerflow import PeerAddress


@pytest.fixture
async def channel(address: PeerAddress) -> AsyncIterator[grpc.Channel]:
    channel = grpc.insecure_channel(f"{address.host}:{address.port}", options=CHANNEL_OPTIONS)
    yield channel
    await trio.to_thread.run_sync(channel.close)


@pytest.fixture
def caller(channel: grpc.Channel) -> GrpcioCaller:
    return GrpcioCaller(channel)
