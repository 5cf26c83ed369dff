"""The command line in-process: argument parsing, exit codes and one-line errors.

Everything here fails before a server would serve, so ``main(argv)`` runs in
the test process and its output is captured.
"""

from __future__ import annotations

import io
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import peerflow
from peerflow._cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main

ENDPOINT = "http://127.0.0.1:1"


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, fragment: str) -> None:
    assert err.startswith("peerflow: error: "), err
    assert err.count("\n") == 1, err
    assert fragment in err
    assert "Traceback" not in err


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A local port that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--version")
    assert (code, out) == (EXIT_OK, f"peerflow {peerflow.__version__}\n")


def test_help_documents_bytes_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "invoke", "--help")
    assert code == EXIT_OK
    assert '{"$bytes": "<base64>"}' in out
    assert "1 the remote workflow failed" in out
    assert "PEERFLOW_PEER_TOKEN" in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "required: COMMAND"),
        (["frobnicate"], "invalid choice"),
        (["serve", "--steps", "m"], "--node-id"),
        (["serve", "--node-id", "n"], "--steps"),
        (["serve", "--node-id", "n", "--steps", "m", "--bind", "7443"], "HOST:PORT"),
        (["serve", "--node-id", "n", "--steps", "m", "--bind", "h:65536"], "HOST:PORT"),
        (["serve", "--node-id", "n", "--steps", "m", "--bind", "h:"], "HOST:PORT"),
        (["serve", "--node-id", "n", "--steps", "m:"], "MODULE or MODULE:ATTR"),
        (["serve", "--node-id", "n", "--steps", ":attr"], "MODULE or MODULE:ATTR"),
        (["serve", "--node-id", "n", "--steps", "m", "--drain-grace", "0"], "positive"),
        (["serve", "--node-id", "n", "--steps", "m", "--tls-ca", "ca.pem"], "need --tls-cert"),
        (["serve", "--node-id", "", "--steps", "m"], "a node id cannot be empty"),
        (["invoke", "ftp://peer:1", "wf", "s", "--input", "1"], "invalid endpoint 'ftp://peer:1'"),
        (["invoke", ENDPOINT, "wf", "s", "--input", "1", "--node-id", ""], "cannot be empty"),
        (["invoke", ENDPOINT, "wf", "s"], "--input"),
        (["invoke", ENDPOINT, "wf", "--input", "1"], "STEP"),
        (["invoke", ENDPOINT, "wf", "s", "--input", "1", "--timeout", "-1"], "positive"),
        (["invoke", ENDPOINT, "wf", "s", "--input", "1", "--timeout", "nan"], "positive"),
        (["invoke", ENDPOINT, "wf", "s", "--input", "1", "--tls-key", "k.pem"], "--tls-cert"),
        (["invoke", ENDPOINT, "wf", "s", "--input", "1", "--tls-ca", "ca.pem"], "https://"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    code, out, err = run_main(capsys, *argv)
    assert code == EXIT_USAGE
    assert out == ""
    assert "usage: peerflow" in err
    assert fragment in err


def test_bad_input_json(capsys: pytest.CaptureFixture[str], refusing_port: int) -> None:
    endpoint = f"http://127.0.0.1:{refusing_port}"
    code, out, err = run_main(capsys, "invoke", endpoint, "wf", "s", "--input", '{"a": }')
    assert (code, out) == (EXIT_ERROR, "")
    assert_one_line_error(err, "input: malformed JSON: Expecting value")


def test_input_from_stdin_with_bad_base64_names_the_path(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, refusing_port: int
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"rows": [{"$bytes": "not base64!"}]}'))
    endpoint = f"http://127.0.0.1:{refusing_port}"
    code, out, err = run_main(capsys, "invoke", endpoint, "wf", "s", "--input", "-")
    assert (code, out) == (EXIT_ERROR, "")
    assert_one_line_error(err, 'input["rows"][0]["$bytes"]: not valid base64')


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"a": ' + "[" * 70 + "0" + "]" * 70 + "}", 'input["a"]' + "[0]" * 63 + ": nested deeper"),
        ("[" * 100_000, "input: JSON nested too deep (values allow 64 levels)"),
        (str(2**64), "input: int does not fit in 64 bits"),
        ('["\\ud800"]', "input[0]: str is not valid Unicode: lone surrogate"),
    ],
)
def test_input_that_is_no_wire_value_is_refused_before_connecting(
    capsys: pytest.CaptureFixture[str], refusing_port: int, text: str, error: str
) -> None:
    endpoint = f"http://127.0.0.1:{refusing_port}"
    code, out, err = run_main(capsys, "invoke", endpoint, "wf", "s", "--input", text)
    assert (code, out) == (EXIT_ERROR, "")
    assert_one_line_error(err, error)


