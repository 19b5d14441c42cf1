"""The guard fitted on one calibrate.json's rows (as `kvlib calibrate --rows ... --holdout 0` fits it) and checked
on another's: requests it never saw, measured the same way (same model, ladder and target), e.g. the test
questions' rows written by `kvlib calibrate --data test.json --out DIR`. Prints, per budget, the share within B,
the share served without full, mean TTFT against full's and the rungs taken; and, per fixed rung, its share within
each B and its mean TTFT against full's, for comparison at equal cost. numpy only, no model.

    python scripts/guard_check_rows.py DEV/calibrate.json TEST/calibrate.json [--confidence 0.9] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvlib.bench.calibrate import REPORT_BUDGETS, read_rows, row_arrays, split_parts  # noqa: E402
from kvlib.engine.calibration import evaluate, fit_calibration  # noqa: E402
from kvlib.engine.guard import FEATURES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dev", type=Path)
    ap.add_argument("test", type=Path)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dev, test = read_rows(args.dev), read_rows(args.test)
    for key in ("ladder", "fingerprint", "target"):
        if dev.get(key, "gold") != test.get(key, "gold"):
            sys.exit(f"the two files differ in {key}: {dev.get(key)} against {test.get(key)}")
    x, kl, _ = row_arrays(dev["rows"])
    fit, cal, _ = split_parts(len(x), 0.0, args.seed)
    calib = fit_calibration(x, kl, fit, cal, features=FEATURES, rungs=tuple(dev["ladder"]),
                            confidence=args.confidence, model_fp="", model_name="", encoding="")
    tx, tkl, tttft = row_arrays(test["rows"])
    check = evaluate(calib, tx, tkl, REPORT_BUDGETS, tttft)
    print(f"fit {len(fit)} / calibrate {len(cal)} on {args.dev}; checked on {len(tx)} requests of {args.test} "
          f"(target {test.get('target', 'gold')}, confidence {args.confidence})")
    print("| B | within B | served without full | mean TTFT vs full | rungs |")
    print("|---|---:|---:|---:|---|")
    for b, g in check["budgets"].items():
        rungs = ", ".join(f"{k} {v}" for k, v in g["rungs"].items())
        print(f"| {b} | {g['within_budget']:.0%} | {g['without_full']:.0%} | {g['mean_ttft_vs_full']:.2f}x | {rungs} |")
    full_ttft = tttft[:, -1].mean()
    print("\n| fixed rung | " + " | ".join(f"within {b:g}" for b in REPORT_BUDGETS) + " | mean TTFT vs full |")
    print("|---|" + "---:|" * (len(REPORT_BUDGETS) + 1))
    for j, name in enumerate(dev["ladder"]):
        shares = " | ".join(f"{np.mean(tkl[:, j] <= b):.0%}" for b in REPORT_BUDGETS)
        print(f"| {name or 'rerope'} | {shares} | {tttft[:, j].mean() / full_ttft:.2f}x |")


if __name__ == "__main__":
    main()
