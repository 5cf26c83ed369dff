from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from peerflow import (
    Context,
    Event,
    RefCapacityError,
    RefLifetime,
    RefNotFoundError,
    SessionRefRegistry,
    StartEvent,
    StepError,
    StepRegistry,
    StepTimeoutError,
    StopEvent,
    Workflow,
    WorkflowTimeoutError,
)

LIFETIMES = list(RefLifetime)


@attrs.define
class Idle(Event, event_type="tests.Idle"):
    pass


def ref_workflow(registry: StepRegistry, *, then: str = "stop") -> Workflow:
    """A step inserts one ref per lifetime, then stops, raises, hangs or times out."""
    wf = Workflow("refs", registry=registry)

    @wf.step("make", StartEvent, timeout=5)
    async def make(ev: StartEvent, ctx: Context) -> StopEvent:
        ids = {lt.value: ctx.refs.insert(f"value-{lt.value}".encode(), lt) for lt in LIFETIMES}
        ctx.state["ids"] = ids
        ctx.write_event_to_stream(StopEvent(ids))  # lets a test see the ids early
        if then == "raise":
            raise RuntimeError("after inserting")
        if then in ("hang", "timeout"):
            await trio.sleep(10)
        return StopEvent(ids)

    return wf


async def test_success_keeps_only_refs_that_outlive_the_run(
    registry: StepRegistry, refs: SessionRefRegistry
) -> None:
    result = await ref_workflow(registry).run(refs=refs)
    ids = result.result
    assert set(result.refs) == {ids["until_parent_finish"], ids["until_explicit_drop"]}
    assert ids["until_context_drop"] not in result.refs
    desc = result.refs[ids["until_explicit_drop"]]
    assert desc.origin_node_id == "node-a"
    assert desc.lifetime is RefLifetime.UNTIL_EXPLICIT_DROP
    assert desc.size == len(b"value-until_explicit_drop")
    assert refs.get(ids["until_explicit_drop"]) == b"value-until_explicit_drop"
    assert refs.get(ids["until_parent_finish"]) == b"value-until_parent_finish"
    with pytest.raises(RefNotFoundError):
        refs.get(ids["until_context_drop"])
    assert len(refs) == 2


async def test_handle_lists_context_refs_before_they_are_purged(
    registry: StepRegistry, refs: SessionRefRegistry
) -> None:
    async with ref_workflow(registry).start(refs=refs, owner="caller-1") as handle:
        result = await handle.result()
        entries = handle.created_refs()
        assert [e.descriptor.lifetime for e in entries] == LIFETIMES
        assert [e.value for e in entries] == [f"value-{lt.value}".encode() for lt in LIFETIMES]
        assert all(e.owner == "caller-1" and e.run_id == handle.run_id for e in entries)
        assert len(refs) == 3
    assert len(refs) == 2
    assert set(result.refs) == {e.ref_uuid for e in handle.created_refs()}


@pytest.mark.parametrize(
    ("then", "error"),
    [("raise", StepError), ("timeout", WorkflowTimeoutError)],
)
async def test_failed_run_leaves_no_refs(
    registry: StepRegistry,
    refs: SessionRefRegistry,
    autojump_clock: trio.testing.MockClock,
    then: str,
    error: type[Exception],
) -> None:
    with pytest.raises(error):
        await ref_workflow(registry, then=then).run(refs=refs, timeout=1)
    assert len(refs) == 0


