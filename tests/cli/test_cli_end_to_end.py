"""``peerflow serve`` and ``peerflow invoke`` as separate processes over real sockets.

The server is ``python -m peerflow serve --bind 127.0.0.1:0`` serving step
modules from a directory; its URL is read from its first line of output.
Every wait is bounded (see cli_procs).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trustme
from cli_procs import (
    CALL_TIMEOUT,
    PYTHON_M,
    STOP_TIMEOUT,
    Lines,
    Served,
    child_env,
    console_script,
    run_cli,
    start_serve,
)
from cli_step_modules import write_steps

EMPTY = {"state": {}, "remote_refs": {}, "inline_refs": {}, "dropped_refs": [], "error": None}


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the tests that only call it: cli_steps merged with cli_more's workflow."""
    directory = write_steps(tmp_path_factory.mktemp("steps"))
    served = start_serve(
        directory, "--steps", "cli_steps", "--steps", "cli_more:shout", env=child_env(directory)
    )
    yield served
    served.close()


@attrs.frozen
class Caller:
    """Where and with what environment the ``invoke`` children run."""

    cwd: Path
    env: dict[str, str]

    def with_token(self, token: str) -> Caller:
        return Caller(self.cwd, {**self.env, "PEERFLOW_PEER_TOKEN": token})


@pytest.fixture
def caller(tmp_path: Path) -> Caller:
    """A caller with no token, run from a directory with no step modules."""
    return Caller(tmp_path, child_env(tmp_path))


def invoke(
    served: Served, caller: Caller, *args: str, command: tuple[str, ...] = PYTHON_M
) -> subprocess.CompletedProcess[str]:
    return run_cli("invoke", served.url, *args, cwd=caller.cwd, env=caller.env, command=command)


def only_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_invoke_prints_the_response_with_bytes_as_base64(peer: Served, caller: Caller) -> None:
    value: dict[str, Any] = {
        "a": [1, {"$bytes": "AAEC/w=="}],
        "text": "caf\u00e9",
        # Not the one-key form with a str value: plain maps both ways.
        "two_keys": {"$bytes": "AA==", "x": 1},
        "not_str": {"$bytes": 5},
    }
    result = invoke(peer, caller, "cli", "cli::echo", "--input", json.dumps(value))
    assert (result.returncode, result.stderr) == (0, "")
    # Bytes went over the wire as bytes and came back in the same JSON form.
    assert json.loads(result.stdout) == {
        **EMPTY,
        "result": {"echo": value},
        "state": {"seen": value},
    }


def test_console_script_reaches_a_step_of_the_merged_registry(peer: Served, caller: Caller) -> None:
    script = console_script()
    if script is None:
        pytest.skip("the peerflow console script is not installed")
    result = invoke(peer, caller, "shout", "more::shout", "--input", '"hi"', command=(script,))
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout) == {**EMPTY, "result": "HI"}


def test_console_script_and_python_m_agree_on_the_version(caller: Caller) -> None:
    script = console_script()
    if script is None:
        pytest.skip("the peerflow console script is not installed")
    by_script = run_cli("--version", cwd=caller.cwd, env=caller.env, command=(script,))
    by_module = run_cli("--version", cwd=caller.cwd, env=caller.env)
    assert by_script.returncode == by_module.returncode == 0
    assert by_script.stdout == by_module.stdout
    assert by_module.stdout.startswith("peerflow ")


def test_stream_prints_each_event_then_the_response(peer: Served, caller: Caller) -> None:
    result = invoke(peer, caller, "cli", "cli::ticks", "--input", "null", "--stream")
    assert (result.returncode, result.stderr) == (0, "")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == [
        {"event_type": "cli.Tick", "data": {"n": 0}},
        {"event_type": "cli.Tick", "data": {"n": 1}},
        {"event_type": "cli.Tick", "data": {"n": 2}},
        {**EMPTY, "result": "ticked"},
    ]


