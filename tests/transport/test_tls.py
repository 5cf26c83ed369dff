"""TLS loaders refuse broken PEM setups up front, and their contexts really authenticate."""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peerflow
from peerflow import PeerTlsError, load_client_tls, load_server_tls
from peerflow._transport.tls import peer_principal

UTC = datetime.timezone.utc


@attrs.frozen
class Identity:
    cert: Path
    key: Path
    subject: str


@attrs.frozen
class Pki:
    ca: Path
    other_ca: Path
    server: Identity
    client: Identity
    other_client: Identity
    tmp: Path

    def issue(self, ca: trustme.CA, name: str, *identities: str, **kw: Any) -> Identity:
        return _write_identity(self.tmp, name, ca.issue_cert(*identities, **kw))


def _write_identity(tmp: Path, name: str, leaf: trustme.LeafCert) -> Identity:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    # The whole chain goes in the cert file, as a deployment would do it.
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    parsed = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return Identity(cert, key, parsed.subject.rfc4514_string())


@pytest.fixture(scope="module")
def cas() -> tuple[trustme.CA, trustme.CA]:
    return trustme.CA(), trustme.CA()


@pytest.fixture
def pki(tmp_path: Path, cas: tuple[trustme.CA, trustme.CA]) -> Pki:
    ca, other_ca = cas
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    return Pki(
        ca=tmp_path / "ca.pem",
        other_ca=tmp_path / "other-ca.pem",
        server=_write_identity(tmp_path, "server", ca.issue_cert("localhost", "127.0.0.1")),
        client=_write_identity(
            tmp_path, "client", ca.issue_cert("peer-a.example", common_name="peer-a")
        ),
        other_client=_write_identity(
            tmp_path, "other-client", other_ca.issue_cert("peer-x.example", common_name="peer-x")
        ),
        tmp=tmp_path,
    )


# --------------------------------------------------------------------------
# Good configurations


def test_server_context_with_ca_requires_client_certs(pki: Pki) -> None:
    ctx = load_server_tls(pki.server.cert, pki.server.key, pki.ca)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_server_context_without_ca_does_not_ask_for_client_certs(pki: Pki) -> None:
    ctx = load_server_tls(str(pki.server.cert), str(pki.server.key))
    assert ctx.verify_mode == ssl.CERT_NONE


def test_client_context_verifies_server_and_host_name(pki: Pki) -> None:
    ctx = load_client_tls(pki.client.cert, pki.client.key, pki.ca)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_client_context_without_anything_uses_system_trust() -> None:
    ctx = load_client_tls()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname


def test_key_may_live_in_the_cert_file(pki: Pki) -> None:
    combined = pki.tmp / "combined.pem"
    combined.write_bytes(pki.server.cert.read_bytes() + pki.server.key.read_bytes())
    load_server_tls(combined, None, pki.ca)
    load_client_tls(combined, ca=pki.ca)


def test_certificate_from_an_intermediate_chains_to_the_root(
    pki: Pki, cas: tuple[trustme.CA, trustme.CA]
) -> None:
    intermediate = cas[0].create_child_ca()
    leaf = pki.issue(intermediate, "via-intermediate", "localhost")
    load_server_tls(leaf.cert, leaf.key, pki.ca)


def test_ca_file_may_hold_only_an_intermediate(
    pki: Pki, cas: tuple[trustme.CA, trustme.CA]
) -> None:
    intermediate = cas[0].create_child_ca()
    intermediate.cert_pem.write_to_path(str(pki.tmp / "intermediate.pem"))
    leaf = pki.issue(intermediate, "via-intermediate", "localhost")
    load_server_tls(leaf.cert, leaf.key, pki.tmp / "intermediate.pem")


def test_chain_check_can_be_waived_for_a_certificate_from_another_ca(pki: Pki) -> None:
    load_client_tls(pki.other_client.cert, pki.other_client.key, pki.ca, chain_to_ca=False)
    load_server_tls(pki.other_client.cert, pki.other_client.key, pki.ca, chain_to_ca=False)


def test_far_future_expiry_uses_generalized_time_and_loads(
    pki: Pki, cas: tuple[trustme.CA, trustme.CA]
) -> None:
    # RFC 5280 encodes dates from 2050 on as GeneralizedTime, not UTCTime.
    leaf = pki.issue(cas[0], "long-lived", "localhost", not_after=datetime.datetime(2071, 1, 1))
    load_server_tls(leaf.cert, leaf.key, pki.ca)


