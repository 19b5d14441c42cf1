"""The guard's held-back check over many random splits of one calibrate.json (numpy only, no model).

    python scripts/guard_splits.py results/guard-smol/calibrate/calibrate.json [--splits 200] [--json]

`kvlib calibrate` stores one calibration from one seeded split; its held-back share within B is
one draw of a quantity risk control bounds only in expectation over the calibration draw. This
refits the same measured rows on many seeded fit / calibrate / held-back splits (as
kvlib.bench.calibrate.split_parts cuts them) and reports, per budget, the mean and spread of the
held-back share within B, the share served without full, and mean TTFT against full's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvlib.bench.calibrate import REPORT_BUDGETS, read_rows, row_arrays, split_parts  # noqa: E402
from kvlib.engine.calibration import evaluate, fit_calibration  # noqa: E402
from kvlib.engine.guard import FEATURES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path)
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--holdout", type=float, default=0.3)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    measured = read_rows(args.rows)
    rows, ladder = measured["rows"], tuple(measured["ladder"])
    x, kl, ttft = row_arrays(rows)
    per_budget: dict = {format(b, "g"): [] for b in REPORT_BUDGETS}
    for seed in range(args.splits):
        fit, cal, test = split_parts(len(rows), args.holdout, seed)
        calib = fit_calibration(x, kl, fit, cal, features=FEATURES, rungs=ladder, confidence=args.confidence,
                                model_fp="", model_name="", encoding="")
        for b, g in evaluate(calib, x[test], kl[test], REPORT_BUDGETS, ttft[test])["budgets"].items():
            per_budget[b].append((g["within_budget"], g["without_full"], g["mean_ttft_vs_full"]))
    out = {"rows": str(args.rows), "n": len(rows), "splits": args.splits, "confidence": args.confidence, "budgets": {}}
    for b, v in per_budget.items():
        a = np.array(v)
        out["budgets"][b] = {"within_mean": a[:, 0].mean(), "within_p10": np.percentile(a[:, 0], 10),
                             "within_p50": np.percentile(a[:, 0], 50), "splits_within_at_confidence":
                             float((a[:, 0] >= args.confidence - 1e-9).mean()),
                             "without_full_mean": a[:, 1].mean(), "ttft_vs_full_mean": a[:, 2].mean()}
    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return
    print(f"{args.rows}: {len(rows)} requests, {args.splits} splits, confidence {args.confidence}")
    print("B      within (mean / p10 / p50)   splits >= conf   without full   mean TTFT vs full")
    for b, g in out["budgets"].items():
        print(f"{b:<6} {g['within_mean']:.3f} / {g['within_p10']:.2f} / {g['within_p50']:.2f}"
              f"          {g['splits_within_at_confidence']:.2f}            {g['without_full_mean']:.3f}"
              f"          {g['ttft_vs_full_mean']:.3f}")


if __name__ == "__main__":
    main()
