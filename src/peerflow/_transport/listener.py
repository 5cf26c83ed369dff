"""One TCP port for HTTP/2 and HTTP/1.1: accept, pick the protocol, hand off, drain.

The protocol is chosen by TLS ALPN when the handshake settled it, otherwise
by sniffing the HTTP/2 client preface. An HTTP/1.1 connection goes to the
``http1_handler`` wrapped in a PrefixedStream that replays the sniffed bytes;
without one it is refused (505). Cancelling the server drains every
connection: an HTTP/2 connection sends GOAWAY, and protocols without GOAWAY
run under :func:`serve_draining`, which tells them through a :class:`Drain`.
"""

from __future__ import annotations

import errno
import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import final

import trio

from .._excgroups import collapse_excgroups
from ..errors import PeerTimeoutError, PeerTransportError, PeerUnavailableError
from .config import H2Settings
from .h2conn import StreamHandler, serve_h2_connection
from .mapping import map_exceptions

__all__ = [
    "H2_PREFACE",
    "Drain",
    "PrefixedStream",
    "connect_tcp",
    "handle_connection",
    "reject_http1",
    "serve_draining",
    "serve_tcp",
]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

Http1Handler = Callable[[trio.abc.Stream], Awaitable[object]]

logger = logging.getLogger("peerflow.transport")

# Running out of descriptors or memory is transient: wait and accept again
# instead of taking the whole server down.
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_MAX_HTTP1_HEAD = 16 * 1024
# After the grace period, the time a drained handler has to say goodbye (an
# error answer, a close frame) before it is cancelled: what an HTTP/2
# connection gives its last frames, min(grace_period, this).
_GOODBYE_SECONDS = 1.0


class PrefixedStream(trio.abc.Stream):
    """A stream that first replays ``prefix``, then reads from ``stream``.

    Used to hand a connection on after peeking at its first bytes. Sending
    and closing go straight to the wrapped stream.
    """

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = prefix

    @property
    def replaying(self) -> bool:
        """Whether some of the peeked bytes are still to be read."""
        return bool(self._prefix)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


@final
class Drain:
    """What a connection's handler learns when its server starts to shut down.

    :func:`serve_draining` hands one to its handler and starts it when the
    server is cancelled. From then on the handler takes no new calls, closes
    what is idle, and lets its calls in flight run until ``deadline``, the
    end of the grace period (infinite until the drain starts). Its goodbyes
    (an error answer, a close frame) get ``goodbye`` seconds more.
    """

    def __init__(self, grace_period: float) -> None:
        self.grace_period = grace_period
        self.goodbye = min(grace_period, _GOODBYE_SECONDS)
        self.deadline = math.inf
        self._started = trio.Event()
        self._idle: set[trio.CancelScope] = set()
        self._in_flight: set[trio.CancelScope] = set()

    @property
    def started(self) -> bool:
        """Whether the drain has started: no new call may begin."""
        return self._started.is_set()

    async def wait_started(self) -> None:
        """Return once the drain has started."""
        await self._started.wait()

    @contextmanager
    def while_idle(self) -> Iterator[trio.CancelScope]:
        """A cancel scope for waiting with nothing in flight: the drain's start cancels it."""
        with trio.CancelScope() as scope:
            if self.started:
                scope.cancel()
            self._idle.add(scope)
            try:
                yield scope
            finally:
                self._idle.discard(scope)

    @contextmanager
    def in_flight(self) -> Iterator[trio.CancelScope]:
        """A cancel scope for one call in flight: it expires when the grace period ends.

        ``scope.cancelled_caught`` afterwards means the drain cut the call off.
        """
        with trio.CancelScope(deadline=self.deadline) as scope:
            self._in_flight.add(scope)
            try:
                yield scope
            finally:
                self._in_flight.discard(scope)

    def start(self) -> None:
        """Start the drain: idle waits end now, calls in flight at the deadline."""
        if self.started:
            return
        self.deadline = trio.current_time() + self.grace_period
        for scope in self._idle:
            scope.cancel()
        for scope in self._in_flight:
            scope.deadline = self.deadline
        self._started.set()


