"""Wire values: what may travel inside an envelope, and how bad values are located.

A wire value is ``None``, a bool, an int in ``[-2**63, 2**64 - 1]``, a float, a
str (valid Unicode: no lone surrogates), bytes, a list, or a map with str keys,
nested at most :data:`MAX_DEPTH` containers below the message map. Tuples are
accepted on encode and come back as lists; ``bytearray`` and ``memoryview``
are accepted on encode and come back as ``bytes``.

Checking is split in three so the common case stays cheap. msgpack's C code
goes first: the codec packs with exact types, which refuses sets, objects,
subclasses (str-subclass keys included), ints out of range and lone
surrogates; unpacking yields nothing but wire types and timestamps (the codec
refuses other extension types as they come). What msgpack lets through (map
keys that are not str, extension values, nesting deeper than
:data:`MAX_DEPTH`) is left to :func:`scan_after_msgpack` (and, for small
decoded messages, :func:`within_depth`), which touches each nesting level once
and may answer "maybe not" but never a wrong yes. Only then does
:func:`locate_problem` walk the value again, slowly, to name the path and the
reason, or to clear it.
"""

from __future__ import annotations

from collections.abc import Sequence
from gc import get_referents
from itertools import chain
from operator import ge
from typing import Any, TypeAlias

from msgpack import ExtType, Timestamp

from ..errors import PeerEncodeError