def test_bad_alpn_is_a_value_error(pki: Pki) -> None:
    with pytest.raises(ValueError, match="alpn"):
        load_client_tls(alpn="h2")
    with pytest.raises(ValueError, match="alpn"):
        load_server_tls(pki.server.cert, pki.server.key, alpn=())


def test_loaders_are_public() -> None:
    assert peerflow.load_server_tls is load_server_tls
    assert peerflow.load_client_tls is load_client_tls
    assert {"load_server_tls", "load_client_tls"} <= set(peerflow.__all__)


# --------------------------------------------------------------------------
# Broken configurations: each names the file and says what is wrong

Loader = Callable[[Path, Path, Path], ssl.SSLContext]


def _server(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    return load_server_tls(cert, key, ca)


def _client(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    return load_client_tls(cert, key, ca)


both_loaders = pytest.mark.parametrize("load", [_server, _client], ids=["server", "client"])


@contextlib.contextmanager
def _expect_tls_error(path: Path, *reason_parts: str) -> Iterator[None]:
    with pytest.raises(PeerTlsError) as info:
        yield
    err = info.value
    assert err.path == str(path)
    assert str(path) in str(err)
    for part in reason_parts:
        assert part in err.reason, (part, err.reason)


@both_loaders
@pytest.mark.parametrize("which", ["cert", "key", "ca"])
def test_missing_file(pki: Pki, load: Loader, which: str) -> None:
    paths = {"cert": pki.server.cert, "key": pki.server.key, "ca": pki.ca}
    paths[which] = pki.tmp / "nope.pem"
    with _expect_tls_error(paths[which], "file not found"):
        load(paths["cert"], paths["key"], paths["ca"])


@both_loaders
def test_directory_instead_of_file(pki: Pki, load: Loader) -> None:
    with _expect_tls_error(pki.tmp, "directory"):
        load(pki.tmp, pki.server.key, pki.ca)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(pki: Pki) -> None:
    pki.server.key.chmod(0)
    with _expect_tls_error(pki.server.key, "not readable"):
        load_server_tls(pki.server.cert, pki.server.key, pki.ca)


@both_loaders
@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"hello, I am not a certificate\n", "not a PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "not a PEM cert"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a PEM cert"),
        (b"\x30\x82\x01\x00\xff\xfe", "binary data"),
        (b"", "not a PEM certificate"),
    ],
    ids=["text", "bad-base64", "bad-der", "der-file", "empty"],
)
@pytest.mark.parametrize("which", ["cert", "ca"])
def test_garbage_certificate(
    pki: Pki, load: Loader, which: str, content: bytes, reason: str
) -> None:
    bad = pki.tmp / "bad.pem"
    bad.write_bytes(content)
    cert, ca = (bad, pki.ca) if which == "cert" else (pki.server.cert, bad)
    with _expect_tls_error(bad, reason):
        load(cert, pki.server.key, ca)


@both_loaders
@pytest.mark.parametrize(
    "content",
    [
        b"no key here\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
    ids=["text", "corrupt"],
)
def test_garbage_key(pki: Pki, load: Loader, content: bytes) -> None:
    pki.server.key.write_bytes(content)
    with _expect_tls_error(pki.server.key, "not a PEM private key"):
        load(pki.server.cert, pki.server.key, pki.ca)


@both_loaders
def test_key_of_another_certificate(pki: Pki, load: Loader) -> None:
    with _expect_tls_error(pki.client.key, "private key does not match certificate"):
        load(pki.server.cert, pki.client.key, pki.ca)


@both_loaders
@pytest.mark.parametrize("pkcs8", [True, False], ids=["pkcs8", "traditional"])
def test_encrypted_key_is_refused_without_prompting(pki: Pki, load: Loader, pkcs8: bool) -> None:
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    pki.server.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8
            if pkcs8
            else serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with _expect_tls_error(pki.server.key, "encrypted"):
        load(pki.server.cert, pki.server.key, pki.ca)


@both_loaders
def test_certificate_from_another_ca(pki: Pki, load: Loader) -> None:
    with _expect_tls_error(pki.other_client.cert, "not signed by the CA in", str(pki.ca)):
        load(pki.other_client.cert, pki.other_client.key, pki.ca)


@both_loaders
def test_expired_certificate(pki: Pki, load: Loader, cas: tuple[trustme.CA, trustme.CA]) -> None:
    old = pki.issue(
        cas[0],
        "expired",
        "localhost",
        not_before=datetime.datetime(1998, 1, 1, tzinfo=UTC),
        not_after=datetime.datetime(1999, 12, 31, 23, 59, 58, tzinfo=UTC),
    )
    with _expect_tls_error(old.cert, "certificate expired on 1999-12-31 23:59:58 UTC"):
        load(old.cert, old.key, pki.ca)


def test_expired_certificate_is_refused_even_without_a_ca(
    pki: Pki, cas: tuple[trustme.CA, trustme.CA]
) -> None:
    old = pki.issue(
        cas[0],
        "expired",
        "localhost",
        not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC),
        not_after=datetime.datetime(2021, 6, 1, tzinfo=UTC),
    )
    with _expect_tls_error(old.cert, "expired on 2021-06-01"):
        load_server_tls(old.cert, old.key)


