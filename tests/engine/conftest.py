from __future__ import annotations

import sys
from pathlib import Path

import pytest

from peerflow import SessionRefRegistry, StepRegistry

# tests/strategies.py is shared by every suite; pytest's default import mode
# puts only this directory on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def registry() -> StepRegistry:
    return StepRegistry()


@pytest.fixture
def refs() -> SessionRefRegistry:
    return SessionRefRegistry("node-a")
