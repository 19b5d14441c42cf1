"""The repair trade-off: TTFT against quality for every mode of one order, and the KL gap each closes.

Design facts:
- `full` has KL 0 by definition, so the KL gap a mode closes is 1 - KL(mode) / KL(base),
  against two bases: `rerope+bare` (keys rotated, chunks encoded bare) and `rerope+sink`
  (the library default encoding). A base missing from the run gives None. Rows are
  named by their resolved spec's canonical name (spec.py).
- A mode is Pareto-optimal when no other mode of the same order is at least as fast
  (median TTFT) and strictly closer to full (KL), or strictly faster and as close.
- `best_within(rows, min_speedup)` is the mode closing the most gap while staying at
  least `min_speedup` times faster than full: the issue's "4x below full" question.
- `auto_vs_fixed` sets each `auto` row against the fixed `boundary:k` and `blend:r` rows of
  the same base and encoding at equal mean TTFT: the fixed family's KL and recompute are
  interpolated linearly in TTFT between the two settings that bracket auto's TTFT. Within
  TIE (relative KL) it is a tie, decided by recompute.
"""

from __future__ import annotations

BASES = ("rerope+bare", "rerope+sink")


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


def best_within(rows: list[dict], min_speedup: float, base: str = "rerope+bare") -> dict | None:
    """The row closing the largest share of `base`'s KL gap at >= min_speedup x faster than full."""
    ok = [r for r in rows if r["mode"] != "full" and r["speedup"] >= min_speedup
          and r["gap_closed"].get(base) is not None]
    return max(ok, key=lambda r: r["gap_closed"][base], default=None)


def _num(value) -> str:
    return "–" if value is None else f"{value:.3f}"  # F1 is None on records without answers


def pareto_markdown(rows: list[dict]) -> list[str]:
    head = ["mode", "TTFT ms", "speedup", "KL to full", "gold NLL", "F1", "recomputed",
            "gap closed vs rerope+bare", "vs rerope+sink", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 2) + [":---:"]) + "|"]
    pct = lambda v: "" if v is None else f"{v:.0%}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['mode']} | {r['ttft_s'] * 1000:.0f} | {r['speedup']:.1f}x | {r['kl']:.3f} | "
                     f"{r['nll']:.3f} | {_num(r['f1'])} | {r['recompute_frac']:.1%} | "
                     f"{pct(r['gap_closed']['rerope+bare'])} | {pct(r['gap_closed']['rerope+sink'])} | "
                     f"{'yes' if r['pareto'] else ''} |")
    return lines


def pareto_findings(rows: list[dict], min_speedup: float = 4.0) -> list[str]:
    out = []
    for base in BASES:
        best = best_within(rows, min_speedup, base)
        if best and best["mode"] != base:  # a base closes none of its own gap: nothing to say without a repair
            out.append(f"At >= {min_speedup:g}x below full TTFT, {best['mode']} closes the most of {base}'s KL gap: "
                       f"{best['gap_closed'][base]:.0%} (KL {best['kl']:.3f}, {best['speedup']:.1f}x, "
                       f"{best['recompute_frac']:.1%} of context recomputed).")
    return out


TIE = 0.05  # relative KL difference within which auto and a fixed setting tie
FIXED = ("boundary", "blend")


def _family(mode: str) -> tuple[str, str] | None:
    """('rerope+sink', 'boundary') for 'rerope+sink+boundary:16'; None for no or a '+'-joined repair."""
    from kvlib.engine.spec import parse_mode

    spec = parse_mode(mode)
    if not spec.repair or "+" in spec.repair:
        return None
    return f"{spec.base}+{spec.encoding}", spec.repair.partition(":")[0]


def _mean_ttft(row: dict) -> float:
    return row["ttft_s"].get("mean", row["ttft_s"]["median"])


def _compare(auto: dict, fixed: list[dict]) -> dict:
    """auto against one fixed family (sorted by TTFT) at auto's mean TTFT."""
    t, kl, rc = _mean_ttft(auto), auto["kl_to_full"], auto["recompute_frac"]
    pts = [(_mean_ttft(r), r["kl_to_full"], r["recompute_frac"], r["mode"]) for r in fixed]
    if t < pts[0][0]:  # every fixed setting is slower: auto wins only by also being closer
        ref_kl, ref_rc, against = pts[0][1], pts[0][2], pts[0][3]
        verdict = "beats (faster and closer)" if kl <= ref_kl else "not comparable (faster, further)"
    elif t > pts[-1][0]:  # every fixed setting is faster: auto loses unless it is closer
        ref_kl, ref_rc, against = pts[-1][1], pts[-1][2], pts[-1][3]
        verdict = "loses (slower, further)" if kl >= ref_kl else "not comparable (slower, closer)"
    else:
        (t0, k0, r0, m0), (t1, k1, r1, m1) = next((a, b) for a, b in zip(pts, pts[1:]) if a[0] <= t <= b[0])
        w = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
        ref_kl, ref_rc, against = k0 + w * (k1 - k0), r0 + w * (r1 - r0), f"{m0} .. {m1}"
        if kl < ref_kl * (1 - TIE):
            verdict = "beats"
        elif kl <= ref_kl * (1 + TIE):
            verdict = "ties with less recompute" if rc < ref_rc else "ties with more recompute"
        else:
            verdict = "loses"
    return {"against": against, "kl": ref_kl, "recompute_frac": ref_rc, "verdict": verdict}


def auto_vs_fixed(results: list[dict], order: str = "given") -> list[dict]:
    """Each auto row of `order` against every fixed family of its base and encoding with >= 1 setting."""
    rows = [r for r in results if r["order"] == order]
    fams = {r["mode"]: _family(r["mode"]) for r in rows}
    out = []
    for a in rows:
        if not fams[a["mode"]] or fams[a["mode"]][1] != "auto":
            continue
        prefix = fams[a["mode"]][0]
        for kind in FIXED:
            fixed = sorted((r for r in rows if fams[r["mode"]] == (prefix, kind)), key=_mean_ttft)
            if fixed:
                out.append({"mode": a["mode"], "family": kind, "ttft_s": _mean_ttft(a), "kl": a["kl_to_full"],
                            "recompute_frac": a["recompute_frac"], **{f"fixed_{k}": v for k, v in
                                                                     _compare(a, fixed).items()}})
    return out


def auto_sentences(comparisons: list[dict]) -> list[str]:
    return [f"{c['mode']} (mean TTFT {c['ttft_s'] * 1000:.0f} ms, KL {c['kl']:.3f}, {c['recompute_frac']:.1%} "
            f"recomputed) against {c['family']} at equal TTFT ({c['fixed_against']}: KL {c['fixed_kl']:.3f}, "
            f"{c['fixed_recompute_frac']:.1%} recomputed): {c['fixed_verdict']}." for c in comparisons]