def test_refs_show_their_descriptors_and_inline_payloads(peer: Served, caller: Caller) -> None:
    result = invoke(peer, caller, "cli", "cli::refs", "--input", "null")
    assert result.returncode == 0
    response = json.loads(result.stdout)
    kept, live = response["result"]
    assert response["remote_refs"][live]["serializable"] is False
    descriptor = response["remote_refs"][kept]
    assert descriptor["created_at_epoch_ms"] > 0
    assert descriptor == {
        "origin_node_id": "node-b",
        "type_tag": "peerflow.bytes",
        "created_at_epoch_ms": descriptor["created_at_epoch_ms"],
        "lifetime": "until_explicit_drop",
        "size": 4,
        "serializable": True,
    }
    [inline] = response["inline_refs"].values()
    assert inline["lifetime"] == "until_context_drop"
    # A schema bytes field: a plain base64 string, as in the HTTP/JSON variant.
    assert base64.b64decode(inline["payload"]) == b"inline"
    assert len(response["dropped_refs"]) == 1


def test_failed_workflow_exits_1_and_still_prints_the_response(
    peer: Served, caller: Caller
) -> None:
    result = invoke(peer, caller, "cli", "cli::fail", "--input", "{}")
    assert result.returncode == 1
    assert json.loads(result.stdout) == {
        **EMPTY,
        "result": None,
        "error": {
            "message": "ValueError: boom",
            "step_id": "cli::fail",
            "error_type": "ValueError",
        },
    }


def test_unknown_step_is_the_typed_error(peer: Served, caller: Caller) -> None:
    result = invoke(peer, caller, "cli", "cli::echo", "cli::nope", "--input", "{}")
    assert result.returncode == 3
    assert only_error_line(result) == "peerflow: error: peer has no step registered as 'cli::nope'"


@pytest.mark.parametrize(
    ("step", "error"),
    [
        (
            "cli::nan",
            'result["x"][0]: nan has no JSON form '
            "(only the gRPC and WebSocket variants carry NaN and infinities)",
        ),
        (
            "cli::looks_like_bytes",
            'state["k"]: a map whose only key is "$bytes" with a str value has no JSON form '
            "(it would read back as bytes)",
        ),
    ],
)
def test_response_without_json_form_names_its_path(
    peer: Served, caller: Caller, step: str, error: str
) -> None:
    result = invoke(peer, caller, "cli", step, "--input", "null")
    assert result.returncode == 3
    assert only_error_line(result) == f"peerflow: error: {error}"


def test_stream_prints_bytes_in_events_and_refuses_an_event_without_json_form(
    peer: Served, caller: Caller
) -> None:
    result = invoke(peer, caller, "cli", "cli::odd_events", "--input", "null", "--stream")
    assert result.returncode == 3
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"event_type": "cli.Reading", "data": {"raw": {"$bytes": "AP8="}}}
    ]
    assert result.stderr == (
        'peerflow: error: event["data"]["value"]: nan has no JSON form '
        "(only the gRPC and WebSocket variants carry NaN and infinities)\n"
    )


def test_timeout_gives_up_with_the_typed_error(peer: Served, caller: Caller) -> None:
    result = invoke(peer, caller, "cli", "cli::forever", "--input", "null", "--timeout", "0.3")
    assert result.returncode == 3
    assert "timed out" in only_error_line(result)


