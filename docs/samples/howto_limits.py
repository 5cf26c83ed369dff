"""How-to: limits (docs/how-to/limits.md). Run: python3 docs/samples/howto_limits.py"""

from __future__ import annotations

import trio
import trio.testing

from peerflow import (
    Context,
    Limits,
    PeerLimitError,
    PeerServer,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)
from peerflow.testing import open_memory_peer

steps = StepRegistry()
wf = Workflow("limits", registry=steps)


@wf.step("store", accepts=[StartEvent])
async def store(event: StartEvent, ctx: Context) -> StopEvent:
    ids = [ctx.refs.insert(b"x", lifetime=RefLifetime.UNTIL_EXPLICIT_DROP) for _ in event.data]
    return StopEvent(result=ids)


async def main() -> None:
    # --8<-- [start:limits]
    limits = Limits(
        max_message_size=1024 * 1024,  # 1 MiB requests are plenty for these steps
        max_connections=64,
        refs_per_caller=100,
        drain_grace=30.0,  # let long calls finish on shutdown
    )
    server = PeerServer("node-b", registry=steps, token=None, limits=limits)
    # --8<-- [end:limits]
    async with open_memory_peer(server, "node-a") as client:
        # --8<-- [start:exceeded]
        try:
            await client.invoke_sub_workflow("limits", ["store"], ["x" * 2_000_000])
        except PeerLimitError as exc:
            print("PeerLimitError:", exc)

        response = await client.invoke_sub_workflow("limits", ["store"], list(range(101)))
        print("response.error:", response.error)
        # --8<-- [end:exceeded]
        assert response.error_type == "RefCapacityError"
    assert len(server.refs) == 0


if __name__ == "__main__":
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