async def serve_draining(
    handler: Callable[[Drain], Awaitable[object]], grace_period: float
) -> None:
    """Run ``handler(drain)``; cancelling this drains the handler instead of cutting it off.

    This is the HTTP/2 drain (GOAWAY, then ``grace_period`` for the streams
    in flight) for protocols without GOAWAY: cancellation starts ``drain``
    and the handler does the rest (see :class:`Drain`). Whatever still runs
    ``drain.goodbye`` after ``drain.deadline`` (``min(grace_period, 1.0)``
    seconds, as for HTTP/2) is cancelled. The handler's own exceptions pass
    through unwrapped.
    """
    drain = Drain(grace_period)
    # The handler runs shielded from the caller's cancellation, which starts
    # the drain instead; the guard's deadline, set then, is the backstop.
    guard = trio.CancelScope(shield=True)
    finished = trio.Event()

    async def run() -> None:
        try:
            with guard:
                await handler(drain)
        finally:
            finished.set()

    with collapse_excgroups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            try:
                await finished.wait()
            finally:
                if not finished.is_set():
                    drain.start()
                    guard.deadline = drain.deadline + drain.goodbye


async def reject_http1(stream: trio.abc.Stream) -> None:
    """The placeholder HTTP/1.1 handler: answer 505 (or 400 for non-HTTP) and close.

    Reads at most 16 KiB of request head, within whatever deadline the
    caller set.
    """
    head = b""
    try:
        # Stop reading as soon as the bytes cannot be HTTP (a request line
        # starts with an upper-case method): a TLS ClientHello on a plaintext
        # port is answered at once instead of waiting out the handshake timeout.
        while (
            b"\r\n\r\n" not in head
            and len(head) < _MAX_HTTP1_HEAD
            and (not head or head[:1].isupper())
        ):
            data = await stream.receive_some(4096)
            if not data:
                break
            head += data
        first_line = head.split(b"\r\n", 1)[0]
        if b" HTTP/1." in first_line:
            status, text = b"505 HTTP Version Not Supported", b"this port speaks HTTP/2 only\n"
        else:
            status, text = b"400 Bad Request", b"expected an HTTP/2 or HTTP/1.1 request\n"
        await stream.send_all(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain\r\nconnection: close\r\n"
            b"content-length: " + str(len(text)).encode() + b"\r\n\r\n" + text
        )
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _sniff(stream: trio.abc.Stream) -> bytes:
    buffer = b""
    while len(buffer) < len(H2_PREFACE) and H2_PREFACE.startswith(buffer):
        data = await stream.receive_some(65536)
        if not data:
            break
        buffer += data
    return buffer


