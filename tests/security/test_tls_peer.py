"""TLS and mutual TLS between a real PeerClient and PeerServer on loopback.

Every refusal must reach the caller as one ``PeerTransportError`` within a
bounded time, and must leave the server untouched and serving.
"""

from __future__ import annotations

import ssl

import pytest
import trio
from security_pki import Identity, Pki, raw_client_context

import peerflow
from peerflow import (
    Limits,
    PeerClient,
    PeerServer,
    PeerTlsError,
    PeerTransportError,
    StepRegistry,
    load_client_tls,
    load_server_tls,
)

PARENT = "until_parent_finish"
EXPLICIT = "until_explicit_drop"


def _mtls_server(pki: Pki, steps: StepRegistry, limits: Limits | None = None) -> PeerServer:
    tls = load_server_tls(pki.server.cert, pki.server.key, pki.ca)
    return PeerServer("node-b", registry=steps, token=None, tls=tls, limits=limits)


def _client_tls(pki: Pki, identity: Identity) -> ssl.SSLContext:
    return load_client_tls(identity.cert, identity.key, pki.ca)


async def _serve(nursery: trio.Nursery, server: PeerServer) -> peerflow.PeerAddress:
    address: peerflow.PeerAddress = await nursery.start(server.serve, "127.0.0.1", 0)
    return address


async def _assert_still_serves(server: PeerServer, url: str, pki: Pki) -> None:
    async with PeerClient.connect(url, "node-a", tls=_client_tls(pki, pki.client)) as client:
        assert (await client.invoke_sub_workflow("w", ["echo"], "ok")).result == "ok"
    stats = server.refs.statistics()
    assert (len(server.refs), stats.runs) == (0, 0)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_mutual_tls_call_over_https(
    pki: Pki, steps: StepRegistry, nursery: trio.Nursery, host: str
) -> None:
    server = _mtls_server(pki, steps)
    with trio.fail_after(10):
        address = await _serve(nursery, server)
        assert address.url == f"https://127.0.0.1:{address.port}"
        url = f"https://{host}:{address.port}"
        async with PeerClient.connect(url, "node-a", tls=_client_tls(pki, pki.client)) as client:
            transport = client._conn.transport
            assert isinstance(transport, trio.SSLStream)
            assert transport.selected_alpn_protocol() == "h2"
            response = await client.invoke_sub_workflow("w", ["refs"], [PARENT, EXPLICIT])
            parent, explicit = response.result
            assert response.remote_refs[parent].origin_node_id == "node-b"
            assert await client.deref_session_ref(parent) == b"value-0"
            assert await client.deref_session_ref(explicit) == b"value-1"
            assert await client.release_session_ref(explicit) is True
        assert len(server.refs) == 0


async def _refused(
    url: str, tls: ssl.SSLContext | None, *, within: float = 5
) -> PeerTransportError:
    with trio.fail_after(within), pytest.raises(PeerTransportError) as info:
        async with PeerClient.connect(url, "node-a", tls=tls, token=None):
            pytest.fail("the connection was not refused")
    # One error, of the transport kind: not a timeout, not a group. (The
    # client's first call finds the connection already refused.)
    assert type(info.value) in (PeerTransportError, peerflow.PeerUnavailableError)
    return info.value


@pytest.mark.parametrize("which", ["foreign_client", "expired_client", None])
async def test_the_server_refuses_a_bad_or_missing_client_certificate(
    pki: Pki, steps: StepRegistry, nursery: trio.Nursery, which: str | None
) -> None:
    server = _mtls_server(pki, steps)
    identity = None if which is None else getattr(pki, which)
    with trio.fail_after(10):
        address = await _serve(nursery, server)
        # A context built by hand, so the server, not the loader, has to refuse.
        await _refused(address.url, raw_client_context(pki, identity))
        await _assert_still_serves(server, address.url, pki)


def test_the_client_loader_refuses_an_expired_or_foreign_certificate_up_front(pki: Pki) -> None:
    with pytest.raises(PeerTlsError, match="expired"):
        _client_tls(pki, pki.expired_client)
    with pytest.raises(PeerTlsError, match="not signed by the CA"):
        _client_tls(pki, pki.foreign_client)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_server_certificate_for_another_host_is_refused(
    pki: Pki, steps: StepRegistry, nursery: trio.Nursery, host: str
) -> None:
    tls = load_server_tls(pki.elsewhere.cert, pki.elsewhere.key, pki.ca)
    server = PeerServer("node-b", registry=steps, token=None, tls=tls)
    with trio.fail_after(10):
        address = await _serve(nursery, server)
        error = await _refused(f"https://{host}:{address.port}", _client_tls(pki, pki.client))
    assert f"{host}:{address.port}" in str(error)
    assert len(server.refs) == 0


