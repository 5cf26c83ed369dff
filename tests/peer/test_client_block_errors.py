"""A client's ``async with`` block raises what its body raised, even in a cancelled scope.

A client's exit closes its connection; in a scope that is being cancelled
that could raise Cancelled over the body's error (which the scope would then
swallow), or leave the error in a group beside the Cancelled.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio

from peerflow import (
    HttpPeerClient,
    PeerAddress,
    PeerClient,
    PeerTimeoutError,
    WebSocketPeerClient,
)

CLIENTS: dict[str, Callable[[str], AbstractAsyncContextManager[Any]]] = {
    "grpc": lambda url: PeerClient.connect(url, "node-a", token=None),
    "http": lambda url: HttpPeerClient(url, "node-a", token=None),
    "websocket": lambda url: WebSocketPeerClient.connect(url, "node-a", token=None),
}


async def raise_in_a_cancelled_block(kind: str, url: str, error: Exception) -> None:
    with trio.CancelScope() as scope:
        async with CLIENTS[kind](url) as client:
            assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
            scope.cancel()
            raise error


@pytest.mark.parametrize("kind", list(CLIENTS))
@pytest.mark.parametrize("error", [KeyError("mine"), PeerTimeoutError("a call's own")])
async def test_the_body_s_error_comes_out_alone_when_the_scope_is_cancelled_too(
    address: PeerAddress, kind: str, error: Exception
) -> None:
    with trio.fail_after(10), pytest.raises(type(error)) as raised:
        await raise_in_a_cancelled_block(kind, address.url, error)
    assert raised.value is error