async def handle_connection(
    stream: trio.abc.Stream,
    h2_handler: StreamHandler,
    *,
    settings: H2Settings | None = None,
    ssl_context: ssl.SSLContext | None = None,
    http1_handler: Http1Handler | None = None,
) -> None:
    """Serve one accepted connection: TLS, protocol choice, then the right driver.

    The TLS handshake and the preface must both arrive within the settings'
    ``handshake_timeout``, or the connection is closed. An ``http1_handler``
    owns its connection from then on, timeouts included; without one,
    :func:`reject_http1` answers within what is left of the handshake
    timeout. Failures of this one connection are logged and swallowed: they
    never reach the accept loop.
    """
    settings = settings or H2Settings()
    timeout = settings.handshake_timeout
    deadline = trio.current_time() + timeout if timeout is not None else float("inf")
    try:
        alpn = None
        prefix = b""
        with trio.move_on_at(deadline) as scope:
            if ssl_context is not None:
                tls = trio.SSLStream(stream, ssl_context, server_side=True)
                stream = tls
                with map_exceptions("TLS handshake failed"):
                    await tls.do_handshake()
                alpn = tls.selected_alpn_protocol()
            if alpn is None:
                with map_exceptions("connection lost before its first request"):
                    prefix = await _sniff(stream)
        if scope.cancelled_caught:
            logger.debug("closing a connection that sent no preface within %ss", timeout)
            return
        if alpn == "h2" or (alpn is None and prefix.startswith(H2_PREFACE)):
            await serve_h2_connection(stream, h2_handler, settings, initial_data=prefix)
        elif http1_handler is not None and (prefix or alpn is not None):
            await http1_handler(PrefixedStream(stream, prefix))
        elif prefix or alpn is not None:
            with trio.move_on_at(deadline):
                await reject_http1(PrefixedStream(stream, prefix))
    except PeerTransportError as exc:
        logger.debug("connection failed: %s", exc)
    except Exception:
        # A bug in a handler ends its connection, never the server: the
        # accept loop's nursery would take every other connection with it.
        logger.exception("connection handler failed; closing the connection")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_tcp(
    h2_handler: StreamHandler,
    port: int,
    *,
    host: str | None = None,
    settings: H2Settings | None = None,
    ssl_context: ssl.SSLContext | None = None,
    http1_handler: Http1Handler | None = None,
    max_connections: int = 1024,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` and serve every connection with ``handle_connection``.

    Port 0 picks an ephemeral port; ``task_status`` reports the bound
    ``(host, port)`` of every listening socket. At ``max_connections``
    open connections the accept loop stops accepting until one closes: new
    clients wait in the kernel's backlog rather than being refused. trio
    sets TCP_NODELAY on accepted sockets. Cancelling ``serve_tcp`` stops
    accepting at once and drains every connection: an HTTP/2 connection
    sends GOAWAY and gives its streams ``settings.grace_period`` to finish;
    an ``http1_handler`` drains itself on cancellation (the peer's runs
    under :func:`serve_draining` with the same grace period).

    Raises:
        PeerTransportError: the port cannot be bound.
    """
    with map_exceptions(f"cannot listen on {host or '*'}:{port}"):
        listeners = await trio.open_tcp_listeners(port, host=host)
    limiter = trio.CapacityLimiter(max_connections)

    async def serve_one(stream: trio.SocketStream, token: object) -> None:
        try:
            await handle_connection(
                stream,
                h2_handler,
                settings=settings,
                ssl_context=ssl_context,
                http1_handler=http1_handler,
            )
        finally:
            limiter.release_on_behalf_of(token)

    async def accept_loop(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                token = object()
                await limiter.acquire_on_behalf_of(token)
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    limiter.release_on_behalf_of(token)
                    if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                        raise
                    logger.warning("accept failed (%s); retrying in 100 ms", exc)
                    await trio.sleep(0.1)
                    continue
                except BaseException:
                    limiter.release_on_behalf_of(token)
                    raise
                nursery.start_soon(serve_one, stream, token)

    async with trio.open_nursery() as nursery:
        addresses: list[tuple[str, int]] = []
        for listener in listeners:
            sockname = listener.socket.getsockname()
            addresses.append((sockname[0], sockname[1]))
            nursery.start_soon(accept_loop, listener, nursery)
        task_status.started(addresses)


async def connect_tcp(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float | None = None,
) -> trio.abc.Stream:
    """Open a TCP connection (with TLS when ``ssl_context`` is given).

    ``timeout`` bounds the whole of it, TCP connect and TLS handshake: a
    peer that accepts but never speaks TLS would otherwise hold the caller
    forever.

    Raises:
        PeerUnavailableError: the TCP connection was refused or failed, so
            nothing reached the peer; the message names ``host:port``.
        PeerTransportError: the TLS handshake failed.
        PeerTimeoutError: ``timeout`` passed first (or a deadline set by the
            caller did).
    """
    with trio.move_on_after(math.inf if timeout is None else timeout):
        return await _connect_tcp(host, port, ssl_context, server_hostname)
    raise PeerTimeoutError(
        f"cannot connect to {host}:{port}: no connection"
        + (" and TLS handshake" if ssl_context is not None else "")
        + f" within {timeout:g}s"
    )


async def _connect_tcp(
    host: str, port: int, ssl_context: ssl.SSLContext | None, server_hostname: str | None
) -> trio.abc.Stream:
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        # Nothing reached the peer: a call that needed this connection (an
        # HttpPeerClient opens one per call in flight) never started there.
        raise PeerUnavailableError(
            f"cannot connect to {host}:{port}: {str(exc) or type(exc).__name__}"
        ) from exc
    if ssl_context is None:
        return stream
    tls = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname or host)
    try:
        with map_exceptions(f"TLS handshake with {host}:{port} failed"):
            await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls
