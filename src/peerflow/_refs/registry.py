"""The session-ref registry: values that stay on this node, named by uuid.

Every ref belongs to an *owner* (the caller identity that created it; None
is the local process) and to the *run* that inserted it. An
``UNTIL_PARENT_FINISH`` ref is also bound to a *parent scope*, a hashable id
chosen by whoever started the run (a peer connection's ref scope, or the
parent run's id for a local child workflow). Scopes are what purging keys on:

- a run ending purges its ``UNTIL_CONTEXT_DROP`` refs (:meth:`purge_run`);
- a parent scope closing drops its ``UNTIL_PARENT_FINISH`` refs
  (:meth:`drop_scope`, or ``with registry.scope(scope_id):``);
- ``UNTIL_EXPLICIT_DROP`` refs leave only through :meth:`remove`.

Reads and removals are checked against the owner: a wrong owner looks exactly
like a missing ref. The registry is used from trio tasks of one thread, so it
holds no locks, and it does not import trio.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, final

import attrs

from ..errors import RefCapacityError, RefNotFoundError, RefNotSerializableError
from .descriptor import RefLifetime, RemoteRefDescriptor
from .ids import new_uuid4
from .serializers import BytesLike, serializer_for_type, type_name

__all__ = ["RefEntry", "RefRegistryStatistics", "RefsView", "SessionRefRegistry"]

_CONTEXT = RefLifetime.UNTIL_CONTEXT_DROP
_PARENT = RefLifetime.UNTIL_PARENT_FINISH


@final
@attrs.define(eq=False)
class RefEntry:
    """One stored ref: its value, its public descriptor and who it belongs to.

    Attributes:
        ref_uuid: the ref's id (a uuid4 string).
        value: the live value.
        descriptor: what callers are told about the value.
        owner: the caller identity that may read or release it.
        run_id: the run that created it, if any.
        parent_scope: the scope an ``UNTIL_PARENT_FINISH`` ref is bound to.
    """

    ref_uuid: str
    value: Any
    descriptor: RemoteRefDescriptor
    owner: Hashable
    run_id: str | None
    parent_scope: Hashable


@final
@attrs.frozen
class RefRegistryStatistics:
    """A snapshot of a :class:`SessionRefRegistry`, from ``statistics()``.

    Attributes:
        refs: how many refs are stored.
        capacity: the registry-wide limit.
        per_owner_capacity: the per-owner limit, or None.
        by_lifetime: ref count per lifetime.
        owners: how many distinct owners hold refs.
        runs: how many runs have refs stored.
        scopes: how many parent scopes have refs bound to them.
    """

    refs: int
    capacity: int
    per_owner_capacity: int | None
    by_lifetime: dict[RefLifetime, int]
    owners: int
    runs: int
    scopes: int


def _payload_size(value: object) -> int | None:
    if isinstance(value, memoryview):
        return value.nbytes
    if isinstance(value, bytes | bytearray):
        return len(value)
    return None


@final
class SessionRefRegistry:
    """Stores session refs for one node, keyed by uuid4 strings.

    Args:
        node_id: stamped as ``origin_node_id`` on every descriptor.
        capacity: the most refs the registry holds at once.
        per_owner_capacity: the most refs one owner may hold, or None.

    Raises:
        ValueError: a capacity is smaller than 1.
    """

    _default: ClassVar[SessionRefRegistry | None] = None

    def __init__(
        self,
        node_id: str,
        *,
        capacity: int = 100_000,
        per_owner_capacity: int | None = None,
    ) -> None:
        if capacity < 1 or (per_owner_capacity is not None and per_owner_capacity < 1):
            raise ValueError("ref registry capacities must be at least 1")
        self.node_id = node_id
        self.capacity = capacity
        self.per_owner_capacity = per_owner_capacity
        self._entries: dict[str, RefEntry] = {}
        # Insertion-ordered sets (dict keys) of ref ids, so that purges are
        # proportional to what they drop and listings keep creation order.
        self._by_run: dict[str, dict[str, None]] = {}
        self._by_scope: dict[Hashable, dict[str, None]] = {}
        self._owner_counts: dict[Hashable, int] = {}

    @classmethod
    def default(cls) -> SessionRefRegistry:
        """Return the process-wide registry (node id ``"local"``) used by local runs."""
        if cls._default is None:
            cls._default = cls("local")
        return cls._default

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<SessionRefRegistry node_id={self.node_id!r} refs={len(self._entries)}>"

    # -- insert / read / remove ------------------------------------------

    def insert(
        self,
        value: object,
        *,
        lifetime: RefLifetime = _CONTEXT,
        owner: Hashable = None,
        run_id: str | None = None,
        parent_scope: Hashable = None,
    ) -> str:
        """Store ``value`` and return its new uuid4 string.

        ``parent_scope`` matters only for ``UNTIL_PARENT_FINISH`` refs; with
        no parent scope such a ref outlives its run until it is removed.

        Raises:
            RefCapacityError: the registry, or this owner's share, is full.
        """
        if len(self._entries) >= self.capacity:
            raise RefCapacityError(self.capacity)
        held = self._owner_counts.get(owner, 0)
        if self.per_owner_capacity is not None and held >= self.per_owner_capacity:
            raise RefCapacityError(self.per_owner_capacity, f"share of owner {owner!r}")
        serializer = serializer_for_type(type(value))
        descriptor = RemoteRefDescriptor(
            origin_node_id=self.node_id,
            type_tag=type_name(type(value)) if serializer is None else serializer.type_tag,
            created_at_epoch_ms=time.time_ns() // 1_000_000,
            lifetime=lifetime,
            size=_payload_size(value),
            serializable=serializer is not None,
        )
        ref_uuid = new_uuid4()
        scope = parent_scope if lifetime is _PARENT else None
        self._entries[ref_uuid] = RefEntry(ref_uuid, value, descriptor, owner, run_id, scope)
        self._owner_counts[owner] = held + 1
        if run_id is not None:
            self._by_run.setdefault(run_id, {})[ref_uuid] = None
        if scope is not None:
            self._by_scope.setdefault(scope, {})[ref_uuid] = None
        return ref_uuid

    def entry(self, ref_uuid: str, *, owner: Hashable = None) -> RefEntry:
        """Return the stored entry for ``ref_uuid`` if ``owner`` owns it.

        Raises:
            RefNotFoundError: no such ref, or it belongs to another owner.
        """
        found = self._entries.get(ref_uuid)
        if found is None or found.owner != owner:
            raise RefNotFoundError(ref_uuid)
        return found

    def get(self, ref_uuid: str, *, owner: Hashable = None) -> Any:
        """Return the live value of ``ref_uuid`` if ``owner`` owns it.

        Raises:
            RefNotFoundError: no such ref, or it belongs to another owner.
        """
        return self.entry(ref_uuid, owner=owner).value

    def descriptor(self, ref_uuid: str, *, owner: Hashable = None) -> RemoteRefDescriptor:
        """Return the descriptor of ``ref_uuid`` if ``owner`` owns it.

        Raises:
            RefNotFoundError: no such ref, or it belongs to another owner.
        """
        return self.entry(ref_uuid, owner=owner).descriptor

    def serialize(self, ref_uuid: str, *, owner: Hashable = None) -> BytesLike:
        """Return the value of ``ref_uuid`` as bytes-like, for sending to another node.

        A memoryview result is not copied, so the caller can stream it in slices.

        Raises:
            RefNotFoundError: no such ref, or it belongs to another owner.
            RefNotSerializableError: the value's type has no serializer.
        """
        found = self.entry(ref_uuid, owner=owner)
        serializer = serializer_for_type(type(found.value))
        if serializer is None:
            raise RefNotSerializableError(ref_uuid, found.descriptor.type_tag)
        return serializer.to_bytes(found.value)

    def remove(self, ref_uuid: str, *, owner: Hashable = None) -> bool:
        """Drop ``ref_uuid``; return True if it existed and ``owner`` owned it.

        A ref of another owner is left alone and reported as False, exactly
        like a missing one.
        """
        found = self._entries.get(ref_uuid)
        if found is None or found.owner != owner:
            return False
        self._drop(found)
        return True

    # -- scopes ------------------------------------------------------------

    def list_run(self, run_id: str) -> list[RefEntry]:
        """Return the live refs created by run ``run_id``, oldest first."""
        ids = self._by_run.get(run_id)
        if not ids:
            return []
        return [self._entries[ref_uuid] for ref_uuid in ids]

    def purge_run(self, run_id: str, *, all_lifetimes: bool = False) -> int:
        """Drop the ``UNTIL_CONTEXT_DROP`` refs of a finished run; return how many.

        With ``all_lifetimes=True`` every ref the run created goes: that is
        what a failed or cancelled run does, since nobody learnt their ids.
        """
        ids = self._by_run.get(run_id)
        if not ids:
            return 0
        doomed = [
            self._entries[ref_uuid]
            for ref_uuid in ids
            if all_lifetimes or self._entries[ref_uuid].descriptor.lifetime is _CONTEXT
        ]
        for found in doomed:
            self._drop(found)
        return len(doomed)

    def drop_scope(self, parent_scope: Hashable) -> int:
        """Drop every ``UNTIL_PARENT_FINISH`` ref bound to ``parent_scope``; return how many.

        Called when a caller's ref scope closes or its lease expires.
        """
        ids = self._by_scope.get(parent_scope)
        if not ids:
            return 0
        doomed = [self._entries[ref_uuid] for ref_uuid in ids]
        for found in doomed:
            self._drop(found)
        return len(doomed)

    @contextmanager
    def scope(self, parent_scope: Hashable) -> Iterator[Hashable]:
        """Bind ``UNTIL_PARENT_FINISH`` refs to ``parent_scope`` for a ``with`` block.

        Runs started inside the block with ``parent_scope=...`` bind their
        refs to it; leaving the block (normally or not) drops them.
        """
        try:
            yield parent_scope
        finally:
            self.drop_scope(parent_scope)

    def statistics(self) -> RefRegistryStatistics:
        """Return counts of what the registry holds."""
        by_lifetime = dict.fromkeys(RefLifetime, 0)
        for found in self._entries.values():
            by_lifetime[found.descriptor.lifetime] += 1
        return RefRegistryStatistics(
            refs=len(self._entries),
            capacity=self.capacity,
            per_owner_capacity=self.per_owner_capacity,
            by_lifetime=by_lifetime,
            owners=len(self._owner_counts),
            runs=len(self._by_run),
            scopes=len(self._by_scope),
        )

    def _drop(self, found: RefEntry) -> None:
        del self._entries[found.ref_uuid]
        left = self._owner_counts[found.owner] - 1
        if left:
            self._owner_counts[found.owner] = left
        else:
            del self._owner_counts[found.owner]
        if found.run_id is not None:
            _discard(self._by_run, found.run_id, found.ref_uuid)
        if found.parent_scope is not None:
            _discard(self._by_scope, found.parent_scope, found.ref_uuid)


def _discard(index: dict[Any, dict[str, None]], key: Hashable, ref_uuid: str) -> None:
    ids = index[key]
    del ids[ref_uuid]
    if not ids:
        del index[key]


@final
class RefsView:
    """A run's window on a :class:`SessionRefRegistry`: ``ctx.refs``.

    Inserts are stamped with the run's owner, run id and parent scope; reads
    and removals are checked against the run's owner.
    """

    __slots__ = ("owner", "parent_scope", "registry", "run_id")

    def __init__(
        self,
        registry: SessionRefRegistry,
        *,
        owner: Hashable,
        run_id: str,
        parent_scope: Hashable,
    ) -> None:
        self.registry = registry
        self.owner = owner
        self.run_id = run_id
        self.parent_scope = parent_scope

    def insert(self, value: object, lifetime: RefLifetime = _CONTEXT) -> str:
        """Store ``value`` for this run and return its uuid4 string.

        Raises:
            RefCapacityError: the registry, or this owner's share, is full.
        """
        return self.registry.insert(
            value,
            lifetime=lifetime,
            owner=self.owner,
            run_id=self.run_id,
            parent_scope=self.parent_scope,
        )

    def get(self, ref_uuid: str) -> Any:
        """Return the live value of ``ref_uuid``.

        Raises:
            RefNotFoundError: no such ref, or another owner's.
        """
        return self.registry.get(ref_uuid, owner=self.owner)

    def descriptor(self, ref_uuid: str) -> RemoteRefDescriptor:
        """Return the descriptor of ``ref_uuid``.

        Raises:
            RefNotFoundError: no such ref, or another owner's.
        """
        return self.registry.descriptor(ref_uuid, owner=self.owner)

    def remove(self, ref_uuid: str) -> bool:
        """Drop ``ref_uuid``; return True if it existed and belonged to this owner."""
        return self.registry.remove(ref_uuid, owner=self.owner)

    def __contains__(self, ref_uuid: object) -> bool:
        found = self.registry._entries.get(ref_uuid) if isinstance(ref_uuid, str) else None
        return found is not None and found.owner == self.owner
