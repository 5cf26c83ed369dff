"""A parent workflow that hands a sub-workflow to a peer, both in one process on loopback.

Machine B (the peer) serves the steps of ``analysis_steps.py``. Machine A (the
parent) runs a workflow whose step delegates to B, then prints the remote
result, the exported state and the remote refs, fetches one ref's bytes and
releases it. Run it with ``python3 examples/orchestrator.py``.
"""

from __future__ import annotations

import json

import trio
from analysis_steps import STEP_IDS, peer_steps

from peerflow import Context, PeerClient, PeerServer, StartEvent, StepRegistry, StopEvent, Workflow


def parent_workflow(client: PeerClient) -> Workflow:
    """Machine A's workflow: its one step runs the analysis on the peer."""
    parent = Workflow("distributed-example", registry=StepRegistry())

    @parent.step("orchestrate", accepts=[StartEvent])
    async def orchestrate(event: StartEvent, ctx: Context) -> StopEvent:
        response = await client.invoke_sub_workflow(
            "analyze-pipeline", STEP_IDS, {"document": event.data["document"]}, timeout=60
        )
        response.raise_for_error()
        ctx.state["remote_state"] = response.state
        ctx.state["remote_refs"] = response.remote_refs
        return StopEvent(result=response.result)

    return parent


async def main() -> None:
    server = PeerServer("node-b", registry=peer_steps, token=None)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        print(f"peer node-b serving on {address.url}")

        async with PeerClient.connect(address.url, "node-a", token=None) as client:
            run = await parent_workflow(client).run(
                {"document": "Ada Lovelace met Charles Babbage in London."}
            )
            print("result:", run.result)
            print("exported state:", run.state["remote_state"])
            for ref_uuid, descriptor in run.state["remote_refs"].items():
                print(
                    f"remote ref {ref_uuid} from {descriptor.origin_node_id}:",
                    f"type={descriptor.type_tag} size={descriptor.size}",
                    f"lifetime={descriptor.lifetime.value}",
                )
                payload = await client.deref_session_ref(ref_uuid)
                print("  dereffed:", json.loads(payload))
                print("  released:", await client.release_session_ref(ref_uuid))

        # The client's scope has ended: nothing it was handed is left behind.
        print("refs left on the peer:", len(server.refs))
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
