"""How-to: call a peer over HTTP/JSON (docs/how-to/http-json.md).

Run: python3 docs/samples/howto_http_json.py
"""

from __future__ import annotations

import trio

from peerflow import (
    Context,
    DynamicEvent,
    HttpPeerClient,
    PeerServer,
    PeerUnknownStepError,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)

steps = StepRegistry()
shout = Workflow("shout", registry=steps)


@shout.step("upper", accepts=[StartEvent])
async def upper(event: StartEvent, ctx: Context) -> StopEvent:
    text: str = event.data["text"]
    ctx.write_event_to_stream(DynamicEvent("shout.Progress", {"step": "upper"}))
    ref = ctx.refs.insert(text.upper().encode(), lifetime=RefLifetime.UNTIL_PARENT_FINISH)
    return StopEvent(result={"ref": ref, "raw": text.encode()})


async def main() -> None:
    server = PeerServer("node-b", registry=steps, token=None)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)

            # --8<-- [start:client]
            # No connection yet: the first call opens one (and keeps it alive).
            async with HttpPeerClient(address.url, "node-a", token=None) as client:
                response = await client.invoke_sub_workflow("shout", ["upper"], {"text": "hi"})
                print("result:", response.result)  # bytes travelled as {"$bytes": ...}
                print("deref:", await client.deref_session_ref(response.result["ref"]))

                async with client.stream_sub_workflow("shout", ["upper"], {"text": "yo"}) as call:
                    async for event in call:
                        print("event:", event)
                print("streamed result:", call.response.result if call.response else None)

                try:
                    await client.invoke_sub_workflow("shout", ["no-such-step"], None)
                except PeerUnknownStepError as exc:
                    print("refused:", exc.step_id)
            # Leaving the block released the UNTIL_PARENT_FINISH refs on the peer.
            print("refs left on the peer:", len(server.refs))
            # --8<-- [end:client]
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
