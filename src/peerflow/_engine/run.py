"""The run loop: routing events to steps inside (at most) one nursery per run.

A run's steps execute in the run's nursery, under a cancel scope carrying the
workflow deadline. The hot path avoids a task per event where it can do so
without changing behaviour: when a handler returns, its task carries on with
the first routed (step, event) pair itself and spawns tasks only for the
rest. Events sent with ``ctx.send_event`` while a handler is still running
always get their own tasks, so a sender never waits for its receivers.

The nursery itself opens only once a step may suspend or two things are due
at once: steps whose handlers cannot suspend (see ``steps.never_suspends``)
run before it, and a run made of nothing else, such as a peer's echo, opens
none at all.
"""

from __future__ import annotations

import contextvars
import math
import sys
from collections.abc import Hashable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, final

import attrs
import trio

from .._excgroups import sole_exception
from .._refs.descriptor import RefLifetime, RemoteRefDescriptor
from .._refs.registry import RefEntry, RefsView, SessionRefRegistry
from ..errors import (
    PeerEncodeError,
    StepError,
    StepTimeoutError,
    UnroutableEventError,
    WorkflowError,
    WorkflowTimeoutError,
)
from .context import Context
from .events import DynamicEvent, Event, StartEvent, StopEvent, as_registered
from .steps import StepSpec

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

__all__ = ["Routes", "Run", "RunResult", "WorkflowHandle", "enclosing_registry"]

#: Wire name -> the steps accepting it, in registration order.
Routes = dict[str, tuple[StepSpec, ...]]

_CONTEXT = RefLifetime.UNTIL_CONTEXT_DROP

_running: contextvars.ContextVar[Run | None] = contextvars.ContextVar(
    "peerflow_running", default=None
)


def enclosing_registry() -> SessionRefRegistry | None:
    """The ref registry of the run whose step is the current task, if any."""
    run = _running.get()
    return None if run is None else run.registry


@final
@attrs.frozen
class RunResult:
    """The outcome of a successful run.

    Attributes:
        run_id: the run's id.
        result: the ``result`` of the :class:`~peerflow.StopEvent` that ended it.
        state: the run's final ``ctx.state``.
        refs: the refs this run created that outlive it (every lifetime but
            ``UNTIL_CONTEXT_DROP``), by uuid.
    """

    run_id: str
    result: Any
    state: dict[str, Any]
    refs: dict[str, RemoteRefDescriptor]


