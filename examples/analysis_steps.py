"""The steps a peer offers in the examples: the seed document's analyze pipeline.

Importing this module builds the workflow, which registers its steps in
``peer_steps``; a PeerServer given that registry can then run them for
remote callers.
"""

from __future__ import annotations

import json

import attrs

from peerflow import Context, Event, RefLifetime, StartEvent, StepRegistry, StopEvent, Workflow

peer_steps = StepRegistry()
analyze_pipeline = Workflow("analyze-pipeline", registry=peer_steps)

STEP_IDS = ["my_app::analyze", "my_app::summarize"]


@attrs.define
class Analyzed(Event, event_type="my_app.Analyzed"):
    entities: list[str]


@analyze_pipeline.step("my_app::analyze", accepts=[StartEvent])
async def analyze(event: StartEvent, ctx: Context) -> Analyzed:
    document: str = event.data["document"]
    entities = sorted({word.strip(".,") for word in document.split() if word[:1].isupper()})
    ctx.state["word_count"] = len(document.split())
    ctx.write_event_to_stream(Analyzed(entities=entities))
    # A value that stays on the peer until the caller's client scope ends.
    report = json.dumps({"entities": entities, "chars": len(document)}).encode()
    ctx.state["report_ref"] = ctx.refs.insert(report, lifetime=RefLifetime.UNTIL_PARENT_FINISH)
    return Analyzed(entities=entities)


@analyze_pipeline.step("my_app::summarize", accepts=[Analyzed])
async def summarize(event: Analyzed, ctx: Context) -> StopEvent:
    summary = f"{len(event.entities)} entities: {', '.join(event.entities)}"
    return StopEvent(result={"summary": summary})
