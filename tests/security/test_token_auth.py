"""Bearer-token auth end to end, over real loopback sockets.

What a caller with a missing or wrong token sees: ``PeerClient.connect``
opens the client's lease with a call as it enters its block, so that first
call is the one the peer refuses, and entering the block raises one
``PeerAuthError`` (never a group). No step runs and the peer keeps no state
for the refused caller.
"""

from __future__ import annotations

import logging

import pytest
import trio
from security_pki import Pki

import peerflow
from peerflow import PeerAuthError, PeerClient, PeerServer, StepRegistry, load_server_tls

TOKEN = "s3cret"
PARENT = "until_parent_finish"
EXPLICIT = "until_explicit_drop"


async def _serve(nursery: trio.Nursery, server: PeerServer, host: str = "127.0.0.1") -> str:
    address: peerflow.PeerAddress = await nursery.start(server.serve, host, 0)
    return f"{address.scheme}://127.0.0.1:{address.port}"


def _assert_untouched(server: PeerServer) -> None:
    stats = server.refs.statistics()
    assert (len(server.refs), stats.runs, stats.scopes) == (0, 0, 0)
    assert len(server.service.leases) == 0


async def test_the_right_token_is_accepted(steps: StepRegistry, nursery: trio.Nursery) -> None:
    server = PeerServer("node-b", registry=steps, token=TOKEN)
    with trio.fail_after(10):
        url = await _serve(nursery, server)
        async with PeerClient.connect(url, "node-a", token=TOKEN) as client:
            response = await client.invoke_sub_workflow("w", ["refs"], [PARENT])
            (ref_uuid,) = response.result
            assert await client.deref_session_ref(ref_uuid) == b"value-0"
            async with client.stream_sub_workflow("w", ["ticks"], 2) as call:
                assert [event.n async for event in call] == [0, 1]  # type: ignore[attr-defined]
        assert len(server.refs) == 0


@pytest.mark.parametrize("token", [None, "wrong", "s3cret2", "S3CRET", "s3cre"])
async def test_a_missing_or_wrong_token_is_one_auth_error_on_connect(
    steps: StepRegistry, nursery: trio.Nursery, token: str | None
) -> None:
    server = PeerServer("node-b", registry=steps, token=TOKEN)
    with trio.fail_after(10):
        url = await _serve(nursery, server)
        with pytest.raises(PeerAuthError) as info:
            async with PeerClient.connect(url, "node-a", token=token):
                pytest.fail("the block was entered without credentials")
    assert type(info.value) is PeerAuthError
    assert "token" in str(info.value)
    _assert_untouched(server)


async def test_a_refused_caller_does_not_disturb_an_authorized_one(
    steps: StepRegistry, nursery: trio.Nursery
) -> None:
    server = PeerServer("node-b", registry=steps, token=TOKEN)
    with trio.fail_after(10):
        url = await _serve(nursery, server)
        async with PeerClient.connect(url, "node-a", token=TOKEN) as client:
            with pytest.raises(PeerAuthError):
                async with PeerClient.connect(url, "node-a", token="wrong"):
                    pass
            assert (await client.invoke_sub_workflow("w", ["echo"], 7)).result == 7


async def test_the_token_comes_from_the_environment_on_both_sides(
    steps: StepRegistry, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PEERFLOW_PEER_TOKEN", "from-env\n")
    server = PeerServer("node-b", registry=steps)
    assert server.token == "from-env"
    with trio.fail_after(10):
        url = await _serve(nursery, server)
        async with PeerClient.connect(url, "node-a") as client:
            assert (await client.invoke_sub_workflow("w", ["echo"], 1)).result == 1
        # Proof that the server really checks it: opting out of the env token fails.
        with pytest.raises(PeerAuthError):
            async with PeerClient.connect(url, "node-a", token=None):
                pass
        monkeypatch.setenv("PEERFLOW_PEER_TOKEN", "another")
        with pytest.raises(PeerAuthError):
            async with PeerClient.connect(url, "node-a"):
                pass


@pytest.mark.parametrize("client_token", [None, "anything"])
async def test_a_server_without_a_token_accepts_every_caller(
    steps: StepRegistry,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    client_token: str | None,
) -> None:
    # An explicit None wins over the environment.
    monkeypatch.setenv("PEERFLOW_PEER_TOKEN", TOKEN)
    server = PeerServer("node-b", registry=steps, token=None)
    with trio.fail_after(10):
        url = await _serve(nursery, server)
        async with PeerClient.connect(url, "node-a", token=client_token) as client:
            assert (await client.invoke_sub_workflow("w", ["echo"], 2)).result == 2


def _open_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "peerflow.peer.server" and record.levelno == logging.WARNING
    ]


async def test_serving_on_all_interfaces_without_a_token_warns_once(
    steps: StepRegistry, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="peerflow.peer.server")
    server = PeerServer("node-b", registry=steps, token=None)
    with trio.fail_after(10):
        url = await _serve(nursery, server, "0.0.0.0")
        for _ in range(2):
            async with PeerClient.connect(url, "node-a", token=None) as client:
                await client.invoke_sub_workflow("w", ["echo"], 1)
    (record,) = _open_warnings(caplog)
    assert "0.0.0.0" in record.getMessage()
    assert "PEERFLOW_PEER_TOKEN" in record.getMessage()


@pytest.mark.parametrize(
    ("host", "token"), [("127.0.0.1", None), ("0.0.0.0", TOKEN), ("127.0.0.1", TOKEN)]
)
async def test_no_warning_on_loopback_or_with_a_token(
    steps: StepRegistry,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    host: str,
    token: str | None,
) -> None:
    caplog.set_level(logging.WARNING, logger="peerflow.peer.server")
    server = PeerServer("node-b", registry=steps, token=token)
    with trio.fail_after(10):
        await _serve(nursery, server, host)
    assert _open_warnings(caplog) == []


async def test_tls_without_client_certificates_still_warns_on_all_interfaces(
    steps: StepRegistry, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, pki: Pki
) -> None:
    caplog.set_level(logging.WARNING, logger="peerflow.peer.server")
    tls = load_server_tls(pki.server.cert, pki.server.key)
    server = PeerServer("node-b", registry=steps, token=None, tls=tls)
    with trio.fail_after(10):
        await _serve(nursery, server, "0.0.0.0")
    assert len(_open_warnings(caplog)) == 1


async def test_refs_belong_to_the_token_principal_and_the_node_id(
    steps: StepRegistry, nursery: trio.Nursery
) -> None:
    server = PeerServer("node-b", registry=steps, token=TOKEN)
    with trio.fail_after(10):
        url = await _serve(nursery, server)
        async with PeerClient.connect(url, "node-a", token=TOKEN) as owner:
            response = await owner.invoke_sub_workflow("w", ["refs"], [EXPLICIT, PARENT])
            explicit, parent = response.result
            # Same token, same node id, another connection: the same owner.
            async with PeerClient.connect(url, "node-a", token=TOKEN) as same:
                assert await same.deref_session_ref(explicit) == b"value-0"
                assert await same.deref_session_ref(parent) == b"value-1"
            # Same token, another node id: another owner, who sees nothing.
            async with PeerClient.connect(url, "node-x", token=TOKEN) as other:
                for ref_uuid in (explicit, parent):
                    with pytest.raises(peerflow.PeerRefNotFoundError):
                        await other.deref_session_ref(ref_uuid)
                    assert await other.release_session_ref(ref_uuid) is False
            assert len(server.refs) == 2
            assert await owner.release_session_ref(explicit) is True
        assert len(server.refs) == 0
