"""What a guard could cost on one calibrate.json, with perfect or one-feature foresight (no model run).

    python scripts/guard_frontier.py results/guard-qwen/session29-calibrate/calibrate.json [--feature q_chunk_share]
        [--probes results/guard-qwen/session29-probes/probes.json --feature entropy]

Per rung of the rows' ladder: mean TTFT against full's, the share of requests with KL <= 0.1 and <= 0.2, and the
mean KL. Then, per budget B, two bounds on what any guard over this ladder could do on these rows (in sample,
so optimistic):
- a perfect predictor: each request served by its cheapest rung whose measured KL <= B, full where none is
  (100% within B), and the same with the 10% of requests that would cost most served as rerope instead (the
  error a guard at confidence 0.9 may spend);
- a threshold on one feature: the requests ranked by it (the least first, or the most with --descending), the k
  first served by one rung and the rest by full, k and the rung chosen for the least mean TTFT at >= 90% within B.
A guard's cost lies above the perfect-predictor line; where the one-feature line is far above it, the signal,
not the ladder, is what is missing (docs/guard.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvlib.bench.calibrate import read_rows, row_arrays  # noqa: E402

BUDGETS = (0.1, 0.2)


def perfect(kl: np.ndarray, ttft: np.ndarray, budget: float, spare: float = 0.0) -> tuple[float, float]:
    """(mean TTFT vs full, share served without full) choosing each request's cheapest rung within budget;
    `spare` of the requests (those that would cost most) served as rerope whatever their KL."""
    full = ttft[:, -1]
    ok = kl <= budget
    cost = np.where(ok, ttft[:, :-1], np.inf).min(axis=1)
    served = np.isfinite(cost)
    cost = np.where(served, cost, full)
    n_spare = int(spare * len(cost))
    if n_spare:
        worst = np.argsort(ttft[:, 0] - cost)[:n_spare]  # the largest savings from serving rerope
        cost[worst], served[worst] = ttft[worst, 0], True
    return float(cost.sum() / full.sum()), float(served.mean())


def one_feature(kl, ttft, x: np.ndarray, budget: float, ladder, descending: bool):
    """The least mean TTFT at >= 90% within budget: (cost, rung, k); k = 0 (all full) always qualifies."""
    order = np.argsort(-x if descending else x)
    full, best = ttft[:, -1], None
    for j, name in enumerate(ladder):
        for k in range(len(x) + 1):
            head, rest = order[:k], order[k:]
            within = ((kl[head, j] <= budget).sum() + len(rest)) / len(x)
            cost = (ttft[head, j].sum() + full[rest].sum()) / full.sum()
            if within >= 0.9 and (best is None or cost < best[0]):
                best = (float(cost), name or "rerope", k)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path)
    ap.add_argument("--feature", default="q_chunk_share")
    ap.add_argument("--descending", action="store_true", help="serve the requests with the most of the feature first")
    ap.add_argument("--probes", type=Path, help="scripts/guard_probes.py's probes.json for the same rows: its probes "
                    "(entropy, kl_reversed, ...) become features too (their own cost is not counted)")
    args = ap.parse_args()
    measured = read_rows(args.rows)
    rows, ladder = measured["rows"], measured["ladder"]
    if args.probes:
        import json

        probes = {r["record"]: r["probes"] for r in json.loads(args.probes.read_text())["rows"]}
        for r in rows:
            r["features"] = {**r["features"], **{k: v for k, v in probes.get(r["record"], {}).items()
                                                 if isinstance(v, (int, float))}}
    _, kl, ttft = row_arrays(rows)
    full = ttft[:, -1].mean()
    print(f"{args.rows}: {len(rows)} requests")
    print("| rung | mean TTFT vs full | KL <= 0.1 | KL <= 0.2 | mean KL |\n|---|---:|---:|---:|---:|")
    for j, name in enumerate(ladder):
        print(f"| {name or 'rerope'} | {ttft[:, j].mean() / full:.3f}x | {(kl[:, j] <= 0.1).mean():.0%} | "
              f"{(kl[:, j] <= 0.2).mean():.0%} | {kl[:, j].mean():.3f} |")
    x = np.array([np.nan if r["features"].get(args.feature) is None else r["features"][args.feature] for r in rows])
    for budget in BUDGETS:
        cost, served = perfect(kl, ttft, budget)
        spare_cost, _ = perfect(kl, ttft, budget, spare=0.1)
        print(f"B = {budget}: perfect predictor {cost:.3f}x full's mean TTFT ({served:.0%} without full, all within B); "
              f"with 10% spared {spare_cost:.3f}x")
        best = one_feature(kl, ttft, np.nan_to_num(x, nan=np.nanmean(x)), budget, ladder, args.descending)
        print(f"  threshold on {args.feature}: {best[0]:.3f}x, {best[1]} for the {best[2]} "
              f"{'most' if args.descending else 'least'}, full for the rest")


if __name__ == "__main__":
    main()
