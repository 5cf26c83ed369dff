"""Steps and the step registry a peer server resolves step ids against."""

from __future__ import annotations

import dis
import inspect
import types
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, final

import attrs

from ..errors import DuplicateStepError
from .events import Event, event_type_name

if TYPE_CHECKING:
    from .context import Context

__all__ = [
    "AcceptsSpec",
    "Handler",
    "StepRegistry",
    "StepSpec",
    "never_suspends",
    "normalize_accepts",
]

#: ``async def handler(event, ctx) -> Event | list[Event] | None``.
Handler: TypeAlias = Callable[[Any, "Context"], Awaitable["Event | Sequence[Event] | None"]]

#: What ``accepts=`` takes: one event class or wire name, or an iterable of them.
AcceptsSpec: TypeAlias = "type[Event] | str | Iterable[type[Event] | str]"


def normalize_accepts(accepts: AcceptsSpec) -> tuple[str, ...]:
    """Return the wire names in ``accepts``, in order and without repeats.

    Raises:
        TypeError: an item is neither an Event subclass nor a str.
        ValueError: ``accepts`` is empty.
    """
    items: Iterable[type[Event] | str]
    items = (accepts,) if isinstance(accepts, str | type) else accepts
    names = tuple(dict.fromkeys(event_type_name(item) for item in items))
    if not names:
        raise ValueError("a step must accept at least one event type")
    return names


# A coroutine's frame suspends only at a yield instruction of its own code:
# every await, async for and async with compiles to one (YIELD_FROM up to
# 3.10, YIELD_VALUE since 3.11).
_SUSPENDING_OPS = frozenset({"YIELD_VALUE", "YIELD_FROM"})


def never_suspends(handler: Handler) -> bool:
    """Return True if ``handler`` is an ``async def`` whose body cannot suspend.

    Such a handler has no ``await``, ``async for`` or ``async with``: awaiting
    it runs it to its end with no checkpoint, so no other task runs meanwhile.
    Anything else (other callables, wrappers that await) gives False.
    """
    if isinstance(handler, types.MethodType):
        handler = handler.__func__
    if not isinstance(handler, types.FunctionType):
        return False
    code = handler.__code__
    if not code.co_flags & inspect.CO_COROUTINE:
        return False
    return all(op.opname not in _SUSPENDING_OPS for op in dis.get_instructions(code))


@final
@attrs.frozen
class StepSpec:
    """A registered step: what it accepts, its handler and its limits.

    Attributes:
        step_id: the step's id, unique within a :class:`StepRegistry`.
        accepts: the wire names of the events it handles.
        handler: ``async def (event, ctx) -> Event | list[Event] | None``.
        timeout: seconds one invocation may take, or None.
        max_concurrency: how many invocations may run at once within a run,
            or None for no limit. Extra events wait their turn; none is dropped.
    """

    step_id: str
    accepts: tuple[str, ...]
    handler: Handler = attrs.field(eq=False)
    timeout: float | None = None
    max_concurrency: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"step {self.step_id!r}: timeout must be positive")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"step {self.step_id!r}: max_concurrency must be at least 1")

    def same_step(self, other: StepSpec) -> bool:
        """Return True if ``other`` has the same id, handler object and accepts."""
        return (
            self.step_id == other.step_id
            and self.handler is other.handler
            and self.accepts == other.accepts
        )


@final
class StepRegistry:
    """Steps by id: where a peer server finds the steps a caller names.

    Building a :class:`~peerflow.Workflow` registers its steps here (in
    :meth:`default` unless the workflow was given another registry).
    """

    _default: ClassVar[StepRegistry | None] = None

    def __init__(self) -> None:
        self._steps: dict[str, StepSpec] = {}

    @classmethod
    def default(cls) -> StepRegistry:
        """Return the process-wide registry."""
        if cls._default is None:
            cls._default = cls()
        return cls._default

    def register(self, spec: StepSpec) -> StepSpec:
        """Add ``spec`` and return it.

        Registering the same handler with the same accepts again is allowed
        and replaces the spec (so its limits may change).

        Raises:
            DuplicateStepError: the id is taken by a different handler or accepts.
        """
        existing = self._steps.get(spec.step_id)
        if existing is not None and not existing.same_step(spec):
            raise DuplicateStepError(spec.step_id)
        self._steps[spec.step_id] = spec
        return spec

    def unregister(self, step_id: str) -> bool:
        """Remove ``step_id``; return True if it was registered."""
        return self._steps.pop(step_id, None) is not None

    def get(self, step_id: str) -> StepSpec | None:
        """Return the step registered as ``step_id``, or None."""
        return self._steps.get(step_id)

    def __getitem__(self, step_id: str) -> StepSpec:
        """Return the step registered as ``step_id``.

        Raises:
            KeyError: no such step.
        """
        return self._steps[step_id]

    def __contains__(self, step_id: object) -> bool:
        return step_id in self._steps

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._steps))

    def __len__(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        return f"<StepRegistry {len(self._steps)} steps>"
