"""The peerflow side of benchmarks/peer.py: an echo peer and a client measured by its loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import _alternatives as alt
import trio

from peerflow import (
    Context,
    PeerClient,
    PeerServer,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)

steps = StepRegistry()
bench = Workflow("bench", registry=steps)


@bench.step("echo", accepts=[StartEvent])
async def echo(event: StartEvent, ctx: Context) -> StopEvent:
    return StopEvent(result=event.data)


@bench.step("bulk", accepts=[StartEvent])
async def bulk(event: StartEvent, ctx: Context) -> StopEvent:
    value = alt.payload_of(event.data)
    return StopEvent(result=ctx.refs.insert(value, lifetime=RefLifetime.UNTIL_EXPLICIT_DROP))


def serve(port_ready: Callable[[int], None]) -> None:
    """Serve the bench steps on an ephemeral loopback port until killed."""

    async def main() -> None:
        server = PeerServer("bench-peer", registry=steps, token=None)
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)
            port_ready(address.port)

    trio.run(main)


async def _trio_gather(n: int, fn: Callable[[], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(fn)


def client(port: int, quick: bool, measure: Callable[..., Awaitable[dict[str, float]]]) -> Any:
    """Measure InvokeSubWorkflow echo calls and a deref of a large ref."""

    async def main() -> dict[str, float]:
        async with PeerClient.connect(f"http://127.0.0.1:{port}", "bench", token=None) as peer:
            refs: dict[int, str] = {}

            async def call(data: bytes) -> bytes:
                response = await peer.invoke_sub_workflow("bench", ["echo"], data)
                return response.result  # type: ignore[no-any-return]

            async def deref(size: int) -> int:
                if size not in refs:
                    made = await peer.invoke_sub_workflow("bench", ["bulk"], size)
                    refs[size] = made.result
                return len(await peer.deref_session_ref(refs[size]))

            return await measure(call, deref, _trio_gather, quick=quick)

    return trio.run(main)
