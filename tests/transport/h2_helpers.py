"""Shared helpers for the transport tests: connected pairs and a raw h2 peer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h2.config
import h2.connection
import h2.events
import trio
import trio.testing

from peerflow._transport.config import H2Settings
from peerflow._transport.h2conn import (
    H2ClientConnection,
    H2ServerConnection,
    StreamHandler,
    open_h2_client,
    serve_h2_connection,
)

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/peerflow.test/Echo"),
    (b":authority", b"test"),
    (b"content-type", b"application/grpc+msgpack"),
]
OK = [(b":status", b"200")]
TRAILERS = [(b"grpc-status", b"0")]


async def echo_handler(stream):  # type: ignore[no-untyped-def]
    body = await stream.receive_all()
    await stream.send_response(OK, body, TRAILERS)


@asynccontextmanager
async def connected(
    handler: StreamHandler = echo_handler,
    *,
    server_settings: H2Settings | None = None,
    client_settings: H2Settings | None = None,
) -> AsyncIterator[tuple[H2ClientConnection, H2ServerConnection]]:
    """A client and a server connection joined by an in-memory stream pair."""
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_h2_connection, server_side, handler, server_settings)
        async with open_h2_client(client_side, client_settings) as client:
            yield client, server
        nursery.cancel_scope.cancel()


class RawPeer:
    """A bare h2 connection over a trio stream, for poking the driver with odd frames."""

    def __init__(self, stream: trio.abc.Stream, *, client_side: bool) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=client_side,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.closed = False

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_events(self) -> list[h2.events.Event]:
        """Read once and return the events (empty list with ``closed`` set at EOF)."""
        data = await self.stream.receive_some(65536)
        if not data:
            self.closed = True
            return []
        events = self.h2.receive_data(data)
        await self.flush()
        return events

    async def wait_for(self, kind: type[h2.events.Event]) -> h2.events.Event:
        while True:
            events = await self.next_events()
            for event in events:
                if isinstance(event, kind):
                    return event
            assert not self.closed, f"connection closed before {kind.__name__}"

    async def read_until_closed(self) -> list[h2.events.Event]:
        seen: list[h2.events.Event] = []
        while not self.closed:
            seen.extend(await self.next_events())
        return seen
