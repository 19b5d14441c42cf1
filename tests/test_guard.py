"""guard:B, the calibrated per-request bound on KL to full recompute.

Tiny random models carry the exactness properties (B = 0 is full, B huge is rerope, the
measurement changes nothing); plain numpy carries the statistics of the bound; the real
SmolLM2 tests (slow) run one small calibration and use it from bench, query and serve.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kvlib.engine.calibration import Calibration, evaluate, fit_calibration
from kvlib.engine.guard import FEATURES, LADDER, rung_spec
from kvlib.engine.spec import parse_mode, parse_modes
from kvlib.errors import CalibrationMissingError, InputError
from tiny_models import random_ids, tiny_lm

FULL = parse_mode("full")


# -- grammar ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, name, encoding, budget", [
    ("rerope+guard:0.2", "rerope+sink+guard:0.2", "sink", 0.2),
    ("rerope+lead+guard:0", "rerope+lead+guard:0", "lead", 0.0),
    ("rerope+guard:1e9", "rerope+sink+guard:1000000000", "sink", 1e9),
    ("rerope+guard:1e-3", "rerope+sink+guard:0.001", "sink", 1e-3),
])
def test_guard_parses_in_the_one_grammar(text, name, encoding, budget):
    spec = parse_mode(text)
    assert (spec.base, spec.encoding, spec.repair, spec.guard) == ("rerope", encoding, None, budget)
    assert spec.name == name and parse_mode(spec.name) == spec, "the canonical name must parse back to the spec"
    assert spec.as_dict() == {"base": "rerope", "encoding": encoding, "repair": None, "guard": budget}
    assert parse_mode(f"rerope+{encoding}", repair=f"guard:{budget}") == spec, "--repair guard:B is the suffix"


def test_unguarded_specs_keep_their_dict():
    assert parse_mode("rerope+boundary:16").as_dict() == {"base": "rerope", "encoding": "sink", "repair": "boundary:16"}
    assert [s.name for s in parse_modes("full,rerope+guard:0.1,rerope+sink+guard:0.1")] == ["full", "rerope+sink+guard:0.1"]


@pytest.mark.parametrize("bad, message", [
    ("rerope+guard", "guard needs a budget"), ("rerope+guard:-0.1", "guard needs a budget"),
    ("rerope+guard:x", "guard needs a budget"), ("rerope+guard:nan", "guard needs a budget"),
    ("naive+guard:0.1", "climbs its own ladder from rerope"),
    ("rerope+boundary:8+guard:0.1", "climbs its own ladder from rerope"),
    ("rerope+guard:0.1+guard:0.2", "climbs its own ladder from rerope"),
    ("full+guard:0.1", "full takes no encoding or repair"),
])
def test_bad_guard_modes_are_one_line_errors(bad, message):
    with pytest.raises(InputError, match=message) as caught:
        parse_mode(bad)
    assert "\n" not in str(caught.value)


def test_serve_accepts_guard_and_prefix_and_refuses_unknown_modes():
    from kvlib.serve.settings import Settings, serve_spec

    assert serve_spec(Settings(home=".", mode="rerope+guard:0.2").spec).guard == 0.2
    assert serve_spec(Settings(home=".", mode="rerope", repair="guard:0.3").spec).guard == 0.3
    assert serve_spec("prefix").base == "prefix"  # a serving engine's prefix caching, for comparison
    with pytest.raises(InputError, match="unknown mode"):
        serve_spec("bogus")


# -- the bound's statistics (numpy only) ----------------------------------------------

def synthetic(n: int, seed: int, rungs: int = 3):
    """Features and per-rung KL with a log-linear truth and noise of per-rung scale."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    truth = np.stack([x @ np.array([0.6, -0.3, 0.2, 0.0]) - 1.0 - 0.7 * r for r in range(rungs)], axis=1)
    noise = rng.normal(size=(n, rungs)) * np.array([0.2, 0.4, 0.6])[:rungs]
    return x, np.exp(truth + noise)


def fitted(n_fit: int = 100, n_cal: int = 100, confidence: float = 0.9, seed: int = 0) -> Calibration:
    x, kl = synthetic(n_fit + n_cal, seed)
    return fit_calibration(x, kl, np.arange(n_fit), np.arange(n_fit, n_fit + n_cal), features=list("abcd"),
                           rungs=["", "boundary:16", "blend:0.15"], confidence=confidence, model_fp="fp",
                           model_name="synthetic", encoding="sink")


@pytest.mark.parametrize("confidence", [0.8, 0.9])
def test_the_guard_keeps_its_bound_on_new_requests_at_its_confidence(confidence):
    calib = fitted(confidence=confidence)
    x, kl = synthetic(4000, seed=1)
    report = evaluate(calib, x, kl, budgets=(0.05, 0.1, 0.3))
    # Risk control gives P(served KL > B) <= 1 - c in expectation over the calibration draw;
    # 4000 new requests put the sampling error near 0.005, the calibration draw (100) near 0.03.
    for budget, row in report["budgets"].items():
        assert row["within_budget"] >= confidence - 0.04, f"the guard at B = {budget} broke its bound: {row}"
        assert row["slack"] is not None and row["slack"] >= 0
    assert report["budgets"]["0.3"]["without_full"] > report["budgets"]["0.05"]["without_full"], \
        "a looser budget must serve more requests without full"
    assert report["budgets"]["0.3"]["without_full"] > 0.5, "the bound should not fall back for most requests here"


