"""The curl session in docs/how-to/http-json.md runs, and prints what the page says it prints.

The page's shell blocks are run in order, in one bash, against the examples'
peer; each block's output is compared with the JSON or text block the page
shows after it (ref uuids and timestamps aside).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import shutil
from typing import Any

import pytest
import trio

from peerflow import PeerServer

ROOT = pathlib.Path(__file__).parents[2]
PAGE = ROOT / "docs" / "how-to" / "http-json.md"
DOC_PEER = "http://127.0.0.1:7443"
SEPARATOR = "----- next block -----"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def session_blocks() -> list[tuple[str, str | None]]:
    """The page's curl session: each shell block with the output block shown after it."""
    text = PAGE.read_text().split("## From a shell: curl", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", text, re.DOTALL)
    session: list[tuple[str, str | None]] = []
    for kind, body in blocks:
        if kind == "sh":
            if not body.startswith("python3 examples/"):  # the peer: started by the test
                session.append((body, None))
        elif session and session[-1][1] is None:
            session[-1] = (session[-1][0], body)
    return session


def shape(value: Any) -> Any:
    """A JSON value with what differs from run to run (uuids, times, base64 of them) masked."""
    if isinstance(value, dict):
        return {
            ("<uuid>" if UUID.fullmatch(k) else k): (
                "<time>" if k == "created_at_epoch_ms" else shape(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [shape(v) for v in value]
    if isinstance(value, str):
        return UUID.sub("<uuid>", value)
    return value


def load_example_steps() -> Any:
    spec = importlib.util.spec_from_file_location(
        "analysis_steps", ROOT / "examples" / "analysis_steps.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peer_steps


async def test_the_documented_curl_session_works(nursery: trio.Nursery) -> None:
    session = session_blocks()
    assert len(session) >= 6
    server = PeerServer("node-b", registry=load_example_steps(), token=None)
    with trio.fail_after(30):
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        script = f"\necho '{SEPARATOR}'\n".join(body for body, _ in session)
        result = await trio.run_process(
            ["bash", "-euo", "pipefail", "-c", script.replace(DOC_PEER, address.url)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()
    outputs = result.stdout.decode().split(SEPARATOR + "\n")
    assert len(outputs) == len(session)
    for (command, shown), output in zip(session, outputs, strict=True):
        if shown is None:
            assert output == "", command
            continue
        got, want = output.strip().splitlines(), shown.strip().splitlines()
        assert len(got) == len(want), command
        for got_line, want_line in zip(got, want, strict=True):
            json_part, _, rest = got_line.partition("} HTTP")
            want_json, _, want_rest = want_line.partition("} HTTP")
            assert rest == want_rest
            assert shape(json.loads(json_part + ("}" if rest else ""))) == shape(
                json.loads(want_json + ("}" if want_rest else ""))
            ), command
