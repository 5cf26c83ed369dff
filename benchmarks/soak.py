"""Soak: thousands of mixed calls against a peer in another process, watching for leaks.

The peer runs in a child process on loopback; one PeerClient connection
drives ``--concurrency`` workers through a fixed cycle of operations: unary
invokes, streamed runs, refs of every lifetime, derefs, releases, a stream
left early (the remote run is cancelled mid-call) and a call whose caller
scope is cancelled mid-call. Each cycle runs inside ``client.ref_scope()``,
so its ``until_parent_finish`` refs go with the scope's lease.

At the end it reports unexpected errors, the peer's RSS at start and end,
the refs still alive on the peer once the client has gone (the peer's own
``stats`` step counts them), and calls per second.

Usage::

    python3 benchmarks/soak.py [--calls 10000] [--concurrency 64] [--json]

``tests/security/test_soak.py`` runs :func:`run_soak` with 1,000 calls and
requires no errors and no live refs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial

import attrs
import psutil
import trio

from peerflow import (
    Context,
    Event,
    PeerClient,
    PeerServer,
    PeerTimeoutError,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)

WORKFLOW = "soak"
PARENT = RefLifetime.UNTIL_PARENT_FINISH.value
EXPLICIT = RefLifetime.UNTIL_EXPLICIT_DROP.value
CONTEXT = RefLifetime.UNTIL_CONTEXT_DROP.value
#: How long a cancelled-by-scope call runs before its caller gives up.
CANCEL_AFTER = 0.002
_CYCLE_LENGTH = 10
_SCRIPT = os.path.abspath(__file__)


@attrs.define
class Tick(Event, event_type="benchmarks.soak.Tick"):
    n: int


def build_steps(live_refs: Callable[[], int]) -> StepRegistry:
    """The peer's steps; ``stats`` reports ``live_refs()``."""
    registry = StepRegistry()
    wf = Workflow(WORKFLOW, registry=registry)

    @wf.step("echo", accepts=[StartEvent])
    async def echo(event: StartEvent, ctx: Context) -> StopEvent:
        return StopEvent(result=event.data)

    @wf.step("ticks", accepts=[StartEvent])
    async def ticks(event: StartEvent, ctx: Context) -> StopEvent:
        for n in range(event.data):
            ctx.write_event_to_stream(Tick(n))
        return StopEvent(result=event.data)

    @wf.step("refs", accepts=[StartEvent])
    async def refs(event: StartEvent, ctx: Context) -> StopEvent:
        ids = [
            ctx.refs.insert(f"value-{i}".encode(), lifetime=RefLifetime(lifetime))
            for i, lifetime in enumerate(event.data)
        ]
        return StopEvent(result=ids)

    @wf.step("hold", accepts=[StartEvent])
    async def hold(event: StartEvent, ctx: Context) -> StopEvent:
        # Refs of every kind a cancelled run must not leak, then wait to be cancelled.
        ctx.refs.insert(b"scratch")
        ctx.refs.insert(b"kept", lifetime=RefLifetime.UNTIL_PARENT_FINISH)
        ctx.write_event_to_stream(Tick(0))
        await trio.sleep_forever()

    @wf.step("stats", accepts=[StartEvent])
    async def stats(event: StartEvent, ctx: Context) -> StopEvent:
        return StopEvent(result={"live_refs": live_refs()})

    return registry


# ---------------------------------------------------------------- the peer process


