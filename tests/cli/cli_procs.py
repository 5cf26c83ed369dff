"""Run the ``peerflow`` command line in child processes, with bounded waits.

Every wait here has a timeout: a child that hangs fails the test instead of
hanging it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import attrs

#: Generous bounds for a loaded CI machine; a healthy run takes a fraction.
STARTUP_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

PYTHON_M = (sys.executable, "-m", "peerflow")


def console_script() -> str | None:
    """The installed ``peerflow`` console script, or None if it is not installed."""
    path = Path(sysconfig.get_path("scripts")) / "peerflow"
    return str(path) if path.exists() else None


def child_env(cwd: Path, token: str | None = None) -> dict[str, str]:
    """The environment of a child: ours, with ``cwd`` importable and the token set or not."""
    env = {key: value for key, value in os.environ.items() if key != "PEERFLOW_PEER_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    if token is not None:
        env["PEERFLOW_PEER_TOKEN"] = token
    return env


class Lines:
    """Reads whole lines from a child's pipe, each within a time bound.

    Raw reads on the file descriptor, not the pipe's file object: a buffered
    reader could hold a second line where ``select`` cannot see it.
    """

    def __init__(self, pipe: IO[bytes]) -> None:
        self._pipe = pipe
        self._buffer = b""

    def readline(self, timeout: float = CALL_TIMEOUT) -> str:
        """The next line, without its newline.

        Raises:
            TimeoutError: no whole line came within ``timeout`` seconds.
            EOFError: the pipe closed first.
        """
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._pipe], [], [], deadline - time.monotonic())
            if not ready:
                raise TimeoutError(f"no whole line within {timeout}s: {self._buffer!r}")
            data = os.read(self._pipe.fileno(), 4096)
            if not data:
                raise EOFError(f"the child closed its output: {self._buffer!r}")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def expect(self, fragment: str, timeout: float = CALL_TIMEOUT) -> str:
        """Skip lines until one contains ``fragment``; return that line."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(deadline - time.monotonic(), 0.0))
            if fragment in line:
                return line


@attrs.define
class Served:
    """A running ``peerflow serve`` child, the URL it printed, and its log lines."""

    process: subprocess.Popen[bytes]
    url: str
    log: Lines

    def stop(self, signum: int = signal.SIGINT) -> int:
        """Send ``signum`` and return the exit status (bounded by STOP_TIMEOUT)."""
        self.process.send_signal(signum)
        return self.process.wait(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        """End the child for good and close its pipes (test teardown)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
        for pipe in (self.process.stdout, self.process.stderr):
            assert pipe is not None
            pipe.close()


def start_serve(cwd: Path, *args: str, env: Mapping[str, str], node_id: str = "node-b") -> Served:
    """Start ``python -m peerflow serve`` on an ephemeral port and read its URL.

    Its log is a pipe too (read it with ``served.log``); the tests make few
    enough calls that it never fills.
    """
    process = subprocess.Popen(
        [*PYTHON_M, "serve", "--node-id", node_id, "--bind", "127.0.0.1:0", *args],
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    served = Served(process, "", Lines(process.stderr))
    try:
        line = Lines(process.stdout).readline(STARTUP_TIMEOUT)
    except (TimeoutError, EOFError) as exc:
        served.close()
        raise AssertionError(f"serve did not start: {exc}") from None
    prefix = f"serving {node_id} on "
    assert line.startswith(prefix), line
    served.url = line[len(prefix) :]
    return served


def run_cli(
    *args: str, cwd: Path, env: Mapping[str, str], command: tuple[str, ...] = PYTHON_M
) -> subprocess.CompletedProcess[str]:
    """Run one ``peerflow`` command to its end (bounded by CALL_TIMEOUT)."""
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT,
        check=False,
    )
