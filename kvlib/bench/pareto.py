"""The repair trade-off: TTFT against quality for every mode of one order, and the KL gap each closes.

Design facts:
- `full` has KL 0 by definition, so the KL gap a mode closes is 1 - KL(mode) / KL(base),
  against two bases: `rerope` (keys rotated, chunks encoded bare) and `rerope+sink`
  (the library default encoding). A base missing from the run gives None.
- A mode is Pareto-optimal when no other mode of the same order is at least as fast
  (median TTFT) and strictly closer to full (KL), or strictly faster and as close.
- `best_within(rows, min_speedup)` is the mode closing the most gap while staying at
  least `min_speedup` times faster than full: the issue's "4x below full" question.
"""

from __future__ import annotations

BASES = ("rerope", "rerope+sink")


def pareto_rows(results: list[dict], order: str = "given") -> list[dict]:
    """One row per mode of `order`, fastest first, with speedup, gap closed and a Pareto flag."""
    rows = [r for r in results if r["order"] == order]
    full = next((r for r in rows if r["mode"] == "full"), None)
    if full is None:
        return []
    base_kl = {b: next((r["kl_to_full"] for r in rows if r["mode"] == b), None) for b in BASES}
    out = []
    for r in rows:
        t, kl = r["ttft_s"]["median"], r["kl_to_full"]
        dominated = any(o is not r and o["ttft_s"]["median"] <= t and o["kl_to_full"] <= kl
                        and (o["ttft_s"]["median"] < t or o["kl_to_full"] < kl) for o in rows)
        out.append({"mode": r["mode"], "ttft_s": t, "speedup": full["ttft_s"]["median"] / t, "kl": kl,
                    "nll": r["nll"], "f1": r["f1"], "recompute_frac": r["recompute_frac"],
                    "gap_closed": {b: (1 - kl / v if v else None) for b, v in base_kl.items()},
                    "pareto": not dominated})
    return sorted(out, key=lambda x: x["ttft_s"])


def best_within(rows: list[dict], min_speedup: float, base: str = "rerope") -> dict | None:
    """The row closing the largest share of `base`'s KL gap at >= min_speedup x faster than full."""
    ok = [r for r in rows if r["mode"] != "full" and r["speedup"] >= min_speedup
          and r["gap_closed"].get(base) is not None]
    return max(ok, key=lambda r: r["gap_closed"][base], default=None)


def pareto_markdown(rows: list[dict]) -> list[str]:
    head = ["mode", "TTFT ms", "speedup", "KL to full", "gold NLL", "F1", "recomputed",
            "gap closed vs rerope", "vs rerope+sink", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 2) + [":---:"]) + "|"]
    pct = lambda v: "" if v is None else f"{v:.0%}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['mode']} | {r['ttft_s'] * 1000:.0f} | {r['speedup']:.1f}x | {r['kl']:.3f} | "
                     f"{r['nll']:.3f} | {r['f1']:.3f} | {r['recompute_frac']:.1%} | "
                     f"{pct(r['gap_closed']['rerope'])} | {pct(r['gap_closed']['rerope+sink'])} | "
                     f"{'yes' if r['pareto'] else ''} |")
    return lines


def pareto_findings(rows: list[dict], min_speedup: float = 4.0) -> list[str]:
    out = []
    for base in BASES:
        best = best_within(rows, min_speedup, base)
        if best:
            out.append(f"At >= {min_speedup:g}x below full TTFT, {best['mode']} closes the most of {base}'s KL gap: "
                       f"{best['gap_closed'][base]:.0%} (KL {best['kl']:.3f}, {best['speedup']:.1f}x, "
                       f"{best['recompute_frac']:.1%} of context recomputed).")
    return out
