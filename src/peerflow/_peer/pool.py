"""PeerPool: one caller, several peers.

The pool keeps a :class:`~peerflow.PeerClient` open to every endpoint, each
in a task of its own that watches the connection with HTTP/2 PINGs and
reconnects with backoff when it fails. A call goes to the healthy peer with
the fewest calls in flight (ties take turns). A call that never started
there (:class:`~peerflow.PeerUnavailableError`: the connection was going
away, the stream was refused, the peer said UNAVAILABLE) moves on to the
next peer; any other failure is the caller's to see. Every ref a response
hands out is remembered with its ``origin_node_id``, so its deref and
release go back to the node that holds it.

``UNTIL_PARENT_FINISH`` refs are bound to a pool-wide lease: one lease id
for the pool's block (and one per ``ref_scope()``), opened on each peer the
first time a call goes there. A lease belongs to the caller, not to a
connection, so a member that reconnects picks its leases up again and the
refs it handed out before live on until their scope ends.
"""

from __future__ import annotations

import contextvars
import math
import ssl
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, final

import attrs
import trio

from .._excgroups import collapse_excgroups
from .._refs.descriptor import RefLifetime
from .._wire.envelopes import SubWorkflowResponse
from ..errors import (
    PeerAuthError,
    PeerError,
    PeerRefNotFoundError,
    PeerTimeoutError,
    PeerTransportError,
    PeerUnavailableError,
)
from .auth import resolve_peer_token
from .client import _FROM_ENV, PeerClient, StreamCall, _Scope, parse_endpoint
from .limits import Limits
from .logs import PeerLogger

__all__ = ["PeerPool", "PoolMember"]

# How many released refs a pool still routes (see PeerPool._released).
_RELEASED_KEPT = 4096


@final
@attrs.frozen
class PoolMember:
    """A snapshot of one endpoint of a :class:`PeerPool` (see ``members()``).

    Attributes:
        endpoint: the endpoint URL the pool connects to.
        healthy: whether calls may go there now.
        node_ids: the node ids its responses' refs came from, once seen.
        outstanding: calls in flight there.
        rtt: the last PING round trip in seconds, if one was measured.
        failure: what made it unhealthy last, if anything.
    """

    endpoint: str
    healthy: bool
    node_ids: frozenset[str]
    outstanding: int
    rtt: float | None
    failure: str | None


