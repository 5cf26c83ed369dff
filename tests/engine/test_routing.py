from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from peerflow import (
    Context,
    DuplicateStepError,
    DynamicEvent,
    Event,
    PeerEncodeError,
    StartEvent,
    StepError,
    StepRegistry,
    StopEvent,
    UnroutableEventError,
    Workflow,
    WorkflowError,
)


@attrs.frozen
class Job(Event, event_type="tests.routing.Job"):
    n: int


@attrs.frozen
class Done(Event, event_type="tests.routing.Done"):
    n: int


@attrs.frozen
class Other(Event, event_type="tests.routing.Other"):
    pass


async def test_linear_workflow_returns_result_and_state(registry: StepRegistry) -> None:
    wf = Workflow("linear", registry=registry)

    @wf.step("first", StartEvent)
    async def first(ev: StartEvent, ctx: Context) -> Job:
        ctx.state["seen"] = [ev.data]
        return Job(ev.data + 1)

    @wf.step("second", Job)
    async def second(ev: Job, ctx: Context) -> StopEvent:
        ctx.state["seen"].append(ev.n)
        return StopEvent({"total": ev.n * 10})

    result = await wf.run(4)
    assert result.result == {"total": 50}
    assert result.state == {"seen": [4, 5]}
    assert result.refs == {}
    assert isinstance(result.run_id, str)
    assert len(result.run_id) == 36


async def test_run_id_and_node_id_reach_the_context(registry: StepRegistry) -> None:
    wf = Workflow("ids", registry=registry)

    @wf.step("only", StartEvent)
    async def only(ev: StartEvent, ctx: Context) -> StopEvent:
        return StopEvent((ctx.run_id, ctx.node_id, ctx.workflow_name, ctx.step_id))

    result = await wf.run(run_id="r-1", node_id="n-1")
    assert result.result == ("r-1", "n-1", "ids", "only")
    assert result.run_id == "r-1"


async def test_fan_out_reaches_every_accepting_step(registry: StepRegistry) -> None:
    wf = Workflow("fan-out", registry=registry)
    reached: list[str] = []

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> Job:
        return Job(1)

    for name in ("a", "b", "c"):

        async def worker(ev: Job, ctx: Context, name: str = name) -> Done:
            reached.append(name)
            return Done(ev.n)

        wf.add_step(f"worker-{name}", Job, worker)

    @wf.step("join", Done)
    async def join(ev: Done, ctx: Context) -> StopEvent | None:
        got = ctx.collect_events(Done, 3)
        return None if got is None else StopEvent(len(got))

    result = await wf.run()
    assert result.result == 3
    assert sorted(reached) == ["a", "b", "c"]


