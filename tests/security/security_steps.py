"""Steps the security, fault and soak peers serve, in-process or in a child process."""

from __future__ import annotations

from collections.abc import Callable

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
class Tick(Event, event_type="tests.security.Tick"):
    n: int


def build_steps(
    *,
    on_slow_started: Callable[[], None] = lambda: None,
    stats: Callable[[], object] | None = None,
) -> StepRegistry:
    """A fresh registry of steps.

    ``on_slow_started`` runs when the ``slow`` step has made its refs and is
    about to sleep. ``stats``, when given, adds a ``stats`` step that returns
    what it reports, so a test can ask a peer in another process about its
    state (how many refs it holds).
    """
    registry = StepRegistry()
    wf = Workflow("security", registry=registry)

    @wf.step("echo", accepts=[StartEvent])
    async def echo(event: StartEvent, ctx: Context) -> StopEvent:
        return StopEvent(result=event.data)

    @wf.step("refs", accepts=[StartEvent])
    async def refs(event: StartEvent, ctx: Context) -> StopEvent:
        # data: a list of lifetime wire values, one ref each.
        ids = [
            ctx.refs.insert(f"value-{i}".encode(), lifetime=RefLifetime(lifetime))
            for i, lifetime in enumerate(event.data)
        ]
        return StopEvent(result=ids)

    @wf.step("big", accepts=[StartEvent])
    async def big(event: StartEvent, ctx: Context) -> StopEvent:
        value = bytes(range(256)) * (event.data // 256)
        return StopEvent(result=ctx.refs.insert(value, lifetime=RefLifetime.UNTIL_EXPLICIT_DROP))

    @wf.step("slow", accepts=[StartEvent])
    async def slow(event: StartEvent, ctx: Context) -> StopEvent:
        ctx.refs.insert(b"scratch")
        ctx.refs.insert(b"kept", lifetime=RefLifetime.UNTIL_PARENT_FINISH)
        on_slow_started()
        await trio.sleep(event.data)
        return StopEvent(result="slept")

    @wf.step("ticks", accepts=[StartEvent])
    async def ticks(event: StartEvent, ctx: Context) -> StopEvent:
        for n in range(event.data):
            ctx.write_event_to_stream(Tick(n))
        return StopEvent(result=event.data)

    if stats is not None:
        report = stats

        @wf.step("stats", accepts=[StartEvent])
        async def stats_step(event: StartEvent, ctx: Context) -> StopEvent:
            return StopEvent(result=report())

    return registry
