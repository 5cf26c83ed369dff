"""Peer logs: one logger per component, node id and call id on every record."""

from __future__ import annotations

import logging

import pytest

from peerflow import PeerClient, PeerServer
from peerflow._peer.logs import PeerLogger, for_node
from peerflow.testing import open_memory_peer, sever


async def test_records_carry_the_node_id_and_the_caller_s_call_id(
    client: PeerClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="peerflow.peer"):
        await client.invoke_sub_workflow("w", ["boom"], None)
    (record,) = [r for r in caplog.records if r.name == "peerflow.peer.service"]
    assert record.node_id == "node-b"  # type: ignore[attr-defined]
    # Without a caller-chosen id, the connection and stream name the call.
    assert record.call_id.endswith("/3")  # type: ignore[attr-defined]  # after the lease call
    assert record.caller_node_id == "node-a"  # type: ignore[attr-defined]
    assert record.getMessage().startswith(f"[node-b {record.call_id} from node-a] ")  # type: ignore[attr-defined]
    assert "kaput" in record.getMessage()


async def test_a_caller_chosen_call_id_is_used(
    client: PeerClient, caplog: pytest.LogCaptureFixture
) -> None:
    client._base_headers = (*client._base_headers, (b"x-peerflow-call-id", b"trace-42"))  # type: ignore[misc]
    with caplog.at_level(logging.INFO, logger="peerflow.peer"):
        await client.invoke_sub_workflow("w", ["boom"], None)
    (record,) = [r for r in caplog.records if r.name == "peerflow.peer.service"]
    assert record.call_id == "trace-42"  # type: ignore[attr-defined]


async def test_a_call_id_with_percent_signs_logs_as_it_is(
    client: PeerClient, caplog: pytest.LogCaptureFixture
) -> None:
    # The caller picks its call id; it must not be taken for a format.
    client._base_headers = (*client._base_headers, (b"x-peerflow-call-id", b"%s%d%(x)s"))  # type: ignore[misc]
    with caplog.at_level(logging.INFO, logger="peerflow.peer"):
        await client.invoke_sub_workflow("w", ["boom"], None)
    (record,) = [r for r in caplog.records if r.name == "peerflow.peer.service"]
    assert record.getMessage().startswith("[node-b %s%d%(x)s from node-a] ")


@pytest.mark.parametrize("name", ["peerflow.transport", "peerflow.cli", "peerflow.peer.grpc"])
def test_every_peerflow_record_has_the_fields_a_format_names(name: str) -> None:
    # A handler formatting with %(node_id)s must not fail on any of them.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    if name == "peerflow.peer.grpc":
        logger = PeerLogger("grpc", "node-z")  # type: ignore[assignment]
    logging.getLogger("peerflow").addHandler(handler)
    try:
        with for_node("node-z"):
            logger.warning("connection %s ended", "c1")
    finally:
        logging.getLogger("peerflow").removeHandler(handler)
    (record,) = records
    formatter = logging.Formatter(
        "%(node_id)s %(call_id)s %(caller_node_id)s %(trace_id)s %(message)s"
    )
    assert formatter.format(record) == "node-z - - - [node-z -] connection c1 ended"


async def test_transport_records_name_the_node_whose_connection_logs_them(
    server: PeerServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="peerflow.transport"):
        async with open_memory_peer(server, "node-a") as client:
            await client.invoke_sub_workflow("w", ["echo"], 1)
            await sever(client)
    # Each side's connection ends, and says whose it was.
    ended = [r for r in caplog.records if "HTTP/2 connection ended" in r.getMessage()]
    assert sorted(r.node_id for r in ended) == ["node-a", "node-b"]  # type: ignore[attr-defined]
