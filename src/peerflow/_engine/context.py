"""The context a step handler receives: state, refs, routing and streaming."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, final

from .events import Event, as_registered
from .steps import AcceptsSpec, normalize_accepts

if TYPE_CHECKING:
    from .._refs.registry import RefsView
    from .run import Run

__all__ = ["Context"]


@final
class Context:
    """What a step handler gets besides its event: one per handler invocation.

    Every invocation of a run sees the same :attr:`state` and :attr:`refs`;
    :meth:`collect_events` knows which event the invocation is handling.
    Contexts are made by the engine, not by users.

    Attributes:
        step_id: the id of the step being invoked.
        event: the event this invocation handles.
    """

    __slots__ = ("_collected", "_run", "event", "step_id")

    def __init__(self, run: Run, step_id: str, event: Event) -> None:
        self._run = run
        self.step_id = step_id
        self.event = event
        self._collected = False

    @property
    def state(self) -> dict[str, Any]:
        """The run's key/value state, returned as ``RunResult.state``.

        Values should be wire values (None, bool, int, float, str, bytes,
        lists, str-keyed dicts): a peer exports this dict to its caller and
        the wire codec rejects anything else there.
        """
        return self._run.state

    @property
    def refs(self) -> RefsView:
        """The run's session refs: ``insert(value, lifetime)``, ``get``, ``remove``."""
        return self._run.refs

    @property
    def run_id(self) -> str:
        """The id of this run."""
        return self._run.run_id

    @property
    def node_id(self) -> str:
        """The id of the node this run executes on."""
        return self._run.node_id

    @property
    def workflow_name(self) -> str:
        """The name of the workflow being run."""
        return self._run.workflow_name

    def send_event(self, event: Event) -> None:
        """Route ``event`` to every step that accepts it, alongside this handler.

        A :class:`~peerflow.StopEvent` ends the run (this handler included).

        Raises:
            TypeError: ``event`` is not an :class:`~peerflow.Event`.
            PeerEncodeError: ``event`` is a :class:`~peerflow.DynamicEvent`
                whose data does not fit the class registered under its name.
        """
        if not isinstance(event, Event):
            raise TypeError(f"send_event() takes an Event, not {type(event).__name__}")
        self._run.send(as_registered(event))

    def write_event_to_stream(self, event: Event) -> None:
        """Publish ``event`` to the run's observers (``handle.events()``); never blocks.

        The event is not routed to steps. Runs started with ``Workflow.run``
        have no observers, and the event is discarded.

        Raises:
            TypeError: ``event`` is not an :class:`~peerflow.Event`.
        """
        if not isinstance(event, Event):
            raise TypeError(f"write_event_to_stream() takes an Event, not {type(event).__name__}")
        self._run.publish(event)

    def collect_events(self, types: AcceptsSpec, n: int) -> list[Event] | None:
        """Fan in: buffer this invocation's event until ``n`` events of ``types`` have come.

        Call it from a step that accepts ``types``. Each invocation adds its
        own event (once, however often it calls); the invocation whose event
        completes the set gets the ``n`` events in arrival order, every other
        one gets None and should return None. Events beyond ``n`` stay
        buffered for the next set. The buffer is per step and per ``types``.

        Raises:
            TypeError: this invocation's event is not one of ``types``.
            ValueError: ``n`` is smaller than 1.
        """
        if n < 1:
            raise ValueError("collect_events() needs n >= 1")
        names = frozenset(normalize_accepts(types))
        event = self.event
        if event.event_type not in names:
            raise TypeError(
                f"step {self.step_id!r} is handling a {event.event_type!r} event, "
                f"which is not among the collected types {sorted(names)}"
            )
        buffer = self._run.collect_buffer(self.step_id, names)
        if not self._collected:
            self._collected = True
            buffer.append(event)
        if len(buffer) < n:
            return None
        batch = buffer[:n]
        del buffer[:n]
        return batch

    def __repr__(self) -> str:
        return f"<Context run_id={self.run_id!r} step_id={self.step_id!r}>"
