"""Nursery exception groups reduced to the one exception they stand for."""

from __future__ import annotations

import sys

import pytest
import trio
import trio.testing

from peerflow._excgroups import collapse_excgroups
from peerflow.errors import PeerTransportError

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup


def test_a_group_of_one_error_is_that_error() -> None:
    with pytest.raises(PeerTransportError, match="only one"), collapse_excgroups():
        raise ExceptionGroup("g", [ExceptionGroup("inner", [PeerTransportError("only one")])])


def test_a_group_of_several_errors_stays_a_group() -> None:
    with pytest.raises(ExceptionGroup), collapse_excgroups():
        raise ExceptionGroup("g", [ValueError("a"), KeyError("b")])


async def fail_as_the_scope_is_cancelled(outer: trio.CancelScope) -> None:
    with collapse_excgroups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            await trio.testing.wait_all_tasks_blocked()
            outer.cancel()
            raise KeyError("mine")


async def test_an_error_beside_cancellations_is_raised_alone() -> None:
    # The body fails as an outer scope is cancelled: the child's Cancelled
    # joins the group, and the error must not stay wrapped beside it.
    with trio.CancelScope() as outer, pytest.raises(KeyError, match="mine"):
        await fail_as_the_scope_is_cancelled(outer)


async def test_a_group_of_cancellations_is_one_cancellation() -> None:
    with trio.CancelScope() as outer, collapse_excgroups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(trio.sleep_forever)
            await trio.testing.wait_all_tasks_blocked()
            outer.cancel()
    assert outer.cancelled_caught
