"""What ``peerflow invoke`` prints for a response, checked without a peer.

The end-to-end tests see the responses real steps give; here are the ones a
step cannot easily give, such as an error with no step id.
"""

from __future__ import annotations

from peerflow import InlineRef, RemoteRefDescriptor, SubWorkflowResponse
from peerflow._cli import _printed_response
from peerflow._peer.json_codec import json_body


def test_every_key_is_printed_even_where_the_http_json_body_leaves_it_out() -> None:
    response = SubWorkflowResponse(
        remote_refs={"r": RemoteRefDescriptor("node-b", "t", 1)}, error="lost"
    )
    body = json_body(response)
    assert "inline_refs" not in body
    assert "serializable" not in body["remote_refs"]["r"]
    assert _printed_response(response) == {
        "result": None,
        "state": {},
        "remote_refs": {
            "r": {
                "origin_node_id": "node-b",
                "type_tag": "t",
                "created_at_epoch_ms": 1,
                "lifetime": "until_context_drop",
                "size": None,
                "serializable": True,
            }
        },
        "inline_refs": {},
        "dropped_refs": [],
        "error": {"message": "lost", "step_id": None, "error_type": None},
    }


def test_otherwise_it_is_the_http_json_body_without_v() -> None:
    descriptor = RemoteRefDescriptor("node-b", "t", 1, size=2, serializable=False)
    response = SubWorkflowResponse(
        result={"raw": b"\x00\xff"},
        state={"n": 1.5},
        remote_refs={"r": descriptor},
        error="boom",
        error_step_id="s",
        error_type="ValueError",
        inline_refs={"i": InlineRef(descriptor, b"ab")},
        dropped_refs=("d",),
    )
    body = json_body(response)
    assert body.pop("v") == 1
    assert _printed_response(response) == body
    assert body["result"] == {"raw": {"$bytes": "AP8="}}
    assert body["inline_refs"]["i"]["payload"] == "YWI="