def test_input_may_nest_64_levels(capsys: pytest.CaptureFixture[str], refusing_port: int) -> None:
    endpoint = f"http://127.0.0.1:{refusing_port}"
    argv = ["invoke", endpoint, "wf", "s", "--input", "[" * 64 + "]" * 64]
    code, _, err = run_main(capsys, *argv)
    # Past the input check: it is the connection that fails.
    assert code == EXIT_ERROR
    assert_one_line_error(err, f"127.0.0.1:{refusing_port}")


@pytest.mark.parametrize(
    ("text", "path"), [('{"a": [1, 1e400]}', 'input["a"][1]: inf'), ("NaN", "input: nan")]
)
def test_input_numbers_must_be_finite(
    capsys: pytest.CaptureFixture[str], refusing_port: int, text: str, path: str
) -> None:
    endpoint = f"http://127.0.0.1:{refusing_port}"
    code, _, err = run_main(capsys, "invoke", endpoint, "wf", "s", "--input", text)
    assert code == EXIT_ERROR
    assert_one_line_error(err, f"{path} is not a finite number")


def test_connection_refused_names_the_address(
    capsys: pytest.CaptureFixture[str], refusing_port: int
) -> None:
    endpoint = f"http://127.0.0.1:{refusing_port}"
    code, out, err = run_main(capsys, "invoke", endpoint, "wf", "s", "--input", "{}")
    assert (code, out) == (EXIT_ERROR, "")
    assert_one_line_error(err, f"127.0.0.1:{refusing_port}")


def test_missing_client_tls_file_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ca = tmp_path / "missing-ca.pem"
    argv = ["invoke", "https://127.0.0.1:1", "wf", "s", "--input", "1", "--tls-ca", str(ca)]
    code, _, err = run_main(capsys, *argv)
    assert code == EXIT_ERROR
    assert_one_line_error(err, str(ca))


# -- serve: what it refuses before serving ------------------------------------------


def serve_argv(*steps: str) -> list[str]:
    argv = ["serve", "--node-id", "node-b", "--bind", "127.0.0.1:0"]
    for spec in steps:
        argv += ["--steps", spec]
    return argv


def test_unknown_steps_module(capsys: pytest.CaptureFixture[str], in_steps_dir: Path) -> None:
    code, out, err = run_main(capsys, *serve_argv("cli_nowhere"))
    assert (code, out) == (EXIT_ERROR, "")
    assert_one_line_error(err, "no module named 'cli_nowhere'")


def test_missing_attribute(capsys: pytest.CaptureFixture[str], in_steps_dir: Path) -> None:
    code, _, err = run_main(capsys, *serve_argv("cli_more:nothing"))
    assert code == EXIT_ERROR
    assert_one_line_error(err, "module 'cli_more' has no attribute 'nothing'")


def test_attribute_of_the_wrong_type(
    capsys: pytest.CaptureFixture[str], in_steps_dir: Path
) -> None:
    code, _, err = run_main(capsys, *serve_argv("cli_more:SHOUT_ID"))
    assert code == EXIT_ERROR
    assert_one_line_error(err, "'SHOUT_ID' is a str, not a StepRegistry or a Workflow")


def test_module_that_fails_to_import_shows_its_traceback(
    capsys: pytest.CaptureFixture[str], in_steps_dir: Path
) -> None:
    code, _, err = run_main(capsys, *serve_argv("cli_broken"))
    assert code == EXIT_ERROR
    # The user's own bug: its traceback first, then the usual one-line summary.
    assert 'cli_broken.py", line 1' in err
    assert err.splitlines()[-1] == (
        "peerflow: error: --steps cli_broken: importing 'cli_broken' failed: "
        "RuntimeError: broken on purpose"
    )


def test_clashing_step_ids_across_registries(
    capsys: pytest.CaptureFixture[str], in_steps_dir: Path
) -> None:
    code, _, err = run_main(capsys, *serve_argv("cli_more:more_steps", "cli_clash:clash_steps"))
    assert code == EXIT_ERROR
    assert_one_line_error(
        err,
        "step id 'more::shout' is registered as different steps by "
        "--steps cli_more:more_steps and --steps cli_clash:clash_steps",
    )


def test_missing_server_tls_file_is_named(
    capsys: pytest.CaptureFixture[str], in_steps_dir: Path, tmp_path: Path
) -> None:
    cert = tmp_path / "missing-cert.pem"
    code, _, err = run_main(capsys, *serve_argv("cli_more:shout"), "--tls-cert", str(cert))
    assert code == EXIT_ERROR
    assert_one_line_error(err, str(cert))


def test_address_in_use(capsys: pytest.CaptureFixture[str], in_steps_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = serve_argv("cli_more:more_steps")
        argv[argv.index("--bind") + 1] = f"127.0.0.1:{port}"
        code, out, err = run_main(capsys, *argv)
    assert (code, out) == (EXIT_ERROR, "")
    assert err.startswith("peerflow: error: ")
    assert str(port) in err
    assert "Traceback" not in err
