from __future__ import annotations

import pytest

from peerflow import SessionRefRegistry, StepRegistry


@pytest.fixture
def registry() -> StepRegistry:
    return StepRegistry()


@pytest.fixture
def refs() -> SessionRefRegistry:
    return SessionRefRegistry("node-a")
