"""How-to: trace calls across peers (docs/how-to/tracing.md).

Run: python3 docs/samples/howto_tracing.py
(it needs opentelemetry-sdk, which the test extra installs)
"""

from __future__ import annotations

import logging

import trio

# --8<-- [start:otel-imports]
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

# --8<-- [end:otel-imports]
from peerflow import (
    Context,
    PeerClient,
    PeerServer,
    StartEvent,
    StepRegistry,
    StopEvent,
    Workflow,
    current_trace_context,
    use_trace_context,
)

steps = StepRegistry()
wf = Workflow("traced", registry=steps)


# --8<-- [start:steps]
@wf.step("lookup", accepts=[StartEvent])
async def lookup(event: StartEvent, ctx: Context) -> StopEvent:
    trace = current_trace_context()  # the caller's, forwarded by peerflow
    print(f"{ctx.node_id} runs in trace {trace and trace.trace_id}")
    return StopEvent(result="found")


@wf.step("plan", accepts=[StartEvent])
async def plan(event: StartEvent, ctx: Context) -> StopEvent:
    trace = current_trace_context()
    print(f"{ctx.node_id} runs in trace {trace and trace.trace_id}")
    # A call made from a step carries the same trace on to the next peer.
    async with PeerClient.connect(event.data, ctx.node_id) as client:
        response = await client.invoke_sub_workflow("traced", ["lookup"])
    return StopEvent(result=response.result)


# --8<-- [end:steps]


async def without_opentelemetry(url_b: str, url_c: str) -> None:
    # --8<-- [start:plain]
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"  # e.g. from a web request
    async with PeerClient.connect(url_b, "node-a") as client:
        with use_trace_context(incoming):
            response = await client.invoke_sub_workflow("traced", ["plan"], url_c)
    print("result:", response.result)
    # --8<-- [end:plain]


async def with_opentelemetry(url_b: str, url_c: str) -> None:
    # --8<-- [start:otel]
    exporter = InMemorySpanExporter()  # in production: an OTLP exporter
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    tracer = trace.get_tracer("orchestrator")
    async with PeerClient.connect(url_b, "node-a") as client:
        with tracer.start_as_current_span("handle-request"):
            await client.invoke_sub_workflow("traced", ["plan"], url_c)

    names = {span.context.span_id: span.name for span in exporter.get_finished_spans()}
    for span in exporter.get_finished_spans():
        if span.name.endswith("InvokeSubWorkflow"):
            parent = names.get(span.parent.span_id) if span.parent else None
            node = span.attributes["peerflow.node_id"]
            print(f"{span.kind.name} span {span.name} on {node}, child of {parent}")
    # --8<-- [end:otel]


def show_log_fields() -> None:
    # --8<-- [start:logs]
    logging.basicConfig(
        format="%(name)s node=%(node_id)s caller=%(caller_node_id)s call=%(call_id)s "
        "trace=%(trace_id)s %(message)s"
    )
    # --8<-- [end:logs]


async def main() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            b = await nursery.start(
                PeerServer("node-b", registry=steps, token=None).serve, "127.0.0.1", 0
            )
            c = await nursery.start(
                PeerServer("node-c", registry=steps, token=None).serve, "127.0.0.1", 0
            )
            await without_opentelemetry(b.url, c.url)
            await with_opentelemetry(b.url, c.url)
            nursery.cancel_scope.cancel()
    show_log_fields()


if __name__ == "__main__":
    trio.run(main)
