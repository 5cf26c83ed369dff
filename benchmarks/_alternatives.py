"""Echo servers and clients for the stacks peerflow is measured against.

Both speak the same two unary methods with raw bytes in and out:
``/bench.Echo/Echo`` echoes its request, ``/bench.Echo/Bulk`` answers a
response of the requested size (the request is the size as ASCII digits).
The measuring loop itself lives in ``peer.py`` so every stack is timed the
same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

BIG = 256 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", BIG),
    ("grpc.max_send_message_length", BIG),
]

_payloads: dict[int, bytes] = {}


def payload_of(size: int) -> bytes:
    """A cached response body of ``size`` bytes, so servers measure transport, not allocation."""
    if size not in _payloads:
        _payloads[size] = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    return _payloads[size]


# ---------------------------------------------------------------- grpcio aio


async def grpcio_serve(port_ready: Callable[[int], None]) -> None:
    """Serve the echo service with grpc.aio until cancelled."""
    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def bulk(request: bytes, context: Any) -> bytes:
        return payload_of(int(request))

    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "bench.Echo",
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(echo),
                    "Bulk": grpc.unary_unary_rpc_method_handler(bulk),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_ready(port)
    await server.wait_for_termination()


async def grpcio_client(
    port: int,
) -> tuple[Callable[[bytes], Awaitable[bytes]], Callable[[int], Awaitable[int]], Any]:
    """Return (echo, bulk, channel) for a grpc.aio client on one channel."""
    import grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    echo_call = channel.unary_unary("/bench.Echo/Echo")
    bulk_call = channel.unary_unary("/bench.Echo/Bulk")

    async def echo(data: bytes) -> bytes:
        return await echo_call(data)  # type: ignore[no-any-return]

    async def bulk(size: int) -> int:
        return len(await bulk_call(str(size).encode()))

    return echo, bulk, channel


# ---------------------------------------------------------------- grpclib


class _RawCodec:
    """grpclib codec that passes bytes through unchanged."""

    __content_subtype__ = "proto"

    def encode(self, message: bytes, message_type: Any) -> bytes:
        return message

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return data


async def grpclib_serve(port_ready: Callable[[int], None]) -> None:
    """Serve the echo service with grpclib until cancelled."""
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server

    class Echo:
        async def echo(self, stream: Any) -> None:
            await stream.send_message(await stream.recv_message())

        async def bulk(self, stream: Any) -> None:
            await stream.send_message(payload_of(int(await stream.recv_message())))

        def __mapping__(self) -> dict[str, Any]:
            unary = Cardinality.UNARY_UNARY
            return {
                "/bench.Echo/Echo": Handler(self.echo, unary, bytes, bytes),
                "/bench.Echo/Bulk": Handler(self.bulk, unary, bytes, bytes),
            }

    server = Server([Echo()], codec=_RawCodec())  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)
    sockets = server._server.sockets  # grpclib exposes no public bound-port API
    port_ready(sockets[0].getsockname()[1])
    await server.wait_closed()
    await asyncio.Event().wait()


async def grpclib_client(
    port: int,
) -> tuple[Callable[[bytes], Awaitable[bytes]], Callable[[int], Awaitable[int]], Any]:
    """Return (echo, bulk, channel) for a grpclib client on one channel."""
    from grpclib.client import Channel, UnaryUnaryMethod

    channel = Channel("127.0.0.1", port, codec=_RawCodec())  # type: ignore[arg-type]
    echo_call: Any = UnaryUnaryMethod(channel, "/bench.Echo/Echo", bytes, bytes)
    bulk_call: Any = UnaryUnaryMethod(channel, "/bench.Echo/Bulk", bytes, bytes)

    async def echo(data: bytes) -> bytes:
        return await echo_call(data)  # type: ignore[no-any-return]

    async def bulk(size: int) -> int:
        return len(await bulk_call(str(size).encode()))

    return echo, bulk, channel
