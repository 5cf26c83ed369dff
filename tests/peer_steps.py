"""Steps a test PeerServer offers, instrumented with a Probe that records what they saw.

Shared by the peer and interop suites (tests/ is on pytest's pythonpath).
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from peerflow import (
    Context,
    Event,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)


@attrs.define
class Progress(Event, event_type="tests.Progress"):
    n: int


@attrs.define
class Chatter(Event, event_type="tests.Chatter"):
    n: int
    note: str


class Opaque:
    """A value with no serializer: live-only on its node."""


@attrs.define
class Probe:
    """What the peer's steps observed, for tests to assert on."""

    ran: list[str] = attrs.field(factory=list)
    started: trio.Event = attrs.field(factory=trio.Event)
    finished: bool = False
    cancelled: bool = False
    stopped: trio.Event = attrs.field(factory=trio.Event)
    deadline: float | None = None
    gate: trio.Event = attrs.field(factory=trio.Event)


def build_steps(probe: Probe) -> StepRegistry:
    registry = StepRegistry()
    wf = Workflow("peer-tests", registry=registry)

    @wf.step("echo", accepts=[StartEvent])
    async def echo(event: StartEvent, ctx: Context) -> StopEvent:
        probe.ran.append("echo")
        return StopEvent(result=event.data)

    @wf.step("stateful", accepts=[StartEvent])
    async def stateful(event: StartEvent, ctx: Context) -> StopEvent:
        ctx.state["seen"] = event.data
        ctx.state["node"] = ctx.node_id
        return StopEvent(result="ok")

    @wf.step("boom", accepts=[StartEvent])
    async def boom(event: StartEvent, ctx: Context) -> None:
        ctx.refs.insert(b"doomed", lifetime=RefLifetime.UNTIL_EXPLICIT_DROP)
        raise ValueError("kaput")

    @wf.step("refs", accepts=[StartEvent])
    async def refs(event: StartEvent, ctx: Context) -> StopEvent:
        ids = []
        for lifetime, kind in event.data:
            value: Any = Opaque() if kind == "opaque" else f"value-{len(ids)}".encode()
            ids.append(ctx.refs.insert(value, lifetime=RefLifetime(lifetime)))
        return StopEvent(result=ids)

    @wf.step("unsendable", accepts=[StartEvent])
    async def unsendable(event: StartEvent, ctx: Context) -> StopEvent:
        ctx.refs.insert(b"kept", lifetime=RefLifetime.UNTIL_EXPLICIT_DROP)
        return StopEvent(result={"when": {1, 2}})

    @wf.step("big", accepts=[StartEvent])
    async def big(event: StartEvent, ctx: Context) -> StopEvent:
        value = bytes(range(256)) * (event.data // 256)
        return StopEvent(result=ctx.refs.insert(value, lifetime=RefLifetime.UNTIL_EXPLICIT_DROP))

    @wf.step("slow", accepts=[StartEvent])
    async def slow(event: StartEvent, ctx: Context) -> StopEvent:
        probe.deadline = trio.current_effective_deadline()
        ctx.refs.insert(b"scratch")
        ctx.refs.insert(b"kept", lifetime=RefLifetime.UNTIL_PARENT_FINISH)
        probe.started.set()
        try:
            await trio.sleep(event.data)
        except trio.Cancelled:
            probe.cancelled = True
            probe.stopped.set()
            raise
        probe.finished = True
        return StopEvent(result="slept")

    @wf.step("gated", accepts=[StartEvent])
    async def gated(event: StartEvent, ctx: Context) -> StopEvent:
        probe.started.set()
        await probe.gate.wait()
        return StopEvent(result="through the gate")

    @wf.step("chatty", accepts=[StartEvent])
    async def chatty(event: StartEvent, ctx: Context) -> StopEvent:
        # Streams event.data events of about a kilobyte at once, then waits.
        for n in range(event.data):
            ctx.write_event_to_stream(Chatter(n, "x" * 1000))
        probe.started.set()
        try:
            await probe.gate.wait()
        except trio.Cancelled:
            probe.cancelled = True
            probe.stopped.set()
            raise
        return StopEvent(result="streamed")

    @wf.step("progress", accepts=[StartEvent])
    async def progress(event: StartEvent, ctx: Context) -> StopEvent:
        ctx.write_event_to_stream(Progress(1))
        await probe.gate.wait()
        ctx.write_event_to_stream(Progress(2))
        return StopEvent(result="done")

    return registry
