"""The Guard table and the predicted-against-measured plot of a bench run with `+guard:B` modes.

Design facts:
- Read from result rows only: a guard row's `per_request` (measured KL, prediction, rung,
  fall-back, TTFT per request) and every row's `kl_per_request`, in the same record order.
- "Within B" is measured KL to full <= B, request by request; "served without full" is
  the share that did not fall back. Mean TTFT is compared with full's mean in the same order.
- The comparison a fixed budget must win: among the run's fixed reuse modes (rerope or
  naive, any fixed repair) whose mean TTFT is no more than the guard's, the one with the
  largest share within the same B. A guard that is slower than every fixed mode has none.
- matplotlib is imported inside the plot (see plots.py).
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KL_FLOOR = 1e-4  # where a KL of 0 (full) is drawn on the log axes


def share_within(kls: list, budget: float) -> float | None:
    kls = [k for k in kls if k is not None]
    return sum(k <= budget for k in kls) / len(kls) if kls else None


def mean_ttft(row: dict) -> float:
    return row["ttft_s"].get("mean", row["ttft_s"]["median"])


def is_fixed_reuse(row: dict) -> bool:
    spec = row["spec"]
    return spec["base"] in ("rerope", "naive") and spec.get("guard") is None and "kl_per_request" in row


def guard_rows(results: list[dict]) -> list[dict]:
    """One summary per guarded (mode, order) row; see the module docstring."""
    out = []
    for row in results:
        if "per_request" not in row:
            continue
        budget, order, per = row["guard"]["budget"], row["order"], row["per_request"]
        full = next((r for r in results if r["mode"] == "full" and r["order"] == order), None)
        mine = statistics.fmean(p["ttft_s"] for p in per)
        fixed = [(r, share_within(r["kl_per_request"], budget)) for r in results
                 if r["order"] == order and is_fixed_reuse(r) and mean_ttft(r) <= mine]
        best = max(fixed, key=lambda rs: (rs[1] or 0.0, -mean_ttft(rs[0])), default=(None, None))
        out.append({
            "mode": row["mode"], "order": order, "budget": budget, "n": len(per),
            "within_budget": share_within([p["kl_to_full"] for p in per], budget),
            "without_full": sum(not p["fell_back"] for p in per) / len(per),
            "mean_ttft_s": mine, "ttft_vs_full": mine / mean_ttft(full) if full and mean_ttft(full) else None,
            "rungs": dict(Counter(p["rung"] for p in per)),
            "best_fixed": best[0]["mode"] if best[0] else None, "best_fixed_within": best[1],
            "best_fixed_ttft_s": mean_ttft(best[0]) if best[0] else None,
            "calibrated_along": row["guard"].get("target", "gold"), "measured_along": row.get("kl_target", "gold"),
        })
    return out


_ALONG = {"gold": "gold answers", "full": "full recompute's own answers"}


def _pct(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def guard_markdown(rows: list[dict]) -> list[str]:
    lines = ["| mode | order | B | n | share KL <= B | served without full | mean TTFT ms | vs full | rungs "
             "| best fixed mode at <= this mean TTFT | its share KL <= B | its mean TTFT ms |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|:---|:---|---:|---:|"]
    for g in rows:
        rungs = ", ".join(f"{k} {v}" for k, v in g["rungs"].items())
        ratio = "–" if g["ttft_vs_full"] is None else f"{g['ttft_vs_full']:.2f}x"
        best_ttft = "–" if g["best_fixed_ttft_s"] is None else f"{g['best_fixed_ttft_s'] * 1e3:.0f}"
        lines.append(f"| {g['mode']} | {g['order']} | {g['budget']:g} | {g['n']} | {_pct(g['within_budget'])} "
                     f"| {_pct(g['without_full'])} | {g['mean_ttft_s'] * 1e3:.0f} | {ratio} | {rungs} "
                     f"| {g['best_fixed'] or '–'} | {_pct(g['best_fixed_within'])} | {best_ttft} |")
    return lines


def guard_findings(results: list[dict]) -> list[str]:
    out = []
    for g in guard_rows(results):
        ratio = "" if g["ttft_vs_full"] is None else f", mean TTFT {g['ttft_vs_full']:.2f}x full's"
        best = (f"; best fixed mode at no more mean TTFT: {g['best_fixed']}, {_pct(g['best_fixed_within'])} within B"
                if g["best_fixed"] else "; no fixed mode of the run is as fast")
        out.append(f"[{g['order']}] {g['mode']}: {_pct(g['within_budget'])} of {g['n']} requests within KL "
                   f"{g['budget']:g} of full, {_pct(g['without_full'])} served without full recompute{ratio}{best}.")
        if g["calibrated_along"] != g["measured_along"]:  # the bound speaks of another measure than this check
            out.append(f"[{g['order']}] {g['mode']}: calibrated along the {_ALONG[g['calibrated_along']]} but checked "
                       f"here along the {_ALONG[g['measured_along']]}: rerun with --kl-target "
                       f"{g['calibrated_along']} to check its promise.")
    return out


def plot_guard(results: list[dict]) -> "Figure":
    """Per guard row: measured KL against the predicted KL (dots) and its bound (crosses), log axes."""
    from kvlib.bench.plots import _new_figure

    rows = [r for r in results if "per_request" in r]
    fig, axes = _new_figure(ncols=max(len(rows), 1))
    for ax, row in zip(axes, rows):
        per, budget = row["per_request"], row["guard"]["budget"]
        rungs = list(dict.fromkeys(p["rung"] for p in per))
        for i, rung in enumerate(rungs):
            mine = [p for p in per if p["rung"] == rung]
            measured = [max(p["kl_to_full"], KL_FLOOR) for p in mine]
            ax.scatter([max(p["predicted_kl"], KL_FLOOR) for p in mine], measured, color=f"C{i}", s=14, label=rung)
            ax.scatter([max(p["kl_bound"], KL_FLOOR) for p in mine], measured, color=f"C{i}", marker="x", s=14)
        ax.axline((KL_FLOOR, KL_FLOOR), (1.0, 1.0), color="grey", lw=0.8, ls=":")  # y = x
        if budget > 0:
            ax.axhline(budget, color="red", lw=0.8, ls="--", label=f"B = {budget:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("predicted KL (dot) and its bound (x)")
        ax.set_ylabel("measured KL to full")
        ax.set_title(f"{row['mode']} ({row['order']})", fontsize="small")
        ax.legend(fontsize="x-small")
    if not rows:
        axes[0].set_title("no guard mode in this run")
    return fig
