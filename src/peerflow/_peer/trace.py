"""W3C Trace Context for peer calls: parse it, carry it, and meet OpenTelemetry halfway.

A peer call carries ``traceparent`` and ``tracestate``
(https://www.w3.org/TR/trace-context/) so that a parent, the peer it calls
and the peers that one calls share one trace id. This module is sans-IO (no
trio import): it parses and validates the two fields, keeps the current
trace context in a context variable, and talks to OpenTelemetry when its API
is importable. Wire input that breaks the W3C rules is ignored, never an
error: a call with a bad ``traceparent`` runs as if it had none.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import re
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Final, final

import attrs

__all__ = [
    "MAX_TRACESTATE_LENGTH",
    "NO_TRACE",
    "TRACEPARENT",
    "TRACESTATE",
    "TraceContext",
    "call_failed",
    "current_caller_node_id",
    "current_trace_context",
    "format_traceparent",
    "parse_traceparent",
    "serve_trace",
    "set_caller_node_id",
    "trace_headers",
    "use_trace_context",
]

#: The header (and WebSocket call frame key) names, as HTTP/2 sends them.
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
#: A longer ``tracestate`` is dropped (the W3C text asks vendors to carry at least 512).
MAX_TRACESTATE_LENGTH: Final = 512

_TRACEPARENT_RE: Final = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL
)
_ZERO_TRACE_ID: Final = "0" * 32
_ZERO_PARENT_ID: Final = "0" * 16
# The gRPC service name, also the span name's prefix on every variant.
_SERVICE: Final = "peerflow.peer.v1.Peer"
# Every variant but gRPC is peerflow's own RPC system.
_RPC_SYSTEM: Final = {"grpc": "grpc", "http_json": "peerflow", "websocket": "peerflow"}


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    """Split a ``traceparent`` into ``(trace_id, parent_id, flags)``, or None if invalid.

    Version ``00`` must be exactly 55 characters; a higher version (not
    ``ff``) is read by its first four fields, as the W3C text asks, so a
    newer peer's header still joins the trace. Hex must be lowercase, and
    the trace id and parent id must not be all zeros.
    """
    match = _TRACEPARENT_RE.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_PARENT_ID:
        return None
    return trace_id, parent_id, flags


def format_traceparent(trace_id: str, parent_id: str, flags: str) -> str:
    """A version ``00`` ``traceparent`` from its fields (lowercase hex, unchecked)."""
    return f"00-{trace_id}-{parent_id}-{flags}"


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _valid_tracestate(value: str) -> bool:
    return 0 < len(value) <= MAX_TRACESTATE_LENGTH and value.isascii() and value.isprintable()


def _check_traceparent(_instance: object, _attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value.startswith("00-") or not parse_traceparent(value):
        raise ValueError(f"not a version 00 W3C traceparent: {value!r}")


def _check_tracestate(_instance: object, _attribute: Any, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not _valid_tracestate(value)):
        raise ValueError(
            f"tracestate must be 1 to {MAX_TRACESTATE_LENGTH} printable ASCII characters"
        )


@final
@attrs.frozen
class TraceContext:
    """A W3C trace context: the ``traceparent`` and ``tracestate`` a peer call carries.

    Make one from a caller's headers with :meth:`parse`, which ignores what
    is invalid; the constructor insists on valid values.

    Attributes:
        traceparent: a version ``00`` ``traceparent``,
            ``00-<trace id>-<parent id>-<flags>``.
        tracestate: the vendor ``tracestate``, carried as it is, or None.

    Raises:
        ValueError: ``traceparent`` is not a valid version ``00`` value, or
            ``tracestate`` is empty, longer than 512 characters or not
            printable ASCII.
    """

    traceparent: str = attrs.field(validator=_check_traceparent)
    tracestate: str | None = attrs.field(default=None, validator=_check_tracestate)

    @property
    def trace_id(self) -> str:
        """The trace id: 32 lowercase hex digits, shared by every call of the trace."""
        return self.traceparent[3:35]

    @property
    def parent_id(self) -> str:
        """The id of the caller's span: 16 lowercase hex digits."""
        return self.traceparent[36:52]

    @property
    def sampled(self) -> bool:
        """Whether the caller sampled the trace (the ``sampled`` flag)."""
        return bool(int(self.traceparent[53:55], 16) & 1)

    @classmethod
    def parse(
        cls, traceparent: str | bytes | None, tracestate: str | bytes | None = None
    ) -> TraceContext | None:
        """The trace context of a pair of headers, or None when ``traceparent`` is invalid.

        A higher ``traceparent`` version is read by its first four fields and
        kept as version ``00``. A ``tracestate`` that is too long or not
        printable ASCII is dropped; the ``traceparent`` still counts.
        """
        text = _text(traceparent)
        fields = None if text is None else parse_traceparent(text)
        if fields is None:
            return None
        state = _text(tracestate)
        if state is not None and not _valid_tracestate(state):
            state = None
        return cls(format_traceparent(*fields), state)


_current: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar(
    "peerflow_trace_context", default=None
)


