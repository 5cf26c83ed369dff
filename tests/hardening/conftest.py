"""Every hardening test also fails when the server logged an error while it ran."""

from __future__ import annotations

from collections.abc import Generator

import pytest
from hardening_raw import capture_errors


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    # Checked in the call phase, not in a fixture's teardown, so that an
    # xfail marker also covers a bug that shows only as a logged traceback.
    with capture_errors() as log:
        result = yield
    assert log.texts() == [], "the server logged errors for malformed input"
    return result
