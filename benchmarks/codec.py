"""Codec throughput against plain msgpack on the same data.

Run: ``python benchmarks/codec.py``. Prints per-call times and the ratio of
peerflow's codec to ``msgpack.packb``/``unpackb`` of the identical map, for a
~1 KB nested InvokeSubWorkflow request and a 1 MiB DerefSessionRef chunk.
Targets: <= 2x on the small request, <= 1.1x on the 1 MiB payload.
"""

from __future__ import annotations

import os
import timeit
from collections.abc import Callable

import msgpack

from peerflow._wire.codec import decode_message, encode_deref_chunk_header, encode_message
from peerflow._wire.envelopes import DerefChunk, InvokeSubWorkflowRequest


def _best(fn: Callable[[], object], budget: float = 1.0) -> float:
    """Best per-call time in seconds, over repeats that fit in ``budget``."""
    number = max(1, int(0.05 / max(timeit.timeit(fn, number=1), 1e-7)))
    repeats = max(3, int(budget / (timeit.timeit(fn, number=number) or 1e-9)))
    return min(timeit.repeat(fn, number=number, repeat=min(repeats, 20))) / number


def _row(label: str, ours: float, plain: float) -> None:
    print(f"  {label:<30} {ours * 1e6:10.2f} us {plain * 1e6:10.2f} us {ours / plain:8.2f}x")


def _compare(label: str, message: InvokeSubWorkflowRequest | DerefChunk) -> None:
    data = encode_message(message)
    plain = msgpack.unpackb(data)
    kind = type(message)
    print(f"{label} ({len(data)} bytes)")
    _row("encode", _best(lambda: encode_message(message)), _best(lambda: msgpack.packb(plain)))
    _row("decode", _best(lambda: decode_message(kind, data)), _best(lambda: msgpack.unpackb(data)))


def main() -> None:
    request = InvokeSubWorkflowRequest(
        workflow_name="summarise-documents",
        step_ids=("fetch", "rank", "summarise"),
        input={
            "query": "structured concurrency",
            "rows": [
                {"id": i, "title": f"document {i}", "score": i * 0.75, "tags": ["a", "b"]}
                for i in range(12)
            ],
            "options": {"limit": 5, "lang": "en", "explain": True},
        },
        timeout_ms=30_000,
    )
    chunk = DerefChunk(os.urandom(1 << 20))

    print(f"{'':32} {'peerflow':>13} {'msgpack':>13} {'ratio':>9}")
    _compare("1 KB request", request)
    _compare("1 MiB deref chunk", chunk)
    # The transport's zero-copy path: header only; the payload is sent as a view.
    _row(
        "1 MiB chunk header only",
        _best(lambda: encode_deref_chunk_header(len(chunk.payload))),
        _best(lambda: msgpack.packb({"v": 1, "payload": chunk.payload})),
    )


if __name__ == "__main__":
    main()
