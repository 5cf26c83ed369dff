"""The codec's fast yes/no checks must agree with the slow, path-naming walk.

:func:`scan_after_msgpack` and :func:`within_depth` decide on the hot path
whether a message is a wire value; :func:`locate_problem` is the reference.
A fast check may answer "maybe not" for a good message (the codec then asks
the reference, which clears it) but never yes for a bad one, and the codec
raises exactly the error the reference names. ``scan_after_msgpack`` proves
that map keys are str in one of three ways, chosen by what this interpreter's
gc shows of a dict; the tests run each way this interpreter supports.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from gc import get_referents
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerflow import PeerEncodeError
from peerflow._wire import values
from peerflow._wire.codec import (
    _BODY,
    _FAST_STRUCTURE,
    _converter,
    _pack_default,
    decode_message,
    encode_message,
)
from peerflow._wire.envelopes import InvokeSubWorkflowRequest, Message, StreamEvent
from peerflow._wire.values import MAX_DEPTH, locate_problem, scan_after_msgpack, within_depth
from strategies import messages, wire_values


class _Str(str):
    pass


class _Dict(dict):  # type: ignore[type-arg]
    pass


class _List(list):  # type: ignore[type-arg]
    pass


# Objects whose __dict__ is in use by a test: 3.13 keeps an object's
# attribute values inside the object, out of gc.get_referents' sight of the
# __dict__, but only while the object lives.
_OWNERS: list[object] = []


def _instance_dict(items: dict[str, Any]) -> dict[str, Any]:
    """The ``__dict__`` of a live object holding ``items`` as attributes."""
    owner = type("Owner", (), {})()
    for name, value in items.items():
        setattr(owner, name, value)
    _OWNERS.append(owner)
    return vars(owner)


def _general_table(items: dict[Any, Any]) -> dict[Any, Any]:
    """A dict with ``items`` kept in CPython's general table, as after a non-str key."""
    out: dict[Any, Any] = {0: None}
    del out[0]
    for key, value in items.items():  # update() could copy a str-only table
        out[key] = value
    return out


_Proof = tuple[bool, bool, Callable[[list[dict[Any, Any]]], bool]]

# Ways to prove map keys are str, as (_KEYS_COUNTED, _SKIP_LEAF_LEVEL,
# _str_keyed), each with whether this interpreter's gc makes it sound. With
# _SKIP_LEAF_LEVEL the scan counts all dicts together and never calls
# _str_keyed.
_KEY_PROOFS: dict[str, tuple[_Proof, bool]] = {
    "counted together": (
        (True, True, values._counted_each),
        values._dicts_show_str_keys() and values._dicts_show_values(),
    ),
    "counted each": ((True, False, values._counted_each), values._dicts_show_str_keys()),
    "joined": ((False, False, values._joined), True),
}


@contextmanager
def _proving_keys(proof: str) -> Iterator[None]:
    chosen, sound_here = _KEY_PROOFS[proof]
    if not sound_here:
        pytest.skip(f"gc.get_referents does not support {proof!r} keys here")
    saved = values._KEYS_COUNTED, values._SKIP_LEAF_LEVEL, values._str_keyed
    values._KEYS_COUNTED, values._SKIP_LEAF_LEVEL, values._str_keyed = chosen
    try:
        yield
    finally:
        values._KEYS_COUNTED, values._SKIP_LEAF_LEVEL, values._str_keyed = saved


_proofs = pytest.mark.parametrize("proof", list(_KEY_PROOFS))

