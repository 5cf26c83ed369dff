from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from peerflow import (
    Context,
    Event,
    RefLifetime,
    SessionRefRegistry,
    StartEvent,
    StepError,
    StepRegistry,
    StopEvent,
    Workflow,
    WorkflowError,
    WorkflowHandle,
)


@attrs.frozen
class Progress(Event, event_type="tests.handle.Progress"):
    pct: int


def progress_workflow(registry: StepRegistry, gate: trio.Event | None = None) -> Workflow:
    wf = Workflow("progress", registry=registry)

    @wf.step("work", StartEvent)
    async def work(ev: StartEvent, ctx: Context) -> StopEvent:
        for pct in (25, 50, 75):
            ctx.write_event_to_stream(Progress(pct))
            if gate is not None:
                await gate.wait()
        return StopEvent("finished")

    return wf


async def test_events_stream_while_the_run_is_going(registry: StepRegistry) -> None:
    gate = trio.Event()
    wf = progress_workflow(registry, gate)
    seen: list[int] = []
    async with wf.start() as handle:
        assert isinstance(handle, WorkflowHandle)
        async for event in handle.events():
            assert isinstance(event, Progress)
            seen.append(event.pct)
            # The first event arrived before the step could finish.
            gate.set()
        result = await handle.result()
    assert seen == [25, 50, 75]
    assert result.result == "finished"
    assert result.run_id == handle.run_id


async def test_result_without_reading_events(registry: StepRegistry) -> None:
    async with progress_workflow(registry).start() as handle:
        assert (await handle.result()).result == "finished"
        # Unread events stay readable after the run ended, then the stream ends.
        assert [e.pct async for e in handle.events()] == [25, 50, 75]
    # The stream belongs to the block.
    with pytest.raises(trio.ClosedResourceError):
        await handle.events().receive()


