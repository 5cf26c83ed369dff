"""Events: typed attrs values with stable wire names, and their wire form.

An event class is an attrs class deriving from :class:`Event`::

    @attrs.define
    class Analyzed(Event, event_type="my_app.Analyzed"):
        score: float

Its wire name (``Analyzed.event_type``) defaults to ``"<module>.<qualname>"``;
give one explicitly (keyword above, or a plain ``event_type = "..."`` class
attribute) when peers must agree on it across code bases. Defining a class
registers it by wire name, so an event decoded from the wire becomes an
instance of it; a later class with the same wire name replaces the earlier
one. A wire name with no class decodes to :class:`DynamicEvent`.

On the wire an event is ``{"event_type": <wire name>, "data": {<fields>}}``.
"""

# No ``from __future__ import annotations`` here: the facade re-homes these
# classes to the ``peerflow`` module, where string annotations could not be
# resolved when cattrs inspects subclasses.
from collections.abc import Set
from typing import Any, ClassVar, final

import attrs
import cattrs

from ..errors import PeerEncodeError

__all__ = [
    "DynamicEvent",
    "Event",
    "StartEvent",
    "StopEvent",
    "event_class",
    "event_from_wire",
    "event_to_wire",
    "event_type_name",
]

_registry: "dict[str, type[Event]]" = {}


@attrs.define
class Event:
    """Base class of every workflow event.

    Subclasses are attrs classes (decorate them with ``@attrs.define`` or
    ``@attrs.frozen``). Their fields should hold wire values (None, bool,
    int, float, str, bytes, lists, str-keyed dicts) or attrs classes made of
    them, so that the event can cross to a peer.

    Attributes:
        event_type: the stable wire name (a class attribute).
    """

    event_type: ClassVar[str] = "peerflow.Event"

    def __init_subclass__(cls, *, event_type: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if vars(cls).get("_peerflow_dynamic_", False):
            return
        if event_type is None:
            # attrs rebuilds slotted classes without the class keywords; the
            # name set on the first pass is then found in the class dict.
            explicit = vars(cls).get("event_type")
            event_type = explicit if isinstance(explicit, str) else None
        if event_type is None:
            event_type = f"{cls.__module__}.{cls.__qualname__}"
        cls.event_type = event_type
        _registry[event_type] = cls


@final
@attrs.define
class DynamicEvent(Event):
    """An event named by its wire name, with its data as a map.

    Events from the wire whose type has no class registered here arrive as
    these. A step may also return or send one: if a class is registered
    under its name (``"peerflow.StopEvent"`` included), it becomes an
    instance of that class first, so it routes, and reaches steps, exactly
    as that instance would.
    """

    _peerflow_dynamic_: ClassVar[bool] = True

    event_type: str  # type: ignore[misc]  # an instance field shadowing the class name
    data: dict[str, Any] = attrs.field(factory=dict)


@final
@attrs.define
class StartEvent(Event, event_type="peerflow.StartEvent"):
    """Starts a run; ``data`` is the run's input."""

    data: Any = None


@final
@attrs.define
class StopEvent(Event, event_type="peerflow.StopEvent"):
    """Ends a run when a step emits it; ``result`` becomes the run's result."""

    result: Any = None


def event_class(event_type: str) -> type[Event] | None:
    """Return the class registered under wire name ``event_type``, or None."""
    return _registry.get(event_type)


def as_registered(event: Event) -> Event:
    """Return what ``event`` stands for: a :class:`DynamicEvent` whose wire name
    has a registered class becomes an instance of that class, as if it had
    come from the wire; any other event is returned as it is.

    Raises:
        PeerEncodeError: the dynamic event's data does not fit the class (the
            path names the field).
    """
    if type(event) is not DynamicEvent or event.event_type not in _registry:
        return event
    return event_from_wire({"event_type": event.event_type, "data": event.data})


def event_type_name(kind: type[Event] | str) -> str:
    """Return the wire name of an event class, or ``kind`` itself if it is a str.

    Raises:
        TypeError: ``kind`` is neither a str nor an :class:`Event` subclass.
    """
    if isinstance(kind, str):
        return kind
    if isinstance(kind, type) and issubclass(kind, Event) and kind is not DynamicEvent:
        return kind.event_type
    raise TypeError(f"expected an Event subclass or a wire name, got {kind!r}")


_converter = cattrs.Converter(unstruct_collection_overrides={Set: list, tuple: list})


def event_to_wire(event: Event) -> dict[str, Any]:
    """Return ``{"event_type": ..., "data": {...}}`` for ``event``.

    Field values are unstructured by cattrs (nested attrs classes become
    dicts, tuples and sets become lists); checking that the result is a
    valid wire value is the wire codec's job.

    Raises:
        TypeError: ``event`` is not an :class:`Event`.
    """
    if isinstance(event, DynamicEvent):
        return {"event_type": event.event_type, "data": dict(event.data)}
    if not isinstance(event, Event):
        raise TypeError(f"expected an Event, got {type(event).__name__}")
    data: dict[str, Any] = _converter.unstructure(event)
    return {"event_type": event.event_type, "data": data}


def event_from_wire(value: Any) -> Event:
    """Build an event from its wire form.

    Returns an instance of the class registered under the wire name, or a
    :class:`DynamicEvent` when there is none.

    Raises:
        PeerEncodeError: the value is not an event map, or its data does not
            fit the registered class (the path names the offending field).
    """
    if not isinstance(value, dict):
        raise PeerEncodeError(f"an event must be a map, not {type(value).__name__}")
    name = value.get("event_type")
    if not isinstance(name, str):
        raise PeerEncodeError("must be a str", '["event_type"]')
    data = value.get("data", {})
    if not isinstance(data, dict):
        raise PeerEncodeError(f"must be a map, not {type(data).__name__}", '["data"]')
    cls = _registry.get(name)
    if cls is None:
        return DynamicEvent(name, data)
    try:
        return _converter.structure(data, cls)
    except Exception as exc:
        raise PeerEncodeError(_describe(exc, cls), '["data"]') from exc


def _describe(exc: Exception, cls: type[Event]) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        problems = "; ".join(cattrs.transform_error(exc, path="data"))
    else:
        problems = f"{type(exc).__name__}: {exc}"
    return f"does not fit event class {cls.event_type!r}: {problems}"
