"""Build the ``ssl.SSLContext`` objects peers use, after proving the PEM files are sound.

A broken TLS setup otherwise shows up as an opaque handshake failure on the
*other* machine, long after start-up. So the loaders check everything they can
up front -- the files exist and parse, the key matches the certificate, the
certificate is in date and chains to the CA -- and raise
:class:`~peerflow.PeerTlsError` naming the file and the reason in plain words.

The chain check is a real TLS handshake between two throwaway contexts over
in-memory BIOs, with the side that verifies playing the role the peer will
play in production. That uses OpenSSL's own verifier (signatures, purposes,
dates of the whole chain) with nothing beyond the stdlib. Only the validity
dates of the certificate are read by hand (a few lines of DER walking),
because the stdlib exposes no public way to decode a certificate that has not
been verified yet, and an expired certificate is worth a message with a date.
"""

from __future__ import annotations

import base64
import datetime
import enum
import os
import re
import ssl
from collections.abc import Sequence
from typing import Any, NoReturn, Protocol, TypeAlias

import attrs

from ..errors import PeerTlsError

__all__ = ["DEFAULT_ALPN", "load_client_tls", "load_server_tls", "peer_principal"]

StrPath: TypeAlias = "str | os.PathLike[str]"

DEFAULT_ALPN: tuple[str, ...] = ("h2", "http/1.1")

# RFC 7540 section 9.2.2 forbids the TLS 1.2 CBC suites that Python's default
# list still allows; TLS 1.3 suites are configured separately and all allowed.
_H2_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"

_CERT_BLOCK = re.compile(
    r"-----BEGIN CERTIFICATE-----(?P<body>.*?)-----END CERTIFICATE-----", re.DOTALL
)
_KEY_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")

# The handshake over memory BIOs takes two or three round trips; the bound
# only guards against looping forever on an OpenSSL surprise.
_MAX_SELF_CHECK_ROUNDS = 16

# OpenSSL X509_V_ERR_* codes that mean "this certificate was not issued by that CA".
_NOT_SIGNED_BY_CA = frozenset({2, 7, 18, 19, 20, 21})
_X509_V_ERR_CERT_NOT_YET_VALID = 9
_X509_V_ERR_CERT_HAS_EXPIRED = 10
_X509_V_ERR_INVALID_PURPOSE = 26


class _Role(enum.Enum):
    SERVER = "server"
    CLIENT = "client"