@both_loaders
def test_not_yet_valid_certificate(
    pki: Pki, load: Loader, cas: tuple[trustme.CA, trustme.CA]
) -> None:
    early = pki.issue(
        cas[0],
        "early",
        "localhost",
        not_before=datetime.datetime(2060, 5, 4, tzinfo=UTC),
        not_after=datetime.datetime(2061, 1, 1, tzinfo=UTC),
    )
    with _expect_tls_error(early.cert, "not valid until 2060-05-04 00:00:00 UTC"):
        load(early.cert, early.key, pki.ca)


def test_client_key_without_certificate(pki: Pki) -> None:
    with _expect_tls_error(pki.client.key, "without a client certificate"):
        load_client_tls(key=pki.client.key, ca=pki.ca)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_certificate_loads_or_raises_tls_error(pki: Pki, data: st.DataObject) -> None:
    leaf_pem = pki.server.cert.read_text().split("-----END CERTIFICATE-----")[0]
    der = bytearray(ssl.PEM_cert_to_DER_cert(leaf_pem + "-----END CERTIFICATE-----\n"))
    for _ in range(data.draw(st.integers(1, 4))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    der = der[: data.draw(st.integers(1, len(der)))]
    bad = pki.tmp / "fuzzed.pem"
    bad.write_text(ssl.DER_cert_to_PEM_cert(bytes(der)))
    try:
        load_server_tls(bad, pki.server.key, pki.ca)
    except PeerTlsError as err:
        blamed = err.path
    else:
        blamed = None
    assert blamed in (None, str(bad), str(pki.server.key))


# --------------------------------------------------------------------------
# The contexts over a real loopback TCP connection


@attrs.define
class Outcome:
    server_error: BaseException | None = None
    client_error: BaseException | None = None
    principal: str | None = None
    alpn: str | None = None
    client_alpn: str | None = None
    received: bytes | None = None
    cipher: str | None = None


async def _exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = "localhost"
) -> Outcome:
    outcome = Outcome()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def serve_one() -> None:
        tcp = await listeners[0].accept()
        tls = trio.SSLStream(tcp, server_ctx, server_side=True)
        try:
            await tls.do_handshake()
            outcome.principal = peer_principal(tls)
            outcome.alpn = tls.selected_alpn_protocol()
            await tls.send_all(b"hello")
        except trio.BrokenResourceError as exc:
            outcome.server_error = exc.__cause__
        finally:
            await trio.aclose_forcefully(tls)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            tls = trio.SSLStream(tcp, client_ctx, server_hostname=server_hostname)
            try:
                await tls.do_handshake()
                outcome.client_alpn = tls.selected_alpn_protocol()
                cipher = tls.cipher()
                outcome.cipher = cipher[0] if cipher else None
                outcome.received = await tls.receive_some()
            except trio.BrokenResourceError as exc:
                outcome.client_error = exc.__cause__
            finally:
                await trio.aclose_forcefully(tls)
        await listeners[0].aclose()
    return outcome


async def test_mutual_tls_handshake_negotiates_h2_and_names_the_client(pki: Pki) -> None:
    server = load_server_tls(pki.server.cert, pki.server.key, pki.ca)
    client = load_client_tls(pki.client.cert, pki.client.key, pki.ca, alpn=("h2",))
    outcome = await _exchange(server, client)
    assert outcome.server_error is None
    assert outcome.client_error is None
    assert outcome.received == b"hello"
    assert outcome.alpn == outcome.client_alpn == "h2"
    assert outcome.principal == pki.client.subject
    assert "CN=peer-a" in pki.client.subject


