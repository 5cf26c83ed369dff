"""The soak benchmark, short: 1,000 mixed calls at 64 concurrency against a peer process.

The logic lives in ``benchmarks/soak.py``; this runs it and insists that
nothing failed and nothing leaked.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import trio

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def _load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peerflow_benchmarks_soak", SOAK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_a_thousand_mixed_calls_leave_no_errors_and_no_refs() -> None:
    soak = _load_soak()
    with trio.fail_after(120):
        report = await soak.run_soak(calls=1000, concurrency=64)
    assert report.error_kinds == {}
    assert report.errors == 0
    assert report.live_refs == 0
    assert report.calls == 1000
    # The mix really cancelled calls mid-flight (three in every cycle of ten).
    assert report.cancelled >= 200
    assert report.rss_start > 0
    assert report.rss_end > 0
