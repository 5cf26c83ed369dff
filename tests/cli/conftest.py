"""Fixtures for the CLI tests: a directory of step modules, and in-process imports undone."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_step_modules import MODULES, write_steps


@pytest.fixture
def steps_dir(tmp_path: Path) -> Path:
    """A directory holding the step modules."""
    return write_steps(tmp_path)


@pytest.fixture
def in_steps_dir(steps_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in-process ``serve`` commands from ``steps_dir``, then forget what they imported.

    ``serve`` makes the current directory importable and imports modules
    into this process; both are undone so other tests see neither. Only
    modules with registries of their own are imported in-process, so the
    default StepRegistry stays untouched.
    """
    monkeypatch.chdir(steps_dir)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield steps_dir
    for name in MODULES:
        sys.modules.pop(name, None)
