"""Cancellation and lifetimes, shown (docs/explain/cancellation-and-lifetimes.md).

Run: python3 docs/samples/explain_lifetimes.py
"""

from __future__ import annotations

import trio
import trio.testing

from peerflow import (
    Context,
    PeerRefNotFoundError,
    PeerServer,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)
from peerflow.testing import open_memory_peer

steps = StepRegistry()
wf = Workflow("lifetimes", registry=steps)
seen: list[str] = []


class Scratch:
    """A value with no serializer."""


# --8<-- [start:step]
@wf.step("make_refs", accepts=[StartEvent])
async def make_refs(event: StartEvent, ctx: Context) -> StopEvent:
    return StopEvent(
        result={
            "inline": ctx.refs.insert(b"small result"),  # UNTIL_CONTEXT_DROP, serializable
            "dropped": ctx.refs.insert(Scratch()),  # UNTIL_CONTEXT_DROP, live-only
            "scoped": ctx.refs.insert(b"model", lifetime=RefLifetime.UNTIL_PARENT_FINISH),
            "kept": ctx.refs.insert(b"cache", lifetime=RefLifetime.UNTIL_EXPLICIT_DROP),
        }
    )


# --8<-- [end:step]


@wf.step("slow", accepts=[StartEvent])
async def slow(event: StartEvent, ctx: Context) -> StopEvent:
    ctx.refs.insert(b"scratch", lifetime=RefLifetime.UNTIL_PARENT_FINISH)
    seen.append(
        f"slow started, deadline in {trio.current_effective_deadline() - trio.current_time():g}s"
    )
    try:
        await trio.sleep(event.data)
    except trio.Cancelled:
        seen.append("slow cancelled")
        raise
    return StopEvent(result="done")


# --8<-- [start:stop]
race = Workflow("race", registry=StepRegistry())


@race.step("fast", accepts=[StartEvent])
async def fast(event: StartEvent, ctx: Context) -> StopEvent:
    await trio.sleep(1)
    return StopEvent(result="fast won")


@race.step("thorough", accepts=[StartEvent])
async def thorough(event: StartEvent, ctx: Context) -> StopEvent:
    try:
        await trio.sleep(60)
    finally:  # runs on cancellation too, like any trio task
        seen.append(f"thorough stopped at t={trio.current_time():g}")
    return StopEvent(result="thorough won")


# --8<-- [end:stop]


async def main() -> None:
    # --8<-- [start:stop-run]
    run = await race.run()
    print(run.result, "|", seen.pop())  # fast won | thorough stopped at t=1
    # --8<-- [end:stop-run]
    assert run.result == "fast won"

    server = PeerServer("node-b", registry=steps, token=None)
    async with open_memory_peer(server, "node-a") as client:
        # --8<-- [start:lifetimes]
        async with client.ref_scope():
            response = await client.invoke_sub_workflow("lifetimes", ["make_refs"], None)
            ids = response.result
            print("inline:", response.inline_refs[ids["inline"]].payload)
            print("dropped:", response.dropped_refs == (ids["dropped"],))
            print("remote:", sorted(response.remote_refs) == sorted([ids["scoped"], ids["kept"]]))
            print("scoped, inside the scope:", await client.deref_session_ref(ids["scoped"]))
        try:
            await client.deref_session_ref(ids["scoped"])
        except PeerRefNotFoundError:
            print("scoped, after the scope: gone")
        print("kept:", await client.deref_session_ref(ids["kept"]))
        await client.release_session_ref(ids["kept"])
        # --8<-- [end:lifetimes]
        assert len(server.refs) == 0

        # --8<-- [start:cancel]
        with trio.move_on_after(2):  # the caller's deadline travels as grpc-timeout
            await client.invoke_sub_workflow("lifetimes", ["slow"], 60)
        await trio.testing.wait_all_tasks_blocked()
        print(*seen, sep="\n")
        print("refs left on the peer:", len(server.refs))
        # --8<-- [end:cancel]
        assert seen[-1] == "slow cancelled"
        assert len(server.refs) == 0


if __name__ == "__main__":
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
