"""A large value streams in chunks: a deref never holds many copies of it (SPEC §2).

The SPEC's bound is that a 256 MiB value must not need 1 GiB on either side.
Here both sides share one process, and tracemalloc counts what a deref
allocates on both, beyond the value the server already holds.
``benchmarks/deref_memory.py`` measures the full size, each side in its own
process.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from peerflow import (
    Context,
    HttpPeerClient,
    Limits,
    PeerClient,
    PeerServer,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    WebSocketPeerClient,
    Workflow,
)

SIZE = 16 << 20
CHUNK = 256 << 10

_registry = StepRegistry()


@Workflow("large", registry=_registry).step("make", accepts=[StartEvent])
async def _make(event: StartEvent, ctx: Context) -> StopEvent:
    value = b"\x5a" * SIZE
    return StopEvent(result=ctx.refs.insert(value, lifetime=RefLifetime.UNTIL_EXPLICIT_DROP))


@asynccontextmanager
async def _open_client(kind: str, url: str) -> AsyncIterator[Any]:
    if kind == "grpc":
        async with PeerClient.connect(url, "node-a") as client:
            yield client
    elif kind == "http":
        async with HttpPeerClient(url, "node-a") as client:
            yield client
    else:
        async with WebSocketPeerClient.connect(url, "node-a") as client:
            yield client


@pytest.mark.parametrize("kind", ["grpc", "http", "websocket"])
async def test_a_deref_holds_no_more_than_the_value_it_returns(
    kind: str, nursery: trio.Nursery
) -> None:
    server = PeerServer(
        "node-b", registry=_registry, token=None, limits=Limits(max_deref_chunk=CHUNK)
    )
    with trio.fail_after(60):
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        async with _open_client(kind, address.url) as client:
            ref_uuid = (await client.invoke_sub_workflow("large", ["make"], None)).result
            tracemalloc.start()
            try:
                streamed = 0
                async with client.open_session_ref(ref_uuid) as chunks:
                    async for chunk in chunks:
                        streamed += len(chunk)
                streaming_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.reset_peak()
                joined = await client.deref_session_ref(ref_uuid)
                joined_peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    assert streamed == len(joined) == SIZE
    # Streaming, both sides together hold a few chunks at a time (an
    # HTTP/JSON chunk is base64 inside a JSON line: a few copies of it), however
    # large the value.
    assert streaming_peak < 16 * CHUNK, streaming_peak / CHUNK
    # Joined, the chunks received plus the bytes returned, and a few chunks.
    assert joined_peak < 2.5 * SIZE, joined_peak / SIZE