def load_server_tls(
    cert: StrPath,
    key: StrPath | None,
    ca: StrPath | None = None,
    *,
    alpn: Sequence[str] = DEFAULT_ALPN,
    chain_to_ca: bool = True,
) -> ssl.SSLContext:
    """Build the server-side TLS context a peer serves with.

    The context speaks TLS 1.2 or newer and offers ALPN ``h2`` then
    ``http/1.1`` (so gRPC, HTTP/JSON and WebSocket share one port). With a
    *ca*, clients must present a certificate signed by it (mutual TLS), and
    :func:`peer_principal` then names the caller.

    Args:
        cert: PEM file with the server certificate, optionally followed by
            its intermediate certificates.
        key: PEM file with the unencrypted private key, or None when it is
            in the *cert* file.
        ca: PEM file with the CA certificate(s) that client certificates
            must chain to. Without it, client certificates are not requested.
        alpn: ALPN protocols to offer, in order of preference.
        chain_to_ca: also require *cert* itself to chain to *ca*. Turn this
            off only when the server's own certificate comes from a different
            CA than the client certificates it accepts.

    Raises:
        PeerTlsError: a file is missing, unreadable or not PEM; the key is
            encrypted or does not match the certificate; the certificate has
            expired or is not yet valid; or it is not signed by the CA. The
            error's ``path`` names the file to blame.
    """
    cert_path = _fspath(cert)
    key_path = cert_path if key is None else _fspath(key)
    ca_path = None if ca is None else _fspath(ca)

    _check_certificate_file(cert_path)
    _check_key_file(key_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_policy(ctx, alpn)
    _load_cert_chain(ctx, cert_path, key_path)
    if ca_path is not None:
        _load_ca(ctx, ca_path)
        ctx.verify_mode = ssl.CERT_REQUIRED
        if chain_to_ca:
            _prove_chain(_Role.SERVER, cert_path, key_path, ca_path)
    return ctx


def load_client_tls(
    cert: StrPath | None = None,
    key: StrPath | None = None,
    ca: StrPath | None = None,
    *,
    alpn: Sequence[str] = DEFAULT_ALPN,
    chain_to_ca: bool = True,
) -> ssl.SSLContext:
    """Build the client-side TLS context used to connect to a peer over ``https``.

    The context verifies the server's certificate and host name, speaks TLS
    1.2 or newer and offers ALPN ``h2`` then ``http/1.1`` (pass
    ``alpn=("h2",)`` for a gRPC-only connection).

    Args:
        cert: PEM file with a client certificate for mutual TLS (optionally
            followed by intermediates), or None to present none.
        key: PEM file with its unencrypted private key, or None when it is in
            the *cert* file.
        ca: PEM file with the CA certificate(s) to trust for the server. Without
            it, the system's default trust store is used.
        alpn: ALPN protocols to offer, in order of preference.
        chain_to_ca: also require the client *cert* to chain to *ca*. Turn
            this off only when the client certificate comes from a different
            CA than the server's.

    Raises:
        PeerTlsError: a file is missing, unreadable or not PEM; a key was
            given without a certificate; the key is encrypted or does not
            match the certificate; the certificate has expired or is not yet
            valid; or it is not signed by the CA. The error's ``path`` names
            the file to blame.
    """
    cert_path = None if cert is None else _fspath(cert)
    ca_path = None if ca is None else _fspath(ca)
    if cert_path is None and key is not None:
        _fail("a private key was given without a client certificate", _fspath(key))

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_policy(ctx, alpn)
    if ca_path is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca(ctx, ca_path)
    if cert_path is not None:
        key_path = cert_path if key is None else _fspath(key)
        _check_certificate_file(cert_path)
        _check_key_file(key_path)
        _load_cert_chain(ctx, cert_path, key_path)
        if ca_path is not None and chain_to_ca:
            _prove_chain(_Role.CLIENT, cert_path, key_path, ca_path)
    return ctx


class _PeerCertSource(Protocol):
    def getpeercert(self) -> Any: ...


_RFC4514_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "domainComponent": "DC",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "userId": "UID",
}


def peer_principal(connection: _PeerCertSource) -> str | None:
    """Name the authenticated peer of a TLS connection by its certificate subject.

    *connection* is anything with ``getpeercert()``: an ``ssl.SSLObject``, an
    ``ssl.SSLSocket`` or a ``trio.SSLStream`` after its handshake. The result
    is the subject as an RFC 4514 string, most specific attribute first (for
    example ``CN=peer-a,O=Example``), suitable as an owner id for refs.

    Returns None when the peer sent no certificate, or sent one that was not
    verified (a server without a CA does not verify clients), so an
    unauthenticated caller can never pass for an authenticated one.

    Raises:
        ValueError: the handshake has not completed yet (from ``getpeercert``).
    """
    cert = connection.getpeercert()
    if not cert:
        return None
    subject = cert.get("subject", ())
    rdns = [
        "+".join(
            f"{_RFC4514_NAMES.get(name, name)}={_escape_dn_value(value)}" for name, value in rdn
        )
        for rdn in reversed(subject)
    ]
    return ",".join(rdns)


def _escape_dn_value(value: str) -> str:
    # RFC 4514 section 2.4: these characters are escaped anywhere; a leading
    # '#' or space and a trailing space are escaped so the string parses back.
    escaped = "".join(
        "\\00" if ch == "\0" else f"\\{ch}" if ch in '\\"+,;<>' else ch for ch in value
    )
    if value.startswith(("#", " ")):
        escaped = "\\" + escaped
    if len(value) > 1 and value.endswith(" "):
        escaped = escaped[:-1] + "\\ "
    return escaped


# --------------------------------------------------------------------------
# Checks


def _fail(reason: str, path: str) -> NoReturn:
    raise PeerTlsError(reason, path)


