"""The sandbox benchmark runs end to end in smoke mode (figures are read, never asserted)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_run_produces_well_formed_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    bench = importlib.import_module("benchmarks.bench_sandbox")
    harness = importlib.import_module("benchmarks.harness")
    rows = bench.run(smoke=True)
    assert len(rows) == 9
    for index, row in enumerate(rows):
        normal = harness.normalize(row, index)  # raises on a malformed row
        assert normal["ours"] is not None and normal["ours"] > 0, row
        assert normal["unit"] in ("ms", "MiB", "sandboxes")
    scale = rows[-1]
    assert scale["ours"] == 5  # every sandbox of the smoke run's scale step came up