async def test_returned_list_is_routed_in_order(registry: StepRegistry) -> None:
    wf = Workflow("list", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> list[Event]:
        return [Job(i) for i in range(5)]

    @wf.step("collect", Job)
    async def collect(ev: Job, ctx: Context) -> StopEvent | None:
        got = ctx.collect_events([Job], 5)
        return None if got is None else StopEvent(sorted(e.n for e in got))

    assert (await wf.run()).result == [0, 1, 2, 3, 4]


async def test_send_event_runs_receivers_alongside_the_sender(registry: StepRegistry) -> None:
    wf = Workflow("send", registry=registry)
    receiver_ran = trio.Event()

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> Done:
        ctx.send_event(Job(7))
        # The receiver must run while this handler is still waiting.
        await receiver_ran.wait()
        return Done(1)

    @wf.step("receiver", Job)
    async def receiver(ev: Job, ctx: Context) -> None:
        ctx.state["job"] = ev.n
        receiver_ran.set()

    @wf.step("stop", Done)
    async def stop(ev: Done, ctx: Context) -> StopEvent:
        return StopEvent(ctx.state["job"])

    with trio.fail_after(5):
        assert (await wf.run()).result == 7


async def test_send_event_stop_event_ends_the_run(registry: StepRegistry) -> None:
    wf = Workflow("send-stop", registry=registry)
    after = []

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> None:
        ctx.send_event(StopEvent("early"))
        await trio.lowlevel.checkpoint()
        after.append(True)

    assert (await wf.run()).result == "early"
    assert after == []


async def test_send_event_rejects_non_events(registry: StepRegistry) -> None:
    wf = Workflow("bad-send", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> None:
        ctx.send_event({"not": "an event"})  # type: ignore[arg-type]

    with pytest.raises(StepError) as info:
        await wf.run()
    assert isinstance(info.value.__cause__, TypeError)


async def test_dynamic_event_routes_by_wire_name(registry: StepRegistry) -> None:
    wf = Workflow("dynamic", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> Event:
        return DynamicEvent("tests.routing.Job", {"n": 3})

    @wf.step("typed", Job)
    async def typed(ev: Any, ctx: Context) -> StopEvent:
        # The dynamic event stands for a registered class: the step gets one.
        assert type(ev) is Job
        return StopEvent(ev.n)

    @wf.step("by-name", "remote.Thing")
    async def by_name(ev: Any, ctx: Context) -> StopEvent:
        return StopEvent("never")

    assert (await wf.run()).result == 3


@pytest.mark.parametrize("how", ["return", "send"])
async def test_a_dynamic_stop_event_ends_the_run(registry: StepRegistry, how: str) -> None:
    # The seed's steps end a run with a stop event spelled as a name and data.
    wf = Workflow("dynamic-stop", registry=registry)
    stop = DynamicEvent("peerflow.StopEvent", {"result": {"summary": "..."}})

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> Event | None:
        if how == "return":
            return stop
        ctx.send_event(stop)
        await trio.sleep_forever()
        return None

    with trio.fail_after(5):
        assert (await wf.run()).result == {"summary": "..."}


async def test_a_dynamic_event_that_does_not_fit_its_class_fails_the_step(
    registry: StepRegistry,
) -> None:
    wf = Workflow("dynamic-misfit", registry=registry)
    sent: list[BaseException] = []

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> Event:
        try:
            ctx.send_event(DynamicEvent("tests.routing.Job", {"n": "three"}))
        except PeerEncodeError as exc:
            sent.append(exc)
        return DynamicEvent("tests.routing.Job", {})

    @wf.step("job", Job)
    async def job(ev: Job, ctx: Context) -> StopEvent:
        return StopEvent("never")

    with pytest.raises(StepError) as info:
        await wf.run()
    assert info.value.step_id == "start"
    assert isinstance(info.value.__cause__, PeerEncodeError)
    assert "tests.routing.Job" in str(info.value.__cause__)
    assert len(sent) == 1
    assert "tests.routing.Job" in str(sent[0])


async def test_stop_event_cancels_in_flight_steps(registry: StepRegistry) -> None:
    wf = Workflow("stop-cancels", registry=registry)
    cancelled = []
    finished = []

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> list[Event]:
        return [Job(0), Done(0)]

    @wf.step("slow", Job)
    async def slow(ev: Job, ctx: Context) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise
        finished.append(True)

    @wf.step("stopper", Done)
    async def stopper(ev: Done, ctx: Context) -> StopEvent:
        await trio.testing.wait_all_tasks_blocked()
        return StopEvent("stopped")

    with trio.fail_after(5):
        result = await wf.run()
    assert result.result == "stopped"
    assert cancelled == [True]
    assert finished == []


async def test_first_stop_event_wins(registry: StepRegistry) -> None:
    wf = Workflow("two-stops", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> list[Event]:
        return [StopEvent("first"), StopEvent("second")]

    assert (await wf.run()).result == "first"


async def test_step_error_names_the_step_and_keeps_the_cause(registry: StepRegistry) -> None:
    wf = Workflow("boom", registry=registry)
    boom = KeyError("missing")

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> Job:
        return Job(1)

    @wf.step("explode", Job)
    async def explode(ev: Job, ctx: Context) -> None:
        raise boom

    with pytest.raises(StepError) as info:
        await wf.run()
    assert info.value.step_id == "explode"
    assert info.value.__cause__ is boom
    assert "explode" in str(info.value)
    assert "KeyError" in str(info.value)


async def test_first_error_wins_and_cancels_the_rest(registry: StepRegistry) -> None:
    wf = Workflow("errors", registry=registry)
    cancelled = []

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> list[Event]:
        return [Job(1), Job(2), Done(0)]

    @wf.step("fails", Job)
    async def fails(ev: Job, ctx: Context) -> None:
        # Job(1) fails at once; Job(2) fails only after a checkpoint.
        if ev.n == 2:
            await trio.lowlevel.checkpoint()
        raise ValueError(f"job {ev.n}")

    @wf.step("waits", Done)
    async def waits(ev: Done, ctx: Context) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(True)

    with pytest.raises(StepError) as info:
        await wf.run()
    assert str(info.value.__cause__) == "job 1"
    assert cancelled == [True]


async def test_error_is_never_an_exception_group(registry: StepRegistry) -> None:
    wf = Workflow("many-errors", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> list[Event]:
        return [Job(i) for i in range(10)]

    @wf.step("fails", Job)
    async def fails(ev: Job, ctx: Context) -> None:
        raise RuntimeError(ev.n)

    with pytest.raises(StepError) as info:
        await wf.run()
    assert type(info.value) is StepError


async def test_child_workflow_error_is_wrapped_with_the_parent_step(
    registry: StepRegistry,
) -> None:
    child = Workflow("child", registry=registry)

    @child.step("child-step", StartEvent)
    async def child_step(ev: StartEvent, ctx: Context) -> None:
        raise OSError("disk")

    parent = Workflow("parent", registry=registry)

    @parent.step("parent-step", StartEvent)
    async def parent_step(ev: StartEvent, ctx: Context) -> StopEvent:
        return StopEvent((await child.run()).result)

    with pytest.raises(StepError) as info:
        await parent.run()
    assert info.value.step_id == "parent-step"
    inner = info.value.__cause__
    assert isinstance(inner, StepError)
    assert inner.step_id == "child-step"
    assert isinstance(inner.__cause__, OSError)


async def test_unroutable_event_names_its_type(registry: StepRegistry) -> None:
    wf = Workflow("unroutable", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> Other:
        return Other()

    with pytest.raises(UnroutableEventError) as info:
        await wf.run()
    assert info.value.event_type == "tests.routing.Other"
    assert info.value.workflow_name == "unroutable"
    assert "tests.routing.Other" in str(info.value)


async def test_unroutable_start_event(registry: StepRegistry) -> None:
    wf = Workflow("no-start", registry=registry)

    @wf.step("job", Job)
    async def job(ev: Job, ctx: Context) -> None:
        return None

    with pytest.raises(UnroutableEventError) as info:
        await wf.run()
    assert info.value.event_type == "peerflow.StartEvent"


async def test_unroutable_sent_event(registry: StepRegistry) -> None:
    wf = Workflow("unroutable-send", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> None:
        ctx.send_event(DynamicEvent("nobody.Wants", {}))
        await trio.sleep_forever()

    with trio.fail_after(5), pytest.raises(UnroutableEventError, match=r"nobody\.Wants"):
        await wf.run()


@pytest.mark.parametrize("bad", [42, {"event_type": "x"}, [Job(1), "nope"]])
async def test_bad_return_value_is_a_step_error(registry: StepRegistry, bad: Any) -> None:
    wf = Workflow("bad-return", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> Any:
        return bad

    @wf.step("job", Job)
    async def job(ev: Job, ctx: Context) -> None:
        return None

    with pytest.raises(StepError) as info:
        await wf.run()
    assert info.value.step_id == "start"
    assert isinstance(info.value.__cause__, TypeError)


async def test_run_without_stop_event_fails(registry: StepRegistry) -> None:
    wf = Workflow("stalls", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> Job:
        return Job(1)

    @wf.step("sink", Job)
    async def sink(ev: Job, ctx: Context) -> None:
        return None

    with pytest.raises(WorkflowError, match="without a StopEvent") as info:
        await wf.run()
    assert type(info.value) is WorkflowError


async def test_collect_events_returns_batches_in_arrival_order(registry: StepRegistry) -> None:
    wf = Workflow("batches", registry=registry)
    batches: list[list[int]] = []
    arrivals: list[int] = []

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> list[Event]:
        return [Job(i) for i in range(7)]

    @wf.step("collect", Job)
    async def collect(ev: Job, ctx: Context) -> StopEvent | None:
        arrivals.append(ev.n)
        got = ctx.collect_events(Job, 3)
        if got is None:
            # Asking again must not count this invocation's event twice.
            assert ctx.collect_events(Job, 3) is None
            return None
        batches.append([e.n for e in got])
        return StopEvent(None) if len(batches) == 2 else None

    await wf.run()
    assert batches == [arrivals[0:3], arrivals[3:6]]
    assert sorted(arrivals[:6]) == sorted(batches[0] + batches[1])


async def test_collect_events_of_several_types(registry: StepRegistry) -> None:
    wf = Workflow("mixed", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> list[Event]:
        return [Job(1), Done(2)]

    @wf.step("join", [Job, Done])
    async def join(ev: Event, ctx: Context) -> StopEvent | None:
        got = ctx.collect_events([Job, Done], 2)
        return None if got is None else StopEvent([type(e).__name__ for e in got])

    assert (await wf.run()).result == ["Job", "Done"]


async def test_collect_events_with_concurrent_collectors(registry: StepRegistry) -> None:
    wf = Workflow("concurrent-collect", registry=registry)
    winners = []

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> None:
        for i in range(20):
            ctx.send_event(Job(i))

    @wf.step("join", Job)
    async def join(ev: Job, ctx: Context) -> StopEvent | None:
        await trio.lowlevel.checkpoint()  # let every collector interleave
        got = ctx.collect_events(Job, 20)
        if got is None:
            return None
        winners.append(len(got))
        return StopEvent(sorted(e.n for e in got))

    assert (await wf.run()).result == list(range(20))
    assert winners == [20]


async def test_collect_events_rejects_foreign_event_and_bad_n(registry: StepRegistry) -> None:
    wf = Workflow("collect-misuse", registry=registry)
    errors: list[type[Exception]] = []

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> StopEvent:
        for call in (lambda: ctx.collect_events(Job, 1), lambda: ctx.collect_events(StartEvent, 0)):
            try:
                call()
            except (TypeError, ValueError) as exc:
                errors.append(type(exc))
        return StopEvent(None)

    await wf.run()
    assert errors == [TypeError, ValueError]


async def test_max_concurrency_bounds_simultaneous_handlers(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    wf = Workflow("bounded", registry=registry)
    running = 0
    peak = 0
    handled = []

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> list[Event]:
        return [Job(i) for i in range(12)]

    @wf.step("worker", Job, max_concurrency=3)
    async def worker(ev: Job, ctx: Context) -> Done:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(1)
        running -= 1
        handled.append(ev.n)
        return Done(ev.n)

    @wf.step("join", Done)
    async def join(ev: Done, ctx: Context) -> StopEvent | None:
        got = ctx.collect_events(Done, 12)
        return None if got is None else StopEvent(trio.current_time())

    start_time = trio.current_time()
    result = await wf.run()
    assert peak == 3
    assert sorted(handled) == list(range(12))  # nothing dropped
    assert result.result - start_time == pytest.approx(4.0)  # 12 jobs / 3 slots * 1 s


async def test_unbounded_step_runs_everything_at_once(
    registry: StepRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    wf = Workflow("unbounded", registry=registry)
    running = 0
    peak = 0

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> list[Event]:
        return [Job(i) for i in range(12)]

    @wf.step("worker", Job)
    async def worker(ev: Job, ctx: Context) -> Done:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(1)
        running -= 1
        return Done(ev.n)

    @wf.step("join", Done)
    async def join(ev: Done, ctx: Context) -> StopEvent | None:
        return None if ctx.collect_events(Done, 12) is None else StopEvent(None)

    await wf.run()
    assert peak == 12


# -- definitions and the registry ---------------------------------------------


async def _noop(ev: Event, ctx: Context) -> None:
    return None


async def _other(ev: Event, ctx: Context) -> None:
    return None


def test_steps_are_registered(registry: StepRegistry) -> None:
    wf = Workflow("reg", registry=registry)
    spec = wf.add_step("app.one", [StartEvent, "custom.Name"], _noop, timeout=2.0)
    assert registry.get("app.one") is spec
    assert registry["app.one"] is spec
    assert "app.one" in registry
    assert list(registry) == ["app.one"]
    assert len(registry) == 1
    assert spec.accepts == ("peerflow.StartEvent", "custom.Name")
    assert spec.timeout == 2.0
    assert wf.steps == (spec,)
    assert registry.get("missing") is None
    with pytest.raises(KeyError):
        registry["missing"]


def test_default_registry_is_process_wide() -> None:
    assert StepRegistry.default() is StepRegistry.default()
    wf = Workflow("uses-default")
    assert wf.registry is StepRegistry.default()


def test_duplicate_step_id_with_another_handler(registry: StepRegistry) -> None:
    Workflow("a", registry=registry).add_step("dup", StartEvent, _noop)
    with pytest.raises(DuplicateStepError) as info:
        Workflow("b", registry=registry).add_step("dup", StartEvent, _other)
    assert info.value.step_id == "dup"


def test_duplicate_step_id_with_other_accepts(registry: StepRegistry) -> None:
    Workflow("a", registry=registry).add_step("dup", StartEvent, _noop)
    with pytest.raises(DuplicateStepError):
        Workflow("b", registry=registry).add_step("dup", Job, _noop)


def test_same_handler_may_register_again(registry: StepRegistry) -> None:
    Workflow("a", registry=registry).add_step("same", StartEvent, _noop)
    spec = Workflow("b", registry=registry).add_step("same", StartEvent, _noop, timeout=3.0)
    assert registry["same"] is spec


def test_duplicate_within_one_workflow(registry: StepRegistry) -> None:
    wf = Workflow("a", registry=registry)
    wf.add_step("x", StartEvent, _noop)
    registry.unregister("x")
    with pytest.raises(DuplicateStepError):
        wf.add_step("x", StartEvent, _other)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"accepts": []}, ValueError),
        ({"accepts": [int]}, TypeError),
        ({"accepts": StartEvent, "timeout": 0}, ValueError),
        ({"accepts": StartEvent, "max_concurrency": 0}, ValueError),
    ],
)
def test_invalid_step_definitions(
    registry: StepRegistry, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    wf = Workflow("invalid", registry=registry)
    with pytest.raises(error):
        wf.add_step("s", handler=_noop, **kwargs)
    assert "s" not in registry


def test_invalid_workflow_timeout() -> None:
    with pytest.raises(ValueError, match="positive"):
        Workflow("w", timeout=-1)


async def test_from_steps_assembles_registered_steps(registry: StepRegistry) -> None:
    wf = Workflow("source", registry=registry)

    @wf.step("app.analyze", StartEvent)
    async def analyze(ev: StartEvent, ctx: Context) -> Job:
        return Job(len(ev.data))

    @wf.step("app.summarize", Job)
    async def summarize(ev: Job, ctx: Context) -> StopEvent:
        return StopEvent({"summary": ev.n})

    @wf.step("app.unused", Done)
    async def unused(ev: Done, ctx: Context) -> None:
        return None

    specs = [registry["app.analyze"], registry["app.summarize"]]
    assembled = Workflow.from_steps("sub", specs, registry=registry)
    assert [s.step_id for s in assembled.steps] == ["app.analyze", "app.summarize"]
    assert (await assembled.run("abc")).result == {"summary": 3}
    assert len(registry) == 3


def test_from_steps_rejects_clashing_ids(registry: StepRegistry) -> None:
    first = Workflow("a", registry=registry).add_step("x", StartEvent, _noop)
    other = Workflow("b", registry=StepRegistry()).add_step("x", StartEvent, _other)
    with pytest.raises(DuplicateStepError):
        Workflow.from_steps("ab", [first, other])


async def test_steps_added_after_a_run_are_routed(registry: StepRegistry) -> None:
    wf = Workflow("grows", registry=registry)

    @wf.step("start", StartEvent)
    async def start(ev: StartEvent, ctx: Context) -> Job:
        return Job(1)

    with pytest.raises(UnroutableEventError):
        await wf.run()

    @wf.step("job", Job)
    async def job(ev: Job, ctx: Context) -> StopEvent:
        return StopEvent(ev.n)

    assert (await wf.run()).result == 1
