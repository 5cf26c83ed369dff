"""Fixtures for interop tests: our PeerServer on a real loopback socket, a grpcio channel to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import trio
from interop_peer import CHANNEL_OPTIONS, GrpcioCaller

from peer_steps import Probe, build_steps
from peerflow import Limits, PeerAddress, PeerServer


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
async def channel(address: PeerAddress) -> AsyncIterator[grpc.Channel]:
    channel = grpc.insecure_channel(f"{address.host}:{address.port}", options=CHANNEL_OPTIONS)
    yield channel
    await trio.to_thread.run_sync(channel.close)


@pytest.fixture
def caller(channel: grpc.Channel) -> GrpcioCaller:
    return GrpcioCaller(channel)
