"""Peer logs: one logger per component, node id and call id on every record."""

from __future__ import annotations

import logging

import pytest

from peerflow import PeerClient


async def test_records_carry_the_node_id_and_the_caller_s_call_id(
    client: PeerClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="peerflow.peer"):
        await client.invoke_sub_workflow("w", ["boom"], None)
    (record,) = [r for r in caplog.records if r.name == "peerflow.peer.service"]
    assert record.node_id == "node-b"  # type: ignore[attr-defined]
    # Without a caller-chosen id, the connection and stream name the call.
    assert record.call_id.endswith("/3")  # type: ignore[attr-defined]  # after the lease call
    assert record.getMessage().startswith(f"[node-b {record.call_id}] ")  # type: ignore[attr-defined]
    assert "kaput" in record.getMessage()


async def test_a_caller_chosen_call_id_is_used(
    client: PeerClient, caplog: pytest.LogCaptureFixture
) -> None:
    client._base_headers = (*client._base_headers, (b"x-peerflow-call-id", b"trace-42"))  # type: ignore[misc]
    with caplog.at_level(logging.INFO, logger="peerflow.peer"):
        await client.invoke_sub_workflow("w", ["boom"], None)
    (record,) = [r for r in caplog.records if r.name == "peerflow.peer.service"]
    assert record.call_id == "trace-42"  # type: ignore[attr-defined]
