"""Fixtures for the security tests: step registries and a throwaway PKI."""

from __future__ import annotations

from pathlib import Path

import pytest
from security_pki import Pki, make_pki
from security_steps import build_steps

from peerflow import StepRegistry


@pytest.fixture
def steps() -> StepRegistry:
    return build_steps()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)
