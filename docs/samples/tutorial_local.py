"""Tutorial, part 1: a local workflow (docs/tutorial.md).

Run: python3 docs/samples/tutorial_local.py
"""

from __future__ import annotations

import json

import attrs
import trio

from peerflow import (
    Context,
    Event,
    RefLifetime,
    SessionRefRegistry,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)


# --8<-- [start:events]
@attrs.frozen
class Line(Event, event_type="tutorial.Line"):
    index: int
    text: str


@attrs.frozen
class WordCount(Event, event_type="tutorial.WordCount"):
    index: int
    words: int


@attrs.frozen
class CharCount(Event, event_type="tutorial.CharCount"):
    index: int
    chars: int


# --8<-- [end:events]


# --8<-- [start:workflow]
steps = StepRegistry()
text_stats = Workflow("text-stats", timeout=10, registry=steps)


@text_stats.step("split", accepts=[StartEvent])
async def split(event: StartEvent, ctx: Context) -> list[Line]:
    lines = event.data["text"].splitlines()
    ctx.state["lines"] = len(lines)
    # A returned list is routed event by event.
    return [Line(i, text) for i, text in enumerate(lines)]


# Two steps accept Line: every Line goes to both (fan-out).
@text_stats.step("count_words", accepts=[Line], max_concurrency=4)
async def count_words(event: Line, ctx: Context) -> WordCount:
    ctx.write_event_to_stream(event)  # progress, for whoever watches the run
    return WordCount(event.index, len(event.text.split()))


@text_stats.step("count_chars", accepts=[Line])
async def count_chars(event: Line, ctx: Context) -> CharCount:
    return CharCount(event.index, len(event.text))


@text_stats.step("total", accepts=[WordCount, CharCount])
async def total(event: WordCount | CharCount, ctx: Context) -> StopEvent | None:
    # Fan-in: every invocation but the one completing the set gets None.
    batch = ctx.collect_events([WordCount, CharCount], 2 * ctx.state["lines"])
    if batch is None:
        return None
    words = sum(e.words for e in batch if isinstance(e, WordCount))
    chars = sum(e.chars for e in batch if isinstance(e, CharCount))
    # The full report stays where it was made; the result carries its ref id.
    report = json.dumps({"words": words, "chars": chars, "lines": ctx.state["lines"]})
    report_ref = ctx.refs.insert(report.encode(), lifetime=RefLifetime.UNTIL_EXPLICIT_DROP)
    return StopEvent(result={"words": words, "report_ref": report_ref})


# --8<-- [end:workflow]

TEXT = "Ada Lovelace wrote the first program\nfor Babbage's Analytical Engine"


async def main() -> None:
    # --8<-- [start:run]
    run = await text_stats.run({"text": TEXT})
    print("result:", run.result)
    print("state:", run.state)
    # --8<-- [end:run]
    assert run.result["words"] == 10
    assert run.state == {"lines": 2}

    # --8<-- [start:refs]
    report_ref = run.result["report_ref"]
    print("descriptor:", run.refs[report_ref])
    registry = SessionRefRegistry.default()  # where runs keep refs unless told otherwise
    print("report:", registry.get(report_ref))
    assert registry.remove(report_ref)  # UNTIL_EXPLICIT_DROP: only this frees it
    # --8<-- [end:refs]
    assert len(registry) == 0

    # --8<-- [start:stream]
    async with text_stats.start({"text": TEXT}) as handle:
        async for event in handle.events():
            print("progress:", event)
        outcome = await handle.result()
    registry.remove(outcome.result["report_ref"])
    # --8<-- [end:stream]
    assert outcome.result["words"] == 10
    assert len(registry) == 0


if __name__ == "__main__":
    trio.run(main)
