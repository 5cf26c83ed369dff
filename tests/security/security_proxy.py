"""A TCP proxy that forwards both ways and can cut a connection mid-transfer."""

from __future__ import annotations

import trio


class CuttingProxy:
    """Forwards loopback connections to ``target_port``.

    Once ``cut_after`` bytes have gone from the server to the client on a
    connection, both of its sockets are closed at once, as a network failure
    would do it: no TLS close, no GOAWAY, no FIN in order.

    Attributes:
        cut: set when a connection has been cut.
        forwarded: bytes passed from server to client, over all connections.
    """

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cut = trio.Event()
        self.forwarded = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on an ephemeral loopback port (reported) until cancelled."""
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listener, trio.open_nursery() as nursery:
            task_status.started(listener.socket.getsockname()[1])
            while True:
                downstream = await listener.accept()
                nursery.start_soon(self._relay, downstream)

    async def _relay(self, downstream: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, downstream, upstream, False, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, downstream, True, nursery.cancel_scope)
        finally:
            await trio.aclose_forcefully(downstream)
            await trio.aclose_forcefully(upstream)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        counted: bool,
        done: trio.CancelScope,
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
                if counted:
                    self.forwarded += len(data)
                    if self.forwarded >= self.cut_after:
                        self.cut.set()
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        # Either side ending ends the relay; the caller closes both sockets.
        done.cancel()
