"""A tiny-model end-to-end `bench` run: every mode and order, well-formed results.json and plots.

The model is a random 2-layer Llama with the real SmolLM2 tokenizer, so the run is fast
but goes through the same tokenization, library, prefix cache and reports as a real one.
"""

from __future__ import annotations

import json

import pytest
import torch

from kvlib.bench.report import validate_results
from tiny_models import tiny_hf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_engine(smol_home):
    from transformers import AutoTokenizer

    from kvlib.engine.model import resolve_model_dir, wrap_model
    from kvlib.engine.session import Engine

    model_dir, _ = resolve_model_dir(None, smol_home)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = tiny_hf("llama", "default", vocab_size=len(tokenizer))
    return Engine(wrap_model(hf, tokenizer, name="tiny-llama", dtype=torch.float32, device=torch.device("cpu")))


def write_data(path):
    records = [
        {"question": f"What colour is object {i}?", "answers": [f"colour {i}"],
         "ctxs": [{"title": f"Object {i}", "text": f"Object {i} is painted colour {i}. It stands in hall {j}."}
                  for j in range(4)] + [{"title": "Shared", "text": "This passage appears in every record."}]}
        for i in range(3)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_bench_all_modes_all_orders_writes_reports(tiny_engine, tmp_path):
    from kvlib.bench.session import run_bench
    from kvlib.engine.spec import ALL_MODES, parse_mode

    data = tmp_path / "qa.jsonl"
    write_data(data)
    out = tmp_path / "out"
    report = run_bench(data=str(data), modes="all", order="all", limit=None, ctxs=None, seed=0, max_new_tokens=4,
                       out=out, home=tmp_path / "home", engine=tiny_engine)
    written = json.loads((out / "results.json").read_text())
    validate_results(written)
    modes = {r["mode"] for r in written["results"]}
    assert modes == {parse_mode(m).name for m in ALL_MODES} and len(modes) == len(ALL_MODES)
    assert all(r["spec"] == parse_mode(r["mode"]).as_dict() for r in written["results"])
    assert {r["order"] for r in written["results"]} == {"given", "shuffled", "reversed"}
    for name in ("ttft_by_mode.png", "quality_by_mode.png", "hit_rate_by_order.png", "pareto.png"):
        assert (out / name).stat().st_size > 1000, f"{name} missing or empty"
    assert "| mode" in (out / "report.md").read_text()
    by = {(r["mode"], r["order"]): r for r in written["results"]}
    full = by[("full", "given")]
    assert full["kl_to_full"] == 0.0 and abs(full["attn_sim"] - 1.0) < 1e-6
    assert by[("prefix", "given")]["kl_to_full"] < 1e-6, "exact prefix caching must reproduce full"
    assert by[("rerope+sink", "given")]["hit_rate"] == 1.0 and by[("rerope+sink", "given")]["recompute_frac"] == 0.0
    assert report["findings"], "the run should state findings"
    assert len(written["results"][0]["attn_sim_per_layer"]) == 2
    # every encoding a library mode reads was read once per prompt before the timed modes
    assert set(written["settings"]["first_read_load_s"]) == {"bare", "sink", "lead"}
    from kvlib.store.library import Library

    with Library(tmp_path / "home") as library:  # bench ingest scores every chunk, as `kvlib ingest` does
        scores = [row["drift_score"] for row in library.db.query("SELECT drift_score FROM chunks")]
    assert scores and all(s is not None and s > 0 for s in scores)
    assert all(v > 0 for v in written["settings"]["first_read_load_s"].values())


def test_prefix_hits_depend_on_order(tiny_engine, tmp_path):
    """The shared prefix cache sees passages again under a new order: hits stop where the order differs."""
    from kvlib.bench.session import run_bench

    data = tmp_path / "qa.jsonl"
    write_data(data)
    report = run_bench(data=str(data), modes="prefix,rerope+sink", order="all", limit=None, ctxs=None, seed=0,
                       max_new_tokens=2, out=tmp_path / "out", home=tmp_path / "home", engine=tiny_engine)
    by = {(r["mode"], r["order"]): r for r in report["results_json"]["results"]}
    assert by[("prefix", "reversed")]["hit_rate"] < by[("rerope+sink", "reversed")]["hit_rate"] == 1.0


def test_sweep_writes_the_map(tiny_engine, tmp_path, monkeypatch):
    """The map on a tiny model: every axis has a cell per value, and findings name the verdict rule."""
    import kvlib.bench.sweep as sweep
    from kvlib.bench.session import run_map

    monkeypatch.setattr(sweep, "OFFSETS", (0, 64))  # keep the tiny run short; the axis logic is the same
    monkeypatch.setattr(sweep, "CHUNK_COUNTS", (1, 2))
    monkeypatch.setattr(sweep, "CHUNK_TOKENS", (8, 64))
    data = tmp_path / "qa.jsonl"
    write_data(data)
    report = run_map(data=str(data), limit=3, seed=0, max_new_tokens=2, out=tmp_path / "map",
                     home=tmp_path / "home", engine=tiny_engine)
    axes = {(c["axis"], c["value"]) for c in report["cells"]}
    assert {("chunks", 1), ("chunks", 2), ("offset", 0), ("offset", 64), ("chunk_tokens", 8)} <= axes
    one = next(c for c in report["cells"] if c["axis"] == "chunks" and c["value"] == 1 and c["mode"] == "rerope+sink")
    assert one["kl_to_full"] < 1e-3, "a single chunk behind E is exact composition"
    assert report["findings"][0].startswith("Verdicts:")
    assert (tmp_path / "map" / "map.md").exists() and (tmp_path / "map" / "map_axes.png").stat().st_size > 1000
    kept = [json.loads(line) for line in (tmp_path / "map" / "cells.jsonl").read_text().splitlines()]
    assert kept == json.loads(json.dumps(report["cells"])), "every finished cell is kept as it finishes"


def test_sweep_runs_only_the_chosen_axes_and_names_a_bad_one(tiny_engine, tmp_path, monkeypatch):
    import kvlib.bench.sweep as sweep
    from kvlib.bench.session import run_map
    from kvlib.errors import InputError

    assert sweep.parse_axes("all") == sweep.AXES and sweep.parse_axes("order, chunks") == ("chunks", "order")
    for bad in ("chunk", "", "chunks,sideways"):
        with pytest.raises(InputError, match="unknown map axis"):
            sweep.parse_axes(bad)
    monkeypatch.setattr(sweep, "CHUNK_COUNTS", (1, 2))
    data = tmp_path / "qa.jsonl"
    write_data(data)
    report = run_map(data=str(data), limit=2, seed=0, max_new_tokens=2, out=tmp_path / "map",
                     home=tmp_path / "home", engine=tiny_engine, axes=("chunks",))
    assert {c["axis"] for c in report["cells"]} == {"chunks"} and (tmp_path / "map" / "map.md").exists()