_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_GOOD_LEAVES = (
    st.none() | st.booleans() | _INT | st.floats(allow_nan=False) | st.text() | st.binary()
)
# Things msgpack alone would pack or pass through, and which must be refused.
_BAD_LEAVES = st.sampled_from(
    [
        2**64,
        -(2**63) - 1,
        "lone \ud800",
        _Str("sub"),
        {1, 2},
        frozenset({1}),
        msgpack.ExtType(3, b"x"),
        msgpack.ExtType(4, b""),
        msgpack.Timestamp(1, 0),
        _Dict(a=1),
        _List([1]),
        object(),
    ]
)
_ENCODE_LEAVES = (
    _GOOD_LEAVES | _BAD_LEAVES | st.binary().map(bytearray) | st.binary().map(memoryview)
)
_ANY_KEYS = st.text() | st.binary() | _INT | st.sampled_from([None, 1.5, True, (1, "a"), _Str("k")])
# Attribute names that setattr stores as plain entries of __dict__.
_ATTRIBUTE_NAMES = st.text(max_size=4).filter(lambda name: not name.startswith("__"))


def _nested(leaves: st.SearchStrategy[Any], keys: st.SearchStrategy[Any]) -> Any:
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.lists(inner, max_size=4).map(tuple)
            | st.dictionaries(keys, inner, max_size=4)
            | st.dictionaries(st.text(max_size=4), inner, max_size=4).map(_general_table)
            | st.dictionaries(_ATTRIBUTE_NAMES, inner, max_size=4).map(_instance_dict)
        ),
        max_leaves=20,
    )


@st.composite
def _deep(draw: st.DrawFn, leaves: st.SearchStrategy[Any], encoding: bool) -> Any:
    """A chain of containers around MAX_DEPTH long."""
    value = draw(leaves | st.sampled_from([[], {}]))
    kinds = ["list", "dict", "tuple", "instance dict"] if encoding else ["list", "dict"]
    for _ in range(draw(st.integers(min_value=MAX_DEPTH - 3, max_value=MAX_DEPTH + 2))):
        kind = draw(st.sampled_from(kinds))
        siblings = draw(st.dictionaries(st.text(max_size=2), leaves, max_size=2))
        if kind == "list":
            value = [value, *draw(st.lists(leaves, max_size=2))]
        elif kind == "tuple":
            value = (value,)
        elif kind == "dict":
            value = {"k": value, **siblings}
        else:
            value = _instance_dict({"k": value, **siblings})
    return value


_ENCODE_VALUES = _nested(_ENCODE_LEAVES, _ANY_KEYS) | _deep(_ENCODE_LEAVES, encoding=True)
_DECODE_VALUES = _nested(
    _GOOD_LEAVES | st.just(msgpack.Timestamp(5, 0)), st.text() | st.binary()
) | _deep(_GOOD_LEAVES, encoding=False)


def _body(value: Any) -> dict[str, Any]:
    return {"v": 1, "workflow_name": "wf", "step_ids": ["a"], "input": value}


def _scan(body: dict[str, Any]) -> bool:
    """Pack ``body`` the way the codec does (exact types), then scan it.

    False if msgpack refuses it.
    """
    try:
        data = msgpack.Packer(strict_types=True, default=_pack_default).pack(body)
    except (TypeError, ValueError, OverflowError):
        return False
    return scan_after_msgpack(body, len(data))


@_proofs
@given(_ENCODE_VALUES)
def test_scan_after_packing_never_says_yes_wrongly(proof: str, value: Any) -> None:
    body = _body(value)
    with _proving_keys(proof):
        if _scan(body):
            assert locate_problem(body) is None


@_proofs
@given(_ENCODE_VALUES)
def test_encode_refuses_exactly_what_locate_problem_names(proof: str, value: Any) -> None:
    problem = locate_problem(_body(value))
    request = InvokeSubWorkflowRequest("wf", ["a"], value)
    with _proving_keys(proof):
        if problem is None:
            encode_message(request)
            return
        with pytest.raises(PeerEncodeError) as info:
            encode_message(request)
    assert (info.value.path, info.value.reason) == (problem.path, problem.reason)


@_proofs
@given(wire_values)
def test_plain_wire_values_pass_the_fast_check(proof: str, value: Any) -> None:
    # The fast path is what makes encoding cheap: ordinary values must not
    # fall through to the slow walk.
    with _proving_keys(proof):
        assert _scan(_body(value))