def _fspath(path: StrPath) -> str:
    return os.fsdecode(path)


def _read_pem_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        _fail("file not found", path)
    except IsADirectoryError:
        _fail("is a directory, not a PEM file", path)
    except PermissionError:
        _fail("file is not readable (permission denied)", path)
    except OSError as exc:
        _fail(f"file cannot be read ({exc.strerror or exc})", path)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        _fail("not a PEM file (it holds binary data; DER files must be converted to PEM)", path)


@attrs.frozen
class _Validity:
    not_before: datetime.datetime
    not_after: datetime.datetime


def _check_certificate_file(path: str) -> None:
    """Prove *path* holds parsable certificates that are all in date now."""
    text = _read_pem_text(path)
    blocks = list(_CERT_BLOCK.finditer(text))
    if not blocks:
        _fail("not a PEM certificate (no BEGIN CERTIFICATE block)", path)
    try:
        # OpenSSL's own parser is the judge of well-formedness.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except ssl.SSLError:
        _fail("not a PEM certificate (the certificate data is corrupt)", path)
    now = datetime.datetime.now(datetime.timezone.utc)
    for index, block in enumerate(blocks):
        which = "certificate" if index == 0 else f"certificate #{index + 1} in the chain"
        try:
            der = base64.b64decode("".join(block["body"].split()), validate=True)
            validity = _read_validity(der)
        except ValueError:  # binascii.Error is one too
            _fail(f"not a PEM certificate ({which} is corrupt)", path)
        if now > validity.not_after:
            _fail(f"{which} expired on {_show_time(validity.not_after)}", path)
        if now < validity.not_before:
            _fail(f"{which} is not valid until {_show_time(validity.not_before)}", path)


def _check_key_file(path: str) -> None:
    text = _read_pem_text(path)
    if _KEY_BEGIN.search(text) is None:
        _fail("not a PEM private key (no BEGIN PRIVATE KEY block)", path)


class _EncryptedKeyError(Exception):
    pass


def _refuse_password() -> NoReturn:
    # OpenSSL asks for a password only for an encrypted key; without this
    # callback it would prompt on the terminal and block the process.
    raise _EncryptedKeyError


def _load_cert_chain(ctx: ssl.SSLContext, cert_path: str, key_path: str) -> None:
    try:
        ctx.load_cert_chain(cert_path, key_path, password=_refuse_password)
    except _EncryptedKeyError:
        _fail("private key is encrypted; peerflow needs an unencrypted key file", key_path)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            _fail(f"private key does not match certificate {cert_path}", key_path)
        _fail("not a PEM private key (the key data is corrupt or of an unsupported kind)", key_path)
    except OSError as exc:
        # The files were readable a moment ago; report what changed.
        _fail(f"file cannot be read ({exc.strerror or exc})", exc.filename or cert_path)


def _load_ca(ctx: ssl.SSLContext, ca_path: str) -> None:
    text = _read_pem_text(ca_path)
    if _CERT_BLOCK.search(text) is None:
        _fail("not a PEM certificate (no BEGIN CERTIFICATE block)", ca_path)
    try:
        ctx.load_verify_locations(cadata=text)
    except ssl.SSLError:
        _fail("not a PEM certificate (the CA certificate data is corrupt)", ca_path)


def _apply_policy(ctx: ssl.SSLContext, alpn: Sequence[str]) -> None:
    if isinstance(alpn, str) or not alpn:
        raise ValueError(f"alpn must be a non-empty sequence of protocol names, not {alpn!r}")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(_H2_TLS12_CIPHERS)
    ctx.set_alpn_protocols(list(alpn))
    # A CA file may hold an intermediate; treat whatever the user trusts as an
    # anchor, as Python 3.13's default context does.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN


