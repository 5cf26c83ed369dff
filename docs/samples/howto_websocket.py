"""How-to: call a peer over one WebSocket (docs/how-to/websocket.md).

Run: python3 docs/samples/howto_websocket.py
"""

from __future__ import annotations

import math

import trio

from peerflow import (
    Context,
    DynamicEvent,
    PeerServer,
    PeerTimeoutError,
    StartEvent,
    StepRegistry,
    StopEvent,
    WebSocketPeerClient,
    Workflow,
)

steps = StepRegistry()
measure = Workflow("measure", registry=steps)


@measure.step("probe", accepts=[StartEvent])
async def probe(event: StartEvent, ctx: Context) -> StopEvent:
    for i in range(3):
        ctx.write_event_to_stream(DynamicEvent("measure.Tick", {"i": i}))
        await trio.sleep(event.data["pause"])
    # msgpack carries every wire value: NaN and infinities too (JSON cannot).
    return StopEvent(result={"worst": math.inf, "unknown": math.nan})


async def main() -> None:
    server = PeerServer("node-b", registry=steps, token=None)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)

            # --8<-- [start:client]
            async with WebSocketPeerClient.connect(address.url, "node-a", token=None) as client:
                # Calls share the one WebSocket and run concurrently on it.
                async with trio.open_nursery() as calls:
                    for n in range(3):
                        calls.start_soon(run, client, n)

                async with client.stream_sub_workflow("measure", ["probe"], {"pause": 0}) as call:
                    print("events:", [event.data["i"] async for event in call])  # type: ignore[attr-defined]

                try:  # cancelling a call sends a cancel frame: the peer stops the run
                    await client.invoke_sub_workflow(
                        "measure", ["probe"], {"pause": 5}, timeout=0.1
                    )
                except PeerTimeoutError as exc:
                    print("gave up:", exc)
            # --8<-- [end:client]
            nursery.cancel_scope.cancel()


async def run(client: WebSocketPeerClient, n: int) -> None:
    response = await client.invoke_sub_workflow("measure", ["probe"], {"pause": 0.01})
    print(f"call {n}:", response.result)


if __name__ == "__main__":
    trio.run(main)