def test_the_slack_is_the_least_that_controls_the_calibration_risk():
    """A calibration request loses at slack s if the rung the guard serves at some slack >= s has
    KL > B (checked here by simulating the guard's choice at every slack where it can change)."""
    calib = fitted(confidence=0.9)
    for budget in (0.05, 0.1, 0.3):
        lam = calib.slack(budget)
        t = (math.log(budget) - np.array(calib.cal_yhat)) / np.array([r.sigma for r in calib.rungs])
        bad = np.array(calib.cal_kl) > budget

        def served_bad(i, slack):  # the first admissible rung (slack < t) has KL > B; full never does
            admissible = np.flatnonzero(slack < t[i])
            return bool(admissible.size) and bool(bad[i, admissible[0]])

        def losses(slack):
            return sum(any(served_bad(i, s) for s in [slack, *t[i][t[i] >= slack]]) for i in range(len(t)))

        def any_admissible_losses(slack):  # the looser loss used before session 18
            return int(((slack < t) & bad).any(axis=1).sum())

        n = calib.n_cal
        assert (losses(lam) + 1) / (n + 1) <= 0.1 + 1e-12, "lam must control the risk"
        if lam > 0:
            assert (losses(lam - 1e-6) + 1) / (n + 1) > 0.1, "and be the least slack that does"
        assert losses(lam) <= any_admissible_losses(lam)


def test_too_few_calibration_requests_mean_always_full():
    calib = fitted(n_fit=20, n_cal=8, confidence=0.9)  # (8 + 1) * 0.1 - 1 < 0: no loss can be allowed
    assert math.isinf(calib.slack(0.3))
    features = dict(zip("abcd", [0.0] * 4))
    assert calib.predict(features, 0.3)[1] == [math.inf] * 3
    assert calib.choose(features, 1e9)[0] == 3, "with no stated bound the guard must recompute in full"
    assert math.isfinite(fitted(n_fit=20, n_cal=9, confidence=0.9).slack(0.3)), "9 are enough at 0.9"


def test_bounds_are_positive_so_b_zero_is_full_and_huge_b_is_the_first_rung():
    calib = fitted()
    x, _ = synthetic(50, seed=2)
    for row in x:
        features = dict(zip("abcd", row))
        assert min(calib.predict(features, 0.1)[1]) > 0
        assert calib.choose(features, 0.0)[0] == 3
        assert calib.choose(features, 1e9)[0] == 0


def test_calibration_serialises_to_json_and_back():
    calib = fitted()
    text = json.dumps(calib.to_dict(), allow_nan=False)
    assert Calibration.from_dict(json.loads(text)) == calib
    with pytest.raises(Exception, match="calibrate"):
        Calibration.from_dict({**calib.to_dict(), "format": 99})


def test_missing_feature_is_imputed_not_fatal():
    calib = fitted()
    point, bound = calib.predict({"a": 0.1, "b": math.nan, "c": 0.0}, 0.1)  # b missing (NaN), d absent
    assert all(math.isfinite(v) for v in point + bound)


# -- the engine on tiny random models ----------------------------------------------------

def tiny_engine(family: str = "llama"):
    from kvlib.engine.prompt import PromptTemplate
    from kvlib.engine.session import Engine

    lm, _ = tiny_lm(family, "default")
    return Engine(lm, PromptTemplate(context_ids=tuple(random_ids(5, 1).tolist()), suffix_text=""))


def tiny_request(engine, seed: int):
    g = torch.Generator().manual_seed(seed)
    n_chunks = int(torch.randint(2, 5, (1,), generator=g))
    ids = [random_ids(int(torch.randint(6, 30, (1,), generator=g)), seed * 10 + i).tolist() for i in range(n_chunks)]
    return engine.encode_many(ids), random_ids(5, seed + 1000).tolist()


def answer(engine, spec, chunks, suffix, calibration=None):
    return engine.answer(spec, chunks, suffix_ids=suffix, max_new_tokens=3, calibration=calibration)


def measured_calibration(engine, n: int = 16, confidence: float = 0.8) -> Calibration:
    """A real (small) calibration of the tiny model: features and KL to full per rung, measured."""
    from kvlib.bench.metrics import kl_divergence

    rows, kls = [], []
    for seed in range(n):
        chunks, suffix = tiny_request(engine, seed)
        ref = answer(engine, FULL, chunks, suffix).first_logits
        rows.append([engine.guard_features(chunks, suffix)[f] for f in FEATURES])
        kls.append([kl_divergence(ref, answer(engine, rung_spec("sink", r), chunks, suffix).first_logits)
                    for r in LADDER])
    half = n // 2
    return fit_calibration(np.array(rows, dtype=float), np.array(kls), np.arange(half), np.arange(half, n),
                           features=FEATURES, rungs=LADDER, confidence=confidence, model_fp=engine.lm.fingerprint,
                           model_name=engine.lm.name, encoding="sink")


@pytest.fixture(scope="module")
def tiny_guard():
    engine = tiny_engine()
    return engine, measured_calibration(engine)


def test_b_zero_always_falls_back_and_equals_full_exactly(tiny_guard):
    engine, calib = tiny_guard
    for seed in range(100, 104):
        chunks, suffix = tiny_request(engine, seed)
        full = answer(engine, FULL, chunks, suffix)
        guarded = answer(engine, parse_mode("rerope+guard:0"), chunks, suffix, calib)
        assert guarded.guard["fell_back"] and guarded.guard["rung"] == "full"
        assert guarded.token_ids == full.token_ids and guarded.tokens == full.tokens
        assert torch.equal(guarded.first_logits, full.first_logits), "B = 0 must be full recompute, bit for bit"


def test_huge_b_never_climbs_and_equals_rerope_exactly(tiny_guard):
    engine, calib = tiny_guard
    assert math.isfinite(calib.slack(1e12)), "the test needs a finite bound"
    for seed in range(200, 204):
        chunks, suffix = tiny_request(engine, seed)
        rerope = answer(engine, parse_mode("rerope"), chunks, suffix)
        guarded = answer(engine, parse_mode("rerope+guard:1e12"), chunks, suffix, calib)
        assert guarded.guard["rung"] == "rerope" and not guarded.guard["fell_back"]
        assert guarded.guard["kl_bound"] <= 1e12 and guarded.guard["predicted_kl"] >= 0
        assert torch.equal(guarded.first_logits, rerope.first_logits), \
            "measuring the guard's features must leave the rerope composition untouched"
        assert guarded.token_ids == rerope.token_ids and guarded.tokens == rerope.tokens


def test_middle_budget_climbs_to_a_rung_whose_bound_meets_it(tiny_guard):
    engine, calib = tiny_guard
    chunks, suffix = tiny_request(engine, 300)
    features = engine.guard_features(chunks, suffix)
    point, _ = calib.predict(features, 1.0)
    taken = set()
    for budget in sorted(point)[1:] + [max(point) * 4, max(point) * 64]:  # some met by some rungs, not by rerope
        _, bounds = calib.predict(features, budget)
        gen = answer(engine, parse_mode(f"rerope+guard:{budget}"), chunks, suffix, calib)
        first = next((i for i, b in enumerate(bounds) if b < budget), len(LADDER))
        assert gen.guard["rung"] == ("full" if first == len(LADDER) else LADDER[first] or "rerope")
        assert gen.guard["kl_bound"] < budget or gen.guard["fell_back"]
        taken.add(gen.guard["rung"])
    assert len(taken) > 1, f"budgets across the predictions should take more than one rung: {taken}"


def test_measuring_features_changes_no_cached_kv(tiny_guard):
    from kvlib.engine.compose import compose
    from kvlib.engine.guard import measure_features

    engine, _ = tiny_guard
    chunks, suffix = tiny_request(engine, 400)
    composed = compose(engine.lm, engine.context, chunks, "rerope", extra=16)
    n = composed.cache.length
    before = [t.clone() for t in composed.cache.read(0, n)]
    features = measure_features(engine.lm, composed, chunks, suffix)
    assert set(features) == set(FEATURES) and features["head_dev"] > 0, features
    after = composed.cache.read(0, n)
    assert composed.cache.length == n
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the guard's measurement wrote into the cache"


def test_guard_without_calibration_is_an_error(tiny_guard):
    engine, calib = tiny_guard
    chunks, suffix = tiny_request(engine, 500)
    with pytest.raises(CalibrationMissingError, match="kvlib calibrate"):
        engine.answer(parse_mode("rerope+guard:0.2"), chunks, suffix_ids=suffix, max_new_tokens=1)
    for other in (dataclasses.replace(calib, model_fp="another-model"), dataclasses.replace(calib, encoding="lead")):
        with pytest.raises(CalibrationMissingError):
            engine.answer(parse_mode("rerope+guard:0.2"), chunks, suffix_ids=suffix, max_new_tokens=1,
                          calibration=other)


# -- the library ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["default", pytest.param("services", marks=pytest.mark.services)])
def test_calibration_round_trips_through_the_library(kind, tmp_path, monkeypatch):
    from services_helpers import make_cluster

    from kvlib.engine.guard import load_calibration

    cluster = make_cluster(kind, tmp_path, monkeypatch)
    lm, _ = tiny_lm("llama", "default")
    fp = lm.fingerprint
    calib = dataclasses.replace(fitted(), model_fp=fp, model_name=lm.name)
    with cluster.library("a") as library:
        with pytest.raises(InputError, match="not registered"):
            library.put_calibration(fp, "sink", calib.to_dict(), method="m", confidence=0.9)
        library.register_model(fp, lm.name, lm.config_summary)
        library.put_calibration(fp, "sink", fitted(seed=5).to_dict(), method="m", confidence=0.9)
        library.put_calibration(fp, "sink", calib.to_dict(), method="m", confidence=0.9)  # replaces
    with cluster.library("a") as library:  # a fresh handle reads what the first one wrote
        assert Calibration.from_dict(library.calibration(fp, "sink")) == calib
        assert library.calibration(fp, "lead") is None and library.calibration("other", "sink") is None
        assert [(c["model_fp"], c["encoding"]) for c in library.calibrations()] == [(fp, "sink")]
        assert load_calibration(library, lm, parse_mode("rerope+guard:0.1")) == calib
        with pytest.raises(CalibrationMissingError, match="encoding lead"):
            load_calibration(library, lm, parse_mode("rerope+lead+guard:0.1"))


