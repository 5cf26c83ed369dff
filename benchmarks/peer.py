"""peerflow against grpcio (grpc.aio) and grpclib, side by side in one run.

Every stack runs its server and its client in two separate processes on
loopback, and is measured by the same loop:

- sequential unary calls with a ~100-byte body: p50 and p99 latency;
- 64 concurrent calls on one connection: calls per second;
- a 64 MiB response (a deref for peerflow): MB/s.

Usage: ``python3 benchmarks/peer.py [--stacks peerflow,grpcio,grpclib] [--quick]``.
The figures are printed as a table plus peerflow's ratios to the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import _alternatives as alt

HERE = os.path.dirname(os.path.abspath(__file__))
STACKS = ("peerflow", "grpcio", "grpclib")
BODY = bytes(range(100))
BULK = 64 * 1024 * 1024

Echo = Callable[[bytes], Awaitable[bytes]]
Bulk = Callable[[int], Awaitable[int]]
Gather = Callable[[int, Callable[[], Awaitable[None]]], Awaitable[None]]


async def measure(echo: Echo, bulk: Bulk, gather: Gather, *, quick: bool) -> dict[str, float]:
    """The one measuring loop every stack goes through."""
    sequential = 500 if quick else 3000
    concurrent_total = 4000 if quick else 30000
    bulk_reps = 2 if quick else 5

    for _ in range(200):
        assert await echo(BODY) == BODY
    samples = []
    for _ in range(sequential):
        start = time.perf_counter()
        await echo(BODY)
        samples.append(time.perf_counter() - start)
    samples.sort()

    per_worker = concurrent_total // 64

    async def worker() -> None:
        for _ in range(per_worker):
            await echo(BODY)

    await gather(8, worker)  # warm the connection's windows and caches
    start = time.perf_counter()
    await gather(64, worker)
    calls_per_s = per_worker * 64 / (time.perf_counter() - start)

    assert await bulk(BULK) == BULK
    start = time.perf_counter()
    for _ in range(bulk_reps):
        await bulk(BULK)
    mb_per_s = BULK * bulk_reps / (time.perf_counter() - start) / 1e6

    return {
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
        "calls_per_s": calls_per_s,
        "bulk_mb_per_s": mb_per_s,
    }


# ---------------------------------------------------------------- asyncio stacks


async def _asyncio_gather(n: int, fn: Callable[[], Awaitable[None]]) -> None:
    await asyncio.gather(*(fn() for _ in range(n)))


def _report_port(port: int) -> None:
    print(port, flush=True)


def serve_asyncio(stack: str) -> None:
    serve = alt.grpcio_serve if stack == "grpcio" else alt.grpclib_serve
    asyncio.run(serve(_report_port))


def client_asyncio(stack: str, port: int, quick: bool) -> dict[str, float]:
    async def main() -> dict[str, float]:
        connect = alt.grpcio_client if stack == "grpcio" else alt.grpclib_client
        echo, bulk, channel = await connect(port)
        try:
            return await measure(echo, bulk, _asyncio_gather, quick=quick)
        finally:
            closed = channel.close()
            if asyncio.iscoroutine(closed):
                await closed

    return asyncio.run(main())


# ---------------------------------------------------------------- orchestration


def _run_stack(stack: str, quick: bool) -> dict[str, float]:
    me = os.path.abspath(__file__)
    server = subprocess.Popen(
        [sys.executable, me, "_serve", stack], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        args = [sys.executable, me, "_client", stack, str(port)] + (["--quick"] if quick else [])
        out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "p50_us": min(r["p50_us"] for r in runs),
        "p99_us": min(r["p99_us"] for r in runs),
        "calls_per_s": max(r["calls_per_s"] for r in runs),
        "bulk_mb_per_s": max(r["bulk_mb_per_s"] for r in runs),
    }


def _print_table(results: dict[str, dict[str, float]]) -> None:
    print(f"{'stack':<10} {'p50 µs':>9} {'p99 µs':>9} {'calls/s @64':>12} {'bulk MB/s':>10}")
    for stack, r in results.items():
        print(
            f"{stack:<10} {r['p50_us']:>9.0f} {r['p99_us']:>9.0f} "
            f"{r['calls_per_s']:>12,.0f} {r['bulk_mb_per_s']:>10.0f}"
        )
    if "peerflow" not in results:
        return
    ours = results["peerflow"]
    print()
    for other, r in results.items():
        if other == "peerflow":
            continue
        print(
            f"peerflow / {other}: calls/s x{ours['calls_per_s'] / r['calls_per_s']:.2f}, "
            f"bulk x{ours['bulk_mb_per_s'] / r['bulk_mb_per_s']:.2f}, "
            f"p50 x{ours['p50_us'] / r['p50_us']:.2f} (lower is better)"
        )


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_serve":
        stack = sys.argv[2]
        if stack == "peerflow":
            import _peerflow_stack

            _peerflow_stack.serve(_report_port)
        else:
            serve_asyncio(stack)
        return
    if len(sys.argv) > 3 and sys.argv[1] == "_client":
        stack, port, quick = sys.argv[2], int(sys.argv[3]), "--quick" in sys.argv
        if stack == "peerflow":
            import _peerflow_stack

            result = _peerflow_stack.client(port, quick, measure)
        else:
            result = client_asyncio(stack, port, quick)
        print(json.dumps(result))
        return

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stacks", default=",".join(STACKS))
    parser.add_argument("--quick", action="store_true", help="fewer calls, for a smoke run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per stack, interleaved; the best of each counts"
    )
    opts = parser.parse_args()
    # Stacks take turns, round after round, so a noisy moment on a shared
    # machine hits them alike; each figure is the stack's best round.
    runs: dict[str, list[dict[str, float]]] = {}
    for round_no in range(opts.rounds):
        for stack in opts.stacks.split(","):
            runs.setdefault(stack, []).append(_run_stack(stack, opts.quick))
            print(f"round {round_no + 1}: {stack} done", file=sys.stderr)
    results: dict[str, Any] = {stack: _best(found) for stack, found in runs.items()}
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {time.strftime('%F %T')}, "
        f"best of {opts.rounds} interleaved rounds"
    )
    _print_table(results)


if __name__ == "__main__":
    main()
