"""The peer service: what each method does, independent of the wire it came on.

gRPC, HTTP/JSON and WebSocket front ends all decode a request, call one
method of :class:`PeerService`, and encode what it returns. Everything about
runs, refs, ownership and leases is decided here, once.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator
from types import TracebackType
from typing import Any, final

import attrs
import trio

from .._engine.events import Event
from .._engine.run import RunResult
from .._engine.steps import StepRegistry, StepSpec
from .._engine.workflow import Workflow
from .._excgroups import collapse_excgroups
from .._refs.descriptor import RefLifetime
from .._refs.registry import RefEntry, SessionRefRegistry
from .._refs.serializers import serializer_for_type
from .._wire.envelopes import (
    InlineRef,
    InvokeSubWorkflowRequest,
    LeaseRequest,
    LeaseResponse,
    SubWorkflowResponse,
)
from ..errors import (
    PeerEncodeError,
    PeerLimitError,
    PeerTimeoutError,
    PeerUnknownStepError,
    StepError,
    StepTimeoutError,
    WorkflowError,
    WorkflowTimeoutError,
)
from .leases import LeaseTable
from .limits import Limits
from .logs import PeerLogger
from .trace import call_failed

__all__ = ["Caller", "PeerService", "deref_pieces", "encode_response"]

_CONTEXT = RefLifetime.UNTIL_CONTEXT_DROP


@final
@attrs.frozen
class Caller:
    """Who is calling: the node id it claims plus what authentication proved.

    Attributes:
        node_id: the caller's ``x-peerflow-peer-node-id``.
        principal: the authenticated identity (a client certificate subject
            or a token digest), or None when authentication is off.
        connection: a scope id for the caller's connection; refs bound to the
            caller's parent scope without a lease fall back to it.
    """

    node_id: str
    principal: str | None = None
    connection: Hashable = None

    @property
    def owner(self) -> Hashable:
        """The identity that owns the refs this caller's runs create."""
        return (self.node_id, self.principal)


