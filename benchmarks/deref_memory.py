"""Peak memory of a large deref, on each side, as a multiple of the value's size.

The server process holds a 256 MiB bytes value as an UNTIL_EXPLICIT_DROP ref;
the client process derefs it twice: once with ``deref_session_ref`` (which
returns the joined bytes) and once streaming chunks with
``open_session_ref``. Each process reports its peak RSS growth over its
baseline, divided by the value's size.

    python3 benchmarks/deref_memory.py [--mib 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import trio

from peerflow import (
    PeerClient,
    PeerServer,
    RefLifetime,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
)

steps = StepRegistry()
wf = Workflow("mem", registry=steps)


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@wf.step("make", accepts=[StartEvent])
async def make(event: StartEvent, ctx: object) -> StopEvent:
    value = b"\x5a" * event.data  # real pages: zero-filled memory would not count in RSS
    return StopEvent(result=ctx.refs.insert(value, lifetime=RefLifetime.UNTIL_EXPLICIT_DROP))  # type: ignore[attr-defined]


async def serve() -> None:
    server = PeerServer("mem-peer", registry=steps, token=None)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        print(json.dumps({"port": address.port, "baseline": peak_rss()}), flush=True)
        # Report the peak whenever asked (one line on stdin per report).
        stdin = trio.lowlevel.FdStream(0)
        while await stdin.receive_some(1):
            print(json.dumps({"peak": peak_rss()}), flush=True)
        nursery.cancel_scope.cancel()


async def client(port: int, size: int) -> dict[str, int]:
    baseline = peak_rss()
    async with PeerClient.connect(f"http://127.0.0.1:{port}", "mem", token=None) as peer:
        ref = (await peer.invoke_sub_workflow("mem", ["make"], size)).result
        streamed = 0
        async with peer.open_session_ref(ref) as chunks:
            async for chunk in chunks:
                streamed += len(chunk)
        after_stream = peak_rss()
        data = await peer.deref_session_ref(ref)
        assert len(data) == size
        assert streamed == size
        del data
        await peer.release_session_ref(ref)
    return {"baseline": baseline, "after_stream": after_stream, "after_join": peak_rss()}


def main() -> None:
    if sys.argv[1:2] == ["_serve"]:
        trio.run(serve)
        return
    if sys.argv[1:2] == ["_client"]:
        print(json.dumps(trio.run(client, int(sys.argv[2]), int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    size = parser.parse_args().mib * 1024 * 1024
    server = subprocess.Popen(
        [sys.executable, __file__, "_serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None
    assert server.stdout is not None
    try:
        started = json.loads(server.stdout.readline())
        out = subprocess.run(
            [sys.executable, __file__, "_client", str(started["port"]), str(size)],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        server.stdin.write("\n")
        server.stdin.flush()
        server_peak = json.loads(server.stdout.readline())["peak"]
    finally:
        server.kill()
        server.wait()
    mib = size / 2**20
    print(f"value: {mib:.0f} MiB")
    print(f"server peak growth: {(server_peak - started['baseline']) / size:.2f}x the value")
    streaming = (seen["after_stream"] - seen["baseline"]) / size
    joined = (seen["after_join"] - seen["baseline"]) / size
    print(f"client peak growth, streaming chunks: {streaming:.2f}x")
    print(f"client peak growth, deref_session_ref (joined bytes): {joined:.2f}x")


if __name__ == "__main__":
    main()
