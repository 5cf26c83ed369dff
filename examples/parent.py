"""Machine A as its own process: delegate to a peer running in another process.

    python3 examples/parent.py http://127.0.0.1:7443

With no endpoint it starts ``peer_server.py`` on an ephemeral port itself,
so the two-process demo runs with one command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import trio
from analysis_steps import STEP_IDS

from peerflow import PeerClient

HERE = os.path.dirname(os.path.abspath(__file__))


async def delegate(endpoint: str) -> None:
    async with PeerClient.connect(endpoint, "node-a") as client:
        # Stream the remote run's events as they happen, then its response.
        async with client.stream_sub_workflow(
            "analyze-pipeline", STEP_IDS, {"document": "Grace Hopper wrote COBOL in Philadelphia."}
        ) as call:
            async for event in call:
                print("event from the peer:", event)
        assert call.response is not None
        call.response.raise_for_error()
        print("result:", call.response.result)
        print("exported state:", call.response.state)
        for ref_uuid in call.response.remote_refs:
            print("dereffed:", json.loads(await client.deref_session_ref(ref_uuid)))
            print("released:", await client.release_session_ref(ref_uuid))


async def main() -> None:
    if len(sys.argv) > 1:
        await delegate(sys.argv[1])
        return
    server = [sys.executable, os.path.join(HERE, "peer_server.py"), "--bind", "127.0.0.1:0"]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(trio.run_process, server, stdout=subprocess.PIPE, check=False)
        )
        try:
            with trio.fail_after(30):
                line = b""
                while not line.endswith(b"\n"):
                    line += await process.stdout.receive_some(1)
            endpoint = line.decode().split()[-1]
            print(f"started a peer process (pid {process.pid}) on {endpoint}")
            await delegate(endpoint)
        finally:
            process.terminate()


if __name__ == "__main__":
    trio.run(main)
