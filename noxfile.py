"""Developer sessions: tests on every supported Python, lint, typecheck, examples..."""

from __future__ import annotations

import glob
import os
import pathlib

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
ROOT = pathlib.Path(__file__).parent

nox.options.sessions = ["tests", "lint", "typecheck", "examples"]
nox.options.error_on_missing_interpreters = False


def _expose_pyenv_interpreters() -> None:
    # pyenv's shims only answer for the globally selected version, so put each
    # installed version's own bin directory on PATH for nox to find.
    found = sorted(glob.glob("/root/.pyenv/versions/3.*/bin"), reverse=True)
    if found:
        os.environ["PATH"] = os.pathsep.join([*found, os.environ.get("PATH", "")])


_expose_pyenv_interpreters()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "examples")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".", "mypy")
    session.run("mypy")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the documentation site (mkdocs, strict) and run the code samples it shows."""
    # The test extra too: the samples include a pytest module and trustme certificates.
    session.install("-e", ".[docs,test]")
    samples = ROOT / "docs" / "samples"
    for sample in sorted(samples.glob("*.py")):
        if not sample.name.startswith("test_"):
            session.run("python", str(sample))
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(samples))
    site = pathlib.Path(session.create_tmp()) / "site"
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", str(site), env={"NO_MKDOCS_2_WARNING": "1"}
    )


@nox.session(python="3.11")
def examples(session: nox.Session) -> None:
    """Run every example script; each must exit 0 on its own."""
    # trustme makes the throwaway certificates of the TLS example.
    session.install("-e", ".", "trustme")
    for script in sorted((ROOT / "examples").glob("*.py")):
        # A steps module is imported by the others; the peer server runs until
        # stopped and is exercised by parent.py, which starts it.
        if script.name in {"analysis_steps.py", "peer_server.py"}:
            continue
        session.run("python", str(script))


@nox.session(python="3.11")
def interop(session: nox.Session) -> None:
    """Interop with third-party gRPC/HTTP/2 stacks: grpcio both ways, and h2load if installed."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "tests/interop", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run every benchmark; pass --quick for a smoke run of the peer comparison."""
    session.install("-e", ".[dev]")
    bench_dir = ROOT / "benchmarks"
    for script in ("engine.py", "codec.py", "h2_raw.py", "deref_memory.py"):
        session.run("python", str(bench_dir / script))
    session.run("python", str(bench_dir / "peer.py"), *session.posargs)