def current_trace_context() -> TraceContext | None:
    """The trace context a peer call made by the current task carries, or None.

    When the OpenTelemetry API is importable and a valid span is current,
    that span's context (as OpenTelemetry's propagator writes it); otherwise
    the one set by :func:`use_trace_context` or by the peer call this task
    serves.
    """
    otel = _otel()
    if otel is not None:
        context = otel.current()
        if context is not None:
            return context
    return _current.get()


@contextlib.contextmanager
def use_trace_context(context: TraceContext | str | None) -> Iterator[TraceContext | None]:
    """Make peer calls inside the block (and in tasks it starts) carry ``context``.

    A str is a ``traceparent`` header and is read as :meth:`TraceContext.parse`
    reads it: an invalid one means no trace context. None clears it for the
    block. A current OpenTelemetry span still takes precedence (see
    :func:`current_trace_context`). Yields the context in effect.

    Raises:
        TypeError: ``context`` is not a TraceContext, a str or None.
    """
    if isinstance(context, str):
        context = TraceContext.parse(context)
    elif context is not None and not isinstance(context, TraceContext):
        raise TypeError(f"expected a TraceContext, a str or None, got {type(context).__name__}")
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def trace_headers(context: TraceContext) -> tuple[tuple[bytes, bytes], ...]:
    """The ``traceparent`` (and ``tracestate``) headers that carry ``context``."""
    if context.tracestate is None:
        return ((b"traceparent", context.traceparent.encode()),)
    return (
        (b"traceparent", context.traceparent.encode()),
        (b"tracestate", context.tracestate.encode()),
    )


# -- the serving side ------------------------------------------------------------


#: What :func:`serve_trace` gives a call with nothing to trace.
NO_TRACE: Final = contextlib.nullcontext()

_serving: contextvars.ContextVar[_CallTrace | None] = contextvars.ContextVar(
    "peerflow_serving_trace", default=None
)
# The node id of the caller being served; the log records carry it too.
_caller: contextvars.ContextVar[str] = contextvars.ContextVar("peerflow_caller", default="-")


@final
class _CallTrace:
    """One served call's trace context, and its OpenTelemetry SERVER span if any."""

    __slots__ = ("_attributes", "_context", "_name", "_otel", "_span", "_tokens", "_tracer")

    def __init__(
        self,
        context: TraceContext | None,
        otel: _OtelApi | None,
        tracer: Any,
        name: str,
        attributes: dict[str, str],
    ) -> None:
        self._context = context
        self._otel = otel
        self._tracer = tracer
        self._name = name
        self._attributes = attributes
        self._span: Any = None
        self._tokens: tuple[Any, ...] = ()

    def __enter__(self) -> None:
        current = _current.set(self._context)
        serving = _serving.set(self)
        if self._otel is None or self._tracer is None:
            self._tokens = (current, serving)
            return
        self._span = self._otel.start_server_span(
            self._tracer, self._name, self._context, self._attributes
        )
        self._tokens = (current, serving, self._otel.attach_span(self._span))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.fail(exc)
        if self._otel is not None and self._span is not None:
            self._otel.detach(self._tokens[2])
            self._span.end()
        _serving.reset(self._tokens[1])
        _current.reset(self._tokens[0])

    def admitted(self, caller_node_id: str) -> None:
        """Record the caller's node id on the span (if any)."""
        if self._span is not None:
            self._span.set_attribute("peerflow.caller_node_id", caller_node_id)

    def fail(self, error: BaseException | str, error_type: str | None = None) -> None:
        """Mark the span (if any) as failed."""
        if self._otel is None or self._span is None:
            return
        if isinstance(error, BaseException):
            if isinstance(error, Exception):
                self._span.record_exception(error)
            error_type = type(error).__name__
            description = f"{error_type}: {error}" if str(error) else error_type
        else:
            description = error
        self._otel.set_error(self._span, description, error_type)


def serve_trace(
    traceparent: str | bytes | None,
    tracestate: str | bytes | None,
    *,
    method: str | bytes,
    transport: str,
    node_id: str,
    call_id: Callable[[], str],
) -> contextlib.AbstractContextManager[None]:
    """The context manager a served call runs in, for its trace context.

    The call's tasks then see the caller's trace context (so their own peer
    calls forward it). When OpenTelemetry has a real tracer provider, a
    SERVER span named ``peerflow.peer.v1.Peer/<Method>``, child of the
    caller's context, covers the call, and the tasks run inside it. A call
    with no (valid) ``traceparent`` and no such provider gets
    :data:`NO_TRACE`, which does nothing.

    ``method`` is the method's name or its path (the last segment names it);
    ``transport`` is ``grpc``, ``http_json`` or ``websocket``; ``call_id``
    gives the call's id, asked only when there is something to trace.
    """
    otel = _otel()
    tracer = None if otel is None else otel.tracer()
    if traceparent is None and tracer is None:
        return NO_TRACE
    context = None if traceparent is None else TraceContext.parse(traceparent, tracestate)
    if context is None and tracer is None:
        return NO_TRACE
    if isinstance(method, bytes):
        method = method.rsplit(b"/", 1)[-1].decode("ascii", "replace")
    attributes = {
        "rpc.system": _RPC_SYSTEM.get(transport, "peerflow"),
        "rpc.service": _SERVICE,
        "rpc.method": method,
        "peerflow.transport": transport,
        "peerflow.node_id": node_id,
        "peerflow.call_id": call_id(),
    }
    caller = _caller.get()
    if caller != "-":
        attributes["peerflow.caller_node_id"] = caller
    return _CallTrace(context, otel, tracer, f"{_SERVICE}/{method}", attributes)