def test_a_home_from_before_calibrations_gains_the_table_on_open(tmp_path):
    from kvlib.store.library import Library
    from kvlib.store.manifest import applied_migrations

    home = tmp_path / "home"
    with Library(home) as library:  # make it look like a home written before 0003: its table and record gone
        library.register_model("fp", "old", {})
        library.db.execute("DROP TABLE calibrations")
        library.db.execute("DELETE FROM migrations WHERE name = '0003_calibrations'")
    with Library(home) as library:
        assert applied_migrations(library.db)[-1] == "0003_calibrations"
        assert library.model("fp")["name"] == "old", "the migration must keep what the home held"
        library.put_calibration("fp", "sink", fitted().to_dict(), method="m", confidence=0.9)
        assert library.calibration("fp", "sink")["confidence"] == 0.9


# -- bench results, report and plot ------------------------------------------------------

def bench_row(mode: str, ttft: float, kls: list, **extra) -> dict:
    n = len(kls)
    return {"mode": parse_mode(mode).name if mode != "full" else "full", "spec": parse_mode(mode).as_dict(),
            "order": "given", "n": n, "ttft_s": {"median": ttft, "p90": ttft, "mean": ttft},
            "ttft_parts_s": {"load": 0.0, "compose": 0.0, "repair": 0.0, "prefill": ttft}, "decode_tok_s": 30.0,
            "qps": 1.0, "f1": 0.1, "em": 0.0, "nll": 3.0, "ppl": 20.0, "kl_to_full": sum(kls) / n, "attn_sim": 0.9,
            "attn_sim_per_layer": [0.9], "hit_rate": 1.0, "recompute_frac": 0.0, "kv_bytes_read": 1,
            "kl_per_request": kls, **extra}


def guard_results() -> list[dict]:
    per = [{"kl_to_full": k, "predicted_kl": p, "kl_bound": b, "rung": r, "fell_back": r == "full", "ttft_s": t}
           for k, p, b, r, t in [(0.1, 0.08, 0.18, "boundary:16", 0.3), (0.05, 0.04, 0.15, "rerope", 0.1),
                                  (0.0, 0.0, 0.0, "full", 1.0), (0.15, 0.1, 0.19, "blend:0.15", 0.45)]]
    return [bench_row("full", 1.0, [0.0] * 4), bench_row("rerope", 0.1, [0.3, 0.05, 0.15, 0.25]),
            bench_row("rerope+boundary:16", 0.3, [0.1, 0.02, 0.05, 0.3]),
            bench_row("rerope+blend:0.3", 0.7, [0.05, 0.01, 0.02, 0.1]),
            bench_row("rerope+guard:0.2", 0.4625, [p["kl_to_full"] for p in per], per_request=per,
                      guard={"budget": 0.2, "confidence": 0.9})]


def test_guard_table_compares_with_the_best_fixed_mode_at_no_more_ttft():
    from kvlib.bench.guard_report import guard_findings, guard_rows

    (g,) = guard_rows(guard_results())
    assert (g["within_budget"], g["without_full"], g["n"]) == (1.0, 0.75, 4)
    assert g["ttft_vs_full"] == pytest.approx(0.4625) and g["rungs"] == {"boundary:16": 1, "rerope": 1, "full": 1,
                                                                         "blend:0.15": 1}
    # blend:0.3 (every request within 0.2) is slower than the guard, so it is not the comparison
    assert (g["best_fixed"], g["best_fixed_within"]) == ("rerope+sink+boundary:16", 0.75)
    assert "100% of 4 requests within KL 0.2" in guard_findings(guard_results())[0]


def test_guard_rows_validate_write_a_table_and_a_plot(tmp_path):
    from kvlib.bench.plots import plot_all
    from kvlib.bench.report import validate_results, write_report_md

    settings = {k: "x" for k in ("model", "fingerprint", "dtype", "device", "torch", "hardware", "data", "date")}
    settings.update(n=4, ctxs=None, seed=0)
    results = guard_results()
    validate_results({"settings": settings, "results": results})
    broken = copy_rows(results)
    del broken[-1]["per_request"][2]["fell_back"]
    with pytest.raises(ValueError, match=r"per_request\[2\] is missing key\(s\) 'fell_back'"):
        validate_results({"settings": settings, "results": broken})
    short = copy_rows(results)
    short[-1]["per_request"].pop()
    with pytest.raises(ValueError, match="one per request"):
        validate_results({"settings": settings, "results": short})
    plots = plot_all(tmp_path, results)
    assert "guard_predicted_vs_measured.png" in plots
    assert (tmp_path / "guard_predicted_vs_measured.png").read_bytes()[:4] == b"\x89PNG"
    text = write_report_md(tmp_path, settings, results, plots).read_text()
    assert "## Guard: per-request bound on KL to full" in text
    assert "| rerope+sink+guard:0.2 | given | 0.2 | 4 | 100% | 75% | 462 | 0.46x |" in text


def copy_rows(rows):
    return json.loads(json.dumps(rows))