async def test_a_plaintext_client_on_the_tls_port_fails_promptly(
    pki: Pki, steps: StepRegistry, nursery: trio.Nursery
) -> None:
    # A long handshake timeout: the refusal must not wait for it.
    server = _mtls_server(pki, steps, limits=Limits(handshake_timeout=60))
    with trio.fail_after(10):
        address = await _serve(nursery, server)
        await _refused(f"http://127.0.0.1:{address.port}", None)
        await _assert_still_serves(server, address.url, pki)


async def test_a_tls_client_on_a_plaintext_port_fails_within_the_handshake_timeout(
    pki: Pki, steps: StepRegistry, nursery: trio.Nursery
) -> None:
    server = PeerServer("node-b", registry=steps, token=None, limits=Limits(handshake_timeout=1))
    with trio.fail_after(10):
        address = await _serve(nursery, server)
        url = f"https://127.0.0.1:{address.port}"
        error = await _refused(url, _client_tls(pki, pki.client))
        assert "TLS handshake" in str(error)
        async with PeerClient.connect(address.url, "node-a", token=None) as client:
            assert (await client.invoke_sub_workflow("w", ["echo"], 3)).result == 3


async def test_a_tls_client_on_a_plaintext_port_is_refused_at_once(
    pki: Pki, steps: StepRegistry, nursery: trio.Nursery
) -> None:
    server = PeerServer("node-b", registry=steps, token=None, limits=Limits(handshake_timeout=60))
    address = await _serve(nursery, server)
    await _refused(f"https://127.0.0.1:{address.port}", _client_tls(pki, pki.client), within=3)


async def test_a_host_name_mismatch_says_what_failed(
    pki: Pki, steps: StepRegistry, nursery: trio.Nursery
) -> None:
    tls = load_server_tls(pki.elsewhere.cert, pki.elsewhere.key, pki.ca)
    server = PeerServer("node-b", registry=steps, token=None, tls=tls)
    address = await _serve(nursery, server)
    error = await _refused(address.url, _client_tls(pki, pki.client))
    assert "BrokenResourceError" not in str(error)
    assert "mismatch" in str(error)


async def test_a_refused_client_certificate_says_it_is_about_tls(
    pki: Pki, steps: StepRegistry, nursery: trio.Nursery
) -> None:
    server = _mtls_server(pki, steps)
    address = await _serve(nursery, server)
    error = await _refused(address.url, raw_client_context(pki, pki.foreign_client))
    assert "BrokenResourceError" not in str(error)
    assert "TLS" in str(error) or "SSL" in str(error)


async def test_refs_belong_to_the_client_certificate_subject(
    pki: Pki, steps: StepRegistry, nursery: trio.Nursery
) -> None:
    server = _mtls_server(pki, steps)
    with trio.fail_after(10):
        url = (await _serve(nursery, server)).url
        async with PeerClient.connect(url, "node-a", tls=_client_tls(pki, pki.client)) as owner:
            response = await owner.invoke_sub_workflow("w", ["refs"], [EXPLICIT, PARENT])
            explicit, parent = response.result
            # Same certificate and node id on a new connection: the same owner.
            async with PeerClient.connect(url, "node-a", tls=_client_tls(pki, pki.client)) as same:
                assert await same.deref_session_ref(explicit) == b"value-0"
                assert await same.deref_session_ref(parent) == b"value-1"
            # Same node id, another certificate: another owner, who sees nothing.
            tls_b = _client_tls(pki, pki.client_b)
            async with PeerClient.connect(url, "node-a", tls=tls_b) as other:
                for ref_uuid in (explicit, parent):
                    with pytest.raises(peerflow.PeerRefNotFoundError):
                        await other.deref_session_ref(ref_uuid)
                    assert await other.release_session_ref(ref_uuid) is False
                created = await other.invoke_sub_workflow("w", ["refs"], [EXPLICIT])
                (theirs,) = created.result
                assert await other.release_session_ref(theirs) is True
            assert len(server.refs) == 2
            assert await owner.release_session_ref(explicit) is True
        assert len(server.refs) == 0
