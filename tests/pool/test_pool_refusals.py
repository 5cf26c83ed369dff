"""A PeerPool whose peers refuse it (token, TLS certificate): typed errors, quiet retries."""

from __future__ import annotations

import itertools
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

from peerflow import (
    Context,
    PeerAuthError,
    PeerPool,
    PeerServer,
    PeerTransportError,
    PeerUnavailableError,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
    load_client_tls,
    load_server_tls,
)

DEAD = "http://127.0.0.1:1"


def _registry() -> StepRegistry:
    registry = StepRegistry()
    wf = Workflow("refusals", registry=registry)

    @wf.step("where", accepts=[StartEvent])
    async def where(event: StartEvent, ctx: Context) -> StopEvent:
        return StopEvent(result=ctx.node_id)

    return registry


async def _serve(nursery: trio.Nursery, server: PeerServer) -> str:
    with trio.fail_after(10):
        address = await nursery.start(server.serve, "127.0.0.1", 0)
    url: str = address.url
    return url


@pytest.fixture
async def guarded(nursery: trio.Nursery) -> list[str]:
    """Two peers, node-0 wanting token t0 and node-1 token t1."""
    registry = _registry()
    return [
        await _serve(nursery, PeerServer(f"node-{i}", registry=registry, token=f"t{i}"))
        for i in range(2)
    ]


@pytest.mark.parametrize("token", ["wrong", None])
async def test_a_pool_every_peer_refuses_raises_peer_auth_error(
    guarded: list[str], token: str | None
) -> None:
    with trio.fail_after(10), pytest.raises(PeerAuthError) as info:
        async with PeerPool(guarded, "caller", token=token):
            pytest.fail("entered a pool whose token every peer refused")
    # Not "unavailable": that would promise a retry could work as it is.
    assert not isinstance(info.value, PeerUnavailableError)
    assert "every peer of the pool refused" in str(info.value)
    assert all(url in str(info.value) for url in guarded)
    assert "bearer token" in str(info.value)


async def test_refused_and_unreachable_peers_leave_the_pool_unavailable(
    guarded: list[str],
) -> None:
    # One peer is down: it may come back, so the pool is unavailable, and
    # the message still tells of the token the other refused.
    with trio.fail_after(10), pytest.raises(PeerUnavailableError) as info:
        async with PeerPool([guarded[1], DEAD], "caller", token="t0"):
            pytest.fail("entered a pool with no peer to call")
    assert "bearer token" in str(info.value)
    assert "127.0.0.1:1" in str(info.value)


class _Attempts(logging.Handler):
    """Records what the pool logs about one endpoint, and when."""

    def __init__(self, endpoint: str, wanted: int) -> None:
        super().__init__(logging.DEBUG)
        self.endpoint = endpoint
        self.wanted = wanted
        self.records: list[tuple[float, int]] = []
        self.enough = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.endpoint in message and "refused the pool" in message:
            self.records.append((trio.current_time(), record.levelno))
            if len(self.records) >= self.wanted:
                self.enough.set()


@pytest.fixture
def pool_log() -> Iterator[logging.Logger]:
    logger = logging.getLogger("peerflow.peer.pool")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    yield logger
    logger.setLevel(level)


async def test_a_peer_that_refuses_is_retried_with_backoff_and_logged_once(
    guarded: list[str], pool_log: logging.Logger
) -> None:
    attempts = _Attempts(guarded[1], wanted=5)
    pool_log.addHandler(attempts)
    try:
        with trio.fail_after(10):
            async with PeerPool(
                guarded, "caller", token="t0", reconnect_delay=0.02, max_reconnect_delay=0.08
            ) as pool:
                good, refusing = pool.members()
                assert good.healthy
                assert not refusing.healthy
                assert "bearer token" in (refusing.failure or "")
                for _ in range(3):
                    response = await pool.invoke_sub_workflow("refusals", ["where"], None)
                    assert response.result == "node-0"
                await attempts.enough.wait()
    finally:
        pool_log.removeHandler(attempts)
    levels = [level for _, level in attempts.records]
    assert levels[0] == logging.WARNING
    assert set(levels[1:]) == {logging.DEBUG}  # the same refusal again: not a warning
    # Retried no faster than the backoff: 0.02 s, doubling, at most 0.08 s.
    times = [when for when, _ in attempts.records]
    for i, (before, after) in enumerate(itertools.pairwise(times)):
        assert after - before >= min(0.02 * 2**i, 0.08)


def _tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ours, theirs = trustme.CA(), trustme.CA()
    leaf = theirs.issue_cert("127.0.0.1")
    cert, key, ca = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ours.cert_pem.write_to_path(str(ca))
    return load_server_tls(cert, key), load_client_tls(ca=ca)


async def test_a_certificate_the_pool_rejects_is_a_refusal_not_unavailability(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server_tls, client_tls = _tls_contexts(tmp_path)
    server = PeerServer("node-0", registry=_registry(), token=None, tls=server_tls)
    url = await _serve(nursery, server)
    assert url.startswith("https://")
    with trio.fail_after(10), pytest.raises(PeerTransportError) as info:
        async with PeerPool([url], "caller", token=None, tls=client_tls):
            pytest.fail("entered a pool whose only peer's certificate it rejects")
    assert not isinstance(info.value, PeerUnavailableError)
    assert "every peer of the pool refused" in str(info.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
