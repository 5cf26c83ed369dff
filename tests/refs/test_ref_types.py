from __future__ import annotations

from collections.abc import Iterator

import pytest

import peerflow
from peerflow import SessionRefRegistry, register_ref_type
from peerflow._refs.serializers import (
    serializer_for_tag,
    serializer_for_type,
    unregister_ref_type,
)


class Vector:
    def __init__(self, values: list[int]) -> None:
        self.values = values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vector) and other.values == self.values

    __hash__ = None  # type: ignore[assignment]


class FancyVector(Vector):
    pass


def vector_to_bytes(v: Vector) -> bytes:
    return bytes(v.values)


def vector_from_bytes(data: bytes) -> Vector:
    return Vector(list(data))


class Blob:
    """Opts in with the protocol instead of a registration call."""

    __peerflow_type_tag__ = "tests.Blob"

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __peerflow_to_bytes__(self) -> memoryview:
        return memoryview(self.data)

    @classmethod
    def __peerflow_from_bytes__(cls, data: bytes) -> Blob:
        return cls(data)


class SubBlob(Blob):
    pass


@pytest.fixture(autouse=True)
def clean_registrations() -> Iterator[None]:
    yield
    for cls in (Vector, FancyVector, Blob, SubBlob):
        unregister_ref_type(cls)


def test_register_ref_type_makes_values_serializable() -> None:
    serializer = register_ref_type(Vector, "tests.Vector", vector_to_bytes, vector_from_bytes)
    assert peerflow.register_ref_type is register_ref_type
    assert serializer_for_type(Vector) is serializer
    assert serializer_for_tag("tests.Vector") is serializer
    reg = SessionRefRegistry("n")
    ref_id = reg.insert(Vector([1, 2, 3]))
    desc = reg.descriptor(ref_id)
    assert desc.type_tag == "tests.Vector"
    assert desc.serializable is True
    payload = reg.serialize(ref_id)
    assert bytes(payload) == b"\x01\x02\x03"
    assert serializer.from_bytes(bytes(payload)) == Vector([1, 2, 3])


def test_lookup_follows_the_mro() -> None:
    serializer = register_ref_type(Vector, "tests.Vector", vector_to_bytes, vector_from_bytes)
    assert serializer_for_type(FancyVector) is serializer
    nearer = register_ref_type(FancyVector, "tests.FancyVector", vector_to_bytes, vector_from_bytes)
    assert serializer_for_type(FancyVector) is nearer
    assert serializer_for_type(Vector) is serializer


def test_unregistered_types_are_live_only() -> None:
    assert serializer_for_type(Vector) is None
    assert serializer_for_tag("tests.Vector") is None
    assert unregister_ref_type(Vector) is False


def test_protocol_class_is_found_by_type_then_by_tag() -> None:
    assert serializer_for_tag("tests.Blob") is None  # not seen yet
    serializer = serializer_for_type(SubBlob)
    assert serializer is not None
    assert serializer.cls is Blob
    assert serializer.type_tag == "tests.Blob"
    assert serializer_for_tag("tests.Blob") is serializer
    assert serializer.from_bytes(b"xy").data == b"xy"


def test_protocol_values_stream_without_copies() -> None:
    reg = SessionRefRegistry("n")
    data = b"\x00" * 1024
    ref_id = reg.insert(Blob(data))
    payload = reg.serialize(ref_id)
    assert isinstance(payload, memoryview)
    assert payload.obj is data
    assert reg.descriptor(ref_id).type_tag == "tests.Blob"


def test_register_ref_type_with_the_protocol_only() -> None:
    serializer = register_ref_type(Blob)
    assert serializer.type_tag == "tests.Blob"
    assert serializer_for_tag("tests.Blob") is serializer


def test_explicit_arguments_override_the_protocol() -> None:
    serializer = register_ref_type(Blob, "tests.Blob.v2")
    assert serializer_for_type(Blob) is serializer
    assert serializer_for_tag("tests.Blob.v2") is serializer


def test_reregistering_replaces_the_old_tag() -> None:
    register_ref_type(Vector, "tests.Vector", vector_to_bytes, vector_from_bytes)
    register_ref_type(Vector, "tests.Vector.v2", vector_to_bytes, vector_from_bytes)
    assert serializer_for_tag("tests.Vector") is None
    assert serializer_for_tag("tests.Vector.v2") is not None


def test_tag_clash_between_classes() -> None:
    register_ref_type(Vector, "tests.Vector", vector_to_bytes, vector_from_bytes)
    with pytest.raises(ValueError, match=r"tests\.Vector"):
        register_ref_type(FancyVector, "tests.Vector", vector_to_bytes, vector_from_bytes)


def test_incomplete_registration() -> None:
    with pytest.raises(TypeError):
        register_ref_type(Vector)
    with pytest.raises(TypeError):
        register_ref_type(Vector, "tests.Vector", vector_to_bytes)
    with pytest.raises(TypeError):
        register_ref_type(Vector, "", vector_to_bytes, vector_from_bytes)


@pytest.mark.parametrize(
    ("value", "tag"),
    [(b"raw", "peerflow.bytes"), (bytearray(b"raw"), "peerflow.bytearray"), ("ré", "peerflow.str")],
)
def test_bytes_and_str_are_serializable_out_of_the_box(value: object, tag: str) -> None:
    reg = SessionRefRegistry("n")
    ref_id = reg.insert(value)
    assert reg.descriptor(ref_id).type_tag == tag
    payload = bytes(reg.serialize(ref_id))
    serializer = serializer_for_tag(tag)
    assert serializer is not None
    assert serializer.from_bytes(payload) == value


def test_large_bytes_stream_without_a_copy() -> None:
    reg = SessionRefRegistry("n")
    data = bytes(1 << 20)
    payload = reg.serialize(reg.insert(data))
    assert isinstance(payload, memoryview)
    assert payload.obj is data


def test_unregister_restores_live_only() -> None:
    register_ref_type(Vector, "tests.Vector", vector_to_bytes, vector_from_bytes)
    assert serializer_for_type(Vector) is not None
    assert unregister_ref_type(Vector) is True
    assert serializer_for_type(Vector) is None
    reg = SessionRefRegistry("n")
    assert reg.descriptor(reg.insert(Vector([]))).serializable is False
