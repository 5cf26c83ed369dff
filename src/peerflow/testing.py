"""Test helpers: a PeerClient wired to a PeerServer in memory, no sockets needed.

The pair speaks the real protocol (HTTP/2, gRPC framing, msgpack envelopes)
over ``trio.testing.memory_stream_pair``, so tests run deterministically under
trio's ``MockClock``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio
import trio.testing

from ._excgroups import collapse_excgroups
from ._peer.client import Endpoint, PeerClient, open_client_over
from ._peer.limits import Limits
from ._peer.server import PeerServer

__all__ = ["open_memory_connection", "open_memory_peer", "sever"]


@asynccontextmanager
async def open_memory_connection(server: PeerServer) -> AsyncIterator[trio.abc.Stream]:
    """The client end of an in-memory connection that ``server`` serves, for the block.

    For speaking the protocol by hand (raw HTTP/2, HTTP/1.1 or WebSocket
    bytes). The server side runs in a task of this block (inside
    ``server.running()`` unless the server already runs) and is cancelled
    when the block ends, as if the server shut down. A failure in the
    block is raised as itself, not inside an exception group.
    """
    with collapse_excgroups():
        async with AsyncExitStack() as stack:
            if not server.running_now:
                await stack.enter_async_context(server.running())
            client_stream, server_stream = trio.testing.memory_stream_pair()
            nursery = await stack.enter_async_context(trio.open_nursery())
            nursery.start_soon(server.serve_stream, server_stream)
            yield client_stream
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_memory_peer(
    server: PeerServer,
    node_id: str = "test-client",
    *,
    token: str | None = None,
    limits: Limits | None = None,
    lease_ttl: float = 30.0,
) -> AsyncIterator[PeerClient]:
    """Connect a new :class:`~peerflow.PeerClient` to ``server`` over an in-memory stream.

    The connection is :func:`open_memory_connection`'s. Leaving the block
    closes the client, releasing its scope's refs, and then the connection.
    A failure to connect (a refused token, say) is raised as itself, as from
    :meth:`PeerClient.connect`, not inside an exception group.
    """
    async with (
        open_memory_connection(server) as stream,
        open_client_over(
            stream,
            Endpoint("http", "memory", 0),
            node_id,
            token=token,
            limits=limits or Limits(),
            lease_ttl=lease_ttl,
        ) as client,
    ):
        yield client


async def sever(client: PeerClient) -> None:
    """Cut ``client``'s connection as a crash would: no GOAWAY, no goodbye to the peer.

    The peer then sees a vanished caller and reclaims its scoped refs once
    their lease (or the connection's grace period) runs out.
    """
    await trio.aclose_forcefully(client._conn.transport)
