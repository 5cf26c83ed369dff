"""How-to: token auth between peers (docs/how-to/token-auth.md).

Run: python3 docs/samples/howto_token.py
"""

from __future__ import annotations

import os

import trio

from peerflow import (
    Context,
    PeerAuthError,
    PeerClient,
    PeerServer,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
    peer_token_env,
    resolve_peer_token,
)

steps = StepRegistry()
hello = Workflow("hello", registry=steps)


@hello.step("greet", accepts=[StartEvent])
async def greet(event: StartEvent, ctx: Context) -> StopEvent:
    return StopEvent(result=f"hello {event.data}")


async def main() -> None:
    # --8<-- [start:env]
    os.environ[peer_token_env()] = "s3cret-token"  # normally set by your deployment
    print(peer_token_env(), "->", resolve_peer_token())
    server = PeerServer("node-b", registry=steps)  # token from PEERFLOW_PEER_TOKEN
    # --8<-- [end:env]
    assert server.token == "s3cret-token"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)

            # --8<-- [start:calls]
            # The client reads the same variable and sends "authorization: Bearer ...".
            async with PeerClient.connect(address.url, "node-a") as client:
                print((await client.invoke_sub_workflow("hello", ["greet"], "friend")).result)

            for token in ["wrong-token", None]:  # a wrong token, then none at all
                try:
                    async with PeerClient.connect(address.url, "node-a", token=token) as client:
                        await client.invoke_sub_workflow("hello", ["greet"], "stranger")
                except PeerAuthError as exc:
                    print(f"token={token!r}: PeerAuthError: {exc}")
            # --8<-- [end:calls]
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
