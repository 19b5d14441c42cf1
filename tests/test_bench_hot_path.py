"""`kvlib bench --hot-path` on the real model: the split adds up to TTFT and every floor is a measured rate."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_hot_path_split_adds_up_and_floors_are_positive(smol_engine, tmp_path):
    from kvlib.bench.hot_path import PARTS, report_lines, run_hot_path
    from kvlib.engine.spec import parse_mode
    from kvlib.store.library import Library

    with Library(tmp_path / "scratch") as library:
        report = run_hot_path(smol_engine, library, spec=parse_mode("rerope"), contexts=(512, 1024), repeats=1,
                              full_repeats=1)
    rates = report["rates"]
    assert all(v > 0 for v in rates.values()), rates
    for row in report["rows"]:
        parts = row["parts_s"]
        assert set(parts) == set(PARTS)
        assert all(parts[p] >= 0 for p in PARTS if p != "other"), parts
        # "other" is what the marked parts leave of the profiled TTFT, so they add up to it exactly
        assert sum(parts.values()) == pytest.approx(row["profiled_ttft_s"], rel=1e-9)
        assert parts["attention"] > 0 and parts["proj_mlp"] > 0 and parts["rotate"] > 0
        # well-formed, not fast: speed is the benchmark's to report, never a unit test's to assert
        assert row["floor_total_s"] > 0 and row["full_ttft_s"] > 0 and row["ttft_over_floor"] > 0, row
    assert report["rows"][1]["work"]["kv_bytes"] > report["rows"][0]["work"]["kv_bytes"]
    assert any("TTFT / floor" in line for line in report_lines(report))
    json.dumps(report)  # the report is plain JSON
