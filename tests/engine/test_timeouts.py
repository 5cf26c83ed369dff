from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

from peerflow import (
    Context,
    DynamicEvent,
    Event,
    StartEvent,
    StepRegistry,
    StepTimeoutError,
    StopEvent,
    Workflow,
    WorkflowTimeoutError,
)


def sleeper_workflow(
    registry: StepRegistry, ran: list[str], *, timeout: float | None = None
) -> Workflow:
    wf = Workflow("sleeper", timeout=timeout, registry=registry)

    @wf.step("sleep", StartEvent)
    async def sleep(ev: StartEvent, ctx: Context) -> StopEvent:
        ran.append("before")
        await trio.sleep(ev.data)
        ran.append("after")
        return StopEvent("woke")

    return wf


async def test_workflow_timeout_stops_the_work(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    ran: list[str] = []
    wf = sleeper_workflow(registry, ran, timeout=5)
    start = trio.current_time()
    with pytest.raises(WorkflowTimeoutError) as info:
        await wf.run(100)
    assert trio.current_time() - start == pytest.approx(5)
    assert info.value.timeout == pytest.approx(5)
    assert info.value.workflow_name == "sleeper"
    assert type(info.value) is WorkflowTimeoutError
    # Let the clock run far past the step's own wake-up time: it never resumes.
    await trio.sleep(1000)
    assert ran == ["before"]


async def test_a_step_that_swallows_the_timeout_still_times_the_run_out(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    wf = Workflow("swallower", timeout=5, registry=registry)

    @wf.step("swallow", StartEvent)
    async def swallow(ev: StartEvent, ctx: Context) -> None:
        with contextlib.suppress(trio.Cancelled):
            await trio.sleep(100)

    with pytest.raises(WorkflowTimeoutError) as info:
        await wf.run()
    assert info.value.timeout == pytest.approx(5)


async def test_work_within_the_timeout_completes(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    ran: list[str] = []
    wf = sleeper_workflow(registry, ran, timeout=5)
    assert (await wf.run(4)).result == "woke"
    assert ran == ["before", "after"]


async def test_timeout_override_per_run(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    ran: list[str] = []
    wf = sleeper_workflow(registry, ran, timeout=5)
    assert (await wf.run(10, timeout=None)).result == "woke"
    with pytest.raises(WorkflowTimeoutError) as info:
        await wf.run(10, timeout=2)
    assert info.value.timeout == pytest.approx(2)


async def test_absolute_deadline(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    ran: list[str] = []
    wf = sleeper_workflow(registry, ran, timeout=50)
    deadline = trio.current_time() + 3
    with pytest.raises(WorkflowTimeoutError) as info:
        await wf.run(10, deadline=deadline)
    assert trio.current_time() == pytest.approx(deadline)
    assert info.value.timeout == pytest.approx(3)
    assert ran == ["before"]


async def test_deadline_already_passed_runs_nothing(registry: StepRegistry) -> None:
    ran: list[str] = []
    wf = sleeper_workflow(registry, ran)
    with pytest.raises(WorkflowTimeoutError, match="timed out after 0s") as info:
        await wf.run(0, deadline=trio.current_time() - 1)
    assert info.value.timeout == 0  # the time it had, not how long ago the deadline was
    with pytest.raises(WorkflowTimeoutError):
        async with wf.start(0, deadline=trio.current_time()) as handle:
            await handle.result()
    assert ran == []


async def test_earlier_of_deadline_and_timeout_applies(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    ran: list[str] = []
    wf = sleeper_workflow(registry, ran, timeout=2)
    start = trio.current_time()
    with pytest.raises(WorkflowTimeoutError):
        await wf.run(10, deadline=start + 30)
    assert trio.current_time() - start == pytest.approx(2)


async def test_step_timeout_stops_the_step(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    wf = Workflow("step-timeout", timeout=100, registry=registry)
    ran: list[str] = []

    @wf.step("slow", StartEvent, timeout=1.5)
    async def slow(ev: StartEvent, ctx: Context) -> StopEvent:
        ran.append("before")
        await trio.sleep(10)
        ran.append("after")
        return StopEvent(None)

    start = trio.current_time()
    with pytest.raises(StepTimeoutError) as info:
        await wf.run()
    assert trio.current_time() - start == pytest.approx(1.5)
    assert info.value.step_id == "slow"
    assert info.value.timeout == 1.5
    assert isinstance(info.value, WorkflowTimeoutError)
    await trio.sleep(1000)
    assert ran == ["before"]


async def test_step_timeout_applies_per_invocation(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    # Three sequential 1 s invocations under a 1.5 s step timeout all succeed.
    wf = Workflow("per-invocation", registry=registry)

    @wf.step("tick", [StartEvent, "tests.timeouts.Tick"], timeout=1.5)
    async def tick(ev: Event, ctx: Context) -> Event:
        await trio.sleep(1)
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        if ctx.state["n"] == 3:
            return StopEvent(ctx.state["n"])
        return DynamicEvent("tests.timeouts.Tick", {})

    assert (await wf.run()).result == 3


async def test_handler_swallowing_cancellation_still_times_out(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    wf = Workflow("swallow", registry=registry)

    @wf.step("stubborn", StartEvent, timeout=1)
    async def stubborn(ev: StartEvent, ctx: Context) -> StopEvent:
        with contextlib.suppress(trio.Cancelled):
            await trio.sleep(10)
        return StopEvent("should not count")

    with pytest.raises(StepTimeoutError):
        await wf.run()


async def test_step_timeout_does_not_count_the_wait_for_a_slot(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    wf = Workflow("queue-wait", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> list[Event]:
        return [DynamicEvent("tests.timeouts.Work", {}) for _ in range(4)]

    @wf.step("work", "tests.timeouts.Work", timeout=1.5, max_concurrency=1)
    async def work(ev: Event, ctx: Context) -> StopEvent | None:
        await trio.sleep(1)
        return None if ctx.collect_events("tests.timeouts.Work", 4) is None else StopEvent("ok")

    assert (await wf.run()).result == "ok"


async def test_outer_cancellation_cancels_the_run(registry: StepRegistry) -> None:
    wf = Workflow("outer", registry=registry)
    started = trio.Event()
    ran: list[str] = []

    @wf.step("forever", StartEvent)
    async def forever(ev: StartEvent, ctx: Context) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            ran.append("cleanup")

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wf.run)
            await started.wait()
            scope.cancel()
    assert scope.cancelled_caught
    assert ran == ["cleanup"]


async def test_outer_cancellation_is_not_an_engine_error(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    wf = Workflow("move-on", registry=registry)

    @wf.step("forever", StartEvent)
    async def forever(ev: StartEvent, ctx: Context) -> None:
        await trio.sleep_forever()

    with trio.move_on_after(1) as scope:
        await wf.run()
    assert scope.cancelled_caught


async def test_cancelled_is_raised_bare_not_in_a_group(registry: StepRegistry) -> None:
    wf = Workflow("bare-cancel", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> list[Event]:
        return [DynamicEvent("tests.timeouts.Hang", {}) for _ in range(3)]

    @wf.step("hang", "tests.timeouts.Hang")
    async def hang(ev: Event, ctx: Context) -> None:
        await trio.sleep_forever()

    caught: list[BaseException] = []

    async def runner() -> None:
        try:
            await wf.run()
        except BaseException as exc:
            caught.append(exc)
            raise

    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert len(caught) == 1
    assert type(caught[0]) is trio.Cancelled


async def test_keyboard_interrupt_in_a_step_propagates(registry: StepRegistry) -> None:
    wf = Workflow("interrupt", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await wf.run()