async def test_leaving_the_block_waits_for_the_run(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    wf = Workflow("waits", registry=registry)
    done: list[bool] = []

    @wf.step("slow", StartEvent)
    async def slow(ev: StartEvent, ctx: Context) -> StopEvent:
        await trio.sleep(3)
        done.append(True)
        return StopEvent(None)

    async with wf.start():
        pass
    assert done == [True]


async def test_run_errors_come_from_result(registry: StepRegistry) -> None:
    wf = Workflow("fails", registry=registry)

    @wf.step("bad", StartEvent)
    async def bad(ev: StartEvent, ctx: Context) -> None:
        raise ValueError("nope")

    with pytest.raises(StepError) as info:
        async with wf.start() as handle:
            await handle.result()
    assert info.value.step_id == "bad"
    assert isinstance(info.value.__cause__, ValueError)


async def test_body_error_cancels_the_run_and_propagates_alone(registry: StepRegistry) -> None:
    wf = Workflow("body-error", registry=registry)
    cancelled: list[bool] = []

    @wf.step("forever", StartEvent)
    async def forever(ev: StartEvent, ctx: Context) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(True)

    async def body() -> None:
        async with wf.start():
            await trio.testing.wait_all_tasks_blocked()
            raise LookupError("user code")

    with pytest.raises(LookupError, match="user code"):
        await body()
    assert cancelled == [True]


async def test_handle_can_be_entered_once(registry: StepRegistry) -> None:
    handle = progress_workflow(registry).start()
    async with handle:
        with pytest.raises(RuntimeError):
            await handle.__aenter__()


async def test_state_is_visible_on_the_handle(registry: StepRegistry) -> None:
    wf = Workflow("state", registry=registry)
    gate = trio.Event()

    @wf.step("set", StartEvent)
    async def set_state(ev: StartEvent, ctx: Context) -> StopEvent:
        ctx.state["phase"] = "one"
        await gate.wait()
        return StopEvent(None)

    async with wf.start() as handle:
        await trio.testing.wait_all_tasks_blocked()
        assert handle.state == {"phase": "one"}
        gate.set()
        assert (await handle.result()).state == {"phase": "one"}


async def test_written_events_are_dropped_by_plain_run(registry: StepRegistry) -> None:
    assert (await progress_workflow(registry).run()).result == "finished"


async def test_events_written_after_the_run_ended_are_dropped(registry: StepRegistry) -> None:
    wf = Workflow("late-writer", registry=registry)
    contexts: list[Context] = []

    @wf.step("s", StartEvent)
    async def s(ev: StartEvent, ctx: Context) -> StopEvent:
        contexts.append(ctx)
        ctx.write_event_to_stream(Progress(1))
        return StopEvent(None)

    async with wf.start() as handle:
        await handle.result()
        # A context kept past the run's end writes to a closed stream: dropped.
        contexts[0].write_event_to_stream(Progress(2))
        assert [e.pct async for e in handle.events()] == [1]  # type: ignore[attr-defined]


async def test_write_event_to_stream_rejects_non_events(registry: StepRegistry) -> None:
    wf = Workflow("bad-stream", registry=registry)

    @wf.step("s", StartEvent)
    async def s(ev: StartEvent, ctx: Context) -> None:
        ctx.write_event_to_stream("progress")  # type: ignore[arg-type]

    with pytest.raises(StepError) as info:
        await wf.run()
    assert isinstance(info.value.__cause__, TypeError)


async def test_child_workflow_in_a_step(registry: StepRegistry, refs: SessionRefRegistry) -> None:
    child = Workflow("child", registry=registry)

    @child.step("child.work", StartEvent)
    async def child_work(ev: StartEvent, ctx: Context) -> StopEvent:
        ctx.state["child"] = True
        ctx.write_event_to_stream(Progress(1))
        kept = ctx.refs.insert(b"child-data", lifetime=RefLifetime.UNTIL_PARENT_FINISH)
        ctx.refs.insert(b"scratch")
        return StopEvent({"double": ev.data * 2, "kept": kept})

    parent = Workflow("parent", registry=registry)
    child_refs: list[str] = []

    @parent.step("parent.work", StartEvent)
    async def parent_work(ev: StartEvent, ctx: Context) -> StopEvent:
        ctx.write_event_to_stream(Progress(0))
        # Tie the child's UNTIL_PARENT_FINISH refs to this run.
        async with child.start(
            ev.data, refs=ctx.refs.registry, parent_scope=ctx.run_id
        ) as child_handle:
            child_events = [e async for e in child_handle.events()]
            sub = await child_handle.result()
        child_refs.append(sub.result["kept"])
        # The child's refs are separate, but the parent-scoped one lives on.
        assert ctx.refs.get(sub.result["kept"]) == b"child-data"
        assert len(refs) == 1
        ctx.state["child_state"] = sub.state
        ctx.state["child_events"] = [e.pct for e in child_events]
        return StopEvent(sub.result["double"])

    async with parent.start(21, refs=refs) as handle:
        parent_events = [e.pct async for e in handle.events()]
        result = await handle.result()
    assert result.result == 42
    assert result.state["child_state"] == {"child": True}
    assert result.state["child_events"] == [1]
    assert parent_events == [0]
    # The parent's end dropped the child's UNTIL_PARENT_FINISH ref.
    assert len(refs) == 0
    assert result.refs == {}


async def test_child_run_is_cancelled_with_the_parent_step(
    registry: StepRegistry, refs: SessionRefRegistry
) -> None:
    child = Workflow("child", registry=registry)
    cleaned: list[bool] = []

    @child.step("child.hang", StartEvent)
    async def hang(ev: StartEvent, ctx: Context) -> None:
        ctx.refs.insert(b"temp", lifetime=RefLifetime.UNTIL_EXPLICIT_DROP)
        try:
            await trio.sleep_forever()
        finally:
            cleaned.append(True)

    parent = Workflow("parent", registry=registry)

    @parent.step("parent.start", StartEvent)
    async def parent_start(ev: StartEvent, ctx: Context) -> list[Event]:
        return [Progress(0), Progress(1)]

    @parent.step("parent.run-child", Progress)
    async def run_child(ev: Progress, ctx: Context) -> StopEvent | None:
        if ev.pct == 0:
            await child.run(refs=refs)
            return None
        await trio.testing.wait_all_tasks_blocked()
        return StopEvent("parent done")

    assert (await parent.run(refs=refs)).result == "parent done"
    assert cleaned == [True]
    assert len(refs) == 0


async def test_result_after_outer_cancellation_is_an_engine_error(
    registry: StepRegistry,
) -> None:
    wf = Workflow("cancelled", registry=registry)

    @wf.step("forever", StartEvent)
    async def forever(ev: StartEvent, ctx: Context) -> None:
        await trio.sleep_forever()

    with trio.CancelScope() as scope:
        async with wf.start() as handle:
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    with pytest.raises(WorkflowError, match="cancelled"):
        await handle.result()
