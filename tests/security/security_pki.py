"""A throwaway PKI for the TLS tests: two CAs, a server identity, client identities."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import attrs
import trustme

UTC = datetime.timezone.utc


@attrs.frozen
class Identity:
    """A certificate (with its chain) and its private key, as PEM files."""

    cert: Path
    key: Path


@attrs.frozen
class Pki:
    """Files a deployment would have, written under ``tmp``.

    ``server`` is issued for 127.0.0.1 and localhost; ``client`` and
    ``client_b`` are two distinct client identities from ``ca``;
    ``foreign_client`` comes from another CA; ``expired_client`` from ``ca``
    but out of date; ``elsewhere`` is a server certificate for
    ``other.example`` only.
    """

    ca: Path
    server: Identity
    client: Identity
    client_b: Identity
    foreign_client: Identity
    expired_client: Identity
    elsewhere: Identity


def _write(tmp: Path, name: str, leaf: trustme.LeafCert) -> Identity:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return Identity(cert, key)


def make_pki(tmp: Path) -> Pki:
    """Issue every identity the TLS tests need into ``tmp``."""
    ca, foreign = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    return Pki(
        ca=tmp / "ca.pem",
        server=_write(tmp, "server", ca.issue_cert("127.0.0.1", "localhost")),
        client=_write(tmp, "client", ca.issue_cert("peer-a.example", common_name="peer-a")),
        client_b=_write(tmp, "client-b", ca.issue_cert("peer-b.example", common_name="peer-b")),
        foreign_client=_write(
            tmp, "foreign", foreign.issue_cert("peer-x.example", common_name="peer-x")
        ),
        expired_client=_write(
            tmp,
            "expired",
            ca.issue_cert(
                "peer-old.example",
                common_name="peer-old",
                not_before=datetime.datetime(2000, 1, 1, tzinfo=UTC),
                not_after=datetime.datetime(2001, 1, 1, tzinfo=UTC),
            ),
        ),
        elsewhere=_write(tmp, "elsewhere", ca.issue_cert("other.example")),
    )


def raw_client_context(pki: Pki, identity: Identity | None) -> ssl.SSLContext:
    """A client context built without peerflow's loader checks.

    It presents ``identity`` as it is, so the *server* has to be the one
    that refuses a foreign or expired certificate.
    """
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.set_alpn_protocols(["h2"])
    if identity is not None:
        ctx.load_cert_chain(str(identity.cert), str(identity.key))
    return ctx
