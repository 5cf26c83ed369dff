"""Workflow engine throughput against the same work written as plain trio code.

Scenarios, each measured as completed runs per second in one ``trio.run``:

- linear: StartEvent -> step 1 -> step 2 -> step 3 -> StopEvent;
- fan-out/fan-in: one step sends 100 events, 100 workers answer, one step
  collects the 100 answers with ``ctx.collect_events`` and stops;
- echo: one step that returns a StopEvent without awaiting anything, the
  shape of a peer's echo sub-workflow (the engine runs it with no nursery).

Each step handler of the first two makes one trio checkpoint, the least real
async work a step can do. The plain-trio floor calls the very same handlers
directly: in sequence inside one nursery for the linear and echo cases, as
100 tasks in a nursery for the fan-out case.

Usage: ``python3 benchmarks/engine.py [--seconds 1.0] [--profile linear|fanout|echo]``
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from peerflow import Context, Event, StartEvent, StepRegistry, StopEvent, Workflow

FAN = 100
ROUNDS = 3


@attrs.frozen
class Analyzed(Event, event_type="bench.Analyzed"):
    value: int


@attrs.frozen
class Summarized(Event, event_type="bench.Summarized"):
    value: int


@attrs.frozen
class Job(Event, event_type="bench.Job"):
    n: int


@attrs.frozen
class Answer(Event, event_type="bench.Answer"):
    n: int


async def analyze(ev: StartEvent, ctx: Any) -> Analyzed:
    await trio.lowlevel.checkpoint()
    return Analyzed(ev.data + 1)


async def summarize(ev: Analyzed, ctx: Any) -> Summarized:
    await trio.lowlevel.checkpoint()
    return Summarized(ev.value * 2)


async def finish(ev: Summarized, ctx: Any) -> StopEvent:
    await trio.lowlevel.checkpoint()
    return StopEvent(ev.value)


async def echo(ev: StartEvent, ctx: Any) -> StopEvent:
    return StopEvent(ev.data)


async def worker(ev: Job, ctx: Any) -> Answer:
    await trio.lowlevel.checkpoint()
    return Answer(ev.n * 2)


def build_linear() -> Workflow:
    wf = Workflow("bench.linear", registry=StepRegistry())
    wf.add_step("analyze", StartEvent, analyze)
    wf.add_step("summarize", Analyzed, summarize)
    wf.add_step("finish", Summarized, finish)
    return wf


def build_echo() -> Workflow:
    wf = Workflow("bench.echo", registry=StepRegistry())
    wf.add_step("echo", StartEvent, echo)
    return wf


def build_fanout() -> Workflow:
    wf = Workflow("bench.fanout", registry=StepRegistry())

    async def scatter(ev: StartEvent, ctx: Context) -> None:
        await trio.lowlevel.checkpoint()
        for n in range(FAN):
            ctx.send_event(Job(n))

    async def gather(ev: Answer, ctx: Context) -> StopEvent | None:
        answers = ctx.collect_events(Answer, FAN)
        if answers is None:
            return None
        return StopEvent(sum(a.n for a in answers))  # type: ignore[attr-defined]

    wf.add_step("scatter", StartEvent, scatter)
    wf.add_step("worker", Job, worker)
    wf.add_step("gather", Answer, gather)
    return wf


async def plain_linear(x: int) -> int:
    async with trio.open_nursery():
        a = await analyze(StartEvent(x), None)
        s = await summarize(a, None)
        stop = await finish(s, None)
    result: int = stop.result
    return result


async def plain_echo(x: int) -> int:
    async with trio.open_nursery():
        stop = await echo(StartEvent(x), None)
    result: int = stop.result
    return result


async def plain_fanout(x: int) -> int:
    answers: list[Answer] = []

    async def one(n: int) -> None:
        answers.append(await worker(Job(n), None))

    await trio.lowlevel.checkpoint()
    async with trio.open_nursery() as nursery:
        for n in range(FAN):
            nursery.start_soon(one, n)
    return sum(a.n for a in answers)


async def measure(once: Callable[[int], Awaitable[int]], seconds: float, expect: int) -> float:
    """Return runs per second of ``once`` over about ``seconds``."""
    for _ in range(20):  # warm up caches and the routing tables
        assert await once(1) == expect
    runs = 0
    batch = 50
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            await once(1)
        runs += batch
        now = time.perf_counter()
        if now >= deadline:
            return runs / (now - start)


async def main(seconds: float) -> None:
    linear = build_linear()
    fanout = build_fanout()
    echoing = build_echo()

    async def engine_linear(x: int) -> int:
        result: int = (await linear.run(x)).result
        return result

    async def engine_fanout(x: int) -> int:
        result: int = (await fanout.run(x)).result
        return result

    async def engine_echo(x: int) -> int:
        result: int = (await echoing.run(x)).result
        return result

    fan_expect = sum(2 * n for n in range(FAN))
    rows = []
    for name, engine, plain, expect in (
        ("linear, 3 steps", engine_linear, plain_linear, 4),
        (f"fan-out/fan-in x{FAN}", engine_fanout, plain_fanout, fan_expect),
        ("echo, 1 step, no await", engine_echo, plain_echo, 1),
    ):
        # Interleaved rounds, best of each: other load on the machine only
        # ever slows a round down.
        engine_rate = plain_rate = 0.0
        for _ in range(ROUNDS):
            engine_rate = max(engine_rate, await measure(engine, seconds, expect))
            plain_rate = max(plain_rate, await measure(plain, seconds, expect))
        rows.append((name, engine_rate, plain_rate, plain_rate / engine_rate))

    print(f"{'scenario':<24}{'engine runs/s':>16}{'plain trio runs/s':>20}{'engine/plain':>14}")
    for name, engine_rate, plain_rate, ratio in rows:
        print(f"{name:<24}{engine_rate:>16,.0f}{plain_rate:>20,.0f}{ratio:>13.2f}x")
    linear_ratio = rows[0][3]
    verdict = "meets" if linear_ratio <= 3.0 else "MISSES"
    print(f"\nlinear engine/plain = {linear_ratio:.2f}x: {verdict} the <= 3x goal")


def profile(which: str, seconds: float) -> None:
    wf = {"linear": build_linear, "fanout": build_fanout, "echo": build_echo}[which]()

    async def loop() -> None:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            await wf.run(1)

    profiler = cProfile.Profile()
    profiler.enable()
    trio.run(loop)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement round")
    parser.add_argument(
        "--profile", choices=["linear", "fanout", "echo"], help="cProfile one scenario"
    )
    args = parser.parse_args()
    if args.profile:
        profile(args.profile, args.seconds)
    else:
        trio.run(main, args.seconds)
