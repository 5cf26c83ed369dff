"""Steps whose handlers cannot suspend run before a run opens its nursery, with the same effects."""

from __future__ import annotations

import functools
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from peerflow import (
    Context,
    Event,
    StartEvent,
    StepError,
    StepRegistry,
    StopEvent,
    Workflow,
)
from peerflow._engine.steps import never_suspends


@attrs.frozen
class Job(Event, event_type="tests.inline.Job"):
    n: int


@attrs.frozen
class Done(Event, event_type="tests.inline.Done"):
    n: int


async def _plain(ev: Any, ctx: Any) -> None:
    return None


async def _awaits(ev: Any, ctx: Any) -> None:
    await trio.lowlevel.checkpoint()


async def _async_for(ev: Any, ctx: Any) -> None:
    async for _ in ev:
        pass


async def _async_with(ev: Any, ctx: Any) -> None:
    async with ev:
        pass


async def _awaits_in_a_comprehension(ev: Any, ctx: Any) -> list[Any]:
    return [await x for x in ev]


async def _builds_an_async_generator(ev: Any, ctx: Any) -> Any:
    return (x async for x in ev)  # made, not iterated: nothing suspends here


def _returns_a_coroutine(ev: Any, ctx: Any) -> Any:
    return _plain(ev, ctx)


class _Steps:
    async def plain(self, ev: Any, ctx: Any) -> None:
        return None

    async def awaits(self, ev: Any, ctx: Any) -> None:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (_plain, True),
        (_builds_an_async_generator, True),
        (_Steps().plain, True),
        (_awaits, False),
        (_async_for, False),
        (_async_with, False),
        (_awaits_in_a_comprehension, False),
        (_Steps().awaits, False),
        (_returns_a_coroutine, False),
        (functools.partial(_plain), False),
    ],
)
def test_never_suspends(handler: Any, expected: bool) -> None:
    assert never_suspends(handler) is expected


async def test_receivers_of_a_plain_sender_run_alongside_the_step_it_returns_to(
    registry: StepRegistry,
) -> None:
    wf = Workflow("plain-sender", registry=registry)
    gate = trio.Event()

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> Done:
        ctx.send_event(Job(1))
        return Done(2)

    @wf.step("job", Job)
    async def job(ev: Job, ctx: Context) -> StopEvent:
        await gate.wait()  # opened by the step the sender returned to
        return StopEvent(ev.n)

    @wf.step("done", Done)
    async def done(ev: Done, ctx: Context) -> None:
        await trio.lowlevel.checkpoint()
        gate.set()

    with trio.fail_after(5):
        assert (await wf.run()).result == 1


async def test_a_plain_step_fans_out_to_every_receiver(registry: StepRegistry) -> None:
    wf = Workflow("plain-fan-out", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> list[Event]:
        for n in range(3):
            ctx.send_event(Job(n))
        return [Job(3), Job(4)]

    @wf.step("join", Job)
    async def join(ev: Job, ctx: Context) -> StopEvent | None:
        got = ctx.collect_events(Job, 5)
        return None if got is None else StopEvent(sorted(e.n for e in got))

    assert (await wf.run()).result == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("ending", ["stop", "raise"])
async def test_receivers_of_a_plain_step_that_ends_the_run_are_cancelled(
    registry: StepRegistry, ending: str
) -> None:
    wf = Workflow("plain-ender", registry=registry)
    cancelled: list[int] = []
    finished: list[int] = []

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> None:
        ctx.send_event(Job(1))
        if ending == "raise":
            raise ValueError("after sending")
        ctx.send_event(StopEvent("early"))

    @wf.step("job", Job)
    async def job(ev: Job, ctx: Context) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(ev.n)
            raise
        finished.append(ev.n)

    with trio.fail_after(5):
        if ending == "stop":
            assert (await wf.run()).result == "early"
        else:
            with pytest.raises(StepError, match="after sending"):
                await wf.run()
    assert cancelled == [1]
    assert finished == []


async def test_a_plain_step_sees_the_run_and_step_deadlines(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    wf = Workflow("plain-deadlines", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> Job:
        ctx.state["run"] = trio.current_effective_deadline()
        return Job(1)

    @wf.step("bounded", Job, timeout=3, max_concurrency=1)
    async def bounded(ev: Job, ctx: Context) -> StopEvent:
        return StopEvent(trio.current_effective_deadline())

    now = trio.current_time()
    result = await wf.run(deadline=now + 7)
    assert result.state["run"] == now + 7
    assert result.result == now + 3
