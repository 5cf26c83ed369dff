"""Fixtures shared by every suite that runs a test PeerServer.

A suite may override any of them in its own conftest.py (e.g. ``token`` or
``limits`` for one test module).
"""

from __future__ import annotations

import pytest
import trio

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
    """A PeerServer named node-b serving the probe-instrumented steps of peer_steps."""
    return PeerServer("node-b", registry=build_steps(probe), token=token, limits=limits)


@pytest.fixture
async def address(server: PeerServer, nursery: trio.Nursery) -> PeerAddress:
    """``server`` listening on an ephemeral loopback port for the test."""
    with trio.fail_after(10):
        address: PeerAddress = await nursery.start(server.serve, "127.0.0.1", 0)
    return address
