"""Child processes for the fault tests: start a script, read its output lines, kill it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio

HERE = os.path.dirname(os.path.abspath(__file__))


class Child:
    """A running helper script and the lines it prints."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    async def readline(self) -> str:
        """The next line the child prints (EOFError once it has exited)."""
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            data = await self.process.stdout.receive_some(4096)
            if not data:
                raise EOFError(f"the child exited with {self.process.returncode}")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def expect(self, prefix: str) -> str:
        """Skip lines until one starts with ``prefix``; return the rest of it."""
        while True:
            line = await self.readline()
            if line.startswith(prefix):
                return line[len(prefix) :].strip()


@asynccontextmanager
async def run_child(script: str, *args: str) -> AsyncIterator[Child]:
    """Run ``tests/security/<script>`` for the block; it is killed on the way out."""
    command = [sys.executable, os.path.join(HERE, script), *args]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
        )
        try:
            yield Child(process)
        finally:
            # SIGKILL also ends a SIGSTOPped child; run_process then reaps it.
            process.kill()


async def wait_until(condition: Callable[[], bool], *, poll: float = 0.02) -> None:
    """Poll ``condition()`` until it is true; bound it with ``fail_after``.

    Only for state that changes on the wall clock (lease expiry) or in
    another process; in-process events are awaited, never polled.
    """
    while not condition():  # noqa: ASYNC110 (nothing to wait on: see above)
        await trio.sleep(poll)
