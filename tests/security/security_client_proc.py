"""A parent in a process of its own that takes UNTIL_PARENT_FINISH refs and waits to be killed.

    python3 tests/security/security_client_proc.py URL LEASE_TTL [--no-leases]

Connects as node ``node-a``, asks the peer for two ``until_parent_finish``
refs and one ``until_explicit_drop`` ref, prints ``holding <json list of
their ids>`` and then sleeps until killed. ``--no-leases`` behaves like a
client that knows no leases, so the refs hang on its connection instead.
"""

from __future__ import annotations

import argparse
import json

import trio

from peerflow import PeerClient


async def main(url: str, lease_ttl: float, leases: bool) -> None:
    async with PeerClient.connect(url, "node-a", token=None, lease_ttl=lease_ttl) as client:
        if not leases:
            client._leases_supported = False
        response = await client.invoke_sub_workflow(
            "w", ["refs"], ["until_parent_finish", "until_parent_finish", "until_explicit_drop"]
        )
        print("holding", json.dumps(response.result), flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("lease_ttl", type=float)
    parser.add_argument("--no-leases", action="store_true")
    args = parser.parse_args()
    trio.run(main, args.url, args.lease_ttl, not args.no_leases)