class _Member:
    """One endpoint's live state, owned by its connection task."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        # The node ids seen in its refs outlive a closing of the pool: refs
        # made to last (UNTIL_EXPLICIT_DROP) can still be sent home.
        self.node_ids: set[str] = set()
        self.reset()

    def reset(self) -> None:
        """Forget the connection state of a previous opening of the pool."""
        self.client: PeerClient | None = None
        self.outstanding = 0
        self.rtt: float | None = None
        self.failure: BaseException | None = None
        # The last failure logged as a warning: a failure that repeats on
        # every reconnect attempt is worth one warning, not one per attempt.
        self.reported: str | None = None
        # Set by a call that found the connection unusable: reconnect now.
        self.broken = trio.Event()
        self.tried_once = trio.Event()
        # Woken when the last call in flight here ends.
        self.idle = trio.lowlevel.ParkingLot()

    def call_ended(self) -> None:
        self.outstanding -= 1
        if not self.outstanding:
            self.idle.unpark_all()

    @property
    def usable(self) -> bool:
        client = self.client
        return client is not None and client.accepting_calls and not self.broken.is_set()

    def snapshot(self) -> PoolMember:
        return PoolMember(
            endpoint=self.endpoint,
            healthy=self.usable,
            node_ids=frozenset(self.node_ids),
            outstanding=self.outstanding,
            rtt=self.rtt,
            failure=None if self.failure is None else str(self.failure),
        )


@final
class _PoolScope:
    """A ref scope of a pool: one lease id, opened on each peer it sends calls to.

    The lease belongs to the caller on each peer, not to a connection, so a
    member that reconnects opens it again on its new connection and the
    refs bound to it over the old one stay bound.
    """

    def __init__(self, parent: _PoolScope | None) -> None:
        self.lease_id = str(uuid.uuid4())
        self.parent = parent
        self.open = True
        # The members whose peer has (or had) this lease, and the client-side
        # scope of the lease on each connection it was opened on.
        self.members: set[_Member] = set()
        self.leases: dict[PeerClient, _Scope] = {}
        self.opening: dict[PeerClient, trio.Lock] = {}
        # Its UNTIL_PARENT_FINISH refs: forgotten by the pool when it ends.
        self.refs: set[str] = set()


def _is_refusal(exc: BaseException) -> bool:
    """True for a failure that reconnecting will not cure by itself.

    The peer refused the caller's credentials (UNAUTHENTICATED), or the TLS
    handshake failed on a certificate or a protocol mismatch rather than on
    a dropped connection. Either needs a configuration change on one side.
    """
    if isinstance(exc, PeerAuthError):
        return True
    if not isinstance(exc, PeerTransportError) or isinstance(
        exc, (PeerTimeoutError, PeerUnavailableError)
    ):
        return False
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            # An EOF mid-handshake is a connection dropped, not a refusal.
            return not isinstance(
                seen, (ssl.SSLEOFError, ssl.SSLSyscallError, ssl.SSLZeroReturnError)
            )
        seen = seen.__cause__ or seen.__context__
    return False


@final
class PeerPool:
    """Invoke sub-workflows on several peers, and route each ref back to its node.

    ``async with PeerPool([endpoint, ...], node_id) as pool:`` connects to
    every endpoint and keeps the connections healthy until the block ends;
    leaving it releases the ``UNTIL_PARENT_FINISH`` refs handed out through
    the pool (those of a :meth:`ref_scope` when that block ends), then
    closes the connections. The call methods are those of
    :class:`~peerflow.PeerClient`. Once the block has ended, calls raise
    :class:`~peerflow.PeerUnavailableError` ("not open"), as a
    ``PeerClient``'s do after its block; the pool may be opened again with
    another ``async with``.

    Entering waits for each endpoint's first connection attempt, but once
    one peer is up, the others get only ``health_timeout`` more: a silent
    peer is left unhealthy (and retried in the background) rather than
    holding up the pool. Each connect is bounded by
    ``limits.handshake_timeout``. A peer that refuses the pool (a missing
    or wrong token, a TLS certificate it or the pool rejects) is retried
    with the same backoff as an unreachable one.

    Args:
        endpoints: ``http://host:port`` or ``https://host:port`` URLs.
        node_id: this caller's node id, sent on every call.
        tls: as for :meth:`PeerClient.connect`, for every endpoint.
        token: as for :meth:`PeerClient.connect` (default: the environment).
        limits: as for :meth:`PeerClient.connect`.
        lease_ttl: as for :meth:`PeerClient.connect`.
        health_interval: seconds between health PINGs on each connection.
        health_timeout: a PING unanswered this long marks the peer unhealthy
            and its connection is replaced.
        reconnect_delay: the first wait before reconnecting to a failed
            endpoint; it doubles on each failure up to ``max_reconnect_delay``.

    Raises:
        PeerTransportError: at once for a bad endpoint URI.
        ValueError: no endpoints.
        PeerAuthError: on entering, when every peer refused the pool's token
            (a ``PeerTransportError`` instead when every peer failed the
            TLS handshake on a certificate, or some on each).
        PeerUnavailableError: on entering, when no peer could be reached
            (or some refused and the rest could not be reached).
        RuntimeError: on entering a pool that is already open.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        node_id: str,
        *,
        tls: ssl.SSLContext | None = None,
        token: str | object | None = _FROM_ENV,
        limits: Limits | None = None,
        lease_ttl: float = 30.0,
        health_interval: float = 5.0,
        health_timeout: float = 2.0,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 30.0,
    ) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise ValueError("PeerPool needs a list of one or more endpoints")
        for endpoint in endpoints:
            parse_endpoint(endpoint)
        resolved = resolve_peer_token() if token is _FROM_ENV else token
        self.node_id = node_id
        self._members = [_Member(endpoint) for endpoint in endpoints]
        self._connect_options: dict[str, Any] = {
            "tls": tls,
            "token": resolved,
            "limits": limits,
            "lease_ttl": lease_ttl,
        }
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._reconnect_delay = reconnect_delay
        self._max_reconnect_delay = max_reconnect_delay
        self._log = PeerLogger("pool", node_id)
        self._ref_nodes: dict[str, str] = {}
        # The latest refs released through the pool, with their nodes: their
        # release again answers False and a deref reaches the node's "not
        # found", as on a PeerClient. Bounded, oldest forgotten first.
        self._released: dict[str, str] = {}
        self._node_members: dict[str, _Member] = {}
        self._turn = 0
        self._running: AbstractAsyncContextManager[PeerPool] | None = None
        # The pool block's own scope while it is open; ref_scope() blocks
        # nest under it. Every scope still open, for members that reconnect.
        self._root: _PoolScope | None = None
        self._open_scopes: set[_PoolScope] = set()
        self._scope_var: contextvars.ContextVar[_PoolScope | None] = contextvars.ContextVar(
            f"peerflow-pool-scope-{id(self)}", default=None
        )

    # -- lifetime ----------------------------------------------------------------

    async def __aenter__(self) -> PeerPool:
        if self._running is not None:
            raise RuntimeError("this PeerPool is already open")
        self._running = self._run()
        try:
            return await self._running.__aenter__()
        except BaseException:
            self._running = None
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        running, self._running = self._running, None
        assert running is not None
        return await running.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[PeerPool]:
        # A pool opened again starts afresh: the tasks of its last opening
        # are gone, and their events and counts with them.
        for member in self._members:
            member.reset()
        for stale in self._open_scopes:
            stale.open = False
        self._open_scopes.clear()
        with collapse_excgroups():
            async with trio.open_nursery() as nursery:
                for member in self._members:
                    nursery.start_soon(self._keep_connected, member)
                await self._wait_first_attempts()
                if not any(member.usable for member in self._members):
                    nursery.cancel_scope.cancel()
                    raise self._no_peer("no peer of the pool is reachable")
                root = self._root = _PoolScope(None)
                self._open_scopes.add(root)
                try:
                    yield self
                finally:
                    self._root = None
                    await self._close_scope(root)
                    nursery.cancel_scope.cancel()

    def _no_peer(self, what: str) -> PeerError:
        """The error for no usable peer: a refusal as itself when every peer refused."""
        failures = [member.failure for member in self._members]
        first = failures[0]
        if isinstance(first, PeerError) and all(f is not None and _is_refusal(f) for f in failures):
            # Not "unavailable": retrying will not help until the token or
            # certificate is fixed, so the caller sees what its peers said.
            error = type(first)(f"every peer of the pool refused it: {self._failures()}")
            error.__cause__ = first
            return error
        return PeerUnavailableError(f"{what}: {self._failures()}")

    async def _wait_first_attempts(self) -> None:
        """Wait for every endpoint's first connection attempt, but not for a silent one.

        Once one peer is usable, the others get ``health_timeout`` more to
        connect: a peer that accepts but never answers (its connect is
        bounded only by ``limits.handshake_timeout``) must not hold up the
        pool. Such a peer stays unhealthy, and its task keeps trying.
        """
        with trio.CancelScope() as waiting:

            async def first_attempt(member: _Member) -> None:
                await member.tried_once.wait()
                if member.usable:
                    waiting.deadline = min(
                        waiting.deadline, trio.current_time() + self._health_timeout
                    )

            async with trio.open_nursery() as nursery:
                for member in self._members:
                    nursery.start_soon(first_attempt, member)
        for member in self._members:
            if not member.tried_once.is_set() and member.failure is None:
                member.failure = PeerTimeoutError(
                    f"{member.endpoint} did not connect within {self._health_timeout:g}s "
                    "of the first peer of the pool (still trying)"
                )

    async def _keep_connected(self, member: _Member) -> None:
        delay = self._reconnect_delay
        while True:
            try:
                async with PeerClient.connect(
                    member.endpoint, self.node_id, **self._connect_options
                ) as client:
                    await self._reopen_leases(member, client)
                    if member.reported is not None:
                        self._log.info("peer %s is back", member.endpoint)
                    member.client = client
                    member.broken = trio.Event()
                    member.failure = None
                    member.reported = None
                    delay = self._reconnect_delay
                    member.tried_once.set()
                    unresponsive = await self._watch(member, client)
                    member.broken.set()  # no new calls while it closes
                    self._report(member, "peer %s taken out: %s")
                    if unresponsive:
                        # Goodbyes would only wait for timeouts; its lease lapses.
                        client.abandon(PeerTimeoutError(str(member.failure)))
                    else:
                        # A draining peer lets the calls it took finish.
                        while member.outstanding:
                            await member.idle.park()
            except PeerError as exc:
                member.failure = exc
                if _is_refusal(exc):
                    self._report(
                        member,
                        "peer %s refused the pool: %s (retrying with backoff; "
                        "logged again if it changes)",
                    )
                else:
                    self._report(member, "peer %s unavailable: %s")
            finally:
                member.client = None
            member.tried_once.set()
            await trio.sleep(delay)
            delay = min(delay * 2, self._max_reconnect_delay)

    def _report(self, member: _Member, message: str) -> None:
        """Log a member's failure: a warning when it is new, DEBUG when it repeats."""
        failure = f"{type(member.failure).__name__}: {member.failure}"
        if failure == member.reported:
            self._log.debug(message, member.endpoint, member.failure)
        else:
            member.reported = failure
            self._log.warning(message, member.endpoint, member.failure)

    async def _watch(self, member: _Member, client: PeerClient) -> bool:
        """Return when the connection should be replaced: True if the peer went silent."""
        while True:
            with trio.move_on_after(self._health_interval):
                await member.broken.wait()
            if not member.usable:
                if member.failure is None:
                    member.failure = PeerUnavailableError(
                        f"{member.endpoint} closed the connection or went away"
                    )
                return False
            with trio.move_on_after(self._health_timeout) as scope:
                try:
                    member.rtt = await client.ping()
                except PeerError as exc:
                    member.failure = exc
                    return False
            if scope.cancelled_caught:
                member.failure = PeerTimeoutError(
                    f"{member.endpoint} did not answer a PING within {self._health_timeout:g}s"
                )
                return True

    def _failures(self) -> str:
        return "; ".join(f"{m.endpoint}: {m.failure}" for m in self._members)

    # -- ref scopes ----------------------------------------------------------------

    @asynccontextmanager
    async def ref_scope(self) -> AsyncIterator[None]:
        """Bind the ``UNTIL_PARENT_FINISH`` refs of calls made inside to this block.

        As :meth:`PeerClient.ref_scope`, over every peer of the pool: leaving
        the block releases the refs handed out to calls made inside it,
        whichever peer ran them, and calls made from tasks started inside
        the block belong to it too. Scopes nest. Entering costs nothing; the
        first call the scope sends to a peer opens its lease there. A peer
        that reconnects while the block is open keeps the scope's refs (its
        lease is opened again on the new connection); a peer that is down
        when the block ends frees them once the lease lapses (``lease_ttl``).

        Raises:
            PeerUnavailableError: the pool is not open.
        """
        scope = _PoolScope(self._current_scope())
        self._open_scopes.add(scope)
        token = self._scope_var.set(scope)
        try:
            yield
        finally:
            self._scope_var.reset(token)
            await self._close_scope(scope)

    def _open_root(self) -> _PoolScope:
        root = self._root
        if root is None:
            # As a PeerClient's calls after its block: the call never started.
            raise PeerUnavailableError(
                "this PeerPool is not open: make calls inside its `async with` block"
            )
        return root

    def _current_scope(self) -> _PoolScope:
        root = self._open_root()
        scope = self._scope_var.get()
        # A task that outlived its ref_scope block, or a scope of an earlier
        # opening of the pool: its calls belong to the nearest open scope.
        while scope is not None and not scope.open:
            scope = scope.parent
        return root if scope is None else scope

    async def _lease_within(
        self,
        scope: _PoolScope,
        member: _Member,
        client: PeerClient,
        deadline: float,
        timeout: float | None,
    ) -> _Scope:
        """The scope's lease on this connection, opened within a call's timeout."""
        lease = scope.leases.get(client)
        if lease is not None:
            return lease
        with trio.move_on_at(deadline):
            return await self._lease_on(scope, member, client)
        raise PeerTimeoutError(f"the call timed out after {timeout:g}s opening its lease")

    async def _lease_on(self, scope: _PoolScope, member: _Member, client: PeerClient) -> _Scope:
        """The scope's lease on this connection, opened the first time it is needed."""
        lease = scope.leases.get(client)
        if lease is not None:
            return lease
        async with scope.opening.setdefault(client, trio.Lock()):
            lease = scope.leases.get(client)
            if lease is None:
                scope.members.add(member)
                lease = _Scope(scope.lease_id)
                # Registers it with the client, which renews it from now on.
                await client._open_lease(lease)
                scope.leases[client] = lease
                if not scope.open:  # it ended meanwhile: let the lease lapse
                    client._scopes.pop(scope.lease_id, None)
        return lease

    async def _reopen_leases(self, member: _Member, client: PeerClient) -> None:
        """Open, on a member's new connection, the leases its open scopes hold there.

        Renewal then carries on, so the refs bound to them over the old
        connection are not lost to a reconnect.
        """
        for scope in list(self._open_scopes):
            if member in scope.members:
                try:
                    await self._lease_on(scope, member, client)
                except PeerError as exc:
                    # The scope's next call there will try again.
                    self._log.warning(
                        "could not renew a ref scope's lease on %s: %s", member.endpoint, exc
                    )

    async def _close_scope(self, scope: _PoolScope) -> None:
        """Release a scope's refs on every peer it used, all at once."""
        scope.open = False
        self._open_scopes.discard(scope)

        current = {member.client for member in scope.members}
        for used in scope.leases:
            if used not in current:  # a connection since replaced: stop renewing there
                used._scopes.pop(scope.lease_id, None)

        async def release(member: _Member) -> None:
            client = member.client
            if client is None or not client.accepting_calls:
                return  # the peer lets the lease lapse (lease_ttl)
            # Closing the lease releases its refs, those bound over an earlier
            # connection of this member included.
            await client._close_scope(scope.leases.get(client) or _Scope(scope.lease_id))

        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for member in scope.members:
                    nursery.start_soon(release, member)
        for ref_uuid in scope.refs:
            self._forget(ref_uuid)

    # -- choosing ------------------------------------------------------------------

    def members(self) -> list[PoolMember]:
        """A snapshot of every endpoint: health, calls in flight, node ids, RTT."""
        return [member.snapshot() for member in self._members]

    def _choose(self, tried: Sequence[_Member]) -> tuple[_Member, PeerClient]:
        candidates = [m for m in self._members if m.usable and m not in tried]
        if not candidates:
            if tried:
                raise PeerUnavailableError(f"no healthy peer in the pool: {self._failures()}")
            raise self._no_peer("no healthy peer in the pool")
        fewest = min(m.outstanding for m in candidates)
        least_busy = [m for m in candidates if m.outstanding == fewest]
        self._turn += 1
        member = least_busy[self._turn % len(least_busy)]
        assert member.client is not None
        return member, member.client

    def _learn(
        self, member: _Member, scope: _PoolScope, response: SubWorkflowResponse | None
    ) -> None:
        if response is None:
            return
        for ref_uuid, descriptor in response.remote_refs.items():
            node = descriptor.origin_node_id
            self._ref_nodes[ref_uuid] = node
            if descriptor.lifetime is RefLifetime.UNTIL_PARENT_FINISH:
                scope.refs.add(ref_uuid)
            if node not in self._node_members:
                self._node_members[node] = member
                member.node_ids.add(node)

    def _forget(self, ref_uuid: str) -> None:
        node = self._ref_nodes.pop(ref_uuid, None)
        if node is not None:
            self._released[ref_uuid] = node
            if len(self._released) > _RELEASED_KEPT:
                del self._released[next(iter(self._released))]

    def _holder(self, ref_uuid: str, origin_node_id: str | None) -> tuple[_Member, PeerClient]:
        self._open_root()
        node = origin_node_id or self._ref_nodes.get(ref_uuid) or self._released.get(ref_uuid)
        if node is None:
            raise PeerRefNotFoundError(
                ref_uuid,
                " in this pool (it handed out no such ref, or released it long ago; "
                "pass origin_node_id)",
            )
        member = self._node_members.get(node)
        if member is None:
            raise PeerRefNotFoundError(ref_uuid, f" (no peer of this pool is node {node!r})")
        if not member.usable or member.client is None:
            raise PeerUnavailableError(
                f"{member.endpoint} (node {node!r}) holds ref {ref_uuid!r} but is unavailable"
                + (f": {member.failure}" if member.failure else "")
            )
        return member, member.client

    # -- calls -------------------------------------------------------------------

    async def invoke_sub_workflow(
        self,
        workflow_name: str,
        step_ids: Iterable[str],
        input: Any = None,
        *,
        timeout: float | None = None,
    ) -> SubWorkflowResponse:
        """Run a sub-workflow on the least busy healthy peer.

        As :meth:`PeerClient.invoke_sub_workflow`, whose response it returns.

        A call that never started on a peer is sent to the next one; the
        timeout covers every attempt.

        Raises:
            PeerUnavailableError: no healthy peer could take the call, or the
                pool is not open.
            PeerAuthError: every peer refused the pool's token.
            The errors of :meth:`PeerClient.invoke_sub_workflow`.
        """
        step_ids = list(step_ids) if not isinstance(step_ids, str) else step_ids
        scope = self._current_scope()
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        tried: list[_Member] = []
        while True:
            member, client = self._choose(tried)
            member.outstanding += 1
            try:
                lease = await self._lease_within(scope, member, client, deadline, timeout)
                remaining = None if timeout is None else max(0.0, deadline - trio.current_time())
                # The member's client binds the call's refs to the scope's lease.
                bound = client._scope_var.set(lease)
                try:
                    response = await client.invoke_sub_workflow(
                        workflow_name, step_ids, input, timeout=remaining
                    )
                finally:
                    client._scope_var.reset(bound)
            except PeerUnavailableError as exc:
                self._log.info(
                    "call not taken by %s, trying another peer: %s", member.endpoint, exc
                )
                member.broken.set()
                tried.append(member)
                continue
            finally:
                member.call_ended()
            self._learn(member, scope, response)
            return response

    @asynccontextmanager
    async def stream_sub_workflow(
        self,
        workflow_name: str,
        step_ids: Iterable[str],
        input: Any = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamCall]:
        """Stream a sub-workflow's events from the least busy healthy peer.

        See :meth:`PeerClient.stream_sub_workflow`. Entering the block waits
        for the peer's answer to begin; a call refused before that (the
        stream refused, the peer UNAVAILABLE) moves on to another peer, and
        the timeout covers every attempt. Once the answer has begun, the call
        is this peer's.
        """
        step_ids = list(step_ids) if not isinstance(step_ids, str) else step_ids
        scope = self._current_scope()
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        tried: list[_Member] = []
        while True:
            member, client = self._choose(tried)
            entered = False
            member.outstanding += 1
            try:
                lease = await self._lease_within(scope, member, client, deadline, timeout)
                remaining = None if timeout is None else max(0.0, deadline - trio.current_time())
                # Bound for the whole block: the final response, read as the
                # caller iterates, hands its refs to the scope's lease.
                bound = client._scope_var.set(lease)
                try:
                    async with client.stream_sub_workflow(
                        workflow_name, step_ids, input, timeout=remaining
                    ) as call:
                        # The call has started only once its answer has: a
                        # stream refused before that (REFUSED_STREAM,
                        # UNAVAILABLE) is handed to the next peer, as an
                        # invoke would be.
                        await call._wait_started()
                        entered = True
                        yield call
                finally:
                    client._scope_var.reset(bound)
            except PeerUnavailableError as exc:
                if entered:
                    raise
                self._log.info(
                    "stream not taken by %s, trying another peer: %s", member.endpoint, exc
                )
                member.broken.set()
                tried.append(member)
                continue
            finally:
                member.call_ended()
            self._learn(member, scope, call.response)
            return

    async def deref_session_ref(
        self,
        ref_uuid: str,
        *,
        origin_node_id: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Fetch a remote ref's bytes from the node that holds it.

        ``origin_node_id`` (from the ref's descriptor) is needed only for a
        ref this pool did not hand out itself.

        Raises:
            PeerRefNotFoundError: the pool knows no node for this ref, or the
                node has no such ref for this caller.
            PeerUnavailableError: the holding node is not reachable now.
            The errors of :meth:`PeerClient.deref_session_ref`.
        """
        member, client = self._holder(ref_uuid, origin_node_id)
        member.outstanding += 1
        try:
            return await client.deref_session_ref(ref_uuid, timeout=timeout)
        finally:
            member.call_ended()

    @asynccontextmanager
    async def open_session_ref(
        self,
        ref_uuid: str,
        *,
        origin_node_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream a remote ref's bytes from its node; see :meth:`PeerClient.open_session_ref`."""
        member, client = self._holder(ref_uuid, origin_node_id)
        member.outstanding += 1
        try:
            async with client.open_session_ref(ref_uuid, timeout=timeout) as chunks:
                yield chunks
        finally:
            member.call_ended()

    async def release_session_ref(
        self,
        ref_uuid: str,
        *,
        origin_node_id: str | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Release a remote ref on the node that holds it; True if it was dropped.

        Raises:
            PeerRefNotFoundError: the pool knows no node for this ref.
            PeerUnavailableError: the holding node is not reachable now.
        """
        member, client = self._holder(ref_uuid, origin_node_id)
        member.outstanding += 1
        try:
            released = await client.release_session_ref(ref_uuid, timeout=timeout)
        finally:
            member.call_ended()
        self._forget(ref_uuid)
        for scope in self._open_scopes:  # released: no scope needs to forget it later
            scope.refs.discard(ref_uuid)
        return released

    def __repr__(self) -> str:
        healthy = sum(member.usable for member in self._members)
        return f"<PeerPool {healthy}/{len(self._members)} healthy node_id={self.node_id!r}>"
