"""Wire values: what may travel inside an envelope, and how bad values are located.

A wire value is ``None``, a bool, an int in ``[-2**63, 2**64 - 1]``, a float, a
str (valid Unicode: no lone surrogates), bytes, a list, or a map with str keys,
nested at most :data:`MAX_DEPTH` containers below the message map. Tuples are
accepted on encode and come back as lists; ``bytearray`` and ``memoryview``
are accepted on encode and come back as ``bytes``.

Checking is split in two so the common case stays cheap: :func:`scan_encodable`
and :func:`scan_decoded` only answer yes or no, touching each container once
and leaving scalar checks (int range, UTF-8) to msgpack's C code where it can
do them. Only when something is wrong does :func:`locate_problem` walk the
value again, slowly, to name the path and the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

from ..errors import PeerEncodeError

__all__ = [
    "MAX_DEPTH",
    "WireValue",
    "locate_problem",
    "render_path",
    "scan_decoded",
    "scan_encodable",
]

#: What the wire carries in ``input``, ``result``, ``state`` values and event
#: data: see the module docstring. Typed as ``Any`` because the set is
#: recursive and checked at run time.
WireValue: TypeAlias = Any

#: Containers may nest at most this many levels below the message map. The
#: limit bounds the decoder's recursion and the cost of hostile input; it is
#: part of the protocol (see protocol/README.md).
MAX_DEPTH = 64

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

_CONTAINERS = frozenset({dict, list, tuple})
_DECODED_LEAVES = frozenset({type(None), bool, int, float, str, bytes})
_ENCODABLE_LEAVES = _DECODED_LEAVES | {bytearray, memoryview}


def _scan(value: Any, depth: int, leaves: frozenset[type]) -> bool:
    # The hot path of every encode and decode: keep it to one type lookup per
    # child. The join is a C-level pass that raises on any non-str key.
    if type(value) is dict:
        try:
            "".join(value)
        except TypeError:
            return False
        value = value.values()
    for child in value:
        kind = type(child)
        if kind in leaves:
            continue
        if depth >= MAX_DEPTH or kind not in _CONTAINERS or not _scan(child, depth + 1, leaves):
            return False
    return True


def scan_encodable(message: dict[str, Any]) -> bool:
    """Return True if ``message`` holds only encodable shapes and types.

    Ints out of range and unencodable strings are not checked here; msgpack
    rejects them while packing.
    """
    return _scan(message, 0, _ENCODABLE_LEAVES)


def scan_decoded(message: dict[str, Any]) -> bool:
    """Return True if a freshly unpacked ``message`` is a valid wire value.

    msgpack has already guaranteed int ranges and UTF-8; this catches bytes map
    keys, extension values (timestamps) and excessive nesting.
    """
    return _scan(message, 0, _DECODED_LEAVES)


def render_path(segments: Sequence[object]) -> str:
    """Render ``["input", "rows", 3]`` as ``input["rows"][3]``.

    The first segment is a field name and is written bare.
    """
    out = []
    for i, seg in enumerate(segments):
        if isinstance(seg, str):
            out.append(seg if i == 0 else _quote(seg))
        else:
            out.append(f"[{seg!r}]" if i else repr(seg))
    return "".join(out)


def _quote(key: str) -> str:
    escaped = key.replace("\\", "\\\\").replace('"', '\\"')
    # backslashreplace keeps lone surrogates printable inside error messages.
    return '["' + escaped.encode("utf-8", "backslashreplace").decode("utf-8") + '"]'


def locate_problem(value: Any, *, decoded: bool = False) -> PeerEncodeError | None:
    """Find the first value inside ``value`` that is not a wire value.

    ``value`` is a whole message map; the returned error's path starts with a
    field name. Returns None when everything is fine.
    """
    return _locate(value, [], 0, decoded)


def _locate(value: Any, path: list[object], depth: int, decoded: bool) -> PeerEncodeError | None:
    kind = type(value)
    if kind is dict or kind is list or kind is tuple:
        if depth > MAX_DEPTH:
            return PeerEncodeError(f"nested deeper than {MAX_DEPTH} levels", render_path(path))
        if kind is dict:
            for key, child in value.items():
                if type(key) is not str:
                    return PeerEncodeError(
                        f"map key must be a str, got {type(key).__name__}",
                        render_path([*path, key]),
                    )
                key_problem = _leaf_problem(key, decoded)
                if key_problem is not None:
                    return PeerEncodeError(f"map key: {key_problem}", render_path([*path, key]))
                found = _locate(child, [*path, key], depth + 1, decoded)
                if found is not None:
                    return found
        else:
            for index, child in enumerate(value):
                found = _locate(child, [*path, index], depth + 1, decoded)
                if found is not None:
                    return found
        return None
    reason = _leaf_problem(value, decoded)
    return None if reason is None else PeerEncodeError(reason, render_path(path))


def _leaf_problem(value: Any, decoded: bool) -> str | None:
    kind = type(value)
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            return "int does not fit in 64 bits (allowed: -2**63 .. 2**64-1)"
        return None
    if kind is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"str is not valid Unicode: lone surrogate at index {exc.start}"
        return None
    if kind in (_DECODED_LEAVES if decoded else _ENCODABLE_LEAVES):
        return None
    if decoded:
        return f"msgpack extension values are not wire values (got {kind.__name__})"
    return (
        f"{kind.__module__}.{kind.__qualname__} is not a wire value "
        "(use None, bool, int, float, str, bytes, list or a str-keyed dict)"
    )
