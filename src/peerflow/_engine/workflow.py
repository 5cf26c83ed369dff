"""Workflow: a named set of steps, and the entry points that run it."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from contextlib import AbstractAsyncContextManager
from types import EllipsisType, TracebackType
from typing import Any, TypeVar, final

import trio

from .._refs.ids import new_uuid4
from .._refs.registry import SessionRefRegistry
from ..errors import DuplicateStepError
from .events import Event
from .run import Routes, Run, RunResult, WorkflowHandle, enclosing_registry
from .steps import AcceptsSpec, Handler, StepRegistry, StepSpec, never_suspends, normalize_accepts

__all__ = ["Workflow"]

_H = TypeVar("_H", bound=Handler)


@final
class Workflow:
    """A named set of steps that route events to each other; run it with :meth:`run`.

    Args:
        name: the workflow's name (used in errors and by peers).
        timeout: seconds a whole run may take, or None for no limit.
        registry: where added steps are registered, for peers to find them;
            defaults to :meth:`StepRegistry.default`.

    A run starts by routing a :class:`~peerflow.StartEvent` carrying the
    input and ends when a step emits a :class:`~peerflow.StopEvent`. Each
    event goes to every step that accepts its wire name; what a handler
    returns is routed in turn.
    """

    def __init__(
        self,
        name: str,
        *,
        timeout: float | None = None,
        registry: StepRegistry | None = None,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError("a workflow timeout must be positive")
        self.name = name
        self.timeout = timeout
        self.registry = StepRegistry.default() if registry is None else registry
        self._steps: dict[str, StepSpec] = {}
        self._routes: Routes | None = None
        self._limits: dict[str, int] = {}
        self._inline: frozenset[str] = frozenset()

    @classmethod
    def from_steps(
        cls,
        name: str,
        steps: Iterable[StepSpec],
        *,
        timeout: float | None = None,
        registry: StepRegistry | None = None,
    ) -> Workflow:
        """Assemble a workflow from registered steps, e.g. those a peer caller named.

        The steps are used as they are and not registered again.

        Raises:
            DuplicateStepError: two different steps share an id.
        """
        workflow = cls(name, timeout=timeout, registry=registry)
        for spec in steps:
            workflow._add(spec)
        return workflow

    @property
    def steps(self) -> tuple[StepSpec, ...]:
        """The workflow's steps, in the order they were added."""
        return tuple(self._steps.values())

    def step(
        self,
        step_id: str,
        accepts: AcceptsSpec,
        *,
        timeout: float | None = None,
        max_concurrency: int | None = None,
    ) -> Callable[[_H], _H]:
        """Decorator form of :meth:`add_step`; returns the handler unchanged.

        Raises:
            DuplicateStepError: ``step_id`` is taken by another handler.
        """

        def decorate(handler: _H) -> _H:
            self.add_step(
                step_id, accepts, handler, timeout=timeout, max_concurrency=max_concurrency
            )
            return handler

        return decorate

    def add_step(
        self,
        step_id: str,
        accepts: AcceptsSpec,
        handler: Handler,
        *,
        timeout: float | None = None,
        max_concurrency: int | None = None,
    ) -> StepSpec:
        """Add a step to this workflow and to its step registry; return its spec.

        ``accepts`` takes Event classes or wire names. ``timeout`` bounds each
        invocation (not its wait for a ``max_concurrency`` slot).

        Raises:
            DuplicateStepError: ``step_id`` is taken by another handler or
                other accepts, here or in the registry.
            ValueError: a limit is not positive, or ``accepts`` is empty.
            TypeError: ``accepts`` holds something that is not an event type.
        """
        spec = StepSpec(step_id, normalize_accepts(accepts), handler, timeout, max_concurrency)
        existing = self._steps.get(step_id)
        if existing is not None and not existing.same_step(spec):
            raise DuplicateStepError(step_id)
        self.registry.register(spec)
        self._add(spec)
        return spec

    def _add(self, spec: StepSpec) -> None:
        existing = self._steps.get(spec.step_id)
        if existing is not None and not existing.same_step(spec):
            raise DuplicateStepError(spec.step_id)
        self._steps[spec.step_id] = spec
        self._routes = None

    def _routing(self) -> tuple[Routes, dict[str, int], frozenset[str]]:
        if self._routes is None:
            routes: dict[str, list[StepSpec]] = {}
            for spec in self._steps.values():
                for name in spec.accepts:
                    routes.setdefault(name, []).append(spec)
            self._routes = {name: tuple(specs) for name, specs in routes.items()}
            self._limits = {
                spec.step_id: spec.max_concurrency
                for spec in self._steps.values()
                if spec.max_concurrency is not None
            }
            # Steps a run may execute before it opens its nursery. A slot wait
            # (max_concurrency) happens before the handler starts, when the run
            # has no other task, and a step timeout is the step's own scope.
            self._inline = frozenset(
                spec.step_id for spec in self._steps.values() if never_suspends(spec.handler)
            )
        return self._routes, self._limits, self._inline

    def _new_run(
        self,
        input: Any,
        *,
        stream: trio.MemorySendChannel[Event] | None,
        node_id: str | None,
        run_id: str | None,
        refs: SessionRefRegistry | None,
        owner: Hashable,
        parent_scope: Hashable,
        timeout: float | EllipsisType | None,
        deadline: float | None,
    ) -> Run:
        if refs is None:
            # A child run started from a step shares its parent's registry,
            # where the parent's end can drop the refs it binds to its run.
            refs = enclosing_registry()
            if refs is None:
                refs = SessionRefRegistry.default()
        routes, limits, inline = self._routing()
        return Run(
            self.name,
            routes,
            limits,
            inline,
            input,
            node_id=refs.node_id if node_id is None else node_id,
            run_id=new_uuid4() if run_id is None else run_id,
            refs=refs,
            owner=owner,
            parent_scope=parent_scope,
            timeout=self.timeout if timeout is ... else timeout,
            deadline=deadline,
            stream=stream,
        )

    async def run(
        self,
        input: Any = None,
        *,
        node_id: str | None = None,
        run_id: str | None = None,
        refs: SessionRefRegistry | None = None,
        owner: Hashable = None,
        parent_scope: Hashable = None,
        timeout: float | EllipsisType | None = ...,
        deadline: float | None = None,
    ) -> RunResult:
        """Run the workflow on ``input`` to its end and return the result.

        The same as ``async with self.start(...) as h: return await h.result()``,
        without the event stream.

        Args:
            input: the ``data`` of the :class:`~peerflow.StartEvent`.
            node_id: ``ctx.node_id``; defaults to the ref registry's node id.
            run_id: ``ctx.run_id``; defaults to a fresh uuid4 string.
            refs: the ref registry for ``ctx.refs``; defaults to the
                registry of the run whose step starts this one, or else
                :meth:`SessionRefRegistry.default`.
            owner: the caller identity that owns the refs the run creates
                (None is the local process).
            parent_scope: the scope ``UNTIL_PARENT_FINISH`` refs are bound to.
                A step running a child workflow passes ``ctx.run_id`` here to
                tie the child's refs to its own run.
            timeout: overrides the workflow's timeout (None for none).
            deadline: an absolute ``trio.current_time()`` deadline, e.g. a
                caller's; the earlier of it and the timeout applies.

        Raises:
            StepError: a step raised; the original exception is its ``__cause__``.
            StepTimeoutError: a step ran out of time.
            WorkflowTimeoutError: the run ran out of time.
            UnroutableEventError: an event was emitted that no step accepts.
            WorkflowError: the run ended without a StopEvent.
        """
        async with self.execute(
            input,
            node_id=node_id,
            run_id=run_id,
            refs=refs,
            owner=owner,
            parent_scope=parent_scope,
            timeout=timeout,
            deadline=deadline,
        ) as run:
            return run.outcome()

    def execute(
        self,
        input: Any = None,
        *,
        node_id: str | None = None,
        run_id: str | None = None,
        refs: SessionRefRegistry | None = None,
        owner: Hashable = None,
        parent_scope: Hashable = None,
        timeout: float | EllipsisType | None = ...,
        deadline: float | None = None,
    ) -> AbstractAsyncContextManager[Run]:
        """Run to the end, then hold the finished run open for the block.

        For hosts (a peer server) that must read what a run left behind,
        such as its ``UNTIL_CONTEXT_DROP`` refs, before they are purged on
        leaving the block: ``async with workflow.execute(input) as run:``.
        ``run.outcome()`` gives the result or raises. The arguments are
        those of :meth:`run`, which is built on this.
        """
        run = self._new_run(
            input,
            stream=None,
            node_id=node_id,
            run_id=run_id,
            refs=refs,
            owner=owner,
            parent_scope=parent_scope,
            timeout=timeout,
            deadline=deadline,
        )
        return _Execution(run)

    def start(
        self,
        input: Any = None,
        *,
        node_id: str | None = None,
        run_id: str | None = None,
        refs: SessionRefRegistry | None = None,
        owner: Hashable = None,
        parent_scope: Hashable = None,
        timeout: float | EllipsisType | None = ...,
        deadline: float | None = None,
    ) -> WorkflowHandle:
        """Start a run in the background of an ``async with`` block.

        ``async with workflow.start(input) as handle:`` runs the workflow
        while the block streams ``handle.events()`` and awaits
        ``handle.result()``. The arguments are those of :meth:`run`. Leaving
        the block waits for the run, then purges its refs that do not
        outlive it.
        """
        send, receive = trio.open_memory_channel[Event](float("inf"))
        run = self._new_run(
            input,
            stream=send,
            node_id=node_id,
            run_id=run_id,
            refs=refs,
            owner=owner,
            parent_scope=parent_scope,
            timeout=timeout,
            deadline=deadline,
        )
        return WorkflowHandle(run, receive)

    def __repr__(self) -> str:
        return f"<Workflow {self.name!r} steps={list(self._steps)}>"


@final
class _Execution:
    """What :meth:`Workflow.execute` returns: the run happens on entering.

    A class rather than ``@asynccontextmanager``, whose generator machinery
    is a measurable share of a peer call's cost.
    """

    __slots__ = ("_run",)

    def __init__(self, run: Run) -> None:
        self._run = run

    async def __aenter__(self) -> Run:
        try:
            await self._run.main()
        except BaseException:
            self._run.release_refs()
            raise
        return self._run

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._run.release_refs()
