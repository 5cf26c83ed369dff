"""Ref-type serializers: which value types may leave their node, and how.

A value type opts in to remote deref either with :func:`register_ref_type` or
with a protocol on the class itself::

    class Tensor:
        __peerflow_type_tag__ = "my_app.Tensor"

        def __peerflow_to_bytes__(self) -> bytes: ...

        @classmethod
        def __peerflow_from_bytes__(cls, data: bytes) -> "Tensor": ...

Lookups by type follow the MRO (the nearest registered or protocol class
wins); lookups by tag find explicitly registered types and protocol classes
that have been looked up by type at least once (which happens when a value of
that type is inserted as a ref). ``bytes``, ``bytearray`` and ``str`` are
registered out of the box (tags ``peerflow.bytes``, ``peerflow.bytearray``,
``peerflow.str``). This module is pure data: no trio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import attrs

__all__ = [
    "BytesLike",
    "RefTypeSerializer",
    "register_ref_type",
    "serializer_for_tag",
    "serializer_for_type",
    "type_name",
    "unregister_ref_type",
]

#: What a ``to_bytes`` function may return. A memoryview lets a large value be
#: streamed in slices without copying it.
BytesLike = Union[bytes, bytearray, memoryview]  # noqa: UP007 - a runtime alias must work on 3.10


@attrs.frozen
class RefTypeSerializer:
    """How values of ``cls`` turn into bytes and back.

    Attributes:
        cls: the registered class (values of subclasses use it too).
        type_tag: the stable name that travels in ref descriptors.
        to_bytes: ``value -> bytes | bytearray | memoryview``.
        from_bytes: ``bytes -> value``.
    """

    cls: type
    type_tag: str
    to_bytes: Callable[[Any], BytesLike]
    from_bytes: Callable[[bytes], Any]


_by_type: dict[type, RefTypeSerializer] = {}
_by_tag: dict[str, RefTypeSerializer] = {}
# Resolved MRO lookups, including misses; cleared whenever registrations change.
_type_cache: dict[type, RefTypeSerializer | None] = {}


def type_name(cls: type) -> str:
    """Return the qualified name used as the type tag of a live-only value."""
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def register_ref_type(
    cls: type,
    type_tag: str | None = None,
    to_bytes: Callable[[Any], BytesLike] | None = None,
    from_bytes: Callable[[bytes], Any] | None = None,
) -> RefTypeSerializer:
    """Make values of ``cls`` (and its subclasses) fetchable from another node.

    Arguments left out are taken from the class protocol
    (``__peerflow_type_tag__``, ``__peerflow_to_bytes__``,
    ``__peerflow_from_bytes__``). Registering a class again replaces its
    serializer.

    Raises:
        TypeError: an argument is missing and the class does not provide it.
        ValueError: ``type_tag`` is already registered for a different class.
    """
    if type_tag is None:
        type_tag = getattr(cls, "__peerflow_type_tag__", None)
    if to_bytes is None and hasattr(cls, "__peerflow_to_bytes__"):
        to_bytes = cls.__peerflow_to_bytes__
    if from_bytes is None and hasattr(cls, "__peerflow_from_bytes__"):
        from_bytes = cls.__peerflow_from_bytes__
    if not isinstance(type_tag, str) or not type_tag:
        raise TypeError(f"{type_name(cls)} needs a non-empty str type_tag")
    if to_bytes is None or from_bytes is None:
        raise TypeError(f"{type_name(cls)} needs both to_bytes and from_bytes")
    clash = _by_tag.get(type_tag)
    if clash is not None and clash.cls is not cls:
        raise ValueError(
            f"ref type tag {type_tag!r} is already registered for {type_name(clash.cls)}"
        )
    old = _by_type.pop(cls, None)
    if old is not None:
        _by_tag.pop(old.type_tag, None)
    serializer = RefTypeSerializer(cls, type_tag, to_bytes, from_bytes)
    _by_type[cls] = serializer
    _by_tag[type_tag] = serializer
    _type_cache.clear()
    return serializer


def unregister_ref_type(cls: type) -> bool:
    """Forget the explicit registration of ``cls``; return True if there was one."""
    serializer = _by_type.pop(cls, None)
    if serializer is None:
        return False
    _by_tag.pop(serializer.type_tag, None)
    _type_cache.clear()
    return True


def serializer_for_type(cls: type) -> RefTypeSerializer | None:
    """Return the serializer for values of ``cls``, or None if they are live-only.

    Walks the MRO: the nearest class that is registered or carries the
    protocol wins. A protocol class found this way becomes known by tag.
    """
    try:
        return _type_cache[cls]
    except KeyError:
        pass
    found: RefTypeSerializer | None = None
    for klass in cls.__mro__:
        found = _by_type.get(klass)
        if found is not None:
            break
        if "__peerflow_type_tag__" in vars(klass):
            found = register_ref_type(klass)
            break
    _type_cache[cls] = found
    return found


def serializer_for_tag(type_tag: str) -> RefTypeSerializer | None:
    """Return the serializer registered under ``type_tag``, or None."""
    return _by_tag.get(type_tag)


# Raw bytes need no user code to cross machines: they are their own wire form
# (and a memoryview of them streams without a copy).
register_ref_type(bytes, "peerflow.bytes", memoryview, bytes)
register_ref_type(bytearray, "peerflow.bytearray", memoryview, bytearray)
register_ref_type(str, "peerflow.str", lambda s: s.encode("utf-8"), lambda b: b.decode("utf-8"))
