"""Hypothesis strategies shared by the test suites: wire values, envelopes and events."""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import strategies as st

from peerflow import (
    DynamicEvent,
    Event,
    InlineRef,
    RefLifetime,
    RemoteRefDescriptor,
    StartEvent,
    StopEvent,
    SubWorkflowResponse,
)
from peerflow._wire.envelopes import (
    DerefChunk,
    DerefSessionRefRequest,
    ErrorDetails,
    InvokeSubWorkflowRequest,
    LeaseRequest,
    LeaseResponse,
    Message,
    ReleaseSessionRefRequest,
    ReleaseSessionRefResponse,
    StreamEvent,
)

# --- wire values and envelopes (owned by the wire work) ---

_uuids = st.uuids().map(str)
_keys = st.text(max_size=8)

#: Scalars the wire carries. NaN is left out because it never equals itself.
wire_scalars: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)

#: Any wire value in its decoded form (lists, never tuples).
wire_values: st.SearchStrategy[Any] = st.recursive(
    wire_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_keys, children, max_size=5),
    max_leaves=25,
)

wire_maps: st.SearchStrategy[dict[str, Any]] = st.dictionaries(_keys, wire_values, max_size=5)

_optional_text = st.none() | st.text(max_size=12)
_u64 = st.integers(min_value=0, max_value=2**63 - 1)

descriptors = st.builds(
    RemoteRefDescriptor,
    origin_node_id=st.text(max_size=12),
    type_tag=st.text(max_size=12),
    created_at_epoch_ms=_u64,
    lifetime=st.sampled_from(RefLifetime),
    size=st.none() | _u64,
    serializable=st.booleans(),
)

invoke_requests = st.builds(
    InvokeSubWorkflowRequest,
    workflow_name=st.text(max_size=12),
    step_ids=st.lists(st.text(max_size=8), max_size=4),
    input=wire_values,
    timeout_ms=st.none() | _u64,
    lease_id=st.none() | _uuids,
)

_errors = st.none() | st.tuples(st.text(), _optional_text, _optional_text)


@st.composite
def sub_workflow_responses(draw: st.DrawFn) -> SubWorkflowResponse:
    """Responses with any mix of result, state, refs and error."""
    error = draw(_errors)
    message, step_id, error_type = error if error is not None else (None, None, None)
    return SubWorkflowResponse(
        result=draw(wire_values),
        state=draw(wire_maps),
        remote_refs=draw(st.dictionaries(_uuids, descriptors, max_size=3)),
        error=message,
        error_step_id=step_id,
        error_type=error_type,
        inline_refs=draw(
            st.dictionaries(_uuids, st.builds(InlineRef, descriptors, st.binary()), max_size=2)
        ),
        dropped_refs=draw(st.lists(_uuids, max_size=3)),
    )


stream_events = st.builds(StreamEvent, event_type=st.text(max_size=12), data=wire_maps)

deref_chunks = st.builds(
    DerefChunk,
    payload=st.binary(max_size=300),
    type_tag=_optional_text,
    total_size=st.none() | _u64,
)

error_details = st.builds(
    ErrorDetails,
    code=st.text(max_size=12),
    message=st.text(),
    step_id=_optional_text,
    got=st.none() | _u64,
    supported=st.none() | _u64,
    path=_optional_text,
    ref_uuid=st.none() | _uuids,
    value_type=_optional_text,
)


def messages() -> st.SearchStrategy[Message]:
    """Any message object the codec knows, with arbitrary contents."""
    return st.one_of(
        invoke_requests,
        sub_workflow_responses(),
        stream_events,
        st.builds(DerefSessionRefRequest, _uuids),
        deref_chunks,
        st.builds(ReleaseSessionRefRequest, _uuids),
        st.builds(ReleaseSessionRefResponse, st.booleans()),
        st.builds(LeaseRequest, _uuids, _u64, close=st.booleans()),
        st.builds(LeaseResponse, _uuids, _u64, released=_u64),
        error_details,
    )


# --- end wire values and envelopes ---

# --- events (owned by the engine work) ---

_event_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)

#: Wire values without NaN (which never equals itself), for event round trips.
event_data_values: st.SearchStrategy[Any] = st.recursive(
    _event_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)


@attrs.frozen
class SamplePoint:
    """A nested attrs value inside an event."""

    x: int
    y: float


@attrs.define
class SampleEvent(Event, event_type="peerflow_tests.SampleEvent"):
    """An event with one field of each common wire type."""

    count: int
    label: str
    blob: bytes
    scores: list[int]
    extra: dict[str, Any]
    point: SamplePoint
    maybe: float | None = None


@attrs.frozen
class MarkerEvent(Event, event_type="peerflow_tests.MarkerEvent"):
    """An event with no fields."""


sample_events = st.builds(
    SampleEvent,
    count=st.integers(min_value=-(2**63), max_value=2**64 - 1),
    label=st.text(),
    blob=st.binary(),
    scores=st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    extra=st.dictionaries(st.text(), event_data_values, max_size=4),
    point=st.builds(SamplePoint, x=st.integers(-1000, 1000), y=st.floats(allow_nan=False)),
    maybe=st.none() | st.floats(allow_nan=False),
)

dynamic_events = st.builds(
    DynamicEvent,
    event_type=st.text(min_size=1).map(lambda s: f"peerflow_tests.unregistered.{s}"),
    data=st.dictionaries(st.text(), event_data_values, max_size=4),
)


def events() -> st.SearchStrategy[Event]:
    """Any event: built-in, typed (registered) or dynamic, with wire-value fields."""
    return st.one_of(
        st.builds(StartEvent, data=event_data_values),
        st.builds(StopEvent, result=event_data_values),
        sample_events,
        st.just(MarkerEvent()),
        dynamic_events,
    )


# --- end events ---
