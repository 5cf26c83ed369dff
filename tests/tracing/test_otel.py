"""With the OpenTelemetry SDK: SERVER spans, children of the caller's span, on every variant.

OpenTelemetry's global tracer provider can be set only once per process, so
no test sets it: ``spans`` patches the getter peerflow asks (restored after
the test) to return a provider of the test's own, which records into an
in-memory exporter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import opentelemetry.trace as otel_trace
import pytest
import trio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from tracing_helpers import VARIANTS, Recorder, open_client

from peerflow import (
    PeerAddress,
    PeerUnknownStepError,
    TraceContext,
    current_trace_context,
    use_trace_context,
)

TIMEOUT = 20
INVOKE = "peerflow.peer.v1.Peer/InvokeSubWorkflow"


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    monkeypatch.setattr(otel_trace, "get_tracer_provider", lambda: provider)
    yield provider
    provider.shutdown()


@pytest.fixture
def spans(provider: TracerProvider) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def invoke_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    # Lease calls (a client's ref scope) get spans too; these tests look at invokes.
    return [span for span in exporter.get_finished_spans() if span.name == INVOKE]


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


@pytest.mark.parametrize("variant", VARIANTS)
async def test_the_server_span_is_a_child_of_the_callers_span(
    variant: str,
    provider: TracerProvider,
    spans: InMemorySpanExporter,
    peer_b: PeerAddress,
    recorder: Recorder,
) -> None:
    tracer = provider.get_tracer("tests")
    with trio.fail_after(TIMEOUT):
        async with open_client(variant, peer_b.url, "node-a") as client:
            with tracer.start_as_current_span("parent") as parent:
                await client.invoke_sub_workflow("tracing", ["record"])
    [server] = invoke_spans(spans)
    trace_id, parent_id = parent.get_span_context().trace_id, parent.get_span_context().span_id
    assert server.kind is SpanKind.SERVER
    assert server.parent is not None
    assert server.parent.is_remote
    assert (server.parent.trace_id, server.parent.span_id) == (trace_id, parent_id)
    assert ids(server)[0] == trace_id
    assert server.status.status_code is StatusCode.UNSET
    attributes = dict(server.attributes or {})
    assert attributes["rpc.system"] == ("grpc" if variant == "grpc" else "peerflow")
    assert attributes["rpc.service"] == "peerflow.peer.v1.Peer"
    assert attributes["rpc.method"] == "InvokeSubWorkflow"
    assert attributes["peerflow.node_id"] == "node-b"
    assert attributes["peerflow.call_id"] not in ("", "-")
    assert attributes["peerflow.caller_node_id"] == "node-a"
    # The step runs inside the server span: a call it made would name that span.
    [seen] = recorder.on("node-b")
    assert seen is not None
    assert (int(seen.trace_id, 16), int(seen.parent_id, 16)) == ids(server)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_nested_calls_keep_one_trace_and_name_the_server_span(
    variant: str,
    provider: TracerProvider,
    spans: InMemorySpanExporter,
    peer_b: PeerAddress,
    peer_c: PeerAddress,
) -> None:
    tracer = provider.get_tracer("tests")
    with trio.fail_after(TIMEOUT):
        async with open_client(variant, peer_b.url, "node-a") as client:
            with tracer.start_as_current_span("parent") as parent:
                response = await client.invoke_sub_workflow(
                    "tracing", ["forward"], {"variant": variant, "url": peer_c.url}
                )
    response.raise_for_error()
    by_node = {
        dict(span.attributes or {})["peerflow.node_id"]: span for span in invoke_spans(spans)
    }
    on_b, on_c = by_node["node-b"], by_node["node-c"]
    assert on_b.parent is not None
    assert on_c.parent is not None
    assert on_b.parent.span_id == parent.get_span_context().span_id
    assert on_c.parent.span_id == ids(on_b)[1]
    assert {ids(on_b)[0], ids(on_c)[0]} == {parent.get_span_context().trace_id}


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_failing_call_marks_its_span(
    variant: str, provider: TracerProvider, spans: InMemorySpanExporter, peer_b: PeerAddress
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client(variant, peer_b.url, "node-a") as client:
            with use_trace_context(TraceContext("00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")):
                response = await client.invoke_sub_workflow("tracing", ["fail"])
                with pytest.raises(PeerUnknownStepError):
                    await client.invoke_sub_workflow("tracing", ["no-such-step"])
    assert response.error is not None
    failed, unknown = invoke_spans(spans)
    assert failed.status.status_code is StatusCode.ERROR
    assert "kaput" in (failed.status.description or "")
    assert dict(failed.attributes or {})["error.type"] == "ValueError"
    assert unknown.status.status_code is StatusCode.ERROR
    assert "PeerUnknownStepError" in (unknown.status.description or "")
    for span in (failed, unknown):
        assert span.parent is not None
        assert (span.parent.trace_id, span.parent.span_id) == (
            int("ab" * 16, 16),
            int("cd" * 8, 16),
        )


async def test_without_a_traceparent_the_server_span_starts_a_trace(
    spans: InMemorySpanExporter, peer_b: PeerAddress, recorder: Recorder
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_client("grpc", peer_b.url, "node-a") as client:
            await client.invoke_sub_workflow("tracing", ["record"])
    [server] = invoke_spans(spans)
    assert server.parent is None
    [seen] = recorder.on("node-b")
    assert seen is not None
    assert int(seen.trace_id, 16) == ids(server)[0]


class _UntouchableProvider(otel_trace.NoOpTracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> otel_trace.Tracer:
        raise AssertionError("peerflow asked a no-op provider for a tracer")


async def test_a_no_op_provider_opens_no_span(
    monkeypatch: pytest.MonkeyPatch, peer_b: PeerAddress, recorder: Recorder
) -> None:
    monkeypatch.setattr(otel_trace, "get_tracer_provider", _UntouchableProvider)
    context = TraceContext("00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")
    with trio.fail_after(TIMEOUT):
        async with open_client("grpc", peer_b.url, "node-a") as client:
            with use_trace_context(context):
                await client.invoke_sub_workflow("tracing", ["record"])
    assert recorder.on("node-b") == [context]


def test_a_current_span_takes_precedence_over_use_trace_context(
    provider: TracerProvider,
) -> None:
    mine = TraceContext("00-" + "ab" * 16 + "-" + "cd" * 8 + "-01", "k=v")
    with use_trace_context(mine):
        assert current_trace_context() == mine
        with provider.get_tracer("tests").start_as_current_span("parent") as span:
            context: Any = current_trace_context()
        assert current_trace_context() == mine
    span_context = span.get_span_context()
    assert isinstance(context, TraceContext)
    assert (context.trace_id, context.parent_id) == (
        f"{span_context.trace_id:032x}",
        f"{span_context.span_id:016x}",
    )
    assert context.sampled
