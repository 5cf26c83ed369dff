"""Raw HTTP/2 driver benchmark: echo server and client in separate processes on loopback.

Reports sequential unary latency (p50/p99), calls/s with 64 concurrent
streams on one connection, and MB/s for a 64 MiB response. Each phase also
reports the CPU time each process spent per call (or per MB): unlike the
wall-clock figures it barely moves when other work shares the machine, so
compare changes by it first.

    python benchmarks/h2_raw.py [--calls N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

from peerflow._transport.h2conn import H2ClientConnection, ServerStream, open_h2_client
from peerflow._transport.listener import connect_tcp, serve_tcp

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/bench/Echo"),
    (b":authority", b"bench"),
    (b"content-type", b"application/grpc+msgpack"),
    (b"te", b"trailers"),
]
BULK_PATH = [(k, b"/bench/Bulk" if k == b":path" else v) for k, v in REQUEST]
CPU_PATH = [(k, b"/bench/Cpu" if k == b":path" else v) for k, v in REQUEST]
OK = [(b":status", b"200"), (b"content-type", b"application/grpc+msgpack")]
TRAILERS = [(b"grpc-status", b"0")]
BULK = memoryview(bytes(64 * 1024 * 1024))


async def handler(stream: ServerStream) -> None:
    body = await stream.receive_all()
    if stream.path == b"/bench/Bulk":
        await stream.send_response(OK, BULK, TRAILERS)
    elif stream.path == b"/bench/Cpu":
        await stream.send_response(OK, str(time.process_time()).encode(), TRAILERS)
    else:
        await stream.send_response(OK, body, TRAILERS)


def run_server(port_queue: multiprocessing.Queue[int]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            [(_, port)] = await nursery.start(
                lambda task_status: serve_tcp(handler, 0, host="127.0.0.1", task_status=task_status)
            )
            port_queue.put(port)

    trio.run(main)


async def measured(
    conn: H2ClientConnection, label: str, units: float, phase: Callable[[], Awaitable[None]]
) -> float:
    """Run ``phase`` and print the CPU seconds each process spent per unit; return wall time."""

    async def server_cpu() -> float:
        s = await conn.open_stream(CPU_PATH, end_stream=True)
        await s.receive_headers()
        return float(await s.receive_all())

    server_start, client_start = await server_cpu(), time.process_time()
    start = time.perf_counter()
    await phase()
    elapsed = time.perf_counter() - start
    client_used = time.process_time() - client_start
    server_used = await server_cpu() - server_start
    print(
        f"  {label}: server {server_used / units * 1e6:.1f} us, "
        f"client {client_used / units * 1e6:.1f} us of CPU"
    )
    return elapsed


async def client(port: int, calls: int) -> None:
    stream = await connect_tcp("127.0.0.1", port)
    body = b"x" * 100
    async with open_h2_client(stream) as conn:

        async def call() -> None:
            s = await conn.open_stream(REQUEST)
            await s.send_data(body, end_stream=True)
            await s.receive_headers()
            await s.receive_all()

        for _ in range(200):
            await call()
        latencies = []
        for _ in range(calls):
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)
        latencies.sort()
        p50 = statistics.median(latencies) * 1e6
        p99 = latencies[int(len(latencies) * 0.99)] * 1e6
        print(f"sequential: p50 {p50:.0f} us, p99 {p99:.0f} us")

        done = 0
        total = calls * 4

        async def worker() -> None:
            nonlocal done
            while done < total:
                done += 1
                await call()

        async def in_flight() -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(64):
                    nursery.start_soon(worker)

        elapsed = await measured(conn, "per call", total, in_flight)
        print(f"64 in flight: {total / elapsed:,.0f} calls/s")

        size = 0

        async def bulk() -> None:
            nonlocal size
            s = await conn.open_stream(BULK_PATH, end_stream=True)
            await s.receive_headers()
            while chunk := await s.receive_data():
                size += len(chunk)

        elapsed = await measured(conn, "per MB", len(BULK) / 1e6, bulk)
        print(f"64 MiB response: {size / elapsed / 1e6:,.0f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[int] = ctx.Queue()
    server = ctx.Process(target=run_server, args=(queue,), daemon=True)
    server.start()
    try:
        port = queue.get(timeout=30)
        trio.run(client, port, args.calls)
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    main()
