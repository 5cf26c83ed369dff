"""Bearer tokens: resolution from the environment, header checking, owner ids."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

import peerflow
from peerflow import PeerAuthError, peer_token_env, resolve_peer_token
from peerflow._peer.auth import bearer_header, check_bearer, token_principal
from peerflow.testing import open_memory_peer

tokens = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64)


def test_env_var_name() -> None:
    assert peer_token_env() == "PEERFLOW_PEER_TOKEN"
    assert peerflow.peer_token_env is peer_token_env
    assert peerflow.resolve_peer_token is resolve_peer_token


def test_unset_token_means_no_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEERFLOW_PEER_TOKEN", raising=False)
    assert resolve_peer_token() is None


@pytest.mark.parametrize("value", ["", "   ", "\n", "\t \r\n"])
def test_empty_or_blank_token_means_no_auth(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PEERFLOW_PEER_TOKEN", value)
    assert resolve_peer_token() is None


def test_token_is_read_from_the_environment_and_stripped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERFLOW_PEER_TOKEN", "  s3cret-Token.v1\n")
    assert resolve_peer_token() == "s3cret-Token.v1"


def test_explicit_environ_mapping_wins_over_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERFLOW_PEER_TOKEN", "from-os")
    assert resolve_peer_token({"PEERFLOW_PEER_TOKEN": "from-map"}) == "from-map"
    assert resolve_peer_token({}) is None


@pytest.mark.parametrize("value", ["two words", "tab\there", "caf\u00e9", "nul\x00"])
def test_token_that_cannot_travel_in_a_header_is_refused(value: str) -> None:
    with pytest.raises(PeerAuthError, match="visible ASCII"):
        resolve_peer_token({"PEERFLOW_PEER_TOKEN": value})
    with pytest.raises(PeerAuthError, match="visible ASCII"):
        bearer_header(value)


def test_bearer_header_shape() -> None:
    assert bearer_header("abc.DEF-123") == (b"authorization", b"Bearer abc.DEF-123")
    with pytest.raises(PeerAuthError, match="empty"):
        bearer_header("")


@given(token=tokens)
def test_client_header_is_accepted_by_the_check(token: str) -> None:
    _, value = bearer_header(token)
    assert check_bearer(value, token)
    assert check_bearer(value.decode("ascii"), token)


@given(token=tokens, other=tokens)
def test_another_token_is_refused(token: str, other: str) -> None:
    _, value = bearer_header(other)
    assert check_bearer(value, token) == (token == other)


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"",
        b"Bearer",
        b"Bearer ",
        b"Basic s3cret",
        b"s3cret",
        b"Bearer s3cre",
        b"Bearer s3cret2",
        b"Bearer S3CRET",
        b"Bearers3cret",
        b"Bearer s3cret extra",
        "Bearer s3cr\u00e9t",
        b"Bearer \xff\xfe",
    ],
)
def test_missing_or_wrong_credentials_are_refused(header: bytes | str | None) -> None:
    assert not check_bearer(header, "s3cret")


@pytest.mark.parametrize(
    "header", [b"Bearer s3cret", b"bearer s3cret", b"BEARER s3cret", b"  Bearer   s3cret  "]
)
def test_scheme_is_case_insensitive_and_spacing_is_lenient(header: bytes) -> None:
    assert check_bearer(header, "s3cret")


def test_empty_expected_token_matches_nothing() -> None:
    assert not check_bearer(b"Bearer ", "")
    assert not check_bearer(b"Bearer x", "")


def test_check_compares_fixed_length_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    # Constant time needs compare_digest on equal-length inputs, whatever
    # length the caller's token has.
    seen: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return a == b

    monkeypatch.setattr("peerflow._peer.auth.hmac.compare_digest", spy)
    assert check_bearer(b"Bearer short", "a-much-longer-expected-token") is False
    assert seen
    assert all(len(a) == len(b) == 32 for a, b in seen)


def test_token_principal_is_stable_distinct_and_hides_the_token() -> None:
    principal = token_principal("s3cret")
    assert principal == token_principal("s3cret")
    assert principal != token_principal("s3cret2")
    assert principal.startswith("token:")
    digest = principal.removeprefix("token:")
    assert len(digest) == 32
    int(digest, 16)
    assert "s3cret" not in principal
    # Salted: not a lookup-table plain sha256 of the token.
    assert digest not in hashlib.sha256(b"s3cret").hexdigest()


@given(a=tokens, b=tokens)
def test_token_principals_collide_only_for_equal_tokens(a: str, b: str) -> None:
    assert (token_principal(a) == token_principal(b)) == (a == b)


@pytest.mark.parametrize("token", ["s3cret"])
async def test_a_refused_memory_client_raises_the_error_itself(server: peerflow.PeerServer) -> None:
    # As PeerClient.connect does: one error, not a group of one.
    with pytest.raises(PeerAuthError):
        async with open_memory_peer(server, "node-a", token="wrong"):
            pass