@final
class Run:
    """One execution of a workflow: its state, refs, routing and outcome.

    Internal: users see it through :class:`Context`, :class:`WorkflowHandle`
    and :class:`RunResult`.
    """

    def __init__(
        self,
        workflow_name: str,
        routes: Routes,
        limits: dict[str, int],
        inline: frozenset[str],
        input: Any,
        *,
        node_id: str,
        run_id: str,
        refs: SessionRefRegistry,
        owner: Hashable,
        parent_scope: Hashable,
        timeout: float | None,
        deadline: float | None,
        stream: trio.MemorySendChannel[Event] | None,
    ) -> None:
        self.workflow_name = workflow_name
        self.node_id = node_id
        self.run_id = run_id
        self.state: dict[str, Any] = {}
        self.registry = refs
        self._owner = owner
        self._parent_scope = parent_scope
        self._refs: RefsView | None = None
        self.result: RunResult | None = None
        self.error: WorkflowError | None = None
        self._routes = routes
        self._inline = inline
        self._input = input
        self._timeout = timeout
        self._deadline = deadline
        self._stream = stream
        self._semaphores = (
            {step_id: trio.Semaphore(n) for step_id, n in limits.items()} if limits else {}
        )
        self._buffers: dict[tuple[str, frozenset[str]], list[Event]] = {}
        self._nursery: trio.Nursery | None = None
        # What was routed to a task of its own before the nursery was open.
        self._unspawned: list[tuple[StepSpec, Event]] = []
        self._stopped = False
        self._sending = False
        self._stop_value: Any = None
        # Set once the outcome is decided; later results and errors are moot.
        self._decided = False

    @property
    def refs(self) -> RefsView:
        """The run's window on its ref registry, ``ctx.refs``; made on first use."""
        if self._refs is None:
            self._refs = RefsView(
                self.registry,
                owner=self._owner,
                run_id=self.run_id,
                parent_scope=self._parent_scope,
            )
        return self._refs

    # -- driving -------------------------------------------------------------

    async def main(self) -> None:
        """Execute the run to its outcome, which lands in ``result`` or ``error``.

        Raises only what is not an engine failure: cancellation from outside
        and BaseExceptions such as KeyboardInterrupt (one, never a group).
        """
        # The steps' tasks (and the runs they start) see this run as theirs.
        running = _running.set(self)
        try:
            ran_out = await self._run_in_time()
            if self._stopped:
                # Built only now, so refs inserted while the steps were being
                # cancelled are accounted for too.
                self.result = self._build_result()
            elif not self._decided:
                self._decided = True
                if ran_out is not None:
                    self.error = WorkflowTimeoutError(self.workflow_name, ran_out)
                else:
                    self.error = WorkflowError(
                        f"workflow {self.workflow_name!r} ended without a StopEvent: "
                        "every step finished and none emitted one"
                    )
        except BaseExceptionGroup as group:
            sole = sole_exception(group)
            if sole is None:
                raise
            raise sole from sole.__cause__
        finally:
            _running.reset(running)
            if self._stream is not None:
                self._stream.close()
                # A step may have handed its context to a task outliving the run.
                self._stream = None
            if self.error is None and self.result is None:
                self._decided = True

    async def _run_in_time(self) -> float | None:
        """Run the steps within the run's deadline; return the time limit they ran out of."""
        if self._timeout is None and self._deadline is None:
            # No deadline: spare the hot path the clock and a cancel scope.
            await self._run_steps()
            return None
        started = trio.current_time()
        deadline = math.inf if self._deadline is None else self._deadline
        if self._timeout is not None:
            deadline = min(deadline, started + self._timeout)
        if deadline <= started:
            return 0.0  # a caller's deadline that has passed: no time at all, run nothing
        if deadline == math.inf:
            await self._run_steps()
            return None
        with trio.CancelScope(deadline=deadline) as deadline_scope:
            await self._run_steps()
        # cancel_called, not cancelled_caught: a step that swallowed its
        # Cancelled and returned has still run out of time.
        return deadline - started if deadline_scope.cancel_called else None

    async def _run_steps(self) -> None:
        pair = self._route((StartEvent(self._input),))
        # A handler that cannot suspend gives no other task a chance to run
        # before it returns, so until one that may suspend comes up, or two
        # things are due at once, the nursery would only cost time: its
        # scope, its objects and the schedule point of its exit. Events routed
        # meanwhile wait in _unspawned; their tasks could not have started
        # before the handler returned anyway.
        while pair is not None and pair[0].step_id in self._inline and not self._unspawned:
            outputs = await self._invoke(*pair)
            pair = None if outputs is None else self._route(outputs, pair[0].step_id)
        if pair is None and not self._unspawned:
            return
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for waiting in self._unspawned:
                nursery.start_soon(self._drive, *waiting)
            self._unspawned.clear()
            if self._decided:
                # The outcome came before their tasks did: _cancel found no
                # nursery to cancel then.
                nursery.cancel_scope.cancel()
            if pair is not None:
                await self._drive(*pair)

    async def _drive(self, step: StepSpec, event: Event) -> None:
        # Carry on inline with the first routed pair while there is one.
        next_pair: tuple[StepSpec, Event] | None = (step, event)
        while next_pair is not None:
            outputs = await self._invoke(*next_pair)
            if outputs is None:
                return
            next_pair = self._route(outputs, next_pair[0].step_id)

    async def _invoke(self, step: StepSpec, event: Event) -> Sequence[Event] | None:
        ctx = Context(self, step.step_id, event)
        semaphore = self._semaphores.get(step.step_id) if self._semaphores else None
        try:
            if semaphore is not None:
                async with semaphore:
                    out = await self._call(step, event, ctx)
            elif step.timeout is None:
                out = await step.handler(event, ctx)  # _call's plain case, one frame fewer
            else:
                out = await self._call(step, event, ctx)
        except Exception as exc:
            self._fail(StepError(step.step_id, exc))
            return None
        if out is None:
            return None
        if isinstance(out, Event):
            return (out,)
        if isinstance(out, list | tuple) and all(isinstance(e, Event) for e in out):
            return out
        self._fail(
            StepError(
                step.step_id,
                TypeError(
                    f"step returned {type(out).__name__}; expected an Event, "
                    "a list of Events or None"
                ),
            )
        )
        return None

    async def _call(self, step: StepSpec, event: Event, ctx: Context) -> Any:
        if step.timeout is None:
            return await step.handler(event, ctx)
        with trio.move_on_after(step.timeout) as scope:
            out = await step.handler(event, ctx)
        # A handler that swallowed its Cancelled has still run out of time.
        if scope.cancel_called:
            self._fail(StepTimeoutError(self.workflow_name, step.step_id, step.timeout))
            return None
        return out

    def _route(self, events: Sequence[Event], sender: str = "") -> tuple[StepSpec, Event] | None:
        """Route ``events`` from step ``sender``; return one (step, event) pair
        for the caller to run itself."""
        first: tuple[StepSpec, Event] | None = None
        for emitted in events:
            if self._decided:
                return None
            event = emitted
            if type(event) is DynamicEvent:
                try:
                    event = as_registered(emitted)
                except PeerEncodeError as exc:
                    self._fail(StepError(sender, exc))
                    return None
            if type(event) is StopEvent:
                self._finish(event.result)
                return None
            steps = self._routes.get(event.event_type)
            if steps is None:
                self._fail(UnroutableEventError(event.event_type, self.workflow_name))
                return None
            for step in steps:
                if first is None:
                    first = (step, event)
                else:
                    self._spawn(step, event)
        return first

    def _spawn(self, step: StepSpec, event: Event) -> None:
        if self._nursery is None:
            self._unspawned.append((step, event))
        else:
            self._nursery.start_soon(self._drive, step, event)

    def send(self, event: Event) -> None:
        """Route ``event`` with a task of its own per accepting step."""
        # The sender is a step still running: an outcome decided here must
        # cancel it too, even when it is the nursery's body.
        self._sending = True
        try:
            pair = self._route((event,))
        finally:
            self._sending = False
        if pair is not None:
            self._spawn(*pair)

    def publish(self, event: Event) -> None:
        """Hand ``event`` to the observers, if the run has any."""
        if self._stream is not None:
            self._stream.send_nowait(event)

    def collect_buffer(self, step_id: str, names: frozenset[str]) -> list[Event]:
        """Return the fan-in buffer of ``step_id`` for events named ``names``."""
        return self._buffers.setdefault((step_id, names), [])

    # -- outcome ---------------------------------------------------------------

    def _finish(self, result: Any) -> None:
        self._decided = True
        self._stopped = True
        self._stop_value = result
        self._cancel()

    def _build_result(self) -> RunResult:
        refs = {
            entry.ref_uuid: entry.descriptor
            for entry in self.registry.list_run(self.run_id)
            if entry.descriptor.lifetime is not _CONTEXT
        }
        return RunResult(self.run_id, self._stop_value, self.state, refs)

    def _fail(self, error: WorkflowError) -> None:
        if self._decided:
            return
        self._decided = True
        self.error = error
        self._cancel()

    def _cancel(self) -> None:
        # The nursery's body drives steps inline and ends on its own once a
        # returning step decides the outcome: then only child tasks need
        # cancelling. A needless cancel costs a Cancelled raised and caught.
        # Before the nursery opens there is nothing to cancel: the one step
        # running cannot suspend, so it never reaches a cancel point (only
        # trio.current_effective_deadline() could tell it apart), and tasks
        # routed meanwhile are cancelled as the nursery opens.
        nursery = self._nursery
        if nursery is not None and (nursery.child_tasks or self._sending):
            nursery.cancel_scope.cancel()

    def outcome(self) -> RunResult:
        """Return the run's result, or raise its error.

        Raises:
            WorkflowError: the run failed (a subclass says how), or it was
                cancelled before it had an outcome.
        """
        if self.result is not None:
            return self.result
        if self.error is not None:
            raise self.error
        raise WorkflowError(f"workflow {self.workflow_name!r} run {self.run_id} was cancelled")

    def created_refs(self) -> list[RefEntry]:
        """List the refs this run created that are still stored, oldest first."""
        return self.registry.list_run(self.run_id)

    def release_refs(self) -> None:
        """Purge what must not outlive the run; after failure, everything it created."""
        self.registry.purge_run(self.run_id, all_lifetimes=self.result is None)
        # Local child runs bind their UNTIL_PARENT_FINISH refs to their parent's id.
        self.registry.drop_scope(self.run_id)


