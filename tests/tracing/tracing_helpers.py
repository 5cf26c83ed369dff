"""The tracing suite's steps and clients: two peers whose steps record their trace context.

``node-b`` is the peer a test calls; its ``forward`` step calls the peer
named in its input over the variant named there, so a test sees what both
hops saw.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import attrs

from peerflow import (
    Context,
    HttpPeerClient,
    PeerClient,
    StartEvent,
    StepRegistry,
    StopEvent,
    TraceContext,
    WebSocketPeerClient,
    Workflow,
    current_trace_context,
)

#: Client variants a test can call with (``h2_json`` has no client: tests send it raw).
VARIANTS = ("grpc", "http", "websocket")


@attrs.define
class Recorder:
    """What the steps saw: (node id, trace context) per run, in order."""

    seen: list[tuple[str, TraceContext | None]] = attrs.field(factory=list)

    def on(self, node_id: str) -> list[TraceContext | None]:
        return [context for node, context in self.seen if node == node_id]


def open_client(variant: str, url: str, node_id: str) -> AbstractAsyncContextManager[Any]:
    """A client of ``variant`` (see VARIANTS) for the peer at ``url``."""
    if variant == "grpc":
        return PeerClient.connect(url, node_id, token=None)
    if variant == "http":
        return HttpPeerClient(url, node_id, token=None)
    assert variant == "websocket"
    return WebSocketPeerClient.connect(url, node_id, token=None)


def build_steps(recorder: Recorder) -> StepRegistry:
    registry = StepRegistry()
    wf = Workflow("tracing", registry=registry)

    @wf.step("record", accepts=[StartEvent])
    async def record(event: StartEvent, ctx: Context) -> StopEvent:
        context = current_trace_context()
        recorder.seen.append((ctx.node_id, context))
        return StopEvent(result=None if context is None else context.traceparent)

    @wf.step("forward", accepts=[StartEvent])
    async def forward(event: StartEvent, ctx: Context) -> StopEvent:
        """Record, then have the peer at ``event.data["url"]`` run ``record``."""
        context = current_trace_context()
        recorder.seen.append((ctx.node_id, context))
        async with open_client(event.data["variant"], event.data["url"], ctx.node_id) as client:
            response = await client.invoke_sub_workflow("tracing", ["record"])
        response.raise_for_error()
        return StopEvent(result=response.result)

    @wf.step("fail", accepts=[StartEvent])
    async def fail(event: StartEvent, ctx: Context) -> None:
        recorder.seen.append((ctx.node_id, current_trace_context()))
        raise ValueError("kaput")

    return registry