async def serve() -> None:
    """The peer side: serve on an ephemeral loopback port until SIGTERM."""
    box: list[PeerServer] = []
    server = PeerServer("soak-peer", registry=build_steps(lambda: len(box[0].refs)), token=None)
    box.append(server)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)
            print(f"serving on {address.url}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


# ---------------------------------------------------------------- the load


@attrs.frozen
class SoakReport:
    """What a soak run observed.

    Attributes:
        calls: operations run (each is one call, or one abandoned call).
        cancelled: of those, calls cancelled mid-call on purpose.
        errors: operations that failed unexpectedly or returned a wrong value.
        error_kinds: the errors by exception type and message.
        seconds: wall time of the load phase.
        rss_start: the peer's resident memory before the load, bytes.
        rss_end: the peer's resident memory after the load, bytes.
        live_refs: refs alive on the peer after the client disconnected.
    """

    calls: int
    cancelled: int
    errors: int
    error_kinds: dict[str, int]
    seconds: float
    rss_start: int
    rss_end: int
    live_refs: int

    @property
    def calls_per_s(self) -> float:
        """Operations per second over the load phase."""
        return self.calls / self.seconds


@attrs.define
class _Tally:
    cancelled: int = 0
    errors: Counter[str] = attrs.field(factory=Counter)


class _Mismatch(Exception):
    pass


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise _Mismatch(what)


async def _run_cycle(client: PeerClient, ops: int, tally: _Tally) -> None:
    """One worker cycle of up to ten operations, inside its own ref scope."""
    explicit = parent = ""

    async def make_refs() -> None:
        nonlocal explicit, parent
        response = await client.invoke_sub_workflow(WORKFLOW, ["refs"], [EXPLICIT, PARENT, CONTEXT])
        explicit, parent, inline = response.result
        _check(set(response.remote_refs) == {explicit, parent}, "remote refs")
        _check(response.inline_refs[inline].payload == b"value-2", "inline ref")

    async def echo() -> None:
        response = await client.invoke_sub_workflow(WORKFLOW, ["echo"], {"n": [1, "two"]})
        _check(response.result == {"n": [1, "two"]}, "echo")

    async def deref_explicit() -> None:
        _check(await client.deref_session_ref(explicit) == b"value-0", "deref explicit")

    async def release_explicit() -> None:
        _check(await client.release_session_ref(explicit) is True, "release explicit")

    async def deref_parent() -> None:
        _check(await client.deref_session_ref(parent) == b"value-1", "deref parent")

    async def stream() -> None:
        async with client.stream_sub_workflow(WORKFLOW, ["ticks"], 3) as call:
            seen = [event.n async for event in call]  # type: ignore[attr-defined]
        _check(seen == [0, 1, 2] and call.response is not None, "stream")

    async def leave_stream_early() -> None:
        # Leaving the block at the first event cancels the remote run mid-call.
        async with client.stream_sub_workflow(WORKFLOW, ["hold"], None) as call:
            async for _ in call:
                break
        tally.cancelled += 1

    async def cancel_by_scope() -> None:
        with trio.move_on_after(CANCEL_AFTER) as scope:
            await client.invoke_sub_workflow(WORKFLOW, ["hold"], None)
        _check(scope.cancelled_caught, "a held call returned")
        tally.cancelled += 1

    async def time_out() -> None:
        try:
            await client.invoke_sub_workflow(WORKFLOW, ["hold"], None, timeout=CANCEL_AFTER)
        except PeerTimeoutError:
            tally.cancelled += 1
        else:
            raise _Mismatch("a held call returned")

    cycle: list[Callable[[], Awaitable[None]]] = [
        make_refs,
        echo,
        deref_explicit,
        stream,
        release_explicit,
        leave_stream_early,
        deref_parent,
        cancel_by_scope,
        echo,
        time_out,
    ]
    chosen = cycle[:ops]
    if release_explicit not in chosen:
        # A short last cycle still gives back the explicit ref it made.
        chosen.append(release_explicit)
    async with client.ref_scope():
        for operation in chosen:
            if operation is release_explicit and not explicit:
                continue
            try:
                await operation()
            except Exception as exc:
                tally.errors[f"{type(exc).__name__}: {exc}"] += 1


async def _worker(client: PeerClient, ops: int, tally: _Tally) -> None:
    while ops > 0:
        await _run_cycle(client, min(ops, _CYCLE_LENGTH), tally)
        ops -= _CYCLE_LENGTH


async def _read_line(stream: trio.abc.ReceiveStream) -> str:
    line = b""
    while not line.endswith(b"\n"):
        data = await stream.receive_some(1)
        if not data:
            raise RuntimeError("the peer process exited before it served")
        line += data
    return line.decode()


async def _live_refs(url: str) -> int:
    async with PeerClient.connect(url, "soak-observer", token=None) as observer:
        response = await observer.invoke_sub_workflow(WORKFLOW, ["stats"], None)
    return int(response.result["live_refs"])


async def run_soak(calls: int = 10_000, concurrency: int = 64) -> SoakReport:
    """Start a peer process, run ``calls`` mixed operations on it, report.

    Raises:
        RuntimeError: the peer process did not come up.
    """
    command = [sys.executable, _SCRIPT, "--serve"]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
        )
        try:
            assert process.stdout is not None
            with trio.fail_after(30):
                url = (await _read_line(process.stdout)).split()[-1]
            peer = psutil.Process(process.pid)
            rss_start = peer.memory_info().rss
            tally = _Tally()
            share, extra = divmod(calls, concurrency)
            start = time.perf_counter()
            async with (
                PeerClient.connect(url, "soak-client", token=None) as client,
                trio.open_nursery() as workers,
            ):
                for index in range(concurrency):
                    workers.start_soon(_worker, client, share + (index < extra), tally)
            seconds = time.perf_counter() - start
            live_refs = await _live_refs(url)
            rss_end = peer.memory_info().rss
        finally:
            process.terminate()
    return SoakReport(
        calls=calls,
        cancelled=tally.cancelled,
        errors=sum(tally.errors.values()),
        error_kinds=dict(tally.errors),
        seconds=seconds,
        rss_start=rss_start,
        rss_end=rss_end,
        live_refs=live_refs,
    )


def _print_report(report: SoakReport) -> None:
    mib = 1024 * 1024
    print(f"calls            {report.calls:,} ({report.cancelled:,} cancelled mid-call)")
    print(f"errors           {report.errors}")
    for kind, count in sorted(report.error_kinds.items(), key=lambda item: -item[1])[:10]:
        print(f"  {count:>6} x {kind}")
    print(f"calls/s          {report.calls_per_s:,.0f} ({report.seconds:.1f} s)")
    print(
        f"peer RSS         {report.rss_start / mib:.1f} MiB -> {report.rss_end / mib:.1f} MiB "
        f"({(report.rss_end - report.rss_start) / mib:+.1f} MiB)"
    )
    print(f"live refs at end {report.live_refs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve)
        return
    report = trio.run(run_soak, args.calls, args.concurrency)
    if args.json:
        print(json.dumps({**attrs.asdict(report), "calls_per_s": report.calls_per_s}))
    else:
        _print_report(report)
    sys.exit(1 if report.errors or report.live_refs else 0)


if __name__ == "__main__":
    main()
