"""Tutorial, part 2: the same steps served by a peer on loopback (docs/tutorial.md).

Run: python3 docs/samples/tutorial_peer.py
"""

from __future__ import annotations

import json

import trio
from tutorial_local import TEXT, steps

from peerflow import PeerClient, PeerServer, PeerUnknownStepError

STEP_IDS = ["split", "count_words", "count_chars", "total"]


async def use_the_peer(client: PeerClient, server: PeerServer) -> None:
    # --8<-- [start:invoke]
    response = await client.invoke_sub_workflow("text-stats", STEP_IDS, {"text": TEXT}, timeout=10)
    response.raise_for_error()  # a failed remote run would raise PeerWorkflowError here
    print("result:", response.result)
    print("exported state:", response.state)
    # --8<-- [end:invoke]
    assert response.state == {"lines": 2}

    # --8<-- [start:refs]
    report_ref = response.result["report_ref"]
    descriptor = response.remote_refs[report_ref]
    print(f"ref on {descriptor.origin_node_id}: {descriptor.type_tag}, {descriptor.size} bytes")
    report = json.loads(await client.deref_session_ref(report_ref))
    print("report:", report)
    print("released:", await client.release_session_ref(report_ref))  # True
    print("released again:", await client.release_session_ref(report_ref))  # False
    # --8<-- [end:refs]
    assert report["chars"] == 67
    assert len(server.refs) == 0

    # --8<-- [start:stream]
    async with client.stream_sub_workflow("text-stats", STEP_IDS, {"text": TEXT}) as call:
        async for event in call:
            print("remote progress:", event)
    assert call.response is not None  # set once the event stream has ended
    call.response.raise_for_error()
    await client.release_session_ref(call.response.result["report_ref"])
    # --8<-- [end:stream]

    # --8<-- [start:unknown]
    try:
        await client.invoke_sub_workflow("text-stats", ["split", "no-such-step"], {"text": ""})
    except PeerUnknownStepError as exc:
        print("refused before anything ran:", exc.step_id)
    # --8<-- [end:unknown]
    assert len(server.refs) == 0


# --8<-- [start:main]
async def main() -> None:
    server = PeerServer("node-b", registry=steps, token=None)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        print("serving on", address.url)
        async with PeerClient.connect(address.url, "node-a", token=None) as client:
            await use_the_peer(client, server)
        nursery.cancel_scope.cancel()  # stops serve(): it drains, then returns


# --8<-- [end:main]


if __name__ == "__main__":
    trio.run(main)
