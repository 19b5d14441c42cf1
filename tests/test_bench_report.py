"""results.json shape and round trip, report.md table, terminal table, PNG plots."""

from __future__ import annotations

import copy
import io

import pytest

from kvlib.bench.plots import plot_all
from kvlib.bench.report import (
    RESULT_KEYS,
    SETTINGS_KEYS,
    load_results,
    render_table,
    validate_results,
    write_report_md,
    write_results,
)

from kvlib.engine.spec import parse_mode

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SETTINGS = {
    "model": "SmolLM2-135M-Instruct", "fingerprint": "ab12cd", "dtype": "bfloat16", "device": "cpu",
    "torch": "2.13.0", "hardware": "2 cores", "data": "qa_train.json", "n": 4, "ctxs": 10, "seed": 0,
    "date": "2025-01-01T00:00:00Z", "repeats": 3,
}


def row(mode: str, order: str, ttft: float, **overrides) -> dict:
    base = {
        "mode": mode, "spec": parse_mode(mode).as_dict(), "order": order, "n": 4,
        "ttft_s": {"median": ttft, "p90": ttft * 1.2},
        "ttft_parts_s": {"load": 0.001, "compose": 0.002, "repair": 0.0, "prefill": ttft - 0.003},
        "decode_tok_s": 40.0, "qps": 1.0 / ttft, "f1": 0.5, "em": 0.25, "nll": 1.2, "ppl": 3.32,
        "kl_to_full": 0.0 if mode == "full" else 0.05, "attn_sim": 0.97, "attn_sim_per_layer": [0.99, 0.95],
        "hit_rate": 0.0 if mode == "full" else 0.8, "recompute_frac": 1.0 if mode == "full" else 0.1,
        "kv_bytes_read": 0 if mode == "full" else 2_500_000,
    }
    return base | overrides


RESULTS = [
    row("full", "given", 0.400),
    row("prefix", "given", 0.100),
    row("rerope", "given", 0.080),
    row("full", "shuffled", 0.420),
    row("prefix", "shuffled", 0.380, hit_rate=0.1),
    row("rerope+boundary:4", "shuffled", 0.090, attn_sim=None, attn_sim_per_layer=[]),
]


def test_results_round_trip(tmp_path):
    path = write_results(tmp_path / "run", SETTINGS, RESULTS)
    assert path == tmp_path / "run" / "results.json"
    assert load_results(path) == {"settings": SETTINGS, "results": RESULTS}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"], "no temp file left behind"


def test_result_keys_are_the_documented_ones():
    # The runner, plots and downstream readers all depend on these exact names.
    assert set(RESULTS[0]) == set(RESULT_KEYS)
    assert set(SETTINGS_KEYS) <= set(SETTINGS)


@pytest.mark.parametrize("key", RESULT_KEYS)
def test_validator_rejects_each_missing_result_key(key):
    obj = {"settings": SETTINGS, "results": copy.deepcopy(RESULTS)}
    del obj["results"][2][key]
    with pytest.raises(ValueError, match=rf"results\[2\] is missing key\(s\) '{key}'"):
        validate_results(obj)


@pytest.mark.parametrize("key", SETTINGS_KEYS)
def test_validator_rejects_each_missing_setting(key):
    settings = {k: v for k, v in SETTINGS.items() if k != key}
    with pytest.raises(ValueError, match=f"settings is missing key\\(s\\) '{key}'"):
        validate_results({"settings": settings, "results": RESULTS})


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(ttft=r.pop("ttft_s")), "missing key\\(s\\) 'ttft_s' \\(unexpected: 'ttft'; renamed\\?\\)"),
        (lambda r: r["ttft_parts_s"].pop("compose"), "ttft_parts_s is missing key\\(s\\) 'compose'"),
        (lambda r: r["ttft_s"].pop("p90"), "ttft_s is missing key\\(s\\) 'p90'"),
        (lambda r: r.update(f1=float("nan")), "f1 is nan; write null"),
        (lambda r: r.update(em="0.5"), "em must be a number or null"),
        (lambda r: r.update(n=4.0), "n must be an integer"),
        (lambda r: r.update(attn_sim_per_layer=[0.9, "x"]), "attn_sim_per_layer\\[1\\]"),
    ],
)
def test_validator_names_the_bad_key(mutate, message):
    obj = {"settings": SETTINGS, "results": copy.deepcopy(RESULTS)}
    mutate(obj["results"][0])
    with pytest.raises(ValueError, match=message):
        validate_results(obj)


def test_write_refuses_invalid_results(tmp_path):
    bad = copy.deepcopy(RESULTS)
    del bad[0]["qps"]
    with pytest.raises(ValueError, match="'qps'"):
        write_results(tmp_path, SETTINGS, bad)
    assert not (tmp_path / "results.json").exists()


def test_report_md_contains_the_table(tmp_path):
    path = write_report_md(tmp_path, SETTINGS, RESULTS, ["ttft_by_mode.png"], findings=["rerope is 5x faster"])
    text = path.read_text()
    results_part = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    table = [line for line in results_part.splitlines() if line.startswith("| ")]
    header = next(line for line in table if line.startswith("| mode |"))
    assert "TTFT ms (p50)" in header and "KL to full" in header and "hit rate" in header
    body = [line for line in table if line.startswith(("| full", "| prefix", "| rerope"))]
    assert len(body) == len(RESULTS)
    # prefix/given: 400 ms / 100 ms = 4x faster than full in the same order
    assert "| prefix | given | 4 | 100.0 | 120.0 | 4.00x |" in text
    # rerope+boundary:4/shuffled has no attention similarity: shown as a dash, not "None"
    assert "None" not in text and "| – |" in text
    assert "![ttft_by_mode](ttft_by_mode.png)" in text and "- rerope is 5x faster" in text
    assert "## Trade-off (given order)" in text and "gap closed vs rerope" in text


def test_render_table_has_every_row():
    from rich.console import Console

    table = render_table(RESULTS)
    assert table.row_count == len(RESULTS)
    out = io.StringIO()
    Console(width=400, file=out).print(table)
    assert "rerope+boundary:4" in out.getvalue() and "4.00x" in out.getvalue()
    narrow = io.StringIO()  # a log file is 80 columns wide: the headline columns must still show their values
    Console(width=80, file=narrow).print(table)
    assert "rerope+boundary:4" in narrow.getvalue() and "4.00x" in narrow.getvalue()


@pytest.mark.parametrize("results", [RESULTS, RESULTS[:3], [RESULTS[0]], [row("naive", "given", 0.05, f1=None, kl_to_full=None)]])
def test_plots_are_non_empty_pngs(tmp_path, results):
    names = plot_all(tmp_path, results)
    assert names == ["ttft_by_mode.png", "quality_by_mode.png", "hit_rate_by_order.png", "pareto.png"]
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, f"{name}: {len(data)} bytes"


def test_plot_all_with_no_results_writes_nothing(tmp_path):
    assert plot_all(tmp_path, []) == []
    assert list(tmp_path.iterdir()) == []



def test_validator_accepts_extra_result_fields():
    """The issue's schema welcomes more fields; it forbids only missing or renamed ones."""
    from kvlib.bench.report import RESULT_KEYS, validate_results

    row = {k: 0.0 for k in RESULT_KEYS}
    row.update(mode="rerope+sink", spec=parse_mode("rerope").as_dict(), order="given", n=1,
               ttft_s={"median": 0.1, "p90": 0.2}, ttft_parts_s={"load": 0.0, "compose": 0.0, "repair": 0.0,
                                                               "prefill": 0.1}, attn_sim_per_layer=[1.0],
               answers=["x"])
    settings = {k: "x" for k in ("model", "fingerprint", "dtype", "device", "torch", "hardware", "data", "date")}
    settings.update(n=1, ctxs=None, seed=0)
    validate_results({"settings": settings, "results": [row]})


def test_mode_grammar_joins_repair_selectors():
    from kvlib.engine.spec import parse_mode

    spec = parse_mode("rerope+sink+boundary:8+query:0.05")
    assert (spec.base, spec.encoding, spec.repair) == ("rerope", "sink", "boundary:8+query:0.05")
    assert parse_mode("rerope+boundary:8") == spec.__class__("rerope", "sink", "boundary:8"), "sink is the default"
    assert parse_mode("rerope+bare+boundary:8").encoding == "bare"
    assert parse_mode("rerope", "auto") == parse_mode("rerope+sink+auto"), "--repair appends to --mode"
    assert parse_mode("full").name == "full" and parse_mode("naive").name == "naive+sink"


def _row(mode, ttft, kl, order="given"):
    return {"mode": mode, "order": order, "ttft_s": {"median": ttft}, "kl_to_full": kl, "nll": 1.0, "f1": 0.5,
            "recompute_frac": 0.0}