async def test_ip_address_as_server_name(pki: Pki) -> None:
    server = load_server_tls(pki.server.cert, pki.server.key, pki.ca)
    client = load_client_tls(pki.client.cert, pki.client.key, pki.ca)
    outcome = await _exchange(server, client, server_hostname="127.0.0.1")
    assert outcome.received == b"hello"


async def test_alpn_falls_back_to_http11_for_clients_without_h2(pki: Pki) -> None:
    server = load_server_tls(pki.server.cert, pki.server.key)
    client = load_client_tls(ca=pki.ca, alpn=("http/1.1",))
    outcome = await _exchange(server, client)
    assert outcome.alpn == "http/1.1"
    # Without a CA the server never verifies a client, so nobody is named.
    assert outcome.principal is None


async def test_tls12_uses_only_h2_approved_ciphers(pki: Pki) -> None:
    server = load_server_tls(pki.server.cert, pki.server.key)
    client = load_client_tls(ca=pki.ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    outcome = await _exchange(server, client)
    assert outcome.received == b"hello"
    assert outcome.cipher is not None
    assert "GCM" in outcome.cipher or "CHACHA20" in outcome.cipher


async def test_tls12_client_offering_only_cbc_suites_is_refused(pki: Pki) -> None:
    # RFC 7540 9.2.2 blocklists these suites for HTTP/2.
    server = load_server_tls(pki.server.cert, pki.server.key)
    client = load_client_tls(ca=pki.ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384")
    outcome = await _exchange(server, client)
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert outcome.received is None


async def test_client_without_certificate_is_refused(pki: Pki) -> None:
    server = load_server_tls(pki.server.cert, pki.server.key, pki.ca)
    client = load_client_tls(ca=pki.ca)
    outcome = await _exchange(server, client)
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert outcome.received is None
    assert outcome.principal is None


async def test_client_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    server = load_server_tls(pki.server.cert, pki.server.key, pki.ca)
    client = load_client_tls(pki.other_client.cert, pki.other_client.key, pki.ca, chain_to_ca=False)
    outcome = await _exchange(server, client)
    assert isinstance(outcome.server_error, ssl.SSLCertVerificationError)
    assert outcome.received is None


async def test_server_from_another_ca_is_refused(pki: Pki) -> None:
    server = load_server_tls(pki.server.cert, pki.server.key)
    client = load_client_tls(ca=pki.other_ca)
    outcome = await _exchange(server, client)
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert outcome.received is None


async def test_host_name_mismatch_is_refused(pki: Pki) -> None:
    server = load_server_tls(pki.server.cert, pki.server.key, pki.ca)
    client = load_client_tls(pki.client.cert, pki.client.key, pki.ca)
    outcome = await _exchange(server, client, server_hostname="elsewhere.example")
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert "mismatch" in outcome.client_error.verify_message
    assert outcome.received is None


# --------------------------------------------------------------------------
# peer_principal


@attrs.frozen
class FakeConnection:
    cert: Any

    def getpeercert(self) -> Any:
        return self.cert


_OIDS = {
    "commonName": NameOID.COMMON_NAME,
    "organizationName": NameOID.ORGANIZATION_NAME,
    "organizationalUnitName": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "localityName": NameOID.LOCALITY_NAME,
    "domainComponent": NameOID.DOMAIN_COMPONENT,
}


def test_no_certificate_means_no_principal() -> None:
    assert peer_principal(FakeConnection(None)) is None
    # getpeercert() returns {} for a certificate that was not verified.
    assert peer_principal(FakeConnection({})) is None


def test_principal_is_most_specific_first_with_multi_valued_rdns() -> None:
    subject = (
        (("domainComponent", "org"),),
        (("organizationName", "Example, Inc."),),
        (("commonName", "peer-a"), ("userId", "42")),
    )
    assert peer_principal(FakeConnection({"subject": subject})) == (
        "CN=peer-a+UID=42,O=Example\\, Inc.,DC=org"
    )


dn_values = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12
)


@given(
    rdns=st.lists(
        st.tuples(st.sampled_from(sorted(_OIDS)), dn_values),
        min_size=1,
        max_size=4,
    )
)
def test_principal_matches_cryptography_rfc4514(rdns: list[tuple[str, str]]) -> None:
    subject = tuple(((name, value),) for name, value in rdns)
    expected = x509.Name([x509.NameAttribute(_OIDS[name], value) for name, value in rdns])
    assert peer_principal(FakeConnection({"subject": subject})) == expected.rfc4514_string()
