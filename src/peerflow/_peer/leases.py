"""Leases: caller scopes on a peer that end on close or when they expire.

A scope is what ``UNTIL_PARENT_FINISH`` refs are bound to. A caller's explicit
lease lives while it is renewed; a connection is an implicit scope that is held
while the connection is up and expires a grace period after it goes. Expiry
drops every ref bound to the scope, so a crashed parent leaks nothing.

Callers choose lease ids, so the table is bounded: each caller identity may
hold ``Limits.leases_per_caller`` open leases and the peer
``Limits.lease_capacity`` in all. Renewing or closing a lease that is open
always works; only opening one more is refused.

Expiry never scans the table. Deadlines wait in a heap, and the reaper sleeps
until the earliest one, so opening or renewing a lease costs O(log n) and a
wake-up costs O(log n) per scope it looks at. A renewal that pushes a
deadline back queues nothing: the scope's old heap entry comes due, finds the
later deadline and queues that one instead. Entries left behind by closed
scopes (or by a deadline brought forward) are skipped when they come due, and
the heap is rebuilt without them once they outnumber the live ones.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from collections.abc import Hashable
from typing import Final, final

import attrs
import trio

from .._refs.registry import SessionRefRegistry
from ..errors import PeerEncodeError, PeerLimitError

__all__ = ["MAX_LEASE_ID_LENGTH", "LeaseTable", "LeaseTableStatistics"]

#: The longest lease id a peer opens. Clients send uuid4 strings (36
#: characters); without a bound, the per-caller cap would bound only how many
#: ids a caller holds, not how many bytes.
MAX_LEASE_ID_LENGTH: Final = 128

# Stale heap entries tolerated beyond one per live scope before a rebuild;
# keeps tiny tables from rebuilding on every close.
_SLACK: Final = 64


@final
class _Scope:
    """One scope in the table: its deadline, and the deadline it is queued under."""

    __slots__ = ("expires", "key", "owner", "queued")

    def __init__(self, key: Hashable, owner: Hashable | None) -> None:
        self.key = key
        # The caller identity whose lease this is; None for connection scopes,
        # which count against no caller's cap.
        self.owner = owner
        self.expires = math.inf
        # The deadline of this scope's one live heap entry (inf: none).
        self.queued = math.inf


@final
@attrs.frozen
class LeaseTableStatistics:
    """A snapshot of a :class:`LeaseTable`, as ``statistics()`` returns it.

    Attributes:
        leases: open leases, over all callers.
        scopes: every scope in the table: leases plus connection scopes.
        queued: entries in the expiry heap, stale ones included.
        examined: heap entries the reaper has looked at so far. It grows with
            the scopes that came due (expired or renewed since they were
            queued), never with the size of the table.
    """

    leases: int
    scopes: int
    queued: int
    examined: int


@final
class LeaseTable:
    """Expiry times of scopes, and the reaper that purges expired ones.

    Args:
        refs: the registry whose refs are dropped when their scope ends.
        per_caller: open leases one caller identity may hold.
        capacity: open leases the whole table may hold.
    """

    def __init__(
        self, refs: SessionRefRegistry, *, per_caller: int = 1024, capacity: int = 100_000
    ) -> None:
        self._refs = refs
        self.per_caller = per_caller
        self.capacity = capacity
        self._scopes: dict[Hashable, _Scope] = {}
        self._leases_of: Counter[Hashable] = Counter()
        self._leases = 0
        self._heap: list[tuple[float, int, _Scope]] = []
        # Ties in the heap are broken by insertion order, never by comparing scopes.
        self._order = itertools.count()
        self._examined = 0
        # The reaper's sleep; moving its deadline earlier wakes it sooner.
        self._alarm = trio.CancelScope()

    def __len__(self) -> int:
        return len(self._scopes)

    def statistics(self) -> LeaseTableStatistics:
        """Return the table's current size and the reaper's work so far."""
        return LeaseTableStatistics(
            leases=self._leases,
            scopes=len(self._scopes),
            queued=len(self._heap),
            examined=self._examined,
        )

    @staticmethod
    def key(owner: Hashable, lease_id: str) -> Hashable:
        """The scope id of one caller's lease; callers cannot reach each other's."""
        return ("lease", owner, lease_id)

    def scope(self, owner: Hashable, lease_id: str, default_ttl: float) -> Hashable:
        """Return the scope of a lease, opening it with ``default_ttl`` if it is new.

        Raises:
            PeerLimitError: the lease is new and the caller, or the table, is full.
            PeerEncodeError: the lease is new and its id is longer than
                :data:`MAX_LEASE_ID_LENGTH`.
        """
        key = self.key(owner, lease_id)
        if key not in self._scopes:
            self._set(self._open(key, owner, lease_id), trio.current_time() + default_ttl)
        return key

    def renew(self, owner: Hashable, lease_id: str, ttl: float) -> None:
        """Open or extend a lease so it expires ``ttl`` seconds from now.

        Raises:
            PeerLimitError: the lease is new and the caller, or the table, is full.
            PeerEncodeError: the lease is new and its id is longer than
                :data:`MAX_LEASE_ID_LENGTH`.
        """
        key = self.key(owner, lease_id)
        scope = self._scopes.get(key)
        if scope is None:
            scope = self._open(key, owner, lease_id)
        self._set(scope, trio.current_time() + ttl)

    def close(self, owner: Hashable, lease_id: str) -> int:
        """End a lease now; return how many refs it released."""
        key = self.key(owner, lease_id)
        scope = self._scopes.get(key)
        if scope is not None:
            self._remove(scope)
        return self._refs.drop_scope(key)

    def hold(self, scope: Hashable) -> None:
        """Keep ``scope`` alive until :meth:`expire_after` is called for it."""
        self._set(self._get_or_add(scope), math.inf)

    def expire_after(self, scope: Hashable, grace: float) -> None:
        """Let ``scope`` expire ``grace`` seconds from now."""
        self._set(self._get_or_add(scope), trio.current_time() + grace)

    def expire_due(self) -> int:
        """Purge every scope whose time has come; return how many refs went."""
        now = trio.current_time()
        dropped = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, scope = heapq.heappop(heap)
            self._examined += 1
            if not self._is_live(when, scope):
                continue
            scope.queued = math.inf
            if scope.expires <= now:
                self._remove(scope)
                dropped += self._refs.drop_scope(scope.key)
            else:
                # Renewed since it was queued: wait for the new deadline.
                self._queue(scope)
        return dropped

    async def run_reaper(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Expire scopes as their times come, until cancelled."""
        task_status.started()
        while True:
            self.expire_due()
            with trio.CancelScope(deadline=self._next_deadline()) as self._alarm:
                await trio.sleep_forever()

    # -- bookkeeping -------------------------------------------------------------

    def _open(self, key: Hashable, owner: Hashable, lease_id: str) -> _Scope:
        if len(lease_id) > MAX_LEASE_ID_LENGTH:
            raise PeerEncodeError(
                f"a lease id of {len(lease_id)} characters is longer than the limit "
                f"of {MAX_LEASE_ID_LENGTH}",
                "lease_id",
            )
        if self._leases_of[owner] >= self.per_caller:
            raise PeerLimitError(
                f"this caller already holds {self.per_caller} open leases "
                "(Limits.leases_per_caller); close one, or let one expire, first"
            )
        if self._leases >= self.capacity:
            raise PeerLimitError(
                f"this peer already holds {self.capacity} open leases "
                "(Limits.lease_capacity); try again once some have closed or expired"
            )
        self._leases_of[owner] += 1
        self._leases += 1
        scope = self._scopes[key] = _Scope(key, owner)
        return scope

    def _get_or_add(self, key: Hashable) -> _Scope:
        scope = self._scopes.get(key)
        if scope is None:
            scope = self._scopes[key] = _Scope(key, None)
        return scope

    def _remove(self, scope: _Scope) -> None:
        # Its heap entry stays behind, stale, until it comes due or a rebuild.
        del self._scopes[scope.key]
        scope.queued = math.inf
        if scope.owner is not None:
            self._leases -= 1
            self._leases_of[scope.owner] -= 1
            if not self._leases_of[scope.owner]:
                del self._leases_of[scope.owner]

    def _set(self, scope: _Scope, when: float) -> None:
        scope.expires = when
        # A later deadline rides on the entry already queued (see expire_due).
        if when < scope.queued:
            self._queue(scope)

    def _queue(self, scope: _Scope) -> None:
        when = scope.expires
        if when == math.inf:
            return
        scope.queued = when
        heapq.heappush(self._heap, (when, next(self._order), scope))
        if len(self._heap) > 2 * len(self._scopes) + _SLACK:
            self._rebuild()
        # Wake the reaper sooner only if this deadline comes first.
        self._alarm.deadline = min(self._alarm.deadline, when)

    def _is_live(self, when: float, scope: _Scope) -> bool:
        return scope.queued == when and self._scopes.get(scope.key) is scope

    def _rebuild(self) -> None:
        # O(n), but only after as many stale entries piled up: amortised O(1).
        # In place: expire_due may be popping from this very list.
        self._heap[:] = [entry for entry in self._heap if self._is_live(entry[0], entry[2])]
        heapq.heapify(self._heap)

    def _next_deadline(self) -> float:
        heap = self._heap
        while heap and not self._is_live(heap[0][0], heap[0][2]):
            heapq.heappop(heap)
            self._examined += 1
        return heap[0][0] if heap else math.inf