async def test_step_timeout_leaves_no_refs(
    registry: StepRegistry, refs: SessionRefRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(StepTimeoutError):
        await ref_workflow(registry, then="hang").run(refs=refs)
    assert len(refs) == 0


async def test_failed_handle_run_leaves_no_refs(
    registry: StepRegistry, refs: SessionRefRegistry
) -> None:
    with pytest.raises(StepError):
        async with ref_workflow(registry, then="raise").start(refs=refs) as handle:
            await handle.result()
    assert len(refs) == 0


async def test_cancelled_run_leaves_no_refs(
    registry: StepRegistry, refs: SessionRefRegistry
) -> None:
    with trio.CancelScope() as scope:
        async with ref_workflow(registry, then="hang").start(refs=refs) as handle:
            async for _ in handle.events():
                assert len(refs) == 3
                scope.cancel()
    assert scope.cancelled_caught
    assert len(refs) == 0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: ref_workflow(StepRegistry(), then="hang").run(refs=refs))
        await trio.testing.wait_all_tasks_blocked()
        assert len(refs) == 3
        nursery.cancel_scope.cancel()
    assert len(refs) == 0


async def test_execute_holds_the_finished_runs_refs_for_its_block(
    registry: StepRegistry, refs: SessionRefRegistry
) -> None:
    wf = ref_workflow(registry)
    async with wf.execute(refs=refs) as run:
        ids = run.outcome().result
        assert [entry.ref_uuid for entry in run.created_refs()] == list(ids.values())
        assert refs.get(ids["until_context_drop"]) == b"value-until_context_drop"
    assert ids["until_context_drop"] not in {e.ref_uuid for e in refs.list_run(run.run_id)}
    assert len(refs) == 2

    async def answer_and_fail() -> None:
        async with wf.execute(refs=refs):
            assert len(refs) == 5
            raise LookupError("the host failed while answering")

    with pytest.raises(LookupError):
        await answer_and_fail()
    assert len(refs) == 4  # leaving the block still purged the run's context ref


async def test_execute_purges_a_run_cancelled_from_outside(
    registry: StepRegistry, refs: SessionRefRegistry
) -> None:
    entered = []
    with trio.move_on_after(0.01):
        async with ref_workflow(registry, then="hang").execute(refs=refs):
            entered.append(True)
    assert entered == []
    assert len(refs) == 0


async def test_execute_purges_a_finished_run_whose_host_is_cancelled_before_the_block(
    registry: StepRegistry, refs: SessionRefRegistry
) -> None:
    # The StopEvent is in, but the cancel lands as the run's nursery closes,
    # before the block gets the run: nobody can learn the refs' ids, so even
    # those that outlive a run go (the run has no result yet).
    wf = Workflow("late", registry=registry)
    host = trio.CancelScope()

    @wf.step("make", StartEvent)
    async def make(ev: StartEvent, ctx: Context) -> StopEvent:
        ctx.send_event(Idle())
        await trio.lowlevel.checkpoint()
        ctx.refs.insert(b"kept", RefLifetime.UNTIL_EXPLICIT_DROP)
        host.cancel()  # no checkpoint between this and the outcome
        return StopEvent("done")

    @wf.step("idle", Idle)
    async def idle(ev: Idle, ctx: Context) -> None:
        await trio.sleep_forever()

    entered = []
    with host:
        async with wf.execute(refs=refs):
            entered.append(True)
    assert host.cancelled_caught
    assert entered == []
    assert len(refs) == 0


async def test_refs_are_owned_by_the_runs_owner(
    registry: StepRegistry, refs: SessionRefRegistry
) -> None:
    result = await ref_workflow(registry).run(refs=refs, owner=("node-b", "alice"))
    kept = result.result["until_explicit_drop"]
    with pytest.raises(RefNotFoundError):
        refs.get(kept)
    with pytest.raises(RefNotFoundError):
        refs.get(kept, owner=("node-c", "alice"))
    assert refs.remove(kept) is False
    assert refs.get(kept, owner=("node-b", "alice")) == b"value-until_explicit_drop"
    assert refs.remove(kept, owner=("node-b", "alice")) is True


async def test_parent_scope_binds_parent_finish_refs(
    registry: StepRegistry, refs: SessionRefRegistry
) -> None:
    with refs.scope("call-scope-1"):
        result = await ref_workflow(registry).run(refs=refs, parent_scope="call-scope-1")
        assert len(refs) == 2
    # Closing the scope dropped the UNTIL_PARENT_FINISH ref only.
    assert list(refs._entries) == [result.result["until_explicit_drop"]]