def test_token_from_the_environment_then_sigint_exits_0(steps_dir: Path, caller: Caller) -> None:
    served = start_serve(
        steps_dir,
        "--steps",
        "cli_more:shout",
        "--log-level",
        "debug",
        env=child_env(steps_dir, "s3cret"),
    )
    try:
        refused = invoke(served, caller, "shout", "more::shout", "--input", '"x"')
        assert refused.returncode == 3
        assert only_error_line(refused) == "peerflow: error: missing or wrong bearer token"
        allowed = invoke(
            served, caller.with_token("s3cret"), "shout", "more::shout", "--input", '"x"'
        )
        assert (allowed.returncode, json.loads(allowed.stdout)["result"]) == (0, "X")
        assert served.stop(signal.SIGINT) == 0
        log = []
        with contextlib.suppress(EOFError):
            while True:
                log.append(served.log.readline(STOP_TIMEOUT))
        assert any("SIGINT: draining in-flight calls" in line for line in log), log
        # peerflow's own debug records, and nobody else's: the header codec's
        # would print the token.
        assert any(" DEBUG peerflow." in line for line in log), log
        assert not any("s3cret" in line for line in log), log
    finally:
        served.close()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_sigterm_lets_the_call_in_flight_finish(steps_dir: Path, caller: Caller) -> None:
    fifo = steps_dir / "release"
    os.mkfifo(fifo)
    served = start_serve(steps_dir, "--steps", "cli_steps", env=child_env(steps_dir))
    argv = [*PYTHON_M, "invoke", served.url, "cli", "cli::hold", "--stream"]
    argv += ["--input", json.dumps(str(fifo))]
    client = subprocess.Popen(
        argv, cwd=caller.cwd, env=caller.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert client.stdout is not None
        output = Lines(client.stdout)
        # The step's first event says the call is running on the peer.
        assert json.loads(output.readline()) == {"event_type": "cli.Tick", "data": {"n": -1}}
        served.process.send_signal(signal.SIGTERM)
        served.log.expect("SIGTERM: draining in-flight calls")
        assert served.process.poll() is None  # still serving the call in flight
        # O_NONBLOCK: fails at once, rather than hangs, if the step is not reading.
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"released")
        os.close(writer)
        assert json.loads(output.readline()) == {**EMPTY, "result": "released"}
        assert client.wait(timeout=CALL_TIMEOUT) == 0
        assert served.process.wait(timeout=STOP_TIMEOUT) == 0
    finally:
        if client.poll() is None:
            client.kill()
        client.communicate(timeout=STOP_TIMEOUT)
        served.close()


def test_tls_with_client_certificates(steps_dir: Path, caller: Caller) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(steps_dir / "ca.pem"))
    for name, leaf in [
        ("server", ca.issue_cert("127.0.0.1")),
        ("client", ca.issue_cert("node-a.example")),
    ]:
        leaf.cert_chain_pems[0].write_to_path(str(steps_dir / f"{name}.pem"))
        leaf.private_key_pem.write_to_path(str(steps_dir / f"{name}.key"))
    tls = ["--tls-cert", "server.pem", "--tls-key", "server.key", "--tls-ca", "ca.pem"]
    served = start_serve(steps_dir, "--steps", "cli_more:shout", *tls, env=child_env(steps_dir))
    try:
        assert served.url.startswith("https://127.0.0.1:")
        trust = ["--tls-ca", str(steps_dir / "ca.pem")]
        identity = ["--tls-cert", str(steps_dir / "client.pem")]
        identity += ["--tls-key", str(steps_dir / "client.key")]
        ok = invoke(served, caller, "shout", "more::shout", "--input", '"x"', *trust, *identity)
        assert (ok.returncode, json.loads(ok.stdout)["result"]) == (0, "X")
        # The server asks for a client certificate; without one the call fails cleanly.
        refused = invoke(served, caller, "shout", "more::shout", "--input", '"x"', *trust)
        assert refused.returncode == 3
        assert only_error_line(refused).startswith("peerflow: error: ")
        assert served.stop() == 0
    finally:
        served.close()


def test_serve_refuses_a_module_whose_steps_live_elsewhere(steps_dir: Path) -> None:
    # A fresh process: its default StepRegistry is empty, as an operator's is.
    argv = ["serve", "--node-id", "n", "--bind", "127.0.0.1:0", "--steps", "cli_more"]
    result = run_cli(*argv, cwd=steps_dir, env=child_env(steps_dir))
    assert result.returncode == 3
    assert only_error_line(result) == (
        "peerflow: error: --steps cli_more: no steps are registered there "
        "(if it builds its Workflow with registry=..., name that: MODULE:ATTR)"
    )
