"""A pool of peers: calls spread over two nodes, refs fetched from the node that holds them.

Two peers (node-b and node-c) serve the steps of ``analysis_steps.py`` on
loopback. A ``PeerPool`` sends each document to the least busy of them, then
fetches every report ref from the node that made it. Finally node-b shuts
down, and the pool carries on with node-c alone. Run it with
``python3 examples/pool.py``.
"""

from __future__ import annotations

import json

import trio
from analysis_steps import STEP_IDS, peer_steps

from peerflow import PeerPool, PeerServer

DOCUMENTS = [
    "Ada Lovelace met Charles Babbage in London.",
    "Grace Hopper found a moth in the Mark II.",
    "Alan Turing wrote about computable numbers.",
    "Katherine Johnson computed orbits for NASA.",
]


async def serve(
    server: PeerServer, scope: trio.CancelScope, *, task_status: trio.TaskStatus[str]
) -> None:
    """Serve ``server`` on an ephemeral port until ``scope`` is cancelled."""
    with scope:
        await server.serve("127.0.0.1", 0, task_status=task_status)


async def main() -> None:
    async with trio.open_nursery() as nursery:
        urls = []
        scopes = []
        for node_id in ("node-b", "node-c"):
            scope = trio.CancelScope()
            address = await nursery.start(
                serve, PeerServer(node_id, registry=peer_steps, token=None), scope
            )
            print(f"peer {node_id} serving on {address.url}")
            urls.append(address.url)
            scopes.append(scope)

        async with PeerPool(urls, "node-a", token=None) as pool:

            async def analyze(document: str) -> None:
                response = await pool.invoke_sub_workflow(
                    "analyze-pipeline", STEP_IDS, {"document": document}, timeout=60
                )
                response.raise_for_error()
                ref_uuid = response.state["report_ref"]
                node = response.remote_refs[ref_uuid].origin_node_id
                report = json.loads(await pool.deref_session_ref(ref_uuid))
                print(f"{node} analyzed {document!r}: {report}")
                await pool.release_session_ref(ref_uuid)

            async with trio.open_nursery() as calls:
                for document in DOCUMENTS:
                    calls.start_soon(analyze, document)

            for member in pool.members():
                print(
                    f"{member.endpoint}: healthy={member.healthy} nodes={sorted(member.node_ids)}"
                )

            print("node-b shuts down; the pool carries on with node-c")
            scopes[0].cancel()
            await analyze("Margaret Hamilton wrote the Apollo guidance software.")

        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