@final
class PeerService:
    """Runs sub-workflows for callers and serves their refs and leases.

    Args:
        node_id: stamped on every ref descriptor.
        steps: where requested step ids are looked up.
        refs: where the runs' refs are stored.
        limits: lease TTL bounds and the grace period for vanished callers.
    """

    def __init__(
        self,
        node_id: str,
        *,
        steps: StepRegistry,
        refs: SessionRefRegistry,
        limits: Limits,
    ) -> None:
        self.node_id = node_id
        self._log = PeerLogger("service", node_id)
        self.steps = steps
        self.refs = refs
        self.limits = limits
        self.leases = LeaseTable(
            refs, per_caller=limits.leases_per_caller, capacity=limits.lease_capacity
        )
        self._workflows: dict[
            tuple[str, tuple[str, ...]], tuple[Workflow, tuple[StepSpec, ...]]
        ] = {}

    # -- invoke ----------------------------------------------------------------

    def assemble(self, request: InvokeSubWorkflowRequest) -> Workflow:
        """Return the workflow a request names, built from registered steps.

        Raises:
            PeerUnknownStepError: a step id is not registered here; nothing ran.
        """
        specs: list[StepSpec] = []
        for step_id in request.step_ids:
            spec = self.steps.get(step_id)
            if spec is None:
                raise PeerUnknownStepError(step_id)
            specs.append(spec)
        key = (request.workflow_name, request.step_ids)
        cached = self._workflows.get(key)
        # Registered steps can be replaced at run time; reuse only an exact match.
        if cached is not None and all(map(operator.is_, cached[1], specs)):
            return cached[0]
        workflow = Workflow.from_steps(request.workflow_name, specs, registry=self.steps)
        if len(self._workflows) >= 1024:
            self._workflows.clear()
        # The specs as requested: a workflow holds a repeated step only once.
        self._workflows[key] = (workflow, tuple(specs))
        return workflow

    def scope_for(self, request: InvokeSubWorkflowRequest, caller: Caller) -> Hashable:
        """The parent scope that ``UNTIL_PARENT_FINISH`` refs of this call bind to."""
        if request.lease_id is not None:
            return self.leases.scope(caller.owner, request.lease_id, self.limits.lease_ttl)
        return caller.connection

    async def invoke(
        self,
        request: InvokeSubWorkflowRequest,
        caller: Caller,
        *,
        deadline: float = math.inf,
        on_event: Callable[[Event], Awaitable[None]] | None = None,
    ) -> SubWorkflowResponse:
        """Run the requested sub-workflow and build its response.

        ``deadline`` is the caller's (trio time); the request's ``timeout_ms``
        tightens it. ``on_event`` receives streamed events as they happen.
        A failed run is a response with ``error`` set, not an exception.

        Raises:
            PeerUnknownStepError: a step id is unknown; nothing ran.
            PeerTimeoutError: the caller's deadline passed first.
            PeerLimitError: the request names a lease that is not open, and
                the caller may open no more; or ``on_event`` fell more than
                ``limits.stream_backlog`` events behind the run (which is
                then cancelled).
        """
        workflow = self.assemble(request)
        if request.timeout_ms is not None:
            deadline = min(deadline, trio.current_time() + request.timeout_ms / 1000)
        parent_scope = self.scope_for(request, caller)
        run_deadline = None if deadline == math.inf else deadline
        # Both blocks answer while the run's refs still exist: leaving them
        # purges the UNTIL_CONTEXT_DROP refs, whose bytes must ship first.
        # (Keyword arguments spelt out: a dict splatted into them costs more.)
        outcome: RunResult | WorkflowError
        response: SubWorkflowResponse
        run_id = None
        try:
            if on_event is None:
                async with workflow.execute(
                    request.input,
                    node_id=self.node_id,
                    refs=self.refs,
                    owner=caller.owner,
                    parent_scope=parent_scope,
                    deadline=run_deadline,
                ) as run:
                    run_id = run.run_id
                    try:
                        outcome = run.outcome()
                    except WorkflowError as exc:
                        outcome = exc
                    response = self._respond(request, deadline, outcome, run.created_refs())
            else:
                async with workflow.start(
                    request.input,
                    node_id=self.node_id,
                    refs=self.refs,
                    owner=caller.owner,
                    parent_scope=parent_scope,
                    deadline=run_deadline,
                ) as handle:
                    run_id = handle.run_id
                    await _forward(handle.events(), on_event, self.limits.stream_backlog)
                    try:
                        outcome = await handle.result()
                    except WorkflowError as exc:
                        outcome = exc
                    response = self._respond(request, deadline, outcome, handle.created_refs())
        except BaseException:
            # Cancelled or failed after the run began, perhaps after its
            # outcome: no response will carry the ids of what it created.
            if run_id is not None:
                self.refs.purge_run(run_id, all_lifetimes=True)
            raise
        return response

    def delivering(
        self,
        response: SubWorkflowResponse,
        caller: Caller,
        watch: Callable[[Callable[[], None]], None] | None = None,
    ) -> _Delivery:
        """Wrap the sending of ``response``: if that fails or is cancelled, drop its refs.

        The caller then never learns their ids, so nobody could release
        them; the call leaves no trace, as a call cancelled mid-run does.
        Once sent, a response that hands out refs is given to ``watch``
        (``ServerStream.watch_delivery``), which drops them if the caller
        turns out to have given up before reading it.
        """
        return _Delivery(self, response, caller, watch)

    def discard(self, ref_uuids: Iterable[str], caller: Caller) -> None:
        """Drop the refs a response hands out (its ``remote_refs``): it never reached ``caller``."""
        dropped = sum(self.refs.remove(ref_uuid, owner=caller.owner) for ref_uuid in ref_uuids)
        if dropped:
            self._log.info("dropped %d refs of a response the caller never received", dropped)

    def _respond(
        self,
        request: InvokeSubWorkflowRequest,
        deadline: float,
        outcome: RunResult | WorkflowError,
        entries: list[RefEntry],
    ) -> SubWorkflowResponse:
        if isinstance(outcome, RunResult):
            return self._success(outcome.result, outcome.state, entries)
        if (
            isinstance(outcome, WorkflowTimeoutError)
            and not isinstance(outcome, StepTimeoutError)
            and trio.current_time() >= deadline
        ):
            raise PeerTimeoutError(
                f"sub-workflow {request.workflow_name!r} ran past the caller's deadline"
            ) from outcome
        self._log.info("sub-workflow %r failed: %s", request.workflow_name, outcome)
        response = _failure(outcome)
        # An OK status on the wire, but a failed call for the trace.
        call_failed(response.error or "", response.error_type)
        return response

    def _success(
        self, result: Any, state: dict[str, Any], entries: list[RefEntry]
    ) -> SubWorkflowResponse:
        remote, inline, dropped = {}, {}, []
        for entry in entries:
            if entry.descriptor.lifetime is not _CONTEXT:
                remote[entry.ref_uuid] = entry.descriptor
                continue
            serializer = serializer_for_type(type(entry.value))
            if serializer is None:
                dropped.append(entry.ref_uuid)
            else:
                inline[entry.ref_uuid] = InlineRef(
                    entry.descriptor, bytes(serializer.to_bytes(entry.value))
                )
        return SubWorkflowResponse(
            result=result,
            state=dict(state),
            remote_refs=remote,
            inline_refs=inline,
            dropped_refs=tuple(dropped),
        )

    # -- refs ------------------------------------------------------------------

    def deref(self, ref_uuid: str, caller: Caller) -> tuple[str, memoryview]:
        """Return the type tag and the serialized bytes of one of the caller's refs.

        Raises:
            RefNotFoundError: no such ref, or it is another caller's.
            RefNotSerializableError: the value has no serializer.
        """
        entry = self.refs.entry(ref_uuid, owner=caller.owner)
        data = self.refs.serialize(ref_uuid, owner=caller.owner)
        return entry.descriptor.type_tag, memoryview(data).cast("B")

    def release(self, ref_uuid: str, caller: Caller) -> bool:
        """Drop one of the caller's refs; False if it was already gone (or not theirs)."""
        return self.refs.remove(ref_uuid, owner=caller.owner)

    def lease(self, request: LeaseRequest, caller: Caller) -> LeaseResponse:
        """Open, renew or close one of the caller's leases.

        Raises:
            PeerLimitError: the lease is new and the caller, or the peer,
                holds as many open leases as its limit allows.
        """
        if request.close:
            released = self.leases.close(caller.owner, request.lease_id)
            return LeaseResponse(request.lease_id, 0, released=released)
        ttl = min(max(request.ttl_ms / 1000, self.limits.min_lease_ttl), self.limits.max_lease_ttl)
        self.leases.renew(caller.owner, request.lease_id, ttl)
        return LeaseResponse(request.lease_id, int(ttl * 1000))

    async def run_reaper(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Purge the refs of expired leases until cancelled."""
        await self.leases.run_reaper(task_status=task_status)


@final
class _Delivery:
    """What :meth:`PeerService.delivering` returns (a class: it is on every call's path)."""

    __slots__ = ("_caller", "_response", "_service", "_watch")

    def __init__(
        self,
        service: PeerService,
        response: SubWorkflowResponse,
        caller: Caller,
        watch: Callable[[Callable[[], None]], None] | None,
    ) -> None:
        self._service = service
        self._response = response
        self._caller = caller
        self._watch = watch

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        refs = self._response.remote_refs
        if exc_type is not None:
            self._service.discard(refs, self._caller)
        elif self._watch is not None and refs:
            # Only the ids: a watch may outlive the response by a while.
            self._watch(functools.partial(self._service.discard, tuple(refs), self._caller))


def encode_response(
    encode: Callable[[SubWorkflowResponse], bytes], response: SubWorkflowResponse
) -> bytes:
    """Encode ``response`` with ``encode``; output that cannot travel becomes an error.

    A run whose result or state is not a wire value still answers: with
    ``error`` set instead of that output. Its refs stay listed: they exist on
    this node, and the caller must be able to release them.
    """
    try:
        return encode(response)
    except PeerEncodeError as exc:
        return encode(
            attrs.evolve(
                response,
                result=None,
                state={},
                error=f"the run's output cannot travel: {exc}",
                error_type="PeerEncodeError",
            )
        )


def deref_pieces(
    type_tag: str, payload: memoryview, chunk_size: int
) -> Iterator[tuple[memoryview, str | None, int | None]]:
    """Cut a ref's payload into the pieces of a ``DerefSessionRef`` answer.

    Yields ``(piece, type_tag, total_size)``; only the first piece carries
    the type tag and total size, and an empty payload is one empty piece.
    Pieces are views of ``payload``, never copies.
    """
    total = len(payload)
    yield payload[:chunk_size], type_tag, total
    for offset in range(chunk_size, total, chunk_size):
        yield payload[offset : offset + chunk_size], None, None


async def _forward(
    events: trio.MemoryReceiveChannel[Event],
    on_event: Callable[[Event], Awaitable[None]],
    backlog: int,
) -> None:
    """Hand a run's streamed events to ``on_event``, holding at most ``backlog`` unsent.

    Steps stream without waiting (``write_event_to_stream`` never blocks), so
    a caller that reads slower than its run streams would otherwise make the
    server hold every event until the run ends. The events are taken off the
    run's stream as they come; one more than ``backlog`` waiting fails the
    call, and so cancels the run.

    Raises:
        PeerLimitError: ``backlog`` events were waiting and another came.
    """
    waiting_in, waiting = trio.open_memory_channel[Event](backlog)

    async def take() -> None:
        async with waiting_in:
            async for event in events:
                try:
                    waiting_in.send_nowait(event)
                except trio.WouldBlock:
                    raise PeerLimitError(
                        f"the caller reads the event stream too slowly: {backlog} events "
                        "are waiting (Limits.stream_backlog)"
                    ) from None

    with collapse_excgroups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take)
            async with waiting:
                async for event in waiting:
                    await on_event(event)


def _failure(exc: WorkflowError) -> SubWorkflowResponse:
    cause = exc.__cause__ if isinstance(exc, StepError) else exc
    step_id = getattr(exc, "step_id", None)
    return SubWorkflowResponse(
        error=str(exc) if cause is exc else f"{type(cause).__name__}: {cause}",
        error_step_id=step_id,
        error_type=type(cause).__name__,
    )
