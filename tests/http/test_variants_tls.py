"""HTTP/JSON and WebSocket over TLS: https/wss with mTLS identities owning their refs."""

from __future__ import annotations

import pathlib
import ssl

import pytest
import trio
import trustme

import peerflow
from peer_steps import Probe, build_steps
from peerflow import (
    HttpPeerClient,
    PeerAddress,
    PeerServer,
    WebSocketPeerClient,
    load_client_tls,
    load_server_tls,
)

TIMEOUT = 20


@pytest.fixture
def pki(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    ca = trustme.CA()
    files = {"ca": tmp_path / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name, leaf in [
        ("server", ca.issue_cert("127.0.0.1")),
        ("a", ca.issue_cert("a.example", common_name="peer-a")),
        ("b", ca.issue_cert("b.example", common_name="peer-b")),
    ]:
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        files[f"{name}-key"] = tmp_path / f"{name}.key"
        leaf.private_key_pem.write_to_path(str(files[f"{name}-key"]))
    return files


@pytest.fixture
async def address(pki: dict[str, pathlib.Path], nursery: trio.Nursery) -> PeerAddress:
    tls = load_server_tls(pki["server"], pki["server-key"], pki["ca"])  # mTLS
    server = PeerServer("node-b", registry=build_steps(Probe()), tls=tls, token=None)
    with trio.fail_after(TIMEOUT):
        address: PeerAddress = await nursery.start(server.serve, "127.0.0.1", 0)
    assert address.scheme == "https"
    return address


def client_tls(
    pki: dict[str, pathlib.Path], who: str, alpn: tuple[str, ...] = ("http/1.1",)
) -> ssl.SSLContext:
    return load_client_tls(pki[who], pki[f"{who}-key"], pki["ca"], alpn=alpn)


async def test_http_json_over_mtls(address: PeerAddress, pki: dict[str, pathlib.Path]) -> None:
    with trio.fail_after(TIMEOUT):
        async with HttpPeerClient(address.url, "node-a", tls=client_tls(pki, "a"), token=None) as a:
            response = await a.invoke_sub_workflow(
                "w", ["refs"], [["until_explicit_drop", "bytes"]]
            )
            (ref_uuid,) = response.result
            assert await a.deref_session_ref(ref_uuid) == b"value-0"
            # Same node id, another certificate: another identity, not the owner.
            tls_b = client_tls(pki, "b")
            async with HttpPeerClient(address.url, "node-a", tls=tls_b, token=None) as b:
                with pytest.raises(peerflow.PeerRefNotFoundError):
                    await b.deref_session_ref(ref_uuid)
            assert await a.release_session_ref(ref_uuid)


async def test_websocket_over_mtls(address: PeerAddress, pki: dict[str, pathlib.Path]) -> None:
    url = address.url.replace("https://", "wss://")
    with trio.fail_after(TIMEOUT):
        async with WebSocketPeerClient.connect(
            url, "node-a", tls=client_tls(pki, "a"), token=None
        ) as client:
            assert (await client.invoke_sub_workflow("w", ["echo"], b"x")).result == b"x"


async def test_a_tls_context_offering_the_wrong_protocol_is_explained(
    address: PeerAddress, pki: dict[str, pathlib.Path]
) -> None:
    h2_first = client_tls(pki, "a", alpn=("h2", "http/1.1"))
    with trio.fail_after(TIMEOUT):
        async with HttpPeerClient(address.url, "node-a", tls=h2_first, token=None) as client:
            with pytest.raises(peerflow.PeerTransportError, match="ALPN"):
                await client.invoke_sub_workflow("w", ["echo"], 1)
        with pytest.raises(peerflow.PeerTransportError, match="ALPN"):
            async with WebSocketPeerClient.connect(address.url, "node-a", tls=h2_first, token=None):
                pass
        # And the other way round: PeerClient needs h2, so agreeing on HTTP/1.1 is explained.
        with pytest.raises(peerflow.PeerTransportError, match=r"chose http/1\.1 by ALPN"):
            async with peerflow.PeerClient.connect(
                address.url, "node-a", tls=client_tls(pki, "a"), token=None
            ):
                pass
