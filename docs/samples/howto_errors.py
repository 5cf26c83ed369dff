"""How-to: handle errors (docs/how-to/errors.md). Run: python3 docs/samples/howto_errors.py"""

from __future__ import annotations

import socket

import trio
import trio.testing

from peerflow import (
    Context,
    DynamicEvent,
    PeerClient,
    PeerEncodeError,
    PeerRefNotFoundError,
    PeerServer,
    PeerTimeoutError,
    PeerTransportError,
    PeerWorkflowError,
    StartEvent,
    StepError,
    StepRegistry,
    StepTimeoutError,
    StopEvent,
    UnroutableEventError,
    Workflow,
    WorkflowTimeoutError,
)
from peerflow.testing import open_memory_peer

steps = StepRegistry()
divider = Workflow("divider", registry=steps)
sleeper = Workflow("sleeper", registry=steps)
stray = Workflow("stray", registry=steps)


@divider.step("divide", accepts=[StartEvent])
async def divide(event: StartEvent, ctx: Context) -> StopEvent:
    return StopEvent(result=1 / event.data)


@sleeper.step("sleepy", accepts=[StartEvent], timeout=1.0)
async def sleepy(event: StartEvent, ctx: Context) -> StopEvent:
    await trio.sleep(event.data)
    return StopEvent(result="awake")


@stray.step("stray", accepts=[StartEvent])
async def emit_stray(event: StartEvent, ctx: Context) -> DynamicEvent:
    return DynamicEvent("my_app.Nobody", {})


async def engine_errors() -> None:
    # --8<-- [start:engine]
    try:
        await divider.run(0)
    except StepError as exc:
        print(f"StepError in {exc.step_id!r}, caused by {exc.__cause__!r}")

    try:
        await sleeper.run(5)  # the step's own 1 s timeout
    except StepTimeoutError as exc:
        print(f"StepTimeoutError: {exc.step_id!r} after {exc.timeout}s")

    try:
        await sleeper.run(0.5, timeout=0.25)  # a timeout for this whole run
    except WorkflowTimeoutError as exc:
        print(f"WorkflowTimeoutError after {exc.timeout}s")

    try:
        await stray.run()
    except UnroutableEventError as exc:
        print("UnroutableEventError:", exc.event_type)
    # --8<-- [end:engine]


async def peer_errors() -> None:
    server = PeerServer("node-b", registry=steps, token=None)
    async with open_memory_peer(server, "node-a") as client:
        # --8<-- [start:peer]
        response = await client.invoke_sub_workflow("divider", ["divide"], 0)
        print("response.error:", response.error)  # a failed run is not raised...
        try:
            response.raise_for_error()  # ...until you ask for it
        except PeerWorkflowError as exc:
            print(f"PeerWorkflowError: step={exc.step_id!r} type={exc.error_type!r}")

        try:
            await client.invoke_sub_workflow("divider", ["divide"], {"when": {1, 2}})
        except PeerEncodeError as exc:
            print(f"PeerEncodeError at {exc.path}: {exc.reason}")

        try:
            await client.invoke_sub_workflow("sleeper", ["sleepy"], 0.5, timeout=0.1)
        except PeerTimeoutError as exc:
            print("PeerTimeoutError:", exc)

        try:
            await client.deref_session_ref("00000000-0000-0000-0000-000000000000")
        except PeerRefNotFoundError as exc:
            print("PeerRefNotFoundError:", exc.ref_uuid)
        # --8<-- [end:peer]


async def connection_errors() -> None:
    with socket.socket() as sock:  # find a port where nobody listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # --8<-- [start:connect]
    try:
        PeerClient.connect("127.0.0.1:7443", "node-a")  # no scheme: refused at once
    except PeerTransportError as exc:
        print("bad URI:", exc)

    try:
        with trio.fail_after(10):
            async with PeerClient.connect(f"http://127.0.0.1:{port}", "node-a", token=None):
                pass
    except PeerTransportError as exc:
        print("refused:", exc)
    # --8<-- [end:connect]


if __name__ == "__main__":
    # Virtual time: the timeouts above pass instantly.
    trio.run(engine_errors, clock=trio.testing.MockClock(autojump_threshold=0))
    trio.run(peer_errors, clock=trio.testing.MockClock(autojump_threshold=0))
    trio.run(connection_errors)
