"""Limits: every bound a peer enforces, in one object with safe defaults."""

from __future__ import annotations

from typing import Any, final

import attrs

from .._transport.config import H2Settings

__all__ = ["Limits"]

_MIB = 1024 * 1024


def _positive(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"Limits.{attribute.name} must be positive, got {value!r}")


@final
@attrs.frozen(kw_only=True)
class Limits:
    """The bounds a :class:`~peerflow.PeerServer` (and a client) enforces.

    Every field has a default that is safe for a peer on a network; docs/
    explains each. Sizes are bytes, times are float seconds.

    Attributes:
        max_message_size: the largest gRPC message accepted; a bigger one is
            refused with RESOURCE_EXHAUSTED before it is buffered.
        max_concurrent_streams: calls one connection may have in flight.
        max_connections: connections served at once; more wait to be accepted.
        max_header_list_size: the largest request header block accepted.
        handshake_timeout: time a new connection has to send its preface;
            for a client, the time to connect (TLS included) and to have
            a scope's opening ``Lease`` call answered.
        request_timeout: time a call has to deliver its whole request message;
            a body that trickles in slower is cut off (DEADLINE_EXCEEDED).
        idle_timeout: a connection with no calls for this long is closed.
        keepalive_interval: PING an idle connection this often.
        keepalive_timeout: a PING unanswered this long means the peer is dead.
        stream_window: receive window per stream (also its memory cap).
        connection_window: receive window per connection.
        max_deref_chunk: the largest payload slice in one deref message.
        refs_per_caller: refs one caller identity may hold at once.
        ref_capacity: refs the whole peer may hold at once.
        leases_per_caller: leases one caller identity may hold open at once;
            opening one more is refused with RESOURCE_EXHAUSTED.
        lease_capacity: leases the whole peer may hold open at once.
        lease_ttl: the TTL of a lease that a call names before it was opened.
        min_lease_ttl: the shortest TTL granted to a lease.
        max_lease_ttl: the longest TTL granted to a lease.
        lease_grace: how long the ``UNTIL_PARENT_FINISH`` refs of a caller
            that vanished without a lease survive its connection.
        drain_grace: how long in-flight calls may run on after shutdown starts.
        reset_budget: calls one connection may cancel (RST_STREAM) in a
            burst, refilled by as many each second; a connection that
            cancels faster is closed with GOAWAY(ENHANCE_YOUR_CALM).
        stream_backlog: events of one ``StreamSubWorkflow`` call that may
            wait for a caller reading slower than its run streams; one more
            fails the call with RESOURCE_EXHAUSTED and cancels the run.

    Raises:
        ValueError: a value is not positive.
    """

    max_message_size: int = attrs.field(default=64 * _MIB, validator=_positive)
    max_concurrent_streams: int = attrs.field(default=1000, validator=_positive)
    max_connections: int = attrs.field(default=1024, validator=_positive)
    max_header_list_size: int = attrs.field(default=64 * 1024, validator=_positive)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    request_timeout: float = attrs.field(default=30.0, validator=_positive)
    idle_timeout: float | None = attrs.field(default=600.0, validator=_positive)
    keepalive_interval: float | None = attrs.field(default=30.0, validator=_positive)
    keepalive_timeout: float = attrs.field(default=20.0, validator=_positive)
    stream_window: int = attrs.field(default=16 * _MIB, validator=_positive)
    connection_window: int = attrs.field(default=32 * _MIB, validator=_positive)
    max_deref_chunk: int = attrs.field(default=1 * _MIB, validator=_positive)
    refs_per_caller: int = attrs.field(default=10_000, validator=_positive)
    ref_capacity: int = attrs.field(default=100_000, validator=_positive)
    leases_per_caller: int = attrs.field(default=1024, validator=_positive)
    lease_capacity: int = attrs.field(default=100_000, validator=_positive)
    lease_ttl: float = attrs.field(default=60.0, validator=_positive)
    min_lease_ttl: float = attrs.field(default=1.0, validator=_positive)
    max_lease_ttl: float = attrs.field(default=3600.0, validator=_positive)
    lease_grace: float = attrs.field(default=60.0, validator=_positive)
    drain_grace: float = attrs.field(default=10.0, validator=_positive)
    reset_budget: int = attrs.field(default=1000, validator=_positive)
    stream_backlog: int = attrs.field(default=4096, validator=_positive)

    def h2_settings(self, *, server: bool) -> H2Settings:
        """The HTTP/2 connection settings these limits imply."""
        return H2Settings(
            initial_stream_window=self.stream_window,
            initial_connection_window=self.connection_window,
            max_concurrent_streams=self.max_concurrent_streams,
            max_header_list_size=self.max_header_list_size,
            keepalive_interval=self.keepalive_interval,
            keepalive_timeout=self.keepalive_timeout,
            idle_timeout=self.idle_timeout if server else None,
            handshake_timeout=self.handshake_timeout,
            grace_period=self.drain_grace,
            reset_budget=self.reset_budget if server else None,
        )
