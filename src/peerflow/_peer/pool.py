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
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, final

import attrs
import trio

from .._transport.mapping import collapse_excgroups
from .._wire.envelopes import SubWorkflowResponse
from ..errors import PeerError, PeerRefNotFoundError, PeerTimeoutError, PeerUnavailableError
from .auth import resolve_peer_token
from .client import _FROM_ENV, PeerClient, StreamCall, parse_endpoint
from .limits import Limits
from .logs import PeerLogger

__all__ = ["PeerPool", "PoolMember"]


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
        self.client: PeerClient | None = None
        self.outstanding = 0
        self.rtt: float | None = None
        self.failure: BaseException | None = None
        self.node_ids: set[str] = set()
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
class PeerPool:
    """Invoke sub-workflows on several peers, and route each ref back to its node.

    ``async with PeerPool([endpoint, ...], node_id) as pool:`` connects to
    every endpoint and keeps the connections healthy until the block ends;
    leaving it closes them, which releases the ``UNTIL_PARENT_FINISH`` refs
    handed out through the pool. The call methods are those of
    :class:`~peerflow.PeerClient`.

    Entering waits for each endpoint's first connection attempt, but once
    one peer is up, the others get only ``health_timeout`` more: a silent
    peer is left unhealthy (and retried in the background) rather than
    holding up the pool. Entering fails only when no peer can be reached;
    each connect is bounded by ``limits.handshake_timeout``.

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
        self._node_members: dict[str, _Member] = {}
        self._turn = 0
        self._running: AbstractAsyncContextManager[PeerPool] | None = None

    # -- lifetime ----------------------------------------------------------------

    async def __aenter__(self) -> PeerPool:
        if self._running is not None:
            raise RuntimeError("this PeerPool is already open")
        self._running = self._run()
        return await self._running.__aenter__()

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
        with collapse_excgroups():
            async with trio.open_nursery() as nursery:
                for member in self._members:
                    nursery.start_soon(self._keep_connected, member)
                await self._wait_first_attempts()
                if not any(member.usable for member in self._members):
                    nursery.cancel_scope.cancel()
                    raise PeerUnavailableError(
                        f"no peer of the pool is reachable: {self._failures()}"
                    )
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()

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
                    member.client = client
                    member.broken = trio.Event()
                    member.failure = None
                    delay = self._reconnect_delay
                    member.tried_once.set()
                    unresponsive = await self._watch(member, client)
                    member.broken.set()  # no new calls while it closes
                    self._log.warning("peer %s taken out: %s", member.endpoint, member.failure)
                    if unresponsive:
                        # Goodbyes would only wait for timeouts; its lease lapses.
                        client.abandon(PeerTimeoutError(str(member.failure)))
                    else:
                        # A draining peer lets the calls it took finish.
                        while member.outstanding:
                            await member.idle.park()
            except PeerError as exc:
                member.failure = exc
                self._log.warning("peer %s unavailable: %s", member.endpoint, exc)
            finally:
                member.client = None
            member.tried_once.set()
            await trio.sleep(delay)
            delay = min(delay * 2, self._max_reconnect_delay)

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

    # -- choosing ------------------------------------------------------------------

    def members(self) -> list[PoolMember]:
        """A snapshot of every endpoint: health, calls in flight, node ids, RTT."""
        return [member.snapshot() for member in self._members]

    def _choose(self, tried: Sequence[_Member]) -> tuple[_Member, PeerClient]:
        candidates = [m for m in self._members if m.usable and m not in tried]
        if not candidates:
            raise PeerUnavailableError(f"no healthy peer in the pool: {self._failures()}")
        fewest = min(m.outstanding for m in candidates)
        least_busy = [m for m in candidates if m.outstanding == fewest]
        self._turn += 1
        member = least_busy[self._turn % len(least_busy)]
        assert member.client is not None
        return member, member.client

    def _learn(self, member: _Member, response: SubWorkflowResponse | None) -> None:
        if response is None:
            return
        for ref_uuid, descriptor in response.remote_refs.items():
            node = descriptor.origin_node_id
            self._ref_nodes[ref_uuid] = node
            if node not in self._node_members:
                self._node_members[node] = member
                member.node_ids.add(node)

    def _holder(self, ref_uuid: str, origin_node_id: str | None) -> tuple[_Member, PeerClient]:
        node = origin_node_id or self._ref_nodes.get(ref_uuid)
        if node is None:
            raise PeerRefNotFoundError(
                ref_uuid, " in this pool (it handed out no such ref; pass origin_node_id)"
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
            PeerUnavailableError: no healthy peer could take the call.
            The errors of :meth:`PeerClient.invoke_sub_workflow`.
        """
        step_ids = list(step_ids) if not isinstance(step_ids, str) else step_ids
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        tried: list[_Member] = []
        while True:
            member, client = self._choose(tried)
            remaining = None if timeout is None else max(0.0, deadline - trio.current_time())
            member.outstanding += 1
            try:
                response = await client.invoke_sub_workflow(
                    workflow_name, step_ids, input, timeout=remaining
                )
            except PeerUnavailableError as exc:
                self._log.info(
                    "call not taken by %s, trying another peer: %s", member.endpoint, exc
                )
                member.broken.set()
                tried.append(member)
                continue
            finally:
                member.call_ended()
            self._learn(member, response)
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
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        tried: list[_Member] = []
        while True:
            member, client = self._choose(tried)
            remaining = None if timeout is None else max(0.0, deadline - trio.current_time())
            entered = False
            member.outstanding += 1
            try:
                async with client.stream_sub_workflow(
                    workflow_name, step_ids, input, timeout=remaining
                ) as call:
                    # The call has started only once its answer has: a stream
                    # refused before that (REFUSED_STREAM, UNAVAILABLE) is
                    # handed to the next peer, as an invoke would be.
                    await call._wait_started()
                    entered = True
                    yield call
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
            self._learn(member, call.response)
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
        self._ref_nodes.pop(ref_uuid, None)
        return released

    def __repr__(self) -> str:
        healthy = sum(member.usable for member in self._members)
        return f"<PeerPool {healthy}/{len(self._members)} healthy node_id={self.node_id!r}>"