@final
class WorkflowHandle:
    """A run in progress, from ``async with workflow.start(...) as handle:``.

    The ``async with`` block is the run's nursery: leaving it waits for the
    run to end (or cancels it, if the block raised) and then purges the run's
    ``UNTIL_CONTEXT_DROP`` refs, or all its refs if it did not succeed.
    """

    def __init__(self, run: Run, events: trio.MemoryReceiveChannel[Event]) -> None:
        self._run = run
        self._events = events
        self._ended = trio.Event()
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None

    @property
    def run_id(self) -> str:
        """The id of the run."""
        return self._run.run_id

    @property
    def state(self) -> dict[str, Any]:
        """The run's live ``ctx.state``."""
        return self._run.state

    def events(self) -> trio.MemoryReceiveChannel[Event]:
        """Return an async iterator over events from ``ctx.write_event_to_stream``.

        It ends when the run ends. Events are buffered without bound until
        read. There is one stream per run: iterate it from one place, inside
        the ``async with`` block (leaving the block closes it).
        """
        return self._events

    async def result(self) -> RunResult:
        """Wait for the run to end and return its result.

        Raises:
            WorkflowError: the run failed; a subclass says how (``StepError``
                with the original exception as ``__cause__``,
                ``WorkflowTimeoutError``, ``StepTimeoutError``,
                ``UnroutableEventError``).
        """
        await self._ended.wait()
        return self._run.outcome()

    def created_refs(self) -> list[RefEntry]:
        """List the refs this run created that are still stored, oldest first.

        Inside the ``async with`` block this includes ``UNTIL_CONTEXT_DROP``
        refs, so they can be serialized before the block purges them.
        """
        return self._run.created_refs()

    async def __aenter__(self) -> WorkflowHandle:
        if self._nursery_manager is not None:
            raise RuntimeError("a WorkflowHandle can be entered only once")
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        nursery.start_soon(self._main)
        return self

    async def _main(self) -> None:
        try:
            await self._run.main()
        finally:
            self._ended.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._nursery_manager is not None
        try:
            return bool(await self._nursery_manager.__aexit__(exc_type, exc, tb))
        except BaseExceptionGroup as group:
            sole = sole_exception(group)
            if sole is None:
                raise
            raise sole from sole.__cause__
        finally:
            self._events.close()
            self._run.release_refs()
