"""A raw HTTP/1.1 client for poking the peer's port with exact bytes, good or bad.

Connections run over ``trio.testing.memory_stream_pair`` (so the server's
timeouts can be tested under MockClock) or a real socket.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing

from peerflow import PeerServer
from peerflow.testing import open_memory_connection


@attrs.frozen
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines()]

    @property
    def error_code(self) -> str:
        return str(self.json["error"]["code"])


class RawConnection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> bool:
        data = await self.stream.receive_some(65536)
        self._buffer += data
        return bool(data)

    async def _take(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not await self._more():
                raise EOFError("connection closed mid-reply")
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    async def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            if not await self._more():
                raise EOFError("connection closed mid-line")
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    async def reply(self, *, head: bool = False) -> Reply:
        """Read one reply; ``head`` for the answer to a HEAD request (no body)."""
        status_line = await self._line()
        _, status, _ = (status_line + b" ").split(b" ", 2)
        headers: dict[bytes, bytes] = {}
        while line := await self._line():
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        code = int(status)
        if code < 200 or head:
            return Reply(code, headers, b"")
        if headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while size := int((await self._line()).split(b";")[0], 16):
                body += await self._take(size)
                await self._line()
            await self._line()
        elif b"content-length" in headers:
            body = await self._take(int(headers[b"content-length"]))
        else:
            while await self._more():
                pass
            body, self._buffer = self._buffer, b""
        return Reply(code, headers, body)

    async def call(self, raw: bytes) -> Reply:
        await self.send(raw)
        return await self.reply()

    async def closed(self) -> bool:
        """True if the server closed the connection (after any unread bytes)."""
        try:
            while await self._more():
                pass
        except trio.BrokenResourceError:
            pass
        return True


@asynccontextmanager
async def memory_connection(server: PeerServer) -> AsyncIterator[RawConnection]:
    """A raw connection to ``server`` over an in-memory stream (MockClock friendly)."""
    async with open_memory_connection(server) as stream:
        yield RawConnection(stream)


def post(
    method: str,
    body: bytes | dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> bytes:
    """The bytes of a POST to an HTTP/JSON route."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    fields = {
        "host": "peer",
        "content-type": content_type,
        "content-length": str(len(data)),
        "x-peerflow-peer-node-id": "raw",
        **(headers or {}),
    }
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return f"POST /peerflow.peer.v1/{method} HTTP/1.1\r\n{head}\r\n".encode() + data


def invoke(step_ids: list[str], value: Any = None, **extra: Any) -> dict[str, Any]:
    return {"v": 1, "workflow_name": "w", "step_ids": step_ids, "input": value, **extra}