def test_pareto_gap_closed_flags_and_best_within_by_hand():
    from kvlib.bench.pareto import best_within, pareto_findings, pareto_rows

    results = [_row("full", 4.0, 0.0), _row("rerope+bare", 0.2, 0.5), _row("rerope+sink", 0.2, 0.4),
               _row("rerope+sink+boundary:16", 0.8, 0.2), _row("rerope+sink+blend:0.3", 2.0, 0.1),
               _row("rerope+sink+query:0.1", 1.0, 0.3), _row("full", 9.0, 0.0, order="shuffled")]
    rows = {r["mode"]: r for r in pareto_rows(results)}
    assert len(rows) == 6 and rows["full"]["speedup"] == 1.0
    b16 = rows["rerope+sink+boundary:16"]
    assert b16["speedup"] == pytest.approx(5.0)
    assert b16["gap_closed"]["rerope+bare"] == pytest.approx(0.6) and b16["gap_closed"]["rerope+sink"] == pytest.approx(0.5)
    # query:0.1 is slower and further from full than boundary:16; rerope ties sink on TTFT but is worse
    assert [m for m, r in rows.items() if not r["pareto"]] == ["rerope+bare", "rerope+sink+query:0.1"]
    assert best_within(list(rows.values()), 4.0)["mode"] == "rerope+sink+boundary:16"
    assert best_within(list(rows.values()), 1.5)["mode"] == "rerope+sink+blend:0.3"
    assert "60%" in pareto_findings(list(rows.values()))[0]
    sink_only = pareto_rows([_row("full", 4.0, 0.0), _row("naive+sink", 0.2, 0.41), _row("rerope+sink", 0.2, 0.4)])
    assert pareto_findings(sink_only) == [], "a mode never 'closes' its own gap (the demo's bench said 0%)"


def test_rerope_and_naive_within_a_percent_are_called_even():
    from kvlib.bench.findings import reuse_findings

    even = reuse_findings([_row("naive+sink", 0.03, 0.1711), _row("rerope+sink", 0.03, 0.1705)])
    assert len(even) == 1 and "within 1%" in even[0] and "0.1705" in even[0]
    apart = reuse_findings([_row("naive+sink", 0.03, 0.30), _row("rerope+sink", 0.03, 0.17)])
    assert "is below naive+sink's 0.300" in apart[0]


def _timed(mode, mean, kl, recompute):
    return {**_row(mode, mean, kl), "ttft_s": {"median": mean, "mean": mean}, "recompute_frac": recompute}


def test_auto_against_fixed_families_at_equal_mean_ttft_by_hand():
    from kvlib.bench.pareto import auto_sentences, auto_vs_fixed

    results = [_timed("full", 4.0, 0.0, 1.0), _timed("rerope+sink+boundary:8", 0.5, 0.30, 0.06),
               _timed("rerope+sink+boundary:16", 1.0, 0.20, 0.12), _timed("rerope+sink+blend:0.15", 1.2, 0.25, 0.15),
               _timed("rerope+sink+blend:0.3", 2.0, 0.15, 0.30), _timed("rerope+sink+boundary:8+query:0.05", 0.8, 0.1, 0.1),
               _timed("rerope+sink+auto", 0.75, 0.20, 0.05), _timed("rerope+sink+auto:0.9", 3.0, 0.16, 0.4),
               _timed("rerope+lead+boundary:16", 0.7, 0.01, 0.1)]
    got = {(c["mode"], c["family"]): c for c in auto_vs_fixed(results)}
    assert set(got) == {("rerope+sink+auto", "boundary"), ("rerope+sink+auto", "blend"),
                        ("rerope+sink+auto:0.9", "boundary"), ("rerope+sink+auto:0.9", "blend")}
    b = got[("rerope+sink+auto", "boundary")]  # halfway between boundary:8 and :16 -> KL 0.25, 9% recompute
    assert b["fixed_kl"] == pytest.approx(0.25) and b["fixed_recompute_frac"] == pytest.approx(0.09)
    assert b["fixed_verdict"] == "beats" and b["fixed_against"] == "rerope+sink+boundary:8 .. rerope+sink+boundary:16"
    assert got[("rerope+sink+auto", "blend")]["fixed_verdict"] == "beats (faster and closer)"
    assert got[("rerope+sink+auto:0.9", "boundary")]["fixed_verdict"] == "not comparable (slower, closer)"
    assert got[("rerope+sink+auto:0.9", "blend")]["fixed_verdict"] == "loses (slower, further)"
    tie = auto_vs_fixed([_timed("rerope+sink+auto", 0.75, 0.26, 0.05)] + results[1:3])
    assert tie[0]["fixed_verdict"] == "ties with less recompute"
    assert "ties with less recompute" in auto_sentences(tie)[0] and "KL 0.250" in auto_sentences(tie)[0]


def test_map_threshold_sentences_by_hand():
    from kvlib.bench.sweep import threshold_sentences

    cell = lambda axis, value, mode, kl: {"axis": axis, "value": value, "mode": mode, "kl_to_full": kl}  # noqa: E731
    rows = [cell("chunks", 1, "rerope+sink", 0.0), cell("chunks", 2, "rerope+sink", 0.2),
            cell("chunks", 4, "rerope+sink", 0.6), cell("offset", 0, "rerope+sink", 0.3),
            cell("offset", 512, "rerope+sink", 0.35)]
    got = threshold_sentences(rows)
    assert got == ["rerope+sink, chunks composed: safe to reuse as is at 1 chunks composed; breaks at 4.",
                   "rerope+sink, tokens of offset: not safe as is at any measured value (0-512 tokens of offset); "
                   "never breaks (worst KL 0.350 at 512)."]
