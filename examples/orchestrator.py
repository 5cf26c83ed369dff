"""A parent workflow that hands a sub-workflow to a peer, both in one process on loopback.

Machine B (the peer) registers two steps and serves them. Machine A (the
parent) runs a workflow whose step delegates to B, then prints the remote
result, the exported state and the remote refs, fetches one ref's bytes and
releases it. Run it with ``python3 examples/orchestrator.py``.
"""

from __future__ import annotations

import json

import attrs
import trio

import peerflow
from peerflow import (
    Event,
    PeerClient,
    PeerServer,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)

# ---------------------------------------------------------------------------
# Machine B: the peer. Building the workflow registers its steps, and the
# PeerServer finds them by id.

peer_steps = StepRegistry()
analyze_pipeline = Workflow("analyze-pipeline", registry=peer_steps)


@attrs.define
class Analyzed(Event, event_type="my_app.Analyzed"):
    entities: list[str]


@analyze_pipeline.step("my_app::analyze", accepts=[StartEvent])
async def analyze(event: StartEvent, ctx: peerflow.Context) -> Analyzed:
    document: str = event.data["document"]
    entities = sorted({word.strip(".,") for word in document.split() if word[:1].isupper()})
    ctx.state["word_count"] = len(document.split())
    # A value that stays on the peer until the parent's client scope ends.
    report = json.dumps({"entities": entities, "chars": len(document)}).encode()
    ctx.state["report_ref"] = ctx.refs.insert(report, lifetime=RefLifetime.UNTIL_PARENT_FINISH)
    return Analyzed(entities=entities)


@analyze_pipeline.step("my_app::summarize", accepts=[Analyzed])
async def summarize(event: Analyzed, ctx: peerflow.Context) -> StopEvent:
    summary = f"{len(event.entities)} entities: {', '.join(event.entities)}"
    return StopEvent(result={"summary": summary})


# ---------------------------------------------------------------------------
# Machine A: the parent workflow, delegating to the peer through a client.


def parent_workflow(client: PeerClient) -> Workflow:
    """The orchestrating workflow; its only step runs the analysis on the peer."""
    parent = Workflow("distributed-example", registry=StepRegistry())

    @parent.step("orchestrate", accepts=[StartEvent])
    async def orchestrate(event: StartEvent, ctx: peerflow.Context) -> StopEvent:
        response = await client.invoke_sub_workflow(
            "analyze-pipeline",
            ["my_app::analyze", "my_app::summarize"],
            {"document": event.data["document"]},
            timeout=60,
        )
        response.raise_for_error()
        ctx.state["remote_state"] = response.state
        ctx.state["remote_refs"] = list(response.remote_refs)
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

            response = await client.invoke_sub_workflow(
                "analyze-pipeline", ["my_app::analyze", "my_app::summarize"], {"document": "Hi Bob"}
            )
            for ref_uuid, descriptor in response.remote_refs.items():
                print(
                    f"ref {ref_uuid} from {descriptor.origin_node_id}",
                    f"type={descriptor.type_tag} size={descriptor.size}",
                    f"lifetime={descriptor.lifetime.value}",
                )
                payload = await client.deref_session_ref(ref_uuid)
                print("dereffed:", json.loads(payload))
                print("released:", await client.release_session_ref(ref_uuid))

        # The client's scope has ended: its UNTIL_PARENT_FINISH refs are gone.
        print("refs left on the peer:", len(server.refs))
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
