"""Secure a peer with mutual TLS: a parent and a peer on loopback over https (docs/how-to/tls.md).

Test certificates come from trustme (a test dependency); in production use
your own CA's files. Run: python3 examples/tls.py
"""

from __future__ import annotations

import pathlib
import tempfile

import trio
import trustme

from peerflow import (
    Context,
    PeerClient,
    PeerServer,
    PeerTlsError,
    PeerTransportError,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
    load_client_tls,
    load_server_tls,
)

steps = StepRegistry()
hello = Workflow("hello", registry=steps)


@hello.step("greet", accepts=[StartEvent])
async def greet(event: StartEvent, ctx: Context) -> StopEvent:
    return StopEvent(result=f"hello {event.data} from {ctx.node_id}")


def make_test_pki(directory: pathlib.Path) -> None:
    # --8<-- [start:pki]
    ca = trustme.CA()
    ca.cert_pem.write_to_path(directory / "ca.pem")
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_cert.private_key_and_cert_chain_pem.write_to_path(directory / "server.pem")
    client_cert = ca.issue_cert("node-a@example.test", common_name="node-a")
    client_cert.private_key_and_cert_chain_pem.write_to_path(directory / "client.pem")
    # --8<-- [end:pki]


async def serve_and_call(pki: pathlib.Path) -> None:
    # --8<-- [start:mtls]
    # key=None: the key is in the cert file. With a CA, clients must present certificates.
    server_tls = load_server_tls(pki / "server.pem", None, pki / "ca.pem")
    server = PeerServer("node-b", registry=steps, tls=server_tls, token=None)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        assert address.url.startswith("https://")

        client_tls = load_client_tls(pki / "client.pem", None, pki / "ca.pem")
        async with PeerClient.connect(address.url, "node-a", tls=client_tls, token=None) as client:
            response = await client.invoke_sub_workflow("hello", ["greet"], "over mTLS")
            print(response.result)
        # --8<-- [end:mtls]

        # --8<-- [start:no-client-cert]
        no_cert = load_client_tls(ca=pki / "ca.pem")  # trusts the server, presents nothing
        try:
            async with PeerClient.connect(address.url, "node-a", tls=no_cert, token=None) as c:
                await c.invoke_sub_workflow("hello", ["greet"], "anonymous")
        except PeerTransportError as exc:
            print("refused without a client certificate:", exc)
        # --8<-- [end:no-client-cert]

        # --8<-- [start:wrong-ca]
        other_ca = pki / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(other_ca)
        try:
            async with PeerClient.connect(
                address.url, "node-a", tls=load_client_tls(ca=other_ca), token=None
            ):
                pass
        except PeerTransportError as exc:
            print("server certificate not trusted:", exc)
        # --8<-- [end:wrong-ca]
        nursery.cancel_scope.cancel()


def show_loader_checks(pki: pathlib.Path) -> None:
    # --8<-- [start:checks]
    for cert, key, ca in [
        (pki / "missing.pem", None, pki / "ca.pem"),  # no such file
        (pki / "ca.pem", None, None),  # a certificate but no private key
        (pki / "server.pem", pki / "client.pem", None),  # key of another certificate
        (pki / "server.pem", None, pki / "other-ca.pem"),  # not signed by that CA
    ]:
        try:
            load_server_tls(cert, key, ca)
        except PeerTlsError as exc:
            print(f"PeerTlsError: path={exc.path}\n    reason={exc.reason}")
    # --8<-- [end:checks]


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pki = pathlib.Path(tmp)
        make_test_pki(pki)
        with trio.fail_after(30):
            await serve_and_call(pki)
        show_loader_checks(pki)


if __name__ == "__main__":
    trio.run(main)
