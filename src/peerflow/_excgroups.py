"""A trio nursery's exception group, reduced to the one exception it stands for.

peerflow raises one exception per failure, never a group wrapping a single
error (SPEC: errors). Nurseries group whatever their tasks raise; these
helpers turn such a group back into that one exception where there is one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import trio

if sys.version_info < (3, 11):  # pragma: no cover - depends on the interpreter
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["collapse_excgroups", "sole_exception"]


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """Return the one exception ``group`` stands for, or None if it holds several.

    ``trio.Cancelled`` does not count beside another exception: the scope it
    was meant for ends anyway, as that exception passes through it. A group
    of nothing but ``trio.Cancelled`` stands for one cancellation.
    """
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    errors = [exc for exc in leaves if not isinstance(exc, trio.Cancelled)]
    if len(errors) == 1:
        return errors[0]
    return leaves[0] if leaves and not errors else None


@contextmanager
def collapse_excgroups() -> Iterator[None]:
    """Raise the one exception a group from the block stands for, instead of the group.

    Wrap the nursery of an ``async with`` resource in this so that its user
    sees one clear exception. Groups of several errors pass through unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        sole = sole_exception(group)
        if sole is None:
            raise
        context = sole.__context__
        try:
            raise sole
        finally:
            sole.__context__ = context
            del sole, context, group