async def test_a_child_run_in_a_step_uses_its_parents_registry(
    registry: StepRegistry, refs: SessionRefRegistry
) -> None:
    # As the docs show it: parent_scope=ctx.run_id and no refs=. Its
    # UNTIL_PARENT_FINISH ref must live, and die, with the parent's run.
    parent = Workflow("parent", registry=registry)
    child = Workflow("child", registry=StepRegistry())
    default_before = len(SessionRefRegistry.default())

    @child.step("make", StartEvent)
    async def make(ev: StartEvent, ctx: Context) -> StopEvent:
        return StopEvent(ctx.refs.insert(b"child", RefLifetime.UNTIL_PARENT_FINISH))

    @parent.step("spawn", StartEvent)
    async def spawn(ev: StartEvent, ctx: Context) -> StopEvent:
        made = (await child.run(parent_scope=ctx.run_id)).result
        assert ctx.refs.registry.get(made) == b"child"
        return StopEvent(made)

    await parent.run(refs=refs)
    assert len(refs) == 0  # dropped when the parent's run ended
    assert len(SessionRefRegistry.default()) == default_before


async def test_refs_inserted_while_stopping_are_reported(
    registry: StepRegistry, refs: SessionRefRegistry
) -> None:
    wf = Workflow("late", registry=registry)

    @wf.step("stop", StartEvent)
    async def stop(ev: StartEvent, ctx: Context) -> None:
        ctx.send_event(StopEvent("done"))
        # No checkpoint yet, so this still runs after the StopEvent.
        ctx.state["late"] = ctx.refs.insert(b"late", RefLifetime.UNTIL_EXPLICIT_DROP)

    result = await wf.run(refs=refs)
    assert list(result.refs) == [result.state["late"]]
    assert refs.get(result.state["late"]) == b"late"


async def test_ctx_refs_view(registry: StepRegistry, refs: SessionRefRegistry) -> None:
    wf = Workflow("view", registry=registry)

    @wf.step("use", StartEvent)
    async def use(ev: StartEvent, ctx: Context) -> StopEvent:
        ref_id = ctx.refs.insert({"live": "object"})
        assert ref_id in ctx.refs
        assert ctx.refs.get(ref_id) == {"live": "object"}
        desc = ctx.refs.descriptor(ref_id)
        assert desc.serializable is False
        assert desc.type_tag == "dict"
        assert desc.lifetime is RefLifetime.UNTIL_CONTEXT_DROP
        assert ctx.refs.remove(ref_id) is True
        assert ref_id not in ctx.refs
        assert ctx.refs.remove(ref_id) is False
        with pytest.raises(RefNotFoundError):
            ctx.refs.get(ref_id)
        return StopEvent(None)

    await wf.run(refs=refs)


async def test_capacity_error_fails_the_step(registry: StepRegistry) -> None:
    small = SessionRefRegistry("tiny", capacity=1)
    wf = Workflow("full", registry=registry)

    @wf.step("fill", StartEvent)
    async def fill(ev: StartEvent, ctx: Context) -> StopEvent:
        ctx.refs.insert(1)
        ctx.refs.insert(2)
        return StopEvent(None)

    with pytest.raises(StepError) as info:
        await wf.run(refs=small)
    assert isinstance(info.value.__cause__, RefCapacityError)
    assert len(small) == 0


async def test_default_registry_and_node_id(registry: StepRegistry) -> None:
    wf = Workflow("default-refs", registry=registry)

    @wf.step("use", StartEvent)
    async def use(ev: StartEvent, ctx: Context) -> StopEvent:
        return StopEvent((ctx.refs.registry, ctx.node_id))

    assert (await wf.run()).result == (SessionRefRegistry.default(), "local")
    peer = SessionRefRegistry("peer-x")
    assert (await wf.run(refs=peer)).result == (peer, "peer-x")
    assert (await wf.run(refs=peer, node_id="n")).result == (peer, "n")
