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
from gc import get_referents
from itertools import chain
from typing import Any, TypeAlias

from ..errors import PeerEncodeError

__all__ = [
    "MAX_DEPTH",
    "WireValue",
    "locate_problem",
    "render_path",
    "scan_decoded",
    "scan_encodable",
    "within_depth",
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

_DECODED_LEAVES = frozenset({type(None), bool, int, float, str, bytes})
_ENCODABLE_LEAVES = _DECODED_LEAVES | {bytearray, memoryview}
_DECODED_TYPES = _DECODED_LEAVES | {dict, list}
_ENCODABLE_TYPES = _ENCODABLE_LEAVES | {dict, list, tuple}
_STR = frozenset({str})


_is_dict = dict.__instancecheck__


def _scan(message: dict[str, Any], leaves: frozenset[type], allowed: frozenset[type]) -> bool:
    # The hot path of every encode and decode. Python bytecode per item costs
    # more than the packing itself, so the walk goes one nesting level at a
    # time and leaves the per-item work to C: gc.get_referents lists the values
    # of every dict and the items of every list in a level (scalars have
    # none), and one set of their types says whether the level is clean.
    # Containers can form cycles, so tp_traverse must report every one of them;
    # only exact dicts, lists and tuples are ever expanded. A dict with a
    # non-str key may report its keys too, which is harmless: the key check
    # refuses it anyway.
    level: list[Any] = [message]
    dicts = [message]
    depth = 0
    while True:
        level = get_referents(*level)
        depth += 1
        kinds = set(map(type, level))
        if kinds <= leaves:
            break
        if depth > MAX_DEPTH or not kinds <= allowed:
            return False
        if dict in kinds:
            dicts += filter(_is_dict, level)
        if memoryview in kinds:
            # A view refers to the owner of its buffer, which is not ours to walk.
            level = [item for item in level if type(item) is not memoryview]
    try:
        "".join(chain.from_iterable(dicts))
    except TypeError:
        return False
    return True


def scan_encodable(message: dict[str, Any]) -> bool:
    """Return True if ``message`` holds only encodable shapes and types.

    Ints out of range and unencodable strings are not checked here; msgpack
    rejects them while packing. False means :func:`locate_problem` will name
    the problem.
    """
    return _scan(message, _ENCODABLE_LEAVES, _ENCODABLE_TYPES)


def scan_decoded(message: dict[str, Any]) -> bool:
    """Return True if a freshly unpacked ``message`` is a valid wire value.

    msgpack has already guaranteed int ranges and UTF-8; this catches bytes map
    keys, extension values (timestamps) and excessive nesting.
    """
    return _scan(message, _DECODED_LEAVES, _DECODED_TYPES)


def within_depth(message: dict[str, Any]) -> bool:
    """Return True if no container in ``message`` is nested too deep.

    Only for a freshly unpacked map that is known to hold nothing but scalars,
    str-keyed dicts and lists (no timestamps, no bytes keys): then depth is the
    one thing left to check, and this walk skips the type checks.
    """
    level: list[Any] = [message]
    for _ in range(MAX_DEPTH):
        level = get_referents(*level)
        if not level:
            return True
    return _DECODED_LEAVES.issuperset(map(type, get_referents(*level)))


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
