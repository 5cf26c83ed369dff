"""The codec's fast yes/no checks must agree with the slow, path-naming walk.

:func:`scan_encodable`, :func:`scan_decoded` and :func:`within_depth` decide
whether a message is a wire value on the hot path; :func:`locate_problem` is
the reference. Every value here, valid or not, gets the same verdict from both,
and the codec raises exactly the error the reference names.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerflow import PeerEncodeError
from peerflow._wire.codec import _FAST_STRUCTURE, _converter, decode_message, encode_message
from peerflow._wire.envelopes import InvokeSubWorkflowRequest, Message
from peerflow._wire.values import (
    MAX_DEPTH,
    locate_problem,
    scan_decoded,
    scan_encodable,
    within_depth,
)
from strategies import messages


class _Str(str):
    pass


class _Dict(dict):  # type: ignore[type-arg]
    pass


class _List(list):  # type: ignore[type-arg]
    pass


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


def _nested(leaves: st.SearchStrategy[Any], keys: st.SearchStrategy[Any]) -> Any:
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.lists(inner, max_size=4).map(tuple)
            | st.dictionaries(keys, inner, max_size=4)
        ),
        max_leaves=20,
    )


@st.composite
def _deep(draw: st.DrawFn, leaves: st.SearchStrategy[Any], tuples: bool) -> Any:
    """A chain of containers around MAX_DEPTH long, each a list, dict or tuple."""
    value = draw(leaves | st.sampled_from([[], {}]))
    kinds = ["list", "dict", "tuple"] if tuples else ["list", "dict"]
    for _ in range(draw(st.integers(min_value=MAX_DEPTH - 3, max_value=MAX_DEPTH + 2))):
        kind = draw(st.sampled_from(kinds))
        if kind == "list":
            value = [value, *draw(st.lists(leaves, max_size=2))]
        elif kind == "tuple":
            value = (value,)
        else:
            value = {"k": value, **draw(st.dictionaries(st.text(max_size=2), leaves, max_size=2))}
    return value


_ENCODE_VALUES = _nested(_ENCODE_LEAVES, _ANY_KEYS) | _deep(_ENCODE_LEAVES, tuples=True)
_DECODE_VALUES = _nested(
    _GOOD_LEAVES | st.just(msgpack.Timestamp(5, 0)), st.text() | st.binary()
) | _deep(_GOOD_LEAVES, tuples=False)


def _body(value: Any) -> dict[str, Any]:
    return {"v": 1, "workflow_name": "wf", "step_ids": ["a"], "input": value}


def _msgpack_checks(problem: PeerEncodeError) -> bool:
    # The scans leave these to msgpack's C code while packing.
    return "64 bits" in problem.reason or "surrogate" in problem.reason


@given(_ENCODE_VALUES)
def test_scan_encodable_agrees_with_locate_problem(value: Any) -> None:
    problem = locate_problem(_body(value))
    if scan_encodable(_body(value)):
        assert problem is None or _msgpack_checks(problem)
    else:
        assert problem is not None


@given(_ENCODE_VALUES)
def test_encode_refuses_exactly_what_locate_problem_names(value: Any) -> None:
    problem = locate_problem(_body(value))
    request = InvokeSubWorkflowRequest("wf", ["a"], value)
    if problem is None:
        encode_message(request)
        return
    with pytest.raises(PeerEncodeError) as info:
        encode_message(request)
    assert (info.value.path, info.value.reason) == (problem.path, problem.reason)


@given(_DECODE_VALUES)
def test_decode_checks_agree_with_locate_problem(value: Any) -> None:
    data = msgpack.packb(_body(value))
    body = msgpack.unpackb(data, strict_map_key=True)
    valid = locate_problem(body, decoded=True) is None
    assert scan_decoded(body) is valid
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


@pytest.mark.parametrize("container", [list, dict])
def test_an_empty_container_one_level_too_deep_is_refused(container: type) -> None:
    value: Any = container()
    for _ in range(MAX_DEPTH):
        value = [value]
    body = {"v": 1, "input": value}
    assert locate_problem(body, decoded=True) is not None
    assert not scan_decoded(body)
    assert not within_depth(body)
    assert not scan_encodable(body)
    assert within_depth({"v": 1, "input": value[0]})
    assert scan_decoded({"v": 1, "input": value[0]})


def test_a_cycle_is_refused_as_too_deep() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(PeerEncodeError, match="deeper than"):
        encode_message(InvokeSubWorkflowRequest("wf", ["a"], {"x": loop}))


@given(messages())
def test_fast_structuring_matches_the_detailed_hooks(message: Message) -> None:
    body = msgpack.unpackb(encode_message(message))
    fast = _FAST_STRUCTURE[type(message)]
    assert fast(body, type(message)) == _converter.structure(body, type(message)) == message
