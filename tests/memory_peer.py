"""A running PeerServer whose connections are in-memory streams, for the drain tests.

Cancelling the connections is what cancelling ``serve`` does to each of them,
so ``shut_down`` starts the server's drain; with a MockClock its grace period
is exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio
import trio.testing

from peer_steps import Probe
from peerflow import PeerServer, PeerUnavailableError


@attrs.define
class MemoryPeer:
    """A running server whose connections are in-memory streams.

    ``shut_down`` cancels every connection, as cancelling ``serve`` does;
    ``stopped`` is set once all of them have ended.
    """

    server: PeerServer
    stopped: trio.Event = attrs.field(factory=trio.Event)
    connections: trio.Nursery | None = None

    def connect(self, *, lockstep: bool = False) -> trio.abc.Stream:
        """A new connection; with ``lockstep``, a send waits until the other end reads.

        Once shut down the peer refuses new connections, as a closed listener does.
        """
        assert self.connections is not None
        if self.connections.cancel_scope.cancel_called:
            raise PeerUnavailableError("cannot connect: the peer has stopped listening")
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client_stream, server_stream = pair()
        self.connections.start_soon(self.server.serve_stream, server_stream)
        return client_stream

    def shut_down(self) -> None:
        assert self.connections is not None
        self.connections.cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as connections:
            self.connections = connections
            task_status.started()
            await trio.sleep_forever()
        self.stopped.set()


@asynccontextmanager
async def memory_peer(server: PeerServer) -> AsyncIterator[MemoryPeer]:
    async with server.running(), trio.open_nursery() as nursery:
        peer = MemoryPeer(server)
        await nursery.start(peer.run)
        yield peer
        peer.shut_down()


@asynccontextmanager
async def shutting_down_once_started(peer: MemoryPeer, probe: Probe) -> AsyncIterator[trio.Nursery]:
    """A nursery in which ``peer`` shuts down as soon as the probe's step has started."""

    async def shut_down_once_started() -> None:
        await probe.started.wait()
        peer.shut_down()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(shut_down_once_started)
        yield nursery


def assert_no_trace(server: PeerServer) -> None:
    """No ref and no run is left on ``server``."""
    assert len(server.refs) == 0
    assert server.refs.statistics().runs == 0
