"""Leases: caller scopes on a peer that end on close or when they expire.

A scope is what ``UNTIL_PARENT_FINISH`` refs are bound to. A caller's explicit
lease lives while it is renewed; a connection is an implicit scope that is held
while the connection is up and expires a grace period after it goes. Expiry
drops every ref bound to the scope, so a crashed parent leaks nothing.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import final

import trio

from .._refs.registry import SessionRefRegistry

__all__ = ["LeaseTable"]


@final
class LeaseTable:
    """Expiry times of scopes, and the reaper that purges expired ones."""

    def __init__(self, refs: SessionRefRegistry) -> None:
        self._refs = refs
        self._expiry: dict[Hashable, float] = {}
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._expiry)

    @staticmethod
    def key(owner: Hashable, lease_id: str) -> Hashable:
        """The scope id of one caller's lease; callers cannot reach each other's."""
        return ("lease", owner, lease_id)

    def scope(self, owner: Hashable, lease_id: str, default_ttl: float) -> Hashable:
        """Return the scope of a lease, opening it with ``default_ttl`` if it is new."""
        key = self.key(owner, lease_id)
        if key not in self._expiry:
            self._set(key, trio.current_time() + default_ttl)
        return key

    def renew(self, owner: Hashable, lease_id: str, ttl: float) -> None:
        """Open or extend a lease so it expires ``ttl`` seconds from now."""
        self._set(self.key(owner, lease_id), trio.current_time() + ttl)

    def close(self, owner: Hashable, lease_id: str) -> int:
        """End a lease now; return how many refs it released."""
        key = self.key(owner, lease_id)
        self._expiry.pop(key, None)
        return self._refs.drop_scope(key)

    def hold(self, scope: Hashable) -> None:
        """Keep ``scope`` alive until :meth:`expire_after` is called for it."""
        self._set(scope, math.inf)

    def expire_after(self, scope: Hashable, grace: float) -> None:
        """Let ``scope`` expire ``grace`` seconds from now."""
        self._set(scope, trio.current_time() + grace)

    def _set(self, scope: Hashable, when: float) -> None:
        self._expiry[scope] = when
        self._changed.set()

    def expire_due(self) -> int:
        """Purge every scope whose time has come; return how many refs went."""
        now = trio.current_time()
        due = [scope for scope, when in self._expiry.items() if when <= now]
        dropped = 0
        for scope in due:
            del self._expiry[scope]
            dropped += self._refs.drop_scope(scope)
        return dropped

    async def run_reaper(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Expire scopes as their times come, until cancelled."""
        task_status.started()
        while True:
            self.expire_due()
            self._changed = trio.Event()
            with trio.move_on_at(min(self._expiry.values(), default=math.inf)):
                await self._changed.wait()
