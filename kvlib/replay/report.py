"""replay.json and replay.md: the accounting, the sweep, the savings and the live comparison, as written."""

from __future__ import annotations

import json
import os
from pathlib import Path

SCHEMA = "kvlib-replay/1"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def write_json(result: dict, out: Path) -> Path:
    path = out / "replay.json"
    path.write_text(json.dumps({"schema": SCHEMA, **result}, indent=2, default=str))
    return path


def _inputs_md(result: dict) -> list[str]:
    lines = ["| file | form | requests | skipped | malformed | out of order |", "|---|---|---:|---:|---:|---:|"]
    for i in result["inputs"]:
        lines.append(f"| {Path(i['path']).name} | {i['form']} | {i['requests']} | {i['skipped']} | {i['malformed']} | {i['out_of_order']} |")
    for i in result["inputs"]:
        lines += [f"- {Path(i['path']).name}: {e}" for e in i["malformed_examples"]]
    return lines


def _totals_md(result: dict) -> list[str]:
    t, b = result["total"], result["baseline_fixed256"]
    cap, cap_bytes = result["config"]["capacity_tokens"], result["config"]["capacity_bytes"]
    budget = "unbounded" if cap is None else f"{cap:,} tokens ({cap_bytes:,} bytes)"
    return [
        f"Capacity: {budget} for the library and the same for the prefix cache; "
        f"library policy `{result['config']['policy']}`.",
        "",
        "| requests | prompt tokens | prefix share | library share (beyond prefix) | new share | library alone | fixed 256-token chunks beyond prefix |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {t['requests']:,} | {t['tokens']:,} | {_pct(t['prefix_share'])} | {_pct(t['library_share'])} | "
        f"{_pct(t['new_share'])} | {_pct(result['library_any_share'])} | {_pct(b['share_beyond_prefix'])} |",
        "",
        f"Library share beyond prefix over the fixed-chunk matcher's: "
        f"{(t['library_share'] / b['share_beyond_prefix']) if b['share_beyond_prefix'] else float('inf'):.2f}x.",
    ]


def _kinds_md(result: dict) -> list[str]:
    lines = ["| kind | tokens | prefix | library | new |", "|---|---:|---:|---:|---:|"]
    for kind, v in result["by_kind"].items():
        lines.append(f"| {kind} | {v['tokens']:,} | {_pct(v['prefix_share'])} | {_pct(v['library_share'])} | {_pct(v['new_share'])} |")
    s = result["sessions"]
    lines += ["", f"Sessions: {s['count']:,} ({s['multi_turn']:,} with more than one request)."]
    return lines


def _sweep_md(result: dict) -> list[str]:
    if not result.get("sweep"):
        return []
    lines = ["## Capacity sweep", "",
             "Budgets are shares of the unique library bytes; the prefix cache gets the same bytes. "
             "'alone' is the share a library of that size serves at any position; 'beyond' is what it adds to the prefix cache.",
             "", "| budget | bytes | prefix caching | LRU alone | cost alone | LRU beyond prefix | cost beyond prefix | fixed-256 beyond prefix |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["sweep"]:
        lines.append(f"| {_pct(r['fraction'])} | {r['budget_bytes']:,} | {_pct(r['prefix_share'])} | "
                     f"{_pct(r['lru']['library_any_share'])} | {_pct(r['cost']['library_any_share'])} | "
                     f"{_pct(r['lru']['library_share'])} | {_pct(r['cost']['library_share'])} | {_pct(r['fixed256_share'])} |")
    return lines


def _savings_md(result: dict) -> list[str]:
    sv = result.get("savings")
    if not sv:
        return []
    lines = ["## Savings (prefill compute, the compute part of TTFT)", "",
             "| cost model | full ms/request | prefix only | kvlib | saved vs prefix | total saved vs prefix |",
             "|---|---:|---:|---:|---:|---:|"]
    for key in ("measured", "projection"):
        s = sv.get(key)
        if s:
            lines.append(f"| {s['label']} | {s['ttft_full_ms_per_request']:.1f} | {s['ttft_prefix_ms_per_request']:.1f} | "
                         f"{s['ttft_kvlib_ms_per_request']:.1f} | {_pct(s['compute_saved_vs_prefix'])} | {s['saved_vs_prefix_s']:.1f} s |")
    cm = sv["measured_model"]
    lines += ["", f"Measured here: prefill {', '.join(f'{n}: {r:.0f} tok/s' for n, r in zip(cm['lengths'], cm['prefill_tok_s']))}; "
              f"t(n) = {cm['t0']:.3f} + {cm['a']:.3e}*n + {cm['c']:.3e}*n^2 s; per cached token: load {cm['load_s_per_token'] * 1e6:.2f} us, "
              f"rotation {cm['rotate_s_per_token'] * 1e6:.2f} us, repair `{cm['repair']}` {cm['repair_s_per_token'] * 1e6:.2f} us "
              f"(load average {'/'.join(str(x) for x in cm.get('load_average') or ()) or 'unknown'} on {os.cpu_count()} cores when measured).",
              "", f"Projection formula: {sv['projection_formula']}."]
    return lines


def _live_md(result: dict) -> list[str]:
    live = result.get("live")
    if not live:
        return []
    waited = ("each request sent once the server had stored the misses of those before" if live.get("waited_for_stores")
              else "requests sent back to back, without waiting for the server's stores")
    return ["## Live comparison", "", f"Server: {live['url']}; {live['requests']} requests sent, {live['errors']} errors; "
            f"{waited}. Prompt tokens as replay renders them: {live['prompt_tokens_match']}/{live['requests']}. "
            f"Trim rule: {live['trim_rule']}.", "",
            "| prediction | exact matches | mean abs error (tokens) | predicted total | reported total |", "|---|---:|---:|---:|---:|"] + [
        f"| {name} | {_pct(c['exact_share'])} | {c['mean_abs_error']:.1f} | {c['predicted_total']:,} | {c['reported_total']:,} |"
        for name, c in live["comparisons"].items()]


def write_markdown(result: dict, out: Path, plots: list[str]) -> Path:
    lines = ["# kvlib replay", "", "## Inputs", ""] + _inputs_md(result) + ["", "## Shares", ""] + _totals_md(result)
    lines += ["", "## By kind", ""] + _kinds_md(result) + [""] + _sweep_md(result) + [""] + _savings_md(result)
    lines += [""] + _live_md(result) + [""] + [f"![{p}]({p})" for p in plots]
    lines += ["", f"Replay took {result['replay_s']:.1f} s; peak memory {result.get('peak_rss_mib', 0):.0f} MiB."]
    path = out / "replay.md"
    path.write_text("\n".join(lines) + "\n")
    return path