def _scan_input(value: Any) -> bool:
    """Scan a request's ``input`` the way encode_message does (the one field walked)."""
    body = _body(value)
    data = msgpack.Packer(strict_types=True, default=_pack_default).pack(body)
    return scan_after_msgpack(body, len(data), (value,))


@pytest.mark.skipif(not values._SKIP_LEAF_LEVEL, reason="the str-leaves shortcut needs it")
def test_leaves_that_are_all_str_clear_the_map_keys_right_above_them() -> None:
    # The level above the leaves is not counted, so even a dict kept in the
    # general table (whose count would say "maybe not") clears: its keys are
    # among the strs.
    assert _scan_input({"rows": [{"t": "a", "u": "b"}, _general_table({"k": "v"})], "q": "c"})
    # A non-str key shows up among them, away from the sampled ends.
    assert not _scan_input({"rows": [_general_table({"a": "x", 2: "y", "b": "z", "c": "w"})]})
    assert not _scan_input(["a", "b", _general_table({"c": "d", (): "e", "f": "g", "h": "i"})])
    # An extension value's level holds its class, never only strs.
    assert not _scan_input({"a": "x", "t": msgpack.ExtType(1, b"s"), "b": "y"})


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1])
@pytest.mark.parametrize("container", [list, dict])
def test_str_leaves_count_as_deep_as_any_other(
    depth: int, container: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    value: Any = "s"
    for _ in range(depth):
        value = ["x", value, "y"] if container is list else {"a": "x", "k": value, "b": "y"}
    shortcut = _scan_input(value)
    monkeypatch.setattr(values, "_JOINED_SIZE", -1)  # no message is small enough to join
    assert shortcut is _scan_input(value)
    assert shortcut is (depth < MAX_DEPTH)


@_proofs
def test_a_flat_map_passes_only_with_str_keys(proof: str) -> None:
    with _proving_keys(proof):
        assert _scan({"v": 1, "payload": b"x"})
        assert not _scan({"v": 1, b"payload": b"x"})
        assert not _scan({"v": 1, "payload": b"x", 2: None})


@_proofs
@given(_DECODE_VALUES)
def test_decode_checks_agree_with_locate_problem(proof: str, value: Any) -> None:
    data = msgpack.packb(_body(value))
    body = msgpack.unpackb(data, strict_map_key=True)
    valid = locate_problem(body, decoded=True) is None
    with _proving_keys(proof):
        assert valid or not scan_after_msgpack(body, len(data))
        if not any(marker in data for marker in (b"\xc4", b"\xc5", b"\xc6", b"\xff")):
            # The bytes rule out timestamps and bytes keys: depth decides alone.
            assert within_depth(body) is valid
        for raw in (data, bytearray(data), memoryview(data)):
            try:
                decoded = decode_message(InvokeSubWorkflowRequest, raw)
            except PeerEncodeError:
                assert not valid
            else:
                assert valid
                assert decoded.input == body["input"]


@_proofs
@pytest.mark.parametrize("container", [list, dict])
def test_an_empty_container_one_level_too_deep_is_refused(proof: str, container: type) -> None:
    value: Any = container()
    for _ in range(MAX_DEPTH):
        value = [value]
    body = {"v": 1, "input": value}
    assert locate_problem(body, decoded=True) is not None
    assert not within_depth(body)
    assert within_depth({"v": 1, "input": value[0]})
    with _proving_keys(proof):
        assert not _scan(body)
        assert _scan({"v": 1, "input": value[0]})


def test_a_cycle_is_refused_as_too_deep() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(PeerEncodeError, match="deeper than"):
        encode_message(InvokeSubWorkflowRequest("wf", ["a"], {"x": loop}))


@_proofs
@pytest.mark.parametrize(
    ("attributes", "path", "reason"),
    [
        ({"when": msgpack.Timestamp(1, 0)}, 'event["data"]["when"]', "Timestamp"),
        ({"m": {1: "x"}}, 'event["data"]["m"][1]', "map key must be a str"),
        ({"deep": [[]] * 2}, None, None),
    ],
)
def test_an_objects_dict_is_checked_inside(
    proof: str, attributes: dict[str, Any], path: str | None, reason: str | None
) -> None:
    # Python 3.13 hides the values of a live object's __dict__ from gc.
    data = _instance_dict(attributes)
    with _proving_keys(proof):
        if path is None:
            assert msgpack.unpackb(encode_message(StreamEvent("E", data)))["event"]["data"] == data
            return
        with pytest.raises(PeerEncodeError) as info:
            encode_message(StreamEvent("E", data))
    assert info.value.path == path
    assert reason in info.value.reason


@_proofs
def test_str_keys_in_a_general_table_are_accepted(proof: str) -> None:
    general = _general_table({"a": 1, "b": [2]})
    if sys.implementation.name == "cpython":
        assert len(get_referents(general)) == 2 * len(general)  # the keys show
    with _proving_keys(proof):
        assert msgpack.unpackb(encode_message(StreamEvent("E", {"g": general}))) == {
            "v": 1,
            "kind": "event",
            "event": {"event_type": "E", "data": {"g": {"a": 1, "b": [2]}}},
        }


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython's gc details")
def test_extension_values_keep_the_walk_going_here() -> None:
    # The fast check finds extension values only through this.
    assert values._EXTENSIONS_NEVER_END


@pytest.mark.parametrize("extension", [msgpack.Timestamp(1, 0), msgpack.ExtType(5, b"x")])
@pytest.mark.parametrize("claimed_size", [None, 1 << 40])
def test_a_walk_that_leaves_the_message_stops_soon(
    extension: Any, claimed_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past an extension value the walk reaches classes, modules and the rest
    # of the heap. The message's size stops it, and for a message that claims
    # to be huge, the check of each level's types after _UNCHECKED_VALUES.
    seen: list[int] = []

    def counting(*objects: Any) -> list[Any]:
        found = get_referents(*objects)
        seen.append(len(found))
        return found

    body = {"v": 1, "input": {"rows": [1, extension]}}
    size = claimed_size or len(msgpack.Packer(strict_types=True).pack(body))
    monkeypatch.setattr(values, "get_referents", counting)
    assert not scan_after_msgpack(body, size)
    assert len(seen) < MAX_DEPTH
    assert sum(seen) < 100 * values._UNCHECKED_VALUES


def test_a_large_message_is_cleared_with_its_types_checked() -> None:
    rows = [{"id": i, "tags": ["a", b"b"], "t": (i,)} for i in range(values._UNCHECKED_VALUES)]
    assert _scan({"v": 1, "input": rows})
    assert not _scan({"v": 1, "input": [*rows, {"when": msgpack.Timestamp(1, 0)}]})


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython's gc details")
def test_the_cheapest_sound_key_proof_is_chosen() -> None:
    if (3, 10) <= sys.version_info[:2] <= (3, 12):
        chosen: _Proof = (True, True, values._counted_each)
    elif sys.version_info[:2] == (3, 13):
        chosen = (True, False, values._counted_each)
    else:
        pytest.skip("no expectation for this version yet")
    assert (values._KEYS_COUNTED, values._SKIP_LEAF_LEVEL, values._str_keyed) == chosen


@given(messages())
def test_fast_structuring_matches_the_detailed_hooks(message: Message) -> None:
    body = msgpack.unpackb(encode_message(message))
    fast = _FAST_STRUCTURE[type(message)]
    assert fast(body, type(message)) == _converter.structure(body, type(message)) == message


@given(messages())
def test_written_out_bodies_match_the_converter(message: Message) -> None:
    expected = {"v": 1}
    expected.update(_converter.unstructure(message))
    body = _BODY[type(message)](message)
    assert body == expected
    assert list(body) == list(expected)
    # encode_message writes the request's body out itself.
    sent = msgpack.unpackb(encode_message(message))
    assert list(sent) == list(expected)
