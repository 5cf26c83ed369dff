"""The step modules the CLI tests serve, written to a directory as a user would have them."""

from __future__ import annotations

import textwrap
from pathlib import Path

#: Steps in the default StepRegistry: what ``--steps cli_steps`` serves.
CLI_STEPS = '''
import os

import attrs
import trio

from peerflow import Context, DynamicEvent, Event, RefLifetime, StartEvent, StopEvent, Workflow

wf = Workflow("cli")


@attrs.define
class Tick(Event, event_type="cli.Tick"):
    n: int


class Opaque:
    """No serializer: an until_context_drop ref of it is dropped."""


@wf.step("cli::echo", accepts=[StartEvent])
async def echo(event: StartEvent, ctx: Context) -> StopEvent:
    ctx.state["seen"] = event.data
    return StopEvent(result={"echo": event.data})


@wf.step("cli::ticks", accepts=[StartEvent])
async def ticks(event: StartEvent, ctx: Context) -> StopEvent:
    for n in range(3):
        ctx.write_event_to_stream(Tick(n=n))
    return StopEvent(result="ticked")


@wf.step("cli::fail", accepts=[StartEvent])
async def fail(event: StartEvent, ctx: Context) -> StopEvent:
    raise ValueError("boom")


@wf.step("cli::refs", accepts=[StartEvent])
async def refs(event: StartEvent, ctx: Context) -> StopEvent:
    ctx.refs.insert(b"inline")
    ctx.refs.insert(Opaque())
    kept = ctx.refs.insert(b"kept", lifetime=RefLifetime.UNTIL_EXPLICIT_DROP)
    live = ctx.refs.insert(Opaque(), lifetime=RefLifetime.UNTIL_EXPLICIT_DROP)
    return StopEvent(result=[kept, live])


@wf.step("cli::nan", accepts=[StartEvent])
async def nan(event: StartEvent, ctx: Context) -> StopEvent:
    return StopEvent(result={"x": [float("nan")]})


@wf.step("cli::looks_like_bytes", accepts=[StartEvent])
async def looks_like_bytes(event: StartEvent, ctx: Context) -> StopEvent:
    ctx.state["k"] = {"$bytes": "not bytes"}
    return StopEvent(result=None)


@wf.step("cli::odd_events", accepts=[StartEvent])
async def odd_events(event: StartEvent, ctx: Context) -> StopEvent:
    ctx.write_event_to_stream(DynamicEvent("cli.Reading", {"raw": bytes([0, 255])}))
    ctx.write_event_to_stream(DynamicEvent("cli.Reading", {"value": float("nan")}))
    return StopEvent(result="unprintable")


@wf.step("cli::forever", accepts=[StartEvent])
async def forever(event: StartEvent, ctx: Context) -> StopEvent:
    await trio.sleep_forever()


@wf.step("cli::hold", accepts=[StartEvent])
async def hold(event: StartEvent, ctx: Context) -> StopEvent:
    # Wait, with no clock in it, for the test to write to the FIFO named by
    # the input. It is open for reading before the event tells the caller
    # that the call is in flight, so the test's writer always finds a reader.
    fd = os.open(event.data, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ctx.write_event_to_stream(Tick(n=-1))
        await trio.lowlevel.wait_readable(fd)
        return StopEvent(result=os.read(fd, 1024).decode())
    finally:
        os.close(fd)
'''

#: A registry of its own, served with ``--steps cli_more:shout`` (a Workflow)
#: or ``--steps cli_more:more_steps`` (a StepRegistry).
CLI_MORE = """
from peerflow import StartEvent, StepRegistry, StopEvent, Workflow

SHOUT_ID = "more::shout"
more_steps = StepRegistry()
shout = Workflow("shout", registry=more_steps)


@shout.step(SHOUT_ID, accepts=[StartEvent])
async def do_shout(event, ctx):
    return StopEvent(result=event.data.upper())
"""

#: Another registry with a different step under cli_more's step id.
CLI_CLASH = """
from peerflow import StartEvent, StepRegistry, StopEvent, Workflow

clash_steps = StepRegistry()
whisper = Workflow("whisper", registry=clash_steps)


@whisper.step("more::shout", accepts=[StartEvent])
async def do_whisper(event, ctx):
    return StopEvent(result=event.data.lower())
"""

CLI_BROKEN = """
raise RuntimeError("broken on purpose")
"""

MODULES = {
    "cli_steps": CLI_STEPS,
    "cli_more": CLI_MORE,
    "cli_clash": CLI_CLASH,
    "cli_broken": CLI_BROKEN,
}


def write_steps(directory: Path) -> Path:
    """Write the step modules into ``directory`` and return it."""
    for name, source in MODULES.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(source).lstrip())
    return directory
