"""A peer in a process of its own, for fault tests that kill or freeze it.

    python3 tests/security/security_peer_proc.py [--lease-grace S] [--min-lease-ttl S]

Prints ``serving on <url>`` once it listens on an ephemeral loopback port,
and ``slow started`` each time its ``slow`` step is under way. Its ``stats``
step reports ``{"live_refs": n}``. Token auth is off.
"""

from __future__ import annotations

import argparse

import trio
from security_steps import build_steps

from peerflow import Limits, PeerServer


async def main(limits: Limits) -> None:
    box: list[PeerServer] = []
    steps = build_steps(
        on_slow_started=lambda: print("slow started", flush=True),
        stats=lambda: {"live_refs": len(box[0].refs)},
    )
    server = PeerServer("node-b", registry=steps, token=None, limits=limits)
    box.append(server)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        print(f"serving on {address.url}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lease-grace", type=float, default=60.0)
    parser.add_argument("--min-lease-ttl", type=float, default=1.0)
    args = parser.parse_args()
    trio.run(main, Limits(lease_grace=args.lease_grace, min_lease_ttl=args.min_lease_ttl))
