"""W3C traceparent/tracestate rules, the public context API, and the WebSocket frame keys."""

from __future__ import annotations

import logging

import msgpack
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from peerflow import TraceContext, current_trace_context, use_trace_context
from peerflow._peer.logs import PeerLogger
from peerflow._peer.trace import (
    MAX_TRACESTATE_LENGTH,
    format_traceparent,
    parse_traceparent,
    trace_headers,
)
from peerflow._peer.ws_frames import CallFrame, decode_client_frame, encode_frame

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"

hex_ids = st.text("0123456789abcdef", min_size=32, max_size=32).filter(lambda s: set(s) != {"0"})
hex_parents = st.text("0123456789abcdef", min_size=16, max_size=16).filter(
    lambda s: set(s) != {"0"}
)
hex_flags = st.text("0123456789abcdef", min_size=2, max_size=2)


@given(hex_ids, hex_parents, hex_flags)
def test_valid_traceparents_round_trip(trace_id: str, parent_id: str, flags: str) -> None:
    header = format_traceparent(trace_id, parent_id, flags)
    assert parse_traceparent(header) == (trace_id, parent_id, flags)
    context = TraceContext.parse(header)
    assert context is not None
    assert context.traceparent == header
    assert (context.trace_id, context.parent_id) == (trace_id, parent_id)
    assert context.sampled == bool(int(flags, 16) & 1)


@given(st.one_of(st.text(), st.binary()), st.one_of(st.none(), st.text(), st.binary()))
def test_arbitrary_input_never_raises(
    traceparent: str | bytes, tracestate: str | bytes | None
) -> None:
    context = TraceContext.parse(traceparent, tracestate)
    if context is not None:
        # Whatever got through is valid, so it can travel as a header.
        assert TraceContext(context.traceparent, context.tracestate) == context
        for _name, value in trace_headers(context):
            assert value.isascii()


@given(st.text(max_size=80))
def test_parse_traceparent_never_raises(value: str) -> None:
    fields = parse_traceparent(value)
    if fields is not None:
        assert (len(fields[0]), len(fields[1])) == (32, 16)


@pytest.mark.parametrize(
    "header",
    [
        "",
        VALID.upper(),  # hex must be lowercase
        VALID + "-",  # version 00 is exactly 55 characters
        VALID + "-extra",
        VALID[:-1],
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is forbidden
        f"0-{TRACE_ID}-{PARENT_ID}-01",
        f"00_{TRACE_ID}_{PARENT_ID}_01",
        f"00-{TRACE_ID}-{PARENT_ID}-0g",
        f"00-{TRACE_ID}-{PARENT_ID}-01\n",
        f"01-{TRACE_ID}-{PARENT_ID}-01x",  # a later version's extra fields start with "-"
        f" {VALID}",
    ],
)
def test_invalid_traceparents_are_ignored(header: str) -> None:
    assert parse_traceparent(header) is None
    assert TraceContext.parse(header) is None
    with pytest.raises(ValueError, match="traceparent"):
        TraceContext(header)


def test_a_higher_version_is_read_by_its_first_four_fields() -> None:
    context = TraceContext.parse(f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-holds", "a=1")
    assert context == TraceContext(VALID, "a=1")
    assert TraceContext.parse(f"01-{TRACE_ID}-{PARENT_ID}-00") == TraceContext(
        f"00-{TRACE_ID}-{PARENT_ID}-00"
    )


def test_tracestate_is_carried_as_is_within_bounds() -> None:
    state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert TraceContext.parse(VALID.encode(), state.encode()) == TraceContext(VALID, state)
    longest = "k=" + "v" * (MAX_TRACESTATE_LENGTH - 2)
    assert TraceContext.parse(VALID, longest) == TraceContext(VALID, longest)
    # Too long, unprintable or not ASCII: dropped; the traceparent still counts.
    for bad in (longest + "v", "a=1\tb=2", "a=é", b"a=\xff", ""):
        assert TraceContext.parse(VALID, bad) == TraceContext(VALID, None)
    with pytest.raises(ValueError, match="tracestate"):
        TraceContext(VALID, longest + "v")


def test_properties() -> None:
    context = TraceContext(VALID)
    assert context.trace_id == TRACE_ID
    assert context.parent_id == PARENT_ID
    assert context.sampled
    assert not TraceContext(f"00-{TRACE_ID}-{PARENT_ID}-02").sampled
    assert trace_headers(TraceContext(VALID, "a=1")) == (
        (b"traceparent", VALID.encode()),
        (b"tracestate", b"a=1"),
    )


async def test_use_trace_context_nests_and_restores() -> None:
    assert current_trace_context() is None
    outer = TraceContext(VALID)
    with use_trace_context(outer) as entered:
        assert entered is outer
        assert current_trace_context() is outer
        with use_trace_context(None):
            assert current_trace_context() is None
        with use_trace_context(f"00-{TRACE_ID}-{'1' * 16}-00") as parsed:
            assert parsed is not None
            assert current_trace_context() == parsed
            assert parsed.parent_id == "1" * 16
        with use_trace_context("not a traceparent") as ignored:
            assert ignored is None
            assert current_trace_context() is None
        assert current_trace_context() is outer
    assert current_trace_context() is None


def test_use_trace_context_refuses_other_types() -> None:
    with pytest.raises(TypeError, match="TraceContext"), use_trace_context(42):  # type: ignore[arg-type]
        pass


async def test_tasks_started_inside_inherit_the_context() -> None:
    seen: list[TraceContext | None] = []

    async def child() -> None:
        seen.append(current_trace_context())

    context = TraceContext(VALID)
    async with trio.open_nursery() as nursery:
        with use_trace_context(context):
            nursery.start_soon(child)
        nursery.start_soon(child)
    assert sorted(seen, key=lambda c: c is None) == [context, None]


def test_peer_logger_records_carry_the_trace_id(caplog: pytest.LogCaptureFixture) -> None:
    log = PeerLogger("server", "node-x")
    with caplog.at_level(logging.INFO, logger="peerflow.peer.server"):
        log.info("outside")
        with use_trace_context(VALID):
            log.info("inside")
    outside, inside = caplog.records
    assert outside.trace_id == "-"  # type: ignore[attr-defined]
    assert inside.trace_id == TRACE_ID  # type: ignore[attr-defined]
    assert inside.getMessage() == "[node-x -] inside"  # the prefix is unchanged


def test_websocket_call_frames_carry_the_trace_context() -> None:
    frame = CallFrame(7, "InvokeSubWorkflow", b"x", None, VALID, "a=1")
    assert decode_client_frame(encode_frame(frame)) == frame
    plain = CallFrame(8, "InvokeSubWorkflow", b"x")
    assert b"traceparent" not in encode_frame(plain)
    assert decode_client_frame(encode_frame(plain)) == plain


@pytest.mark.parametrize(
    ("traceparent", "tracestate"), [(b"bytes", "a=1"), (7, None), (VALID, 3), ([VALID], "a=1")]
)
def test_mistyped_trace_keys_in_a_call_frame_are_ignored(
    traceparent: object, tracestate: object
) -> None:
    raw = msgpack.packb(
        {
            "v": 1,
            "id": 1,
            "method": "InvokeSubWorkflow",
            "body": b"x",
            "traceparent": traceparent,
            "tracestate": tracestate,
        }
    )
    frame = decode_client_frame(raw)
    assert isinstance(frame, CallFrame)
    assert frame.traceparent == (traceparent if isinstance(traceparent, str) else None)
    assert frame.tracestate == (
        tracestate if isinstance(traceparent, str) and isinstance(tracestate, str) else None
    )
