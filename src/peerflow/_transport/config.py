"""Tunables of an HTTP/2 connection: windows, frame sizes, limits and timers."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["H2Settings"]

_KIB = 1024
_MIB = 1024 * 1024
_MAX_WINDOW = 2**31 - 1


def _positive(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"H2Settings.{attribute.name} must be > 0, got {value!r}")


def _window(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= _MAX_WINDOW:
        raise ValueError(f"H2Settings.{attribute.name} must be in 1..{_MAX_WINDOW}, got {value!r}")


def _frame_size(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    # RFC 9113 section 6.5.2 bounds SETTINGS_MAX_FRAME_SIZE.
    if not 2**14 <= value <= 2**24 - 1:
        raise ValueError(f"H2Settings.max_frame_size must be in 16384..16777215, got {value!r}")


@attrs.frozen(kw_only=True)
class H2Settings:
    """Options for one HTTP/2 connection, client or server side.

    The receive windows are also the memory cap: a peer can never have more
    than ``initial_stream_window`` unread bytes buffered on one stream, nor
    more than ``initial_connection_window`` on the whole connection. Large
    defaults keep bulk transfers fast; lower them to bound memory.

    Attributes:
        initial_stream_window: receive window per stream, advertised in the
            first SETTINGS frame.
        initial_connection_window: receive window for the whole connection.
        max_frame_size: largest frame the peer may send us.
        max_concurrent_streams: streams the peer may open at once (enforced by
            a server; a client waits for a free slot in the peer's limit).
        max_header_list_size: largest decoded header list accepted.
        read_size: bytes asked of the transport per read.
        write_buffer_size: outbound bytes queued before senders wait.
        keepalive_interval: send a PING after this many idle seconds
            (None: no keepalive).
        keepalive_timeout: seconds a keepalive PING may go unanswered before
            the peer is declared dead.
        idle_timeout: a server closes a connection that has had no streams
            for this many seconds (None: never).
        handshake_timeout: seconds the peer has to send its preface and
            SETTINGS (None: wait forever).
        grace_period: seconds in-flight streams get to finish after GOAWAY.
        reset_budget: RST_STREAM frames a client may send a server in a
            burst; the budget refills by as many again each second. A
            client that overdraws it (the "rapid reset" attack, where each
            stream costs the server a task and costs the client nothing) gets
            GOAWAY(ENHANCE_YOUR_CALM) and is disconnected. None: no budget.

    Raises:
        ValueError: a value is outside what HTTP/2 allows.
    """

    initial_stream_window: int = attrs.field(default=16 * _MIB, validator=_window)
    initial_connection_window: int = attrs.field(default=32 * _MIB, validator=_window)
    max_frame_size: int = attrs.field(default=1 * _MIB, validator=_frame_size)
    max_concurrent_streams: int = attrs.field(default=1000, validator=_positive)
    max_header_list_size: int = attrs.field(default=64 * _KIB, validator=_positive)
    read_size: int = attrs.field(default=64 * _KIB, validator=_positive)
    write_buffer_size: int = attrs.field(default=4 * _MIB, validator=_positive)
    keepalive_interval: float | None = attrs.field(default=None, validator=_positive)
    keepalive_timeout: float = attrs.field(default=20.0, validator=_positive)
    idle_timeout: float | None = attrs.field(default=None, validator=_positive)
    handshake_timeout: float | None = attrs.field(default=10.0, validator=_positive)
    grace_period: float = attrs.field(default=5.0, validator=_positive)
    reset_budget: int | None = attrs.field(default=1000, validator=_positive)
