"""Shared pieces of the interop tests: plain-msgpack helpers and a grpcio caller.

Our PeerServer serves the steps of ``tests/peer_steps.py``.

Messages are built and read with plain ``msgpack`` following protocol/README.md,
not with peerflow's codec, so a codec bug cannot hide behind itself.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import grpc
import msgpack
import trio

SERVICE = "/peerflow.peer.v1.Peer/"
NODE_ID_HEADER = "x-peerflow-peer-node-id"
ERROR_DETAILS_TRAILER = "peerflow-error-bin"
#: Every grpcio call gets a deadline, so a worker thread can never outlive its test.
CALL_TIMEOUT = 10.0
#: grpcio shares TCP connections between channels to one target unless told not to;
#: the tests that watch a connection close need a connection of their own.
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)

Metadata = Sequence[tuple[str, str | bytes]]


def pack(message: dict[str, Any]) -> bytes:
    """Encode one envelope as the spec says: a msgpack map, bytes as bin."""
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(raw: bytes) -> dict[str, Any]:
    """Decode one envelope, insisting on a map as the spec does."""
    message = msgpack.unpackb(raw, raw=False)
    assert isinstance(message, dict), f"a message must be a msgpack map, got {message!r}"
    return message


def grpc_frame(body: bytes) -> bytes:
    """One gRPC length-prefixed message: flag 0, big-endian u32 length, body."""
    return struct.pack(">BI", 0, len(body)) + body


def invoke_request(step_ids: list[str], input: Any, **extra: Any) -> dict[str, Any]:
    """An InvokeSubWorkflowRequest map (version 1)."""
    return {"v": 1, "workflow_name": "interop", "step_ids": step_ids, "input": input, **extra}


@attrs.frozen
class GrpcioCaller:
    """Calls a peer through grpcio's sync API, from a worker thread, bytes in and out.

    Raises whatever grpcio raises: ``grpc.RpcError`` (a ``grpc.Call`` too) on
    a non-OK status.
    """

    channel: grpc.Channel
    node_id: str = "grpcio-caller"
    extra_metadata: Metadata = ()

    def metadata(self) -> list[tuple[str, str | bytes]]:
        return [(NODE_ID_HEADER, self.node_id), *self.extra_metadata]

    async def unary_raw(self, method: str, body: bytes, *, timeout: float = CALL_TIMEOUT) -> bytes:
        call = self.channel.unary_unary(SERVICE + method)
        run = functools.partial(call, body, timeout=timeout, metadata=self.metadata())
        return await trio.to_thread.run_sync(run)  # type: ignore[no-any-return]

    async def unary(
        self, method: str, message: dict[str, Any], *, timeout: float = CALL_TIMEOUT
    ) -> dict[str, Any]:
        return unpack(await self.unary_raw(method, pack(message), timeout=timeout))

    async def server_stream(
        self,
        method: str,
        message: dict[str, Any],
        *,
        on_message: Callable[[dict[str, Any]], None] | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """Collect every message of a server-streaming call.

        ``on_message`` runs in the trio thread for each message as it arrives,
        before the next one is read.
        """
        call = self.channel.unary_stream(SERVICE + method)

        def consume() -> list[dict[str, Any]]:
            received = []
            for raw in call(pack(message), timeout=timeout, metadata=self.metadata()):
                decoded = unpack(raw)
                received.append(decoded)
                if on_message is not None:
                    trio.from_thread.run_sync(on_message, decoded)
            return received

        return await trio.to_thread.run_sync(consume)

    async def unary_concurrently(
        self, method: str, messages: list[dict[str, Any]], *, timeout: float = CALL_TIMEOUT
    ) -> list[dict[str, Any]]:
        """Start every call at once on the channel (grpcio futures), then collect the answers."""
        call = self.channel.unary_unary(SERVICE + method)

        def run_all() -> list[dict[str, Any]]:
            futures = [
                call.future(pack(m), timeout=timeout, metadata=self.metadata()) for m in messages
            ]
            return [unpack(f.result()) for f in futures]

        return await trio.to_thread.run_sync(run_all)


def error_details(error: grpc.RpcError) -> dict[str, Any]:
    """The ErrorDetails map a peer put in the ``peerflow-error-bin`` trailer."""
    assert isinstance(error, grpc.Call)
    trailers = dict(error.trailing_metadata() or ())
    raw = trailers[ERROR_DETAILS_TRAILER]
    # grpcio undoes the base64 of -bin metadata itself.
    assert isinstance(raw, bytes)
    return unpack(raw)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds; callers bound the wait with ``trio.fail_after``.

    Only for state changed by real sockets and wall-clock timers, where no
    event can be awaited and MockClock cannot help.
    """
    while not condition():  # noqa: ASYNC110 - nothing to wait on but the state itself
        await trio.sleep(0.01)


def status_of(error: grpc.RpcError) -> grpc.StatusCode:
    assert isinstance(error, grpc.Call)
    return error.code()
