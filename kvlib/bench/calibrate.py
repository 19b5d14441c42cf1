"""`kvlib calibrate`: fit the guard's predictor for one model on development questions.

Design facts:
- The data, tokenization, ingest and quality pass are the bench's (BenchRunner, ModeRunner):
  each record becomes one request (its passages in the given order), answered by full and
  by every rung of guard.LADDER through Engine.answer, its KL to full measured by the same
  teacher-forced pass the bench uses (no attention recorded, one decoded token: only the
  gold answer's logits matter here). The guard's features come from Engine.guard_features,
  the very measurement a guarded answer makes.
- Records are split at random (seeded) into three disjoint parts: `holdout` of them held
  back, and the rest halved into a fitting part (the ridge) and a calibration part (the
  risk control of each budget's slack; calibration.py says why). The stored calibration never saw the
  held-back part, so the coverage reported on it is an honest check of the stated bound.
- What KL is measured along (`target`): "gold", the record's gold answer, teacher-forced (the
  bench's quality pass); or "full", full recompute's own greedy answer (its first TARGET_TOKENS
  tokens), teacher-forced the same way for every rung, which needs no gold answer: a calibration
  on unlabeled prompts like the traffic (questions and passages only). Both measure the answer's
  distribution against full's, position by position; "full" along the answer full would give.
  Full's answer is decoded in its reference run and forced on that run's own context KV (one
  full prefill per request, not two: the same KL to the bit, ~15% less time a request).
- The calibration is stored in the library with the model's fingerprint and the encoding
  (store/calibrations.py); a new run replaces the old one.
- `refit` fits again from the rows an earlier run measured (its calibrate.json), without
  measuring: a change of predictor or split needs no new hour of model time. The rows must
  have been measured on the model being calibrated (same fingerprint).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from kvlib.bench.row_log import RowLog
from kvlib.engine.spec import ENCODINGS
from kvlib.errors import InputError

REPORT_BUDGETS = (0.05, 0.1, 0.2, 0.3)
TARGETS = ("gold", "full")  # what KL to full is measured along (module docstring)
TARGET_TOKENS = 16  # of full's greedy answer, for target "full"


def check_options(holdout: float, confidence: float, encoding: str, target: str = "gold") -> None:
    if not 0.0 <= holdout < 0.9:
        raise InputError(f"--holdout must lie in [0, 0.9), got {holdout}")
    if not 0.5 <= confidence < 1.0:
        raise InputError(f"--confidence must lie in [0.5, 1), got {confidence}")
    if encoding not in ENCODINGS:
        raise InputError(f"unknown encoding '{encoding}'; choose {', '.join(ENCODINGS)}")
    check_target(target)


def check_target(target: str, option: str = "--target") -> None:
    if target not in TARGETS:
        raise InputError(f"unknown {option} '{target}'; choose gold (the records' answers) or full (full recompute's "
                         "own answer: no answers needed)")


def split_parts(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit, cal, test) row indices: `holdout` of n held back, the rest halved; seeded, disjoint."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(holdout * n))
    dev = order[n_test:]
    return np.sort(dev[: len(dev) // 2]), np.sort(dev[len(dev) // 2:]), np.sort(order[:n_test])


def measure_request(runner, item, rungs, target: str = "gold") -> dict:
    """One request: the guard's features, and KL to full and TTFT for every rung (and full)."""
    from kvlib.bench.metrics import kl_divergence

    runner.first_read(item)
    ref, item = runner.reference(item, target)
    chunks, _ = runner.modes.load_chunks(item, rungs[0])
    features = runner.engine.guard_features(chunks, item.suffix_ids)
    kls, ttfts = [], []
    for spec in rungs:
        sample = runner.modes.run(item, spec)
        kls.append(kl_divergence(ref.gold_logits, sample.gold_logits))
        ttfts.append(sample.ttft)
    features = {k: None if math.isnan(v) else v for k, v in features.items()}  # JSON: a missing one is null
    return {"record": item.record_id, "features": features, "kl": kls, "ttft_s": ttfts + [ref.ttft],
            "target_tokens": len(item.gold_ids)}


