"""The API reference page documents every public name (run by the nox docs session)."""

from __future__ import annotations

import pathlib
import re

import peerflow
import peerflow.testing

API_PAGE = pathlib.Path(__file__).parents[1] / "reference" / "api.md"


def test_every_public_name_has_a_reference_entry() -> None:
    documented = set(re.findall(r"^::: ([\w.]+)$", API_PAGE.read_text(), re.MULTILINE))
    public = {f"peerflow.{name}" for name in peerflow.__all__}
    public |= {f"peerflow.testing.{name}" for name in peerflow.testing.__all__}
    assert sorted(public - documented) == [], "add these to docs/reference/api.md"
    assert sorted(documented - public) == [], "these are not public (any more)"