# -- the deterministic dev/test split -------------------------------------------------------

def test_split_shares_no_question_and_is_deterministic(tmp_path):
    from kvlib.bench.split import split_records, write_split

    records = [{"question": f"Q{i % 7}?", "answer": str(i)} for i in range(20)]  # each question asked 2-3 times
    records.append({"question": "  q0 ", "answer": "again"})  # the same question, written differently
    dev, test = split_records(records, 6)
    assert len(dev) + len(test) == len(records) and len(test) >= 6
    norm = lambda part: {r["question"].strip().lower().rstrip("?") for r in part}  # noqa: E731
    assert not norm(dev) & norm(test), "a question on both sides"
    assert split_records(list(reversed(records)), 6)[1] == list(reversed(test)), "file order must not matter"
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(records))
    written = write_split(path, tmp_path / "split", 6)
    assert json.loads((tmp_path / "split" / "test.json").read_text()) == test and written["n_test"] == len(test)
    with pytest.raises(InputError, match="--test must lie"):
        split_records(records, 0)


@pytest.mark.parametrize("args, expected", [
    (["--holdout", "0.95"], "--holdout must lie in [0, 0.9)"),
    (["--confidence", "1.0"], "--confidence must lie in [0.5, 1)"),
    (["--encoding", "sideways"], "unknown encoding 'sideways'"),
    (["--target", "oracle"], "unknown --target 'oracle'"),
])
def test_calibrate_refuses_bad_options_before_loading_a_model(args, expected, tmp_path):
    from typer.testing import CliRunner

    from kvlib.cli.app import app

    result = CliRunner().invoke(app, ["calibrate", "--data", "nowhere.json", "--home", str(tmp_path), *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and expected in lines[0], result.output
    assert not any(tmp_path.iterdir()), "nothing may be written before the options are checked"


def test_calibrate_takes_one_of_data_or_rows_and_checks_rows_before_loading_a_model(tmp_path):
    from typer.testing import CliRunner

    from kvlib.cli.app import app

    home = tmp_path / "home"
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": [{"kl": [1]}], "encoding": "sink"}')
    cases = [([], "give one of --data FILE"), (["--data", "x.json", "--rows", "y.json"], "give one of --data FILE"),
             (["--rows", str(tmp_path / "missing.json")], "no such file"),
             (["--rows", str(bad)], "has no measured rows of this ladder")]
    for args, expected in cases:
        result = CliRunner().invoke(app, ["calibrate", "--home", str(home), *args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and expected in lines[0], (args, result.output)
    assert not home.exists(), "nothing may be written before the input is checked"


def test_gold_target_on_unlabeled_records_names_the_label_free_target_before_loading_a_model(tmp_path):
    from typer.testing import CliRunner

    from kvlib.cli.app import app

    data = tmp_path / "unlabeled.json"
    data.write_text(json.dumps([{"question": "Where is the viaduct?", "context": [["Skelder", [VIADUCT]]]}]))
    home = tmp_path / "home"
    result = CliRunner().invoke(app, ["calibrate", "--data", str(data), "--home", str(home)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "no answers" in lines[0] and "--target full" in lines[0]
    assert not home.exists(), "nothing may be written before the data is checked"


def test_rows_are_read_on_the_ladder_they_were_measured_on(tmp_path):
    """A calibrate.json names its ladder; one written before it did holds the legacy four rungs."""
    from kvlib.bench.calibrate import read_rows
    from kvlib.engine.guard import LEGACY_LADDER
    from kvlib.errors import InputError

    def rows_file(name, n_rungs, **extra):
        row = {"features": {f: 0.0 for f in FEATURES}, "kl": [0.1] * n_rungs, "ttft_s": [0.1] * (n_rungs + 1)}
        path = tmp_path / name
        path.write_text(json.dumps({"encoding": "sink", "rows": [row, row], **extra}))
        return path

    assert read_rows(rows_file("legacy.json", len(LEGACY_LADDER)))["ladder"] == list(LEGACY_LADDER)
    assert read_rows(rows_file("two.json", 2, ladder=["", "blend:0.3"]))["ladder"] == ["", "blend:0.3"]
    for path in (rows_file("short.json", 2, ladder=["", "blend:0.2", "blend:0.3"]), rows_file("old.json", len(LADDER))):
        with pytest.raises(InputError, match="no measured rows of this ladder"):
            read_rows(path)


# -- the real model (slow): one small calibration, used by calibrate, bench, query and serve --

HOTPOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa" / "qa_train.json"
VIADUCT = ("The Skelder Viaduct carries the main line across the Tarrow Gorge on eleven stone arches. It was built "
           "between 1861 and 1864 and reopened in 2023 after a fourteen-month restoration.\n\nThe Tarrow Gorge is "
           "forty metres deep at the viaduct, and the river below floods most winters.\n")


def unlabeled_hotpot(tmp_path: Path, n: int) -> Path:
    """The first n HotpotQA records with their answers taken out, as a file (skips without the shared data)."""
    if not HOTPOT.is_file():
        pytest.skip(f"needs the shared HotpotQA data at {HOTPOT}")
    records = json.loads(HOTPOT.read_text())[:n]
    for r in records:
        del r["answer"]
    data = tmp_path / "unlabeled.json"
    data.write_text(json.dumps(records))
    return data


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, make_home, smol_engine):
    """12 HotpotQA questions with 3 passages each, calibrated at 0.8 (3 held back, 4 fit, 5 calibrate)."""
    from kvlib.bench.calibrate import run_calibrate

    if not HOTPOT.is_file():
        pytest.skip(f"needs the shared HotpotQA data at {HOTPOT}")
    root = tmp_path_factory.mktemp("guard")
    data = root / "dev.json"
    data.write_text(json.dumps(json.loads(HOTPOT.read_text())[:12]))
    home = make_home(root)
    report = run_calibrate(data=str(data), home=home, ctxs=3, holdout=0.25, confidence=0.8, engine=smol_engine)
    return home, data, report


@pytest.mark.slow
def test_a_small_calibrate_run_stores_what_it_checked(calibrated, smol_engine, monkeypatch):
    from rich.console import Console

    from kvlib.cli import calibrate_cmd
    from kvlib.store.library import Library

    home, _, report = calibrated
    assert (report["requests"], report["n_fit"], report["n_cal"], report["n_test"]) == (12, 4, 5, 3)
    assert "quantile" not in report and report["method"].startswith("ridge")
    assert len(report["rows"]) == 12 and all(len(r["kl"]) == len(LADDER) and min(r["kl"]) >= 0 for r in report["rows"])
    means = [r["mean_kl"] for r in report["rungs"]]
    assert means[0] > means[-1] > 0, f"the top rung should sit closer to full than plain rerope: {means}"
    held = report["held_back"]
    assert held["n"] == 3 and all(0 <= g["within_budget"] <= 1 for g in held["budgets"].values())
    # 5 calibration requests at 0.8: (5 + 1) * 0.2 - 1 = 0.2, so no loss allowed, yet a finite slack
    assert all(g["slack"] is not None for g in held["budgets"].values())
    assert set(held["budgets"]) == {"0.05", "0.1", "0.2", "0.3"}
    with Library(home) as library:
        stored = Calibration.from_dict(library.calibration(smol_engine.lm.fingerprint, "sink"))
    assert stored.report["held_back"] == held and stored.features == FEATURES and stored.n_cal == 5
    out = io.StringIO()
    monkeypatch.setattr(calibrate_cmd, "console", Console(file=out, width=160))
    calibrate_cmd.render({**report, "seconds": 1.0})
    text = out.getvalue()
    assert "slack" in text and "served without full" in text and "4 fit, 5 calibrate, 3 held" in text


@pytest.mark.slow
def test_target_full_calibrates_unlabeled_records_along_full_recomputes_own_answer(tmp_path, make_home, smol_engine):
    """No gold answers: each request's KL is measured along full's greedy answer, which it teacher-forces."""
    from kvlib.bench.calibrate import TARGET_TOKENS, run_calibrate
    from kvlib.bench.data import load_records
    from kvlib.bench.runner import BenchConfig, BenchRunner
    from kvlib.engine.compose import ChunkKV
    from kvlib.store.library import Library

    data, home = unlabeled_hotpot(tmp_path, 6), make_home(tmp_path)
    report = run_calibrate(data=str(data), home=home, ctxs=1, holdout=0, confidence=0.5, target="full",
                           engine=smol_engine)
    assert report["target"] == "full" and report["requests"] == 6
    first = load_records(data, limit=1, ctxs=1, answers=False).records
    assert first[0].answers == ()
    # the first request's target is full's own greedy answer to the same ids (its length, at most TARGET_TOKENS)
    with Library(home) as library:
        runner = BenchRunner(smol_engine, library, BenchConfig(modes=[FULL], orders=["given"], chunk_tokens=512))
        item = runner.items(first, runner.prepare(first), "given")[0]
    chunks = [ChunkKV(torch.tensor(ids), None, None) for ids in item.chunk_ids]
    answer = smol_engine.answer(FULL, chunks, suffix_ids=item.suffix_ids, max_new_tokens=TARGET_TOKENS)
    assert report["rows"][0]["target_tokens"] == max(len(answer.token_ids), 1)
    assert all(len(r["kl"]) == len(LADDER) and min(r["kl"]) >= 0 for r in report["rows"])


@pytest.mark.slow
def test_a_calibration_cut_short_resumes_from_its_rows_and_measures_only_the_rest(tmp_path, make_home, smol_engine,
                                                                                 monkeypatch):
    """Each request's row is on disk once measured: after a crash at the third request, the same run
    measures only the four it lacks, and the rows it took back are the ones measured before."""
    from kvlib.bench import calibrate

    if not HOTPOT.is_file():
        pytest.skip(f"needs the shared HotpotQA data at {HOTPOT}")
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(json.loads(HOTPOT.read_text())[:6]))  # the fewest that fit (3) and calibrate
    home, rows_file = make_home(tmp_path), tmp_path / "out" / "rows.jsonl"
    real, measured = calibrate.measure_request, []

    def measure(runner, item, rungs, target="gold"):
        if len(measured) == 2 and not resumed:
            raise KeyboardInterrupt("killed")  # the run dies while measuring its third request
        measured.append(item.record_id)
        return real(runner, item, rungs, target)

    monkeypatch.setattr(calibrate, "measure_request", measure)
    resumed = False
    kwargs = dict(data=str(data), home=home, ctxs=1, holdout=0, confidence=0.5, engine=smol_engine, rows_file=rows_file)
    with pytest.raises(KeyboardInterrupt):
        calibrate.run_calibrate(**kwargs)
    first_two = [json.loads(line) for line in rows_file.read_text().splitlines()[1:]]
    assert [r["record"] for r in first_two] == measured
    resumed = True
    report = calibrate.run_calibrate(**kwargs)
    assert report["resumed_rows"] == 2 and report["requests"] == 6 and len(measured) == 6
    assert report["rows"][:2] == first_two, "the rows taken back are not the ones measured before"
    assert [r["record"] for r in report["rows"][2:]] == measured[2:]
    with pytest.raises(InputError, match="differs in: target"):  # another setting never mixes with these rows
        calibrate.run_calibrate(**{**kwargs, "target": "full"})


@pytest.mark.slow
def test_rows_refit_reproduces_the_calibration_and_refuse_another_model(calibrated, smol_engine, kvlib_cli, tmp_path):
    from kvlib.bench.calibrate import write_calibrate_report
    from kvlib.store.library import Library

    home, _, report = calibrated
    rows = write_calibrate_report(tmp_path, report)
    with Library(home) as library:
        before = library.calibration(smol_engine.lm.fingerprint, "sink")
    result = kvlib_cli("calibrate", "--rows", rows, "--home", home, "--dtype", "float32", "--holdout", 0.25,
                       "--confidence", 0.8, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["requests"], out["n_fit"], out["n_cal"], out["n_test"]) == (12, 4, 5, 3)
    assert out["held_back"] == report["held_back"], "the same rows and seed must give the same check"
    with Library(home) as library:
        after = library.calibration(smol_engine.lm.fingerprint, "sink")
    assert Calibration.from_dict(after) == Calibration.from_dict(before), "a refit of the same rows is the same fit"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(rows.read_text()), "fingerprint": "0" * 64, "model": "elsewhere"}))
    wrong = kvlib_cli("calibrate", "--rows", other, "--home", home, "--dtype", "float32")
    lines = wrong.stderr.strip().splitlines()
    assert wrong.exit_code == 1 and len(lines) == 1 and "was measured on elsewhere" in lines[0], wrong.output


@pytest.mark.slow
def test_bench_guard_zero_is_full_and_huge_is_rerope_request_by_request(calibrated, kvlib_cli, tmp_path):
    home, data, _ = calibrated
    result = kvlib_cli("bench", "--data", data, "--limit", 2, "--ctxs", 3, "--home", home, "--dtype", "float32",
                       "--modes", "full,rerope,rerope+guard:0,rerope+guard:1000000", "--max-new-tokens", 2,
                       "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["mode"]: r for r in json.loads(result.stdout)["results"]}
    zero, huge = rows["rerope+sink+guard:0"], rows["rerope+sink+guard:1000000"]
    assert [p["fell_back"] for p in zero["per_request"]] == [True, True]
    assert [p["kl_to_full"] for p in zero["per_request"]] == [0.0, 0.0], "B = 0 must answer exactly as full"
    assert [p["rung"] for p in huge["per_request"]] == ["rerope", "rerope"]
    assert huge["kl_per_request"] == rows["rerope+sink"]["kl_per_request"], "B huge must answer exactly as rerope"
    assert set(huge["per_request"][0]) == {"kl_to_full", "predicted_kl", "kl_bound", "rung", "fell_back", "ttft_s"}
    assert "## Guard" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "guard_predicted_vs_measured.png").is_file()


@pytest.mark.slow
def test_bench_kl_target_full_measures_along_fulls_answer_as_calibrate_does(calibrated, smol_engine, kvlib_cli,
                                                                            tmp_path):
    """`--kl-target full`: each mode's KL is the one calibrate --target full measures for the same request
    (full's greedy answer, decoded by full's reference run, forced on every mode), to the bit; a guard
    calibrated along the gold answers and checked along full's is named in the findings."""
    from kvlib.bench import calibrate
    from kvlib.bench.data import load_records
    from kvlib.bench.runner import BenchConfig, BenchRunner
    from kvlib.engine.guard import rung_spec
    from kvlib.store.library import Library

    home, data, _ = calibrated
    result = kvlib_cli("bench", "--data", data, "--limit", 2, "--ctxs", 3, "--home", home, "--dtype", "float32",
                       "--modes", "full,rerope,rerope+guard:1000000", "--max-new-tokens", 2, "--kl-target", "full",
                       "--out", tmp_path)
    assert result.exit_code == 0, result.output
    said = " ".join(result.stdout.split())  # the console wraps lines
    assert "checked here along the full recompute's own answers: rerun with --kl-target gold" in said
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["kl_target"] == "full"
    rows = {r["mode"]: r for r in results["results"]}
    assert rows["full"]["kl_per_request"] == [0.0, 0.0] and rows["rerope+sink"]["kl_target"] == "full"
    records = load_records(data, limit=2, ctxs=3).records
    with Library(home) as library:
        rerope = rung_spec("sink", "")
        runner = BenchRunner(smol_engine, library, BenchConfig(modes=[rerope], orders=["given"], max_new_tokens=2))
        items = runner.items(records, runner.prepare(records), "given")
        along_full = [calibrate.measure_request(runner, item, [rerope], "full")["kl"][0] for item in items]
    assert rows["rerope+sink"]["kl_per_request"] == along_full
    bad = kvlib_cli("bench", "--data", data, "--limit", 1, "--home", home, "--kl-target", "answers", "--out", tmp_path)
    assert bad.exit_code == 1 and "unknown --kl-target 'answers'" in bad.stderr


@pytest.mark.slow
def test_bench_kl_target_full_reads_records_without_answers(kvlib_cli, tmp_path, make_home):
    """Along full's own answer the bench needs no gold answers: F1 and EM are then absent, not zero;
    along the gold answers the same records are refused."""
    data, home, out = unlabeled_hotpot(tmp_path, 2), make_home(tmp_path), tmp_path / "out"
    ok = kvlib_cli("bench", "--data", data, "--ctxs", 2, "--home", home, "--dtype", "float32", "--modes",
                   "full,rerope", "--max-new-tokens", 2, "--kl-target", "full", "--out", out)
    assert ok.exit_code == 0, ok.output
    rows = {r["mode"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert rows["rerope+sink"]["f1"] is None and rows["rerope+sink"]["em"] is None
    assert rows["rerope+sink"]["kl_to_full"] > 0 and rows["full"]["kl_to_full"] == 0
    assert (out / "quality_by_mode.png").is_file() and "| – |" in (out / "report.md").read_text()
    gold = kvlib_cli("bench", "--data", data, "--ctxs", 2, "--home", home, "--modes", "rerope", "--out", out)
    lines = gold.stderr.strip().splitlines()
    assert gold.exit_code == 1 and len(lines) == 1 and "no answers" in lines[0] and "`--kl-target full`" in lines[0]


@pytest.mark.slow
def test_query_reports_the_guard_and_refuses_an_uncalibrated_encoding(calibrated, smol_stack, kvlib_cli, tmp_path):
    from kvlib.rag.ingest import Ingestor

    home, _, _ = calibrated
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "viaduct.txt").write_text(VIADUCT)
    stack = smol_stack(home)
    try:
        Ingestor(stack.engine, stack.library, stack.index, stack.embedder, chunk_tokens=32).run([tmp_path / "docs"])
    finally:
        stack.close()
    question = "How many arches does the Skelder Viaduct have?"
    ok = kvlib_cli("query", question, "--home", home, "--k", 2, "--mode", "rerope+guard:1000000", "--json",
                   "--dtype", "float32", "--max-new-tokens", 3)
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout)
    assert out["mode"] == "rerope+sink+guard:1000000" and out["guard"]["rung"] == "rerope"
    assert not out["guard"]["fell_back"] and out["guard"]["predicted_kl"] >= 0
    missing = kvlib_cli("query", question, "--home", home, "--mode", "rerope+lead+guard:0.2", "--dtype", "float32")
    lines = missing.stderr.strip().splitlines()
    assert missing.exit_code == 1 and len(lines) == 1, missing.output
    assert lines[0].startswith("error: no guard calibration") and "encoding lead" in lines[0], lines[0]


@pytest.mark.slow
def test_bench_guard_without_calibration_is_one_error_line(tmp_path, make_home, kvlib_cli):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"question": "Q?", "answers": ["a"], "ctxs": [{"title": "", "text": "Some text."}]}]))
    result = kvlib_cli("bench", "--data", data, "--modes", "rerope+guard:0.2", "--home", make_home(tmp_path),
                       "--dtype", "float32", "--out", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "no guard calibration" in lines[0], result.output
    assert not (tmp_path / "out").exists(), "nothing may run before the missing calibration is reported"


@pytest.mark.slow
def test_serve_answers_with_the_guard_and_errors_without_its_calibration(calibrated):
    import openai

    from serve_helpers import Server, add_key

    home, _, _ = calibrated
    server = Server(home, "--mode", "rerope+guard:1000000", "--dtype", "float32")
    try:
        client = server.client(add_key(home, "alice"))
        messages = [{"role": "user", "content": f"{VIADUCT}\nHow many arches does the viaduct have?"}]
        ask = lambda **kw: client.chat.completions.create(model="default", messages=messages, max_tokens=3,  # noqa: E731
                                                         temperature=0, **kw)
        huge = ask().model_extra["kvlib"]
        assert huge["mode"] == "rerope+sink+guard:1000000" and huge["guard"]["rung"] == "rerope"
        zero = ask(extra_body={"kvlib": {"mode": "rerope+guard:0"}})
        assert zero.model_extra["kvlib"]["guard"]["fell_back"] and zero.usage.prompt_tokens_details.cached_tokens == 0
        with pytest.raises(openai.BadRequestError) as caught:
            ask(extra_body={"kvlib": {"mode": "rerope+lead+guard:0.2"}})
        assert caught.value.code == "calibration_missing" and "kvlib calibrate" in caught.value.message
        with pytest.raises(openai.BadRequestError) as caught:
            ask(extra_body={"kvlib": {"mode": "rerope+guard"}})
        assert caught.value.code == "invalid_value" and caught.value.param == "kvlib.mode"
    finally:
        server.stop()