def current_caller_node_id() -> str:
    """The node id of the caller the current task serves, or ``"-"``."""
    return _caller.get()


def set_caller_node_id(node_id: str) -> None:
    """Mark the current task (and the tasks it starts) as serving caller ``node_id``.

    The call's span, if it has one, and the spans of calls served later
    from these tasks (the WebSocket variant admits its caller once per
    connection) record it as ``peerflow.caller_node_id``.
    """
    _caller.set(node_id)
    serving = _serving.get()
    if serving is not None:
        serving.admitted(node_id)


def call_failed(error: BaseException | str, error_type: str | None = None) -> None:
    """Mark the call the current task serves as failed (its span's status is ERROR).

    ``error`` is the exception the call reports, or the description of a
    failed run (then ``error_type`` names its exception type). Outside a
    traced call this does nothing.
    """
    serving = _serving.get()
    if serving is not None:
        serving.fail(error, error_type)


# -- OpenTelemetry ---------------------------------------------------------------


@final
class _OtelApi:
    """The few OpenTelemetry API calls peerflow makes, once the API has been imported.

    The modules are imported by name: OpenTelemetry is an optional extra,
    and a peer without it must neither fail nor pay for it.
    """

    def __init__(self, trace_api: Any, context_api: Any) -> None:
        self._trace = trace_api
        self._context = context_api
        self._idle_providers = (trace_api.ProxyTracerProvider, trace_api.NoOpTracerProvider)
        self._provider: Any = None
        self._tracer: Any = None
        # Imported on first use: the propagate module reads its configuration
        # (entry points) when imported, which a peer with no spans never needs.
        self._inject: Any = None
        self._extractor: Any = None

    def current(self) -> TraceContext | None:
        """The current span's context as a TraceContext, when a valid span is current."""
        if not self._trace.get_current_span().get_span_context().is_valid:
            return None
        if self._inject is None:
            self._inject = importlib.import_module("opentelemetry.propagate").inject
        carrier: dict[str, str] = {}
        # The global propagator: the application decides what is propagated
        # (peerflow carries its traceparent and tracestate).
        self._inject(carrier)
        return TraceContext.parse(carrier.get(TRACEPARENT), carrier.get(TRACESTATE))

    def tracer(self) -> Any:
        """peerflow's tracer of the global tracer provider, or None if that provider is a no-op."""
        provider = self._trace.get_tracer_provider()
        if provider is not self._provider:
            # Until an application sets a provider, the global one is a proxy
            # that makes non-recording spans: opening them would be waste.
            self._tracer = (
                None
                if isinstance(provider, self._idle_providers)
                else provider.get_tracer("peerflow")
            )
            self._provider = provider
        return self._tracer

    def start_server_span(
        self, tracer: Any, name: str, parent: TraceContext | None, attributes: dict[str, str]
    ) -> Any:
        """Start a SERVER span, child of ``parent`` (a new trace without one)."""
        context = self._context.Context()
        if parent is not None:
            if self._extractor is None:
                # W3C's own propagator, whatever the global one is: the wire
                # carries exactly W3C's two fields.
                self._extractor = importlib.import_module(
                    "opentelemetry.trace.propagation.tracecontext"
                ).TraceContextTextMapPropagator()
            carrier = {TRACEPARENT: parent.traceparent}
            if parent.tracestate is not None:
                carrier[TRACESTATE] = parent.tracestate
            context = self._extractor.extract(carrier, context)
        return tracer.start_span(
            name, context=context, kind=self._trace.SpanKind.SERVER, attributes=attributes
        )

    def attach_span(self, span: Any) -> Any:
        """Make ``span`` current for the task (and the tasks it starts); returns a token."""
        return self._context.attach(self._trace.set_span_in_context(span))

    def detach(self, token: Any) -> None:
        """Undo :meth:`attach_span`."""
        self._context.detach(token)

    def set_error(self, span: Any, description: str, error_type: str | None) -> None:
        """Set ``span``'s status to ERROR."""
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, description))
        if error_type is not None:
            span.set_attribute("error.type", error_type)


@functools.cache
def _otel() -> _OtelApi | None:
    """The OpenTelemetry API, imported on first use (None when it is not installed)."""
    try:
        return _OtelApi(
            importlib.import_module("opentelemetry.trace"),
            importlib.import_module("opentelemetry.context"),
        )
    except ImportError:
        return None
