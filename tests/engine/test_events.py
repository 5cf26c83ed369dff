from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given

import peerflow
from peerflow import DynamicEvent, Event, PeerEncodeError, StartEvent, StopEvent
from peerflow._engine.events import event_class, event_from_wire, event_to_wire, event_type_name
from strategies import SampleEvent, SamplePoint, events

_LEAVES = (type(None), bool, int, float, str, bytes)


def is_wire_value(value: Any) -> bool:
    if isinstance(value, _LEAVES):
        return True
    if isinstance(value, list):
        return all(is_wire_value(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_wire_value(v) for k, v in value.items())
    return False


@attrs.define
class Analyzed(Event, event_type="my_app.Analyzed"):
    score: float


@attrs.frozen
class ByAttribute(Event):
    event_type = "my_app.ByAttribute"
    n: int


@attrs.define
class Defaulted(Event):
    tags: set[str] = attrs.field(factory=set)
    pair: tuple[int, int] = (1, 2)


def test_builtin_wire_names() -> None:
    assert StartEvent.event_type == "peerflow.StartEvent"
    assert StopEvent.event_type == "peerflow.StopEvent"
    assert peerflow.StartEvent is StartEvent


def test_explicit_wire_name_by_keyword_and_by_attribute() -> None:
    assert Analyzed.event_type == "my_app.Analyzed"
    assert Analyzed(1.0).event_type == "my_app.Analyzed"
    assert ByAttribute.event_type == "my_app.ByAttribute"
    assert event_class("my_app.Analyzed") is Analyzed
    assert event_class("my_app.ByAttribute") is ByAttribute


def test_default_wire_name_is_module_qualified() -> None:
    assert Defaulted.event_type == f"{__name__}.Defaulted"
    assert event_class(Defaulted.event_type) is Defaulted


def test_slotted_attrs_class_is_the_registered_one() -> None:
    # attrs rebuilds slotted classes; the registry must hold the final class.
    assert event_class("my_app.Analyzed") is Analyzed
    assert "__slots__" in vars(Analyzed)


def test_subclass_gets_its_own_name() -> None:
    @attrs.define
    class Child(Analyzed):
        extra: int = 0

    assert Child.event_type.endswith("Child")
    assert Analyzed.event_type == "my_app.Analyzed"


def test_redefinition_replaces_the_class() -> None:
    @attrs.define
    class First(Event, event_type="tests.Replaced"):
        a: int

    @attrs.define
    class Second(Event, event_type="tests.Replaced"):
        b: int

    assert event_class("tests.Replaced") is Second
    assert event_from_wire({"event_type": "tests.Replaced", "data": {"b": 2}}) == Second(2)


def test_wire_form() -> None:
    assert event_to_wire(Analyzed(0.5)) == {
        "event_type": "my_app.Analyzed",
        "data": {"score": 0.5},
    }
    assert event_to_wire(StartEvent({"k": [1]})) == {
        "event_type": "peerflow.StartEvent",
        "data": {"data": {"k": [1]}},
    }
    assert event_to_wire(StopEvent("done")) == {
        "event_type": "peerflow.StopEvent",
        "data": {"result": "done"},
    }
    assert event_to_wire(DynamicEvent("x.Y", {"a": 1})) == {
        "event_type": "x.Y",
        "data": {"a": 1},
    }


def test_sets_and_tuples_become_lists() -> None:
    wire = event_to_wire(Defaulted({"a"}, (3, 4)))
    assert wire["data"] == {"tags": ["a"], "pair": [3, 4]}
    assert event_from_wire(wire) == Defaulted({"a"}, (3, 4))


def test_nested_attrs_values_become_maps() -> None:
    ev = SampleEvent(1, "l", b"b", [1], {}, SamplePoint(2, 3.0))
    data = event_to_wire(ev)["data"]
    assert data["point"] == {"x": 2, "y": 3.0}
    assert is_wire_value(data)


def test_unknown_wire_name_decodes_to_dynamic_event() -> None:
    ev = event_from_wire({"event_type": "elsewhere.Thing", "data": {"a": [1, 2]}})
    assert ev == DynamicEvent("elsewhere.Thing", {"a": [1, 2]})
    assert ev.event_type == "elsewhere.Thing"


def test_known_wire_name_decodes_to_its_class() -> None:
    ev = event_from_wire({"event_type": "my_app.Analyzed", "data": {"score": 2.5}})
    assert type(ev) is Analyzed
    assert ev == Analyzed(2.5)


def test_missing_data_means_no_fields() -> None:
    assert event_from_wire({"event_type": "peerflow.StopEvent"}) == StopEvent(None)


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ([1], ""),
        ({"data": {}}, '["event_type"]'),
        ({"event_type": 3, "data": {}}, '["event_type"]'),
        ({"event_type": "my_app.Analyzed", "data": [1]}, '["data"]'),
        ({"event_type": "my_app.Analyzed", "data": {}}, '["data"]'),
        ({"event_type": "my_app.Analyzed", "data": {"score": "high"}}, '["data"]'),
    ],
)
def test_malformed_wire_events_raise_encode_errors(value: Any, path: str) -> None:
    with pytest.raises(PeerEncodeError) as info:
        event_from_wire(value)
    assert info.value.path == path


def test_decode_error_names_the_field() -> None:
    with pytest.raises(PeerEncodeError, match=r"score"):
        event_from_wire({"event_type": "my_app.Analyzed", "data": {"score": "high"}})


def test_event_to_wire_rejects_non_events() -> None:
    with pytest.raises(TypeError):
        event_to_wire({"event_type": "x"})  # type: ignore[arg-type]


def test_event_type_name() -> None:
    assert event_type_name(Analyzed) == "my_app.Analyzed"
    assert event_type_name("raw.Name") == "raw.Name"
    with pytest.raises(TypeError):
        event_type_name(int)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        event_type_name(DynamicEvent)


@given(events())
def test_wire_round_trip(event: Event) -> None:
    wire = event_to_wire(event)
    assert is_wire_value(wire)
    back = event_from_wire(wire)
    assert type(back) is type(event)
    assert back == event
    assert event_to_wire(back) == wire


@given(events())
def test_typed_event_arriving_as_dynamic_routes_by_the_same_name(event: Event) -> None:
    wire = event_to_wire(event)
    dynamic = DynamicEvent(wire["event_type"], wire["data"])
    assert dynamic.event_type == event.event_type
    assert event_from_wire(event_to_wire(dynamic)) == event
