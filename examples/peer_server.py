"""Machine B as its own process: serve the analysis steps until stopped.

    python3 examples/peer_server.py --bind 127.0.0.1:7443

It prints the endpoint it serves on (useful with port 0). The token comes from
PEERFLOW_PEER_TOKEN when set. Stop it with Ctrl-C or SIGTERM: in-flight calls drain first.
"""

from __future__ import annotations

import argparse
import signal

import trio
from analysis_steps import peer_steps

from peerflow import PeerServer


async def main(host: str, port: int) -> None:
    server = PeerServer("node-b", registry=peer_steps)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, host, port)
            print(f"serving on {address.url}", flush=True)
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: draining in-flight calls", flush=True)
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:7443", help="HOST:PORT (port 0: any)")
    host, _, port = parser.parse_args().bind.rpartition(":")
    trio.run(main, host, int(port))
