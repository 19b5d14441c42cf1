"""Plain sentences from a bench run's numbers, for the terminal and report.md."""

from __future__ import annotations


def _row(results: list, mode: str, order: str):
    """The row of `mode` (any name that resolves to the same spec) and order."""
    from kvlib.engine.spec import parse_mode

    name = parse_mode(mode).name
    return next((r for r in results if parse_mode(r["mode"]).name == name and r["order"] == order), None)


def speed_findings(results: list, order: str) -> list[str]:
    full = _row(results, "full", order)
    if not full:
        return []
    out = []
    for r in results:
        if r["order"] == order and r["mode"] != "full":
            ratio = full["ttft_s"]["median"] / r["ttft_s"]["median"]
            out.append(f"[{order}] {r['mode']}: median TTFT {r['ttft_s']['median'] * 1000:.0f} ms, "
                       f"{ratio:.1f}x lower than full ({full['ttft_s']['median'] * 1000:.0f} ms); "
                       f"KL to full {r['kl_to_full']:.3f}{_f1_text(r, full)}.")
    return out


def _f1_text(r: dict, full: dict) -> str:
    return "" if r["f1"] is None or full["f1"] is None else f", F1 {r['f1']:.2f} (full {full['f1']:.2f})"


def reuse_findings(results: list) -> list[str]:
    out = []
    for order in ("shuffled", "reversed"):
        lib, pre = _row(results, "rerope", order), _row(results, "prefix", order)
        if lib and pre:
            out.append(f"[{order}] the library served {lib['hit_rate']:.0%} of context tokens from cache; "
                       f"exact prefix caching served {pre['hit_rate']:.0%}.")
    for suffix in ("+bare", "+sink", "+lead"):
        naive, rerope = _row(results, "naive" + suffix, "given"), _row(results, "rerope" + suffix, "given")
        if naive and rerope:
            if abs(rerope["kl_to_full"] - naive["kl_to_full"]) <= 0.01 * max(naive["kl_to_full"], 1e-9):
                out.append(f"[given] rerope{suffix} and naive{suffix} are within 1% in KL to full "
                           f"({rerope['kl_to_full']:.4f} and {naive['kl_to_full']:.4f}): at these offsets position "
                           "drift is not what separates them from full; context drift is.")
                continue
            below = rerope["kl_to_full"] < naive["kl_to_full"]
            why = ("rotating keys to their real positions removes position drift; what remains is context drift"
                   if below else "with chunks at their encoding positions (all overlapping, as in parallel "
                   "encoding) the answer distribution stays closer to full than with true positions")
            out.append(f"[given] rerope{suffix} KL to full {rerope['kl_to_full']:.3f} is "
                       f"{'below' if below else 'NOT below'} naive{suffix}'s {naive['kl_to_full']:.3f}: {why}.")
    return out


def findings(results: list) -> list[str]:
    orders = list(dict.fromkeys(r["order"] for r in results))
    from kvlib.bench.pareto import auto_sentences, auto_vs_fixed, pareto_findings, pareto_rows

    return ([line for o in orders for line in speed_findings(results, o)] + reuse_findings(results)
            + pareto_findings(pareto_rows(results, "given")) + auto_sentences(auto_vs_fixed(results, "given")))
