"""Shared-secret bearer tokens: where the token comes from, how it travels, how it is checked.

A token is sent as ``authorization: Bearer <token>`` on every call. The server
compares it in constant time, and derives an owner id from it for ref
ownership so that the token itself is never stored next to the refs.

Tokens are taken with surrounding whitespace stripped: a token read from a
file or a shell substitution often ends in a newline, and HTTP strips
whitespace around header values anyway, so it could never match otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping

from ..errors import PeerAuthError

__all__ = [
    "bearer_header",
    "check_bearer",
    "peer_token_env",
    "resolve_peer_token",
    "token_principal",
]

_TOKEN_ENV = "PEERFLOW_PEER_TOKEN"
_SCHEME = b"bearer"
# Domain separation keeps these hashes useless as a plain sha256 of the token.
_PRINCIPAL_SALT = b"peerflow token principal v1\x00"
_PRINCIPAL_HEX_DIGITS = 32


def peer_token_env() -> str:
    """Name the environment variable that holds the shared peer token.

    Servers and clients read it (through :func:`resolve_peer_token`) when no
    token is passed explicitly.
    """
    return _TOKEN_ENV


def resolve_peer_token(environ: Mapping[str, str] | None = None) -> str | None:
    """Return the peer token from the environment, or None when auth is off.

    The value of ``PEERFLOW_PEER_TOKEN`` is stripped of surrounding whitespace;
    an unset, empty or all-whitespace variable means no token.

    Args:
        environ: the mapping to read instead of ``os.environ`` (for tests and
            embedding).

    Raises:
        PeerAuthError: the token holds characters that cannot travel in an
            HTTP header (anything outside visible ASCII).
    """
    raw = (os.environ if environ is None else environ).get(_TOKEN_ENV, "")
    token = raw.strip()
    if not token:
        return None
    _check_token_chars(token)
    return token


def bearer_header(token: str) -> tuple[bytes, bytes]:
    """Return the ``authorization`` header pair a client sends for *token*.

    Raises:
        PeerAuthError: the token is empty or holds characters that cannot
            travel in an HTTP header.
    """
    if not token:
        raise PeerAuthError("the peer token is empty")
    _check_token_chars(token)
    return b"authorization", b"Bearer " + token.encode("ascii")


def check_bearer(header_value: bytes | str | None, expected: str) -> bool:
    """Tell whether an ``authorization`` header carries the *expected* token.

    The scheme ``Bearer`` is matched case-insensitively (RFC 7235). The token
    comparison takes the same time whatever the header holds, including its
    length, so timing reveals nothing about the expected token. A missing
    header, another scheme, an empty credential, an empty *expected* token and
    a wrong token all give False. Never raises.
    """
    if header_value is None or not expected:
        return False
    raw = header_value if isinstance(header_value, bytes) else header_value.encode("utf-8")
    scheme, _, credentials = raw.strip().partition(b" ")
    credentials = credentials.strip()
    if scheme.lower() != _SCHEME or not credentials:
        return False
    # Hashing first gives compare_digest equal-length inputs, so not even the
    # token's length leaks.
    got = hashlib.sha256(credentials).digest()
    want = hashlib.sha256(expected.encode("utf-8")).digest()
    return hmac.compare_digest(got, want)


def token_principal(token: str) -> str:
    """Derive a stable owner id from *token* that does not reveal the token.

    Used as the authenticated principal for ref ownership when token auth is
    on. The result looks like ``token:1f0c...`` (a salted sha256, truncated
    to 128 bits). Never raises.
    """
    digest = hashlib.sha256(_PRINCIPAL_SALT + token.encode("utf-8")).hexdigest()
    return f"token:{digest[:_PRINCIPAL_HEX_DIGITS]}"


def _check_token_chars(token: str) -> None:
    if not all("\x21" <= ch <= "\x7e" for ch in token):
        raise PeerAuthError(
            "the peer token may hold only visible ASCII characters (no spaces or "
            "control characters), since it travels in an HTTP header"
        )
