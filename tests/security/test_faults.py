"""Faults on real sockets and processes: killed and frozen peers, cut links, crashed parents.

Each test ends with the peer back at its baseline (or, for a dead peer, the
client's own connection state gone), and the peer serving new calls where it
is still alive. Waiting on another process or on a wall-clock lease uses
bounded polling under ``fail_after``.
"""

from __future__ import annotations

import json
import signal

import pytest
import trio
from security_procs import Child, run_child, wait_until
from security_proxy import CuttingProxy

from peerflow import (
    Limits,
    PeerClient,
    PeerRefNotFoundError,
    PeerServer,
    PeerTimeoutError,
    PeerTransportError,
    StepRegistry,
)

MIB = 1024 * 1024


async def _live_refs(url: str) -> int:
    async with PeerClient.connect(url, "observer", token=None) as client:
        response = await client.invoke_sub_workflow("w", ["stats"], None)
    return int(response.result["live_refs"])


async def _wait_for_no_refs(url: str) -> None:
    # The count lives in another process: polling is the only way to watch it.
    while await _live_refs(url) != 0:  # noqa: ASYNC110
        await trio.sleep(0.05)


async def _slow_call_fails(
    client: PeerClient, child: Child, fault: signal.Signals
) -> tuple[PeerTransportError, float]:
    """Start a long call, hit the peer with ``fault`` once it runs; return the error and delay."""
    outcome: list[tuple[PeerTransportError, float]] = []

    async def call() -> None:
        with pytest.raises(PeerTransportError) as info:
            await client.invoke_sub_workflow("w", ["slow"], 3600)
        outcome.append((info.value, trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await child.expect("slow started")
        child.process.send_signal(fault)
        struck_at = trio.current_time()
    ((error, failed_at),) = outcome
    assert failed_at >= struck_at, "the call failed before the fault"
    return error, failed_at - struck_at


async def test_a_peer_killed_mid_call_fails_the_call_promptly() -> None:
    with trio.fail_after(20):
        async with run_child("security_peer_proc.py") as child:
            url = await child.expect("serving on")
            async with PeerClient.connect(url, "node-a", token=None) as client:
                error, delay = await _slow_call_fails(client, child, signal.SIGKILL)
                # The kernel closes the dead peer's socket: no keepalive needed.
                assert type(error) is PeerTransportError
                assert delay < 2
                with pytest.raises(PeerTransportError):
                    await client.invoke_sub_workflow("w", ["echo"], 1)
                assert client._conn.statistics().open_streams == 0


async def test_a_frozen_peer_is_detected_by_keepalive() -> None:
    interval, timeout = 0.5, 0.5
    limits = Limits(keepalive_interval=interval, keepalive_timeout=timeout)
    with trio.fail_after(30):
        async with run_child("security_peer_proc.py") as child:
            url = await child.expect("serving on")
            async with PeerClient.connect(
                url, "node-a", token=None, limits=limits, lease_ttl=1
            ) as client:
                # SIGSTOP: the socket stays open, nothing answers (a half-open peer).
                error, delay = await _slow_call_fails(client, child, signal.SIGSTOP)
                assert isinstance(error, PeerTimeoutError)
                assert "keepalive" in str(error)
                assert delay < interval + timeout + 1.0
            child.process.send_signal(signal.SIGCONT)
            # Thawed, the peer finds the connection gone: the run is cancelled,
            # and the client's lease runs out, so nothing is left behind.
            await _wait_for_no_refs(url)


async def test_a_connection_cut_mid_deref_is_a_clean_error_and_cleans_up(
    steps: StepRegistry, nursery: trio.Nursery
) -> None:
    limits = Limits(lease_grace=0.1, min_lease_ttl=0.1)
    server = PeerServer("node-b", registry=steps, token=None, limits=limits)
    with trio.fail_after(30):
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        async with PeerClient.connect(address.url, "node-a", token=None) as direct:
            ref_uuid = (await direct.invoke_sub_workflow("w", ["big"], 32 * MIB)).result
        baseline = len(server.refs)
        assert baseline == 1

        proxy = CuttingProxy(address.port, cut_after=4 * MIB)
        port = await nursery.start(proxy.serve)
        async with PeerClient.connect(
            f"http://127.0.0.1:{port}", "node-a", token=None, lease_ttl=0.2
        ) as client:
            with pytest.raises(PeerTransportError) as info:
                await client.deref_session_ref(ref_uuid)
            assert type(info.value) is PeerTransportError
            assert proxy.cut.is_set()
            assert proxy.forwarded < 32 * MIB
            assert client._conn.closed
            assert client._conn.statistics().open_streams == 0

        # The peer notices, ends the connection and its streams, and lets its
        # scopes go: the connection's after lease_grace, the lease at its TTL.
        await wait_until(lambda: len(server.service.leases) == 0)
        assert len(server.refs) == baseline
        async with PeerClient.connect(address.url, "node-a", token=None) as again:
            value = await again.deref_session_ref(ref_uuid)
            assert len(value) == 32 * MIB
            assert value[:256] == bytes(range(256))
            assert await again.release_session_ref(ref_uuid) is True
        assert len(server.refs) == 0


@pytest.mark.parametrize("leases", [True, False], ids=["lease", "connection"])
async def test_a_killed_parent_s_refs_are_reclaimed(
    steps: StepRegistry, nursery: trio.Nursery, leases: bool
) -> None:
    grace, ttl = 0.5, 1.0
    limits = Limits(lease_grace=grace, min_lease_ttl=0.5)
    server = PeerServer("node-b", registry=steps, token=None, limits=limits)
    with trio.fail_after(30):
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        args = [address.url, str(ttl)] + ([] if leases else ["--no-leases"])
        async with run_child("security_client_proc.py", *args) as parent:
            parent_a, parent_b, explicit = json.loads(await parent.expect("holding"))
            assert len(server.refs) == 3
            parent.process.kill()
            killed_at = trio.current_time()
            await wait_until(lambda: len(server.refs) == 1)
        # A lease lasts at most its TTL after its last renewal; a connection
        # scope lasts lease_grace after the peer sees the connection close.
        assert trio.current_time() - killed_at < (ttl if leases else grace) + 1.0
        # Only the UNTIL_EXPLICIT_DROP ref is left, still its owner's to take.
        async with PeerClient.connect(address.url, "node-a", token=None) as owner:
            for gone in (parent_a, parent_b):
                with pytest.raises(PeerRefNotFoundError):
                    await owner.deref_session_ref(gone)
            assert await owner.deref_session_ref(explicit) == b"value-2"
            assert await owner.release_session_ref(explicit) is True
        assert len(server.refs) == 0