def run_calibrate(*, data: str, home: Path, model=None, dtype=None, limit=None, ctxs=None, holdout: float = 0.3,
                  confidence: float = 0.9, encoding: str = "sink", seed: int = 0, chunk_tokens: int = 512,
                  target: str = "gold", progress=None, engine=None, rows_file: Path | None = None) -> dict:
    """Measure, fit, check on the held-back part, store; returns the report (with the rows measured).
    rows_file: each request's row is kept there as it is measured, and a run cut short resumes from it
    (bench/row_log.py)."""
    from kvlib.bench.runner import BenchConfig, BenchRunner
    from kvlib.engine.guard import LADDER, rung_spec
    from kvlib.rag.stack import open_stack

    check_options(holdout, confidence, encoding, target)
    records = load_calibration_records(data, limit=limit, ctxs=ctxs, seed=seed, target=target)  # before the model
    t0 = time.perf_counter()
    stack = open_stack(home, model=model, dtype=dtype, engine=engine)
    try:
        rungs = [rung_spec(encoding, r) for r in LADDER]
        config = BenchConfig(modes=rungs, orders=["given"], seed=seed, max_new_tokens=1, chunk_tokens=chunk_tokens,
                             data=str(data))
        runner = BenchRunner(stack.engine, stack.library, config)
        runner.modes.attention = False
        items = runner.items(records, runner.prepare(records, progress), "given")
        log = row_log(rows_file, stack.engine.lm, data=data, ctxs=ctxs, seed=seed, encoding=encoding, target=target,
                      chunk_tokens=chunk_tokens)
        done = log.open() if log is not None else {}
        resumed = sum(str(item.record_id) in done for item in items)
        if resumed and progress:
            progress(f"measured before, in {rows_file}", resumed, len(items))
        if any(str(item.record_id) not in done for item in items):
            runner.warm_up(items)
        rows = []
        for item in items:
            row = done.get(str(item.record_id))
            if row is None:
                row = measure_request(runner, item, rungs, target)
                if log is not None:
                    log.append(row)
            rows.append(row)
            if progress:
                progress("measure", 1, len(items))
        report = fit_and_store(stack.library, stack.engine.lm, rows, ladder=LADDER, holdout=holdout,
                               confidence=confidence, encoding=encoding, seed=seed, data=str(data), ctxs=ctxs,
                               target=target)
    finally:
        stack.close()
    report["seconds"] = time.perf_counter() - t0
    report["resumed_rows"] = resumed
    return report


def row_log(path: Path | None, lm, *, data: str, **settings) -> RowLog | None:
    """The log of a run's measured rows, its identity what the rows' numbers depend on."""
    from kvlib import __version__
    from kvlib.engine.guard import LADDER

    if path is None:
        return None
    identity = {"kvlib": __version__, "model": lm.name, "fingerprint": lm.fingerprint,
                "dtype": str(lm.dtype).replace("torch.", ""), "data": str(Path(data).resolve()), "ladder": list(LADDER),
                **settings}
    if settings.get("target") == "full":
        identity["target_tokens"] = TARGET_TOKENS
    return RowLog(path, identity)


def load_calibration_records(data: str, *, limit, ctxs, seed: int, target: str) -> list:
    """The records to calibrate on; target "gold" needs their answers, and says so when none has one."""
    return load_targeted(data, limit=limit, ctxs=ctxs, seed=seed, target=target).records


def load_targeted(data: str, *, limit, ctxs, seed: int, target: str, option: str = "--target"):
    """load_records for KL along `target`: "gold" needs the records' answers, and an error for records
    without any names `OPTION full`, which needs none."""
    from kvlib.bench.data import load_records

    try:
        return load_records(data, limit=limit, ctxs=ctxs, seed=seed, answers=target == "gold")
    except InputError as exc:
        if target == "gold" and "no answers" in str(exc):
            raise InputError(f"{exc}; `{option} full` measures KL along full recompute's own answers, "
                             "with no gold answers needed") from None
        raise