__all__ = [
    "MAX_DEPTH",
    "WireValue",
    "locate_problem",
    "render_path",
    "scan_after_msgpack",
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

# What scan_after_msgpack's walk meets in a message it can clear (a
# memoryview leads out of the message, to its buffer, so it is not here), and
# how many values one level may hold before the walk checks for them.
_WALKED_TYPES = _DECODED_LEAVES | {bytearray, list, tuple, dict}
_UNCHECKED_VALUES = 1 << 16
# The largest message whose leaves scan_after_msgpack joins to prove them all
# str (the join copies them: at most this many characters).
_JOINED_SIZE = 1 << 14


class _Probe:
    """An object whose ``__dict__`` CPython 3.13 keeps inside the object."""

    value: object


def _dicts_show_str_keys() -> bool:
    # CPython keeps a dict whose keys are all exact str in a "unicode" table,
    # and gc.get_referents of such a dict lists only its values; any other
    # dict lists its keys as well. So a dict with exactly as many referents as
    # entries has only str keys. This is CPython behaviour, not a language
    # rule, hence the check.
    return len(get_referents({"key": None})) == 1 and len(get_referents({0: None})) == 2


def _dicts_show_values() -> bool:
    # 3.13 lists nothing for an object's __dict__ while its values still live
    # inside the object: the walk would not see them.
    probe = _Probe()
    probe.value = None
    return len(get_referents(vars(probe))) == 1


def _extensions_never_end() -> bool:
    # An extension value lists its class among its referents, and the class
    # lists its __mro__, which lists the class again: a walk through one never
    # reaches a level without referents. gc.get_referents promises no such
    # thing, hence the check; msgpack lets only these two through.
    for value in (ExtType(0, b""), Timestamp(0)):
        cls = type(value)
        if not any(item is cls for item in get_referents(value)):
            return False
        if not any(item is cls.__mro__ for item in get_referents(cls)):
            return False
    return True


def _counted_each(dicts: list[dict[Any, Any]]) -> bool:
    # One by one, so that a dict hiding its values cannot offset one that
    # lists its keys too.
    return list(map(len, map(get_referents, dicts))) == list(map(len, dicts))


def _joined(dicts: list[dict[Any, Any]]) -> bool:
    try:
        "".join(chain.from_iterable(dicts))
    except TypeError:
        return False
    # A dict with fewer referents than entries hid its values from the walk.
    return all(map(ge, map(len, map(get_referents, dicts)), map(len, dicts)))


# How scan_after_msgpack proves that every map key is a str, by what this
# interpreter's gc.get_referents shows of a dict. Where dicts show their
# values, and their keys only when some key is not a str, counting all their
# referents in one batch is enough (the scan does it inline), and a level
# whose items have no referents holds no dict worth looking at. Where a dict
# may hide its values (3.13), every level is looked at and each dict counted
# on its own. Elsewhere the keys are joined.
_KEYS_COUNTED = _dicts_show_str_keys()
_SKIP_LEAF_LEVEL = _KEYS_COUNTED and _dicts_show_values()
_str_keyed = _counted_each if _KEYS_COUNTED else _joined
# Where a walk could end beside an extension value, scan_after_msgpack only
# ever says "maybe not", and locate_problem decides.
_EXTENSIONS_NEVER_END = _extensions_never_end()


def scan_after_msgpack(
    message: dict[str, Any], size: int, fields: Sequence[Any] | None = None
) -> bool:
    """Return True if ``message`` is a wire value, given msgpack has vetted it.

    ``message`` must have just been packed with exact types (see the codec)
    into ``size`` bytes, or unpacked from them; then every leaf has a wire
    type or is one of what msgpack lets through: a map key that is not a
    str, an extension value, a memoryview, or nesting deeper than
    :data:`MAX_DEPTH`. The map's own keys are checked too, unless
    ``fields`` lists the only values of ``message`` to check: the caller
    then vouches for the rest (str keys, values of exact scalar types or
    lists of str). False means "maybe not": ask :func:`locate_problem`,
    which names the problem or clears the message.
    """
    # The hot path of every encode and large decode. Python bytecode per item
    # costs more than the packing itself, so the walk goes one nesting level
    # at a time and leaves the per-item work to C: gc.get_referents lists the
    # values of every dict and the items of every list in a level (scalars
    # have none). Extension values need no look of their own: they list their
    # class, whose __mro__ lists it again, so a walk that meets one never runs
    # out of levels (checked at import). It would go on through the rest of
    # the heap, so it is bounded: every value packs into at least one byte,
    # so no level of the message holds more values than it has bytes; a
    # level holding more, or more than _UNCHECKED_VALUES, has its types
    # looked at, and the walk stops at the first that is not all wire types.
    # What is left is one pass over the containers for the map keys (but
    # not over the last level of them when the leaves below are all str).
    if not _EXTENSIONS_NEVER_END:
        return False
    parents: list[Any]
    level: Sequence[Any]
    if fields is not None:
        level = fields
        parents = []
    elif _KEYS_COUNTED:
        level = get_referents(message)
        # The map's own keys. (Were it an object's __dict__ hiding its values,
        # the count would only come up short: a "maybe not".)
        if len(level) != len(message):
            return False
        parents = []
    else:
        level = get_referents(message)
        parents = [message]
    below = get_referents(*level)
    if not below and _SKIP_LEAF_LEVEL:
        return True  # a flat map, such as a deref chunk
    unchecked = size if size < _UNCHECKED_VALUES else _UNCHECKED_VALUES
    levels_left = MAX_DEPTH
    last: Sequence[Any] = ()
    while below:
        levels_left -= 1
        if not levels_left:
            return False
        if len(below) > unchecked and not _WALKED_TYPES.issuperset(map(type, below)):
            return False
        parents += last
        last = level
        level = below
        below = get_referents(*level)
    # Now `level` holds leaves only, and `last` the level right above it. A
    # dict in `last` lists its keys among those leaves if it lists them at
    # all, so leaves that are all str clear its keys, and `last` can be left
    # out of the count. join refuses anything but a str (and msgpack a str
    # subclass); the samples spare most other levels the cost of its error.
    if not (
        _SKIP_LEAF_LEVEL
        and size <= _JOINED_SIZE
        and type(level[-1]) is str
        and type(level[0]) is str
        and type(level[1 % len(level)]) is str
        and type(level[-2 % len(level)]) is str
    ):
        parents += last
    else:
        try:
            "".join(level)
        except TypeError:
            parents += last
    if not _SKIP_LEAF_LEVEL:
        # Here a dict may hide its values, and so have no referents.
        parents += level
    dicts = [item for item in parents if type(item) is dict]
    if _SKIP_LEAF_LEVEL:
        return len(get_referents(*dicts)) == sum(map(len, dicts))
    return not dicts or _str_keyed(dicts)


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
            if decoded:  # a lenient unpack's escape for bytes that were not UTF-8
                return f"str is not valid UTF-8 (at byte {exc.start})"
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
