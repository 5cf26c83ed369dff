"""A client transport whose incoming bytes a test can hold back (tests/ is on pythonpath)."""

from __future__ import annotations

import trio


class Gate(trio.abc.Stream):
    """The client's end of the connection, whose incoming bytes the test can hold back.

    From :meth:`hold_at` on, the bytes from ``marker`` (all of them for an
    empty marker) wait in the gate until :meth:`release`.
    """

    def __init__(self, transport: trio.abc.Stream) -> None:
        self.transport = transport
        self._marker: bytes | None = None
        self._held = b""
        self._released = trio.Event()

    def hold_at(self, marker: bytes = b"") -> None:
        self._marker = marker

    def release(self) -> None:
        self._marker = None
        self._released.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._held:
            await self._released.wait()
            data, self._held = self._held, b""
            return data
        data = bytes(await self.transport.receive_some(max_bytes))
        if self._marker is not None and (at := data.find(self._marker)) != -1:
            data, self._held = data[:at], data[at:]
            if not data:
                return await self.receive_some(max_bytes)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport.aclose()