def row_arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Measured rows as arrays: features [N, F] (a missing one NaN), KL per rung [N, R], TTFT per rung and full [N, R+1]."""
    from kvlib.engine.guard import FEATURES

    x = np.array([[np.nan if r["features"][f] is None else r["features"][f] for f in FEATURES] for r in rows],
                 dtype=float)
    return x, np.array([r["kl"] for r in rows], dtype=float), np.array([r["ttft_s"] for r in rows], dtype=float)


def fit_and_store(library, lm, rows: list[dict], *, ladder, holdout: float, confidence: float, encoding: str,
                  seed: int, data: str, ctxs: int | None = None, target: str = "gold") -> dict:
    """Fit on the fitting part, calibrate on the calibration part, check on the held-back part, store.
    rows: measured on `ladder` (each row's kl per rung, ttft_s per rung and full)."""
    from kvlib.engine.calibration import METHOD, evaluate, fit_calibration
    from kvlib.engine.guard import FEATURES

    x, kl, ttft = row_arrays(rows)
    fit, cal, test = split_parts(len(rows), holdout, seed)
    calibration = fit_calibration(x, kl, fit, cal, features=FEATURES, rungs=tuple(ladder), confidence=confidence,
                                  model_fp=lm.fingerprint, model_name=lm.name, encoding=encoding)
    check = evaluate(calibration, x[test], kl[test], REPORT_BUDGETS, ttft[test]) if len(test) else None
    report = {"model": lm.name, "fingerprint": lm.fingerprint, "encoding": encoding, "data": data, "ctxs": ctxs,
              "target": target, "method": METHOD, "confidence": confidence, "ladder": list(ladder),
              "requests": len(rows), "n_fit": len(fit), "n_cal": len(cal), "n_test": len(test), "seed": seed,
              "rungs": [{"rung": r.name or "rerope", "ridge": r.ridge, "sigma": r.sigma,
                         "mean_kl": float(kl[:, i].mean())} for i, r in enumerate(calibration.rungs)],
              "held_back": check}
    calibration = dataclasses.replace(calibration, report=report)
    library.register_model(lm.fingerprint, lm.name, lm.config_summary)
    library.put_calibration(lm.fingerprint, encoding, calibration.to_dict(), method=METHOD, confidence=confidence)
    return {**report, "rows": rows}


def run_refit(*, rows_file: Path, home: Path, model=None, dtype=None, holdout: float = 0.3, confidence: float = 0.9,
              seed: int = 0, engine=None) -> dict:
    """Fit, check and store again from the rows of an earlier run's calibrate.json (no measuring)."""
    from kvlib.rag.stack import open_stack

    earlier = read_rows(rows_file)  # bad input fails before the model loads
    check_options(holdout, confidence, earlier["encoding"])
    t0 = time.perf_counter()
    stack = open_stack(home, model=model, dtype=dtype, engine=engine)
    try:
        lm = stack.engine.lm
        if earlier.get("fingerprint") != lm.fingerprint:
            raise InputError(f"{rows_file} was measured on {earlier.get('model')} ({str(earlier.get('fingerprint'))[:12]}), "
                             f"not on {lm.name} ({lm.fingerprint[:12]}): pass the --model (and --dtype) it was measured with")
        report = fit_and_store(stack.library, lm, earlier["rows"], ladder=earlier["ladder"], holdout=holdout,
                               confidence=confidence, encoding=earlier["encoding"], seed=seed,
                               data=earlier.get("data", ""), ctxs=earlier.get("ctxs"),
                               target=earlier.get("target", "gold"))
    finally:
        stack.close()
    report["seconds"] = time.perf_counter() - t0
    report["refit_from"] = str(rows_file)
    return report


def read_rows(path: Path) -> dict:
    """An earlier calibrate.json, checked for what a refit needs; its `ladder` is the rungs its
    rows were measured on (guard.LEGACY_LADDER for files written before it was recorded)."""
    from kvlib.engine.guard import FEATURES, LEGACY_LADDER

    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a calibrate.json: {exc}") from None
    rows = obj.get("rows") if isinstance(obj, dict) else None
    ladder = obj.get("ladder", list(LEGACY_LADDER)) if isinstance(obj, dict) else []
    if not rows or obj.get("encoding") not in ENCODINGS or not isinstance(ladder, list) or any(
            not isinstance(r, dict) or len(r.get("kl", ())) != len(ladder) or len(r.get("ttft_s", ())) != len(ladder) + 1
            or set(FEATURES) - set(r.get("features") or {}) for r in rows):
        raise InputError(f"{path} has no measured rows of this ladder and these features: "
                         "write it with `kvlib calibrate --out DIR` first")
    return {**obj, "ladder": ladder}


def write_calibrate_report(out: Path, report: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "calibrate.json"
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return path
