"""The ``peerflow`` command line: serve step modules, or invoke a peer's sub-workflow.

``peerflow serve`` imports step modules and runs a :class:`~peerflow.PeerServer`
until SIGINT or SIGTERM. ``peerflow invoke`` runs one sub-workflow on a peer
and prints its response as JSON. ``python -m peerflow`` is the same program.

JSON has no bytes type, so the CLI reads and prints values in the spelling of
the HTTP/JSON variant (protocol/README.md, section 6), through
:mod:`peerflow._peer.json_codec`: bytes inside wire values are
``{"$bytes": "<base64>"}`` in both directions, and the bytes fields of the
schema (an inline ref's ``payload``) are plain base64 strings.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import signal
import ssl
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import trio

from . import __version__
from ._engine.events import event_to_wire
from ._engine.steps import StepRegistry
from ._engine.workflow import Workflow
from ._excgroups import collapse_excgroups
from ._peer.client import PeerClient, parse_endpoint
from ._peer.json_codec import decode_json_value, json_body
from ._peer.limits import Limits
from ._peer.logs import for_node
from ._peer.server import PeerServer
from ._transport.tls import load_client_tls, load_server_tls
from ._wire.envelopes import StreamEvent, SubWorkflowResponse
from .errors import DuplicateStepError, PeerflowError, PeerTimeoutError, PeerTransportError

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "EXIT_WORKFLOW_FAILED",
    "main",
]

#: The command did what was asked (``serve``: it drained and stopped on a signal).
EXIT_OK = 0
#: ``invoke``: the remote workflow ran and failed; the response, with its
#: ``error``, is still printed.
EXIT_WORKFLOW_FAILED = 1
#: The command line itself is wrong (argparse's own code).
EXIT_USAGE = 2
#: A peerflow error (transport, auth, TLS, unknown step, encoding), bad
#: ``--input`` JSON, or step modules that cannot be served.
EXIT_ERROR = 3
#: Interrupted by Ctrl-C outside ``serve`` (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130

_DEFAULT_INVOKE_NODE_ID = "peerflow-cli"
_log = logging.getLogger("peerflow.cli")


class _CliError(Exception):
    """A failure the CLI reports in one line with :data:`EXIT_ERROR`."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``peerflow`` command line and return its exit status.

    The ``peerflow`` console script and ``python -m peerflow`` both call this.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` by default.

    Returns:
        :data:`EXIT_OK`, :data:`EXIT_WORKFLOW_FAILED`, :data:`EXIT_USAGE`,
        :data:`EXIT_ERROR` or :data:`EXIT_INTERRUPTED`. Errors are reported
        as one ``peerflow: error: ...`` line on stderr, with no traceback
        (except for a step module that fails while it is imported: its
        traceback is the user's to read).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.run(parser, args))
    except SystemExit as exc:
        # argparse exits for --help, --version and usage errors; returning the
        # code keeps main() callable from tests and other programs.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except (PeerflowError, _CliError) as exc:
        message = " ".join(str(exc).split())
        print(f"peerflow: error: {message}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("peerflow: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


# -- the parser ------------------------------------------------------------------

_INVOKE_EPILOG = """\
output:
  One JSON object per line on stdout. With --stream, each event the remote
  run streams is a line {"event_type": ..., "data": {...}}; the last line is
  always the response: {"result", "state", "remote_refs", "inline_refs",
  "dropped_refs", "error"}. "error" is null, or {"message", "step_id",
  "error_type"} when the remote workflow failed.

bytes:
  JSON has no bytes type. Bytes inside values (result, state, event data, and
  --input) are written {"$bytes": "<base64>"}; an inline ref's "payload" is a
  plain base64 string. NaN and infinities have no JSON form: they are refused
  in --input and in the response.

exit status:
  0 success; 1 the remote workflow failed (the JSON is still printed);
  2 usage error; 3 peerflow error (connection, auth, TLS, unknown step,
  encoding) or bad --input JSON; 130 interrupted.

The token is read from PEERFLOW_PEER_TOKEN; there is no flag for it.
"""

_SERVE_EPILOG = """\
Once the socket listens, one line "serving <node-id> on <url>" is printed on
stdout (so --bind 127.0.0.1:0 tells the chosen port). SIGINT or SIGTERM
drains in-flight calls (up to --drain-grace seconds) and exits 0.

The token is read from PEERFLOW_PEER_TOKEN; there is no flag for it.
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peerflow",
        description="Serve peerflow steps to other machines, or invoke a peer's sub-workflow.",
    )
    parser.add_argument("--version", action="version", version=f"peerflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve the steps of some modules until SIGINT or SIGTERM",
        description="Import step modules and serve their steps until SIGINT or SIGTERM.",
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--node-id",
        required=True,
        type=_node_id,
        help="this node's stable id, stamped on every ref it hands out",
    )
    serve.add_argument(
        "--bind",
        type=_host_port,
        default=("127.0.0.1", 7443),
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:7443; port 0 picks a free port)",
    )
    serve.add_argument(
        "--steps",
        action="append",
        required=True,
        type=_steps_spec,
        metavar="MODULE[:ATTR]",
        help=(
            "import MODULE (from the current directory or sys.path) and serve the steps it "
            "registers in the default StepRegistry; with :ATTR, serve that StepRegistry or "
            "Workflow's registry instead. Repeat to serve several; clashing step ids are refused"
        ),
    )
    _add_tls_arguments(serve, "the server certificate", "the CA client certificates must chain to")
    serve.add_argument(
        "--drain-grace",
        type=_positive_seconds,
        metavar="SECONDS",
        help=(
            f"how long in-flight calls may run on after a signal (default {Limits().drain_grace:g})"
        ),
    )
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="the level of the log records written to stderr (default info)",
    )
    serve.set_defaults(run=_serve_command)

    invoke = commands.add_parser(
        "invoke",
        help="run a sub-workflow on a peer and print its response as JSON",
        description="Run a sub-workflow on a peer and print its response as JSON.",
        epilog=_INVOKE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    invoke.add_argument(
        "endpoint", type=_endpoint, metavar="ENDPOINT", help="http://host:port or https://host:port"
    )
    invoke.add_argument("workflow", metavar="WORKFLOW", help="the sub-workflow's name")
    invoke.add_argument("steps", metavar="STEP", nargs="+", help="the step ids to run, in order")
    invoke.add_argument(
        "--input",
        required=True,
        metavar="JSON",
        help='the input as JSON ("-" reads it from stdin); write bytes as {"$bytes": "<base64>"}',
    )
    invoke.add_argument(
        "--node-id",
        default=_DEFAULT_INVOKE_NODE_ID,
        type=_node_id,
        help=f"the caller's node id (default {_DEFAULT_INVOKE_NODE_ID})",
    )
    invoke.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="give up after this long; the deadline travels to the peer as grpc-timeout",
    )
    _add_tls_arguments(invoke, "a client certificate (mTLS)", "the CA to trust for the peer")
    invoke.add_argument(
        "--stream",
        action="store_true",
        help="print each event the remote run streams, as it happens, before the response",
    )
    invoke.set_defaults(run=_invoke_command)
    return parser


def _add_tls_arguments(parser: argparse.ArgumentParser, cert: str, ca: str) -> None:
    parser.add_argument("--tls-cert", metavar="PEM", help=f"PEM file with {cert}")
    parser.add_argument(
        "--tls-key", metavar="PEM", help="PEM file with its private key (default: in --tls-cert)"
    )
    parser.add_argument("--tls-ca", metavar="PEM", help=f"PEM file with {ca}")


def _host_port(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # an IPv6 address, bracketed as in a URL
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port of 0 to 65535: {text!r}")
    return host, int(port)


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds: {text!r}")
    return seconds


def _node_id(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a node id cannot be empty")
    return text


def _endpoint(text: str) -> str:
    try:
        parse_endpoint(text)
    except PeerTransportError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _steps_spec(text: str) -> str:
    module, colon, attr = text.partition(":")
    if not module or (colon and not attr):
        raise argparse.ArgumentTypeError(f"expected MODULE or MODULE:ATTR: {text!r}")
    return text


# -- serve -----------------------------------------------------------------------


def _serve_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.tls_cert is None and (args.tls_key is not None or args.tls_ca is not None):
        parser.error("--tls-key and --tls-ca need --tls-cert")
    registry = _load_steps(args.steps)
    tls = None
    if args.tls_cert is not None:
        tls = load_server_tls(args.tls_cert, args.tls_key, args.tls_ca)
    limits = Limits() if args.drain_grace is None else Limits(drain_grace=args.drain_grace)
    server = PeerServer(args.node_id, registry=registry, tls=tls, limits=limits)
    # The level is peerflow's own: other libraries keep to warnings, since
    # hpack's debug log prints every request header, the bearer token too.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("peerflow").setLevel(args.log_level.upper())
    host, port = args.bind
    with for_node(args.node_id):  # the CLI's own records, and trio.run's tasks
        _log.info("serving %d steps: %s", len(registry), ", ".join(sorted(registry)))
        trio.run(_serve, server, host, port)
    return EXIT_OK


async def _serve(server: PeerServer, host: str, port: int) -> None:
    # The receiver is open before the socket is bound, so a signal that
    # arrives once the "serving" line is out always drains instead of
    # killing the process with KeyboardInterrupt.
    with (
        collapse_excgroups(),
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
    ):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, host, port)
            print(f"serving {server.node_id} on {address.url}", flush=True)
            async for signum in signals:
                _log.info("%s: draining in-flight calls", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _load_steps(specs: Sequence[str]) -> StepRegistry:
    """Import the ``--steps`` modules and return the registry to serve.

    ``module`` means the default registry after importing it; ``module:attr``
    names a :class:`~peerflow.StepRegistry` or a :class:`~peerflow.Workflow`
    (whose registry is served). One registry is served as it is; several are
    merged into a new one. The current directory is importable, as with
    ``python -m``.

    Raises:
        _CliError: a module cannot be imported, an attribute is missing or of
            the wrong type, a registry is empty, or two registries register
            different steps under one id.
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    found: list[tuple[StepRegistry, str]] = []
    for spec in specs:
        registry = _registry_of(spec)
        if not len(registry):
            hint = (
                ""
                if ":" in spec
                else " (if it builds its Workflow with registry=..., name that: MODULE:ATTR)"
            )
            raise _CliError(f"--steps {spec}: no steps are registered there{hint}")
        if all(registry is not seen for seen, _ in found):
            found.append((registry, spec))
    if len(found) == 1:
        return found[0][0]
    merged = StepRegistry()
    origin: dict[str, str] = {}
    for registry, spec in found:
        for step_id in registry:
            try:
                merged.register(registry[step_id])
            except DuplicateStepError:
                raise _CliError(
                    f"step id {step_id!r} is registered as different steps by "
                    f"--steps {origin[step_id]} and --steps {spec}"
                ) from None
            origin.setdefault(step_id, spec)
    return merged


def _registry_of(spec: str) -> StepRegistry:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        if isinstance(exc, ModuleNotFoundError) and _names_module(exc, module_name):
            raise _CliError(
                f"--steps {spec}: no module named {exc.name!r} "
                "(looked in the current directory and on sys.path)"
            ) from None
        # A bug in the user's own module: its traceback is what they need.
        traceback.print_exc()
        raise _CliError(
            f"--steps {spec}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not attr:
        return StepRegistry.default()
    target: object = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise _CliError(
                f"--steps {spec}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if isinstance(target, Workflow):
        return target.registry
    if isinstance(target, StepRegistry):
        return target
    raise _CliError(
        f"--steps {spec}: {attr!r} is a {type(target).__name__}, not a StepRegistry or a Workflow"
    )


def _names_module(exc: ModuleNotFoundError, module_name: str) -> bool:
    # True when the module itself (or a package above it) is missing, not
    # something it imports.
    return exc.name is not None and (module_name + ".").startswith(exc.name + ".")


# -- invoke ----------------------------------------------------------------------


def _invoke_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.tls_key is not None and args.tls_cert is None:
        parser.error("--tls-key needs --tls-cert")
    uses_tls = any(path is not None for path in (args.tls_cert, args.tls_key, args.tls_ca))
    endpoint = parse_endpoint(args.endpoint)
    if uses_tls and endpoint.scheme != "https":
        parser.error("--tls-cert, --tls-key and --tls-ca need an https:// endpoint")
    text = sys.stdin.read() if args.input == "-" else args.input
    # Refused here, before connecting, with the path of the bad value.
    input_value = decode_json_value(text, "input")
    tls = load_client_tls(args.tls_cert, args.tls_key, args.tls_ca) if uses_tls else None
    response = trio.run(_invoke, args, tls, input_value)
    _print_json(_printed_response(response))
    return EXIT_OK if response.error is None else EXIT_WORKFLOW_FAILED


async def _invoke(
    args: argparse.Namespace, tls: ssl.SSLContext | None, input_value: Any
) -> SubWorkflowResponse:
    # One deadline covers connecting too; inside the call it travels to the
    # peer as grpc-timeout, so the remote run stops when the CLI gives up.
    with collapse_excgroups(), trio.move_on_after(args.timeout or math.inf) as deadline:
        async with PeerClient.connect(args.endpoint, args.node_id, tls=tls) as client:
            if not args.stream:
                return await client.invoke_sub_workflow(args.workflow, args.steps, input_value)
            calling = client.stream_sub_workflow(args.workflow, args.steps, input_value)
            async with calling as call:
                async for event in call:
                    # Printed as the "event" of its HTTP/JSON stream line.
                    wire = event_to_wire(event)
                    line = json_body(StreamEvent(wire["event_type"], wire["data"]))
                    _print_json(line["event"])
            assert call.response is not None  # StreamCall raises if the stream had none
            return call.response
    assert deadline.cancelled_caught
    raise PeerTimeoutError(f"invoke timed out after {args.timeout:g}s")


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, allow_nan=False) + "\n")
    sys.stdout.flush()


# -- the printed response -------------------------------------------------------


def _printed_response(response: SubWorkflowResponse) -> dict[str, Any]:
    """The JSON object ``invoke`` prints: the response's HTTP/JSON body, every key present.

    The body itself leaves out optional keys at their defaults, which a
    script reading the output should not have to know, and carries the
    envelope version ``v``, which is the protocol's business, not the
    user's; so the defaults are filled in and ``v`` is left out.

    Raises:
        PeerEncodeError: a value has no JSON form (a NaN or infinite float,
            a map that would read back as bytes); the path names it.
    """
    body = json_body(response)
    error = body["error"]
    if error is not None:
        error = {
            "message": error["message"],
            "step_id": error.get("step_id"),
            "error_type": error.get("error_type"),
        }
    return {
        "result": body["result"],
        "state": body["state"],
        "remote_refs": {
            ref_uuid: _with_serializable(descriptor)
            for ref_uuid, descriptor in body["remote_refs"].items()
        },
        "inline_refs": {
            ref_uuid: _with_serializable(ref)
            for ref_uuid, ref in body.get("inline_refs", {}).items()
        },
        "dropped_refs": body.get("dropped_refs", []),
        "error": error,
    }


def _with_serializable(descriptor: dict[str, Any]) -> dict[str, Any]:
    # A descriptor's one optional key; the encoder leaves out its default.
    return {**descriptor, "serializable": descriptor.get("serializable", True)}