def _prove_chain(role: _Role, cert_path: str, key_path: str, ca_path: str) -> None:
    """Handshake in memory with the CA as the only trust root, verifying *cert*
    the way a peer will: as a server certificate or as a client certificate."""
    if role is _Role.SERVER:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert_path, key_path)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        client.load_verify_locations(ca_path)
    else:
        # The throwaway server reuses the certificate only to have something
        # to present; the client does not check it.
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert_path, key_path)
        server.verify_mode = ssl.CERT_REQUIRED
        server.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        server.load_verify_locations(ca_path)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client.load_cert_chain(cert_path, key_path)
    try:
        _handshake_in_memory(server, client)
    except ssl.SSLCertVerificationError as exc:
        code = exc.verify_code
        if code in _NOT_SIGNED_BY_CA:
            _fail(f"certificate is not signed by the CA in {ca_path}", cert_path)
        if code in (_X509_V_ERR_CERT_HAS_EXPIRED, _X509_V_ERR_CERT_NOT_YET_VALID):
            # The leaf's own dates were checked already, so the culprit is
            # higher up: an intermediate or the CA itself.
            _fail(f"a CA certificate in the chain is out of date ({exc.verify_message})", ca_path)
        if code == _X509_V_ERR_INVALID_PURPOSE:
            _fail(f"certificate is not allowed for TLS {role.value} authentication", cert_path)
        _fail(
            f"certificate does not verify against the CA in {ca_path}: {exc.verify_message}",
            cert_path,
        )
    except ssl.SSLError as exc:
        _fail(f"TLS self-check with the CA in {ca_path} failed: {exc}", cert_path)


def _handshake_in_memory(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    to_server, from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    to_client, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(to_server, from_server, server_side=True)
    client = client_ctx.wrap_bio(to_client, from_client, server_side=False)
    pending = [client, server]
    for _ in range(_MAX_SELF_CHECK_ROUNDS):
        for side in list(pending):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                continue
            pending.remove(side)
        if not pending:
            return
        to_server.write(from_client.read())
        to_client.write(from_server.read())
    raise ssl.SSLError("the handshake did not complete")


# --------------------------------------------------------------------------
# Just enough DER to find a certificate's validity period (RFC 5280 4.1):
# Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
#   serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter } ...


def _der_element(der: bytes, pos: int) -> tuple[int, int, int]:
    """Return (tag, content start, content end) of the element at *pos*."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER element")
    tag, length = der[pos], der[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags do not occur in certificate headers")
    start = pos + 2
    if length & 0x80:
        size = length & 0x7F
        if size == 0 or size > 4 or start + size > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[start : start + size], "big")
        start += size
    end = start + length
    if end > len(der):
        raise ValueError("truncated DER element")
    return tag, start, end


def _der_children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    children = []
    while start < end:
        child = _der_element(der, start)
        if child[2] > end:
            raise ValueError("DER element overruns its parent")
        children.append(child)
        start = child[2]
    return children


def _read_validity(der: bytes) -> _Validity:
    tag, start, end = _der_element(der, 0)
    if tag != 0x30:
        raise ValueError("certificate is not a DER SEQUENCE")
    parts = _der_children(der, start, end)
    if not parts or parts[0][0] != 0x30:
        raise ValueError("tbsCertificate is not a SEQUENCE")
    fields = _der_children(der, parts[0][1], parts[0][2])
    if fields and fields[0][0] == 0xA0:
        fields = fields[1:]
    if len(fields) < 4 or fields[3][0] != 0x30:
        raise ValueError("certificate has no validity SEQUENCE")
    times = _der_children(der, fields[3][1], fields[3][2])
    if len(times) != 2:
        raise ValueError("validity must hold exactly two times")
    return _Validity(*(_der_time(tag, der[s:e]) for tag, s, e in times))


def _der_time(tag: int, raw: bytes) -> datetime.datetime:
    text = raw.decode("ascii")
    if tag == 0x17 and len(text) == 13 and text.endswith("Z"):
        # RFC 5280 4.1.2.5.1: two-digit years 50-99 are 19xx, 00-49 are 20xx.
        century = "19" if int(text[:2]) >= 50 else "20"
        text = century + text
    elif not (tag == 0x18 and len(text) == 15 and text.endswith("Z")):
        raise ValueError("unsupported certificate time encoding")
    parsed = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    return parsed.replace(tzinfo=datetime.timezone.utc)


def _show_time(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
