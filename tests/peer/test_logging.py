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
    # The client's call id travelled with the call: both sides log the same one.
    assert record.call_id.startswith("node-a:")  # type: ignore[attr-defined]
    assert record.getMessage().startswith(f"[node-b {record.call_id}] ")  # type: ignore[attr-defined]
    assert "kaput" in record.getMessage()
