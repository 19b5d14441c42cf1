"""The reusability map (`kvlib bench --sweep`): when is cached document KV reusable?

Design facts:
- Each cell is an ordinary bench run (same runner, same metrics) over synthetic records
  built from the data: the axis changes one thing and keeps the rest as in the data.
  - chunks: how many chunks are composed (1, 2, 4, 8, 16); passages beyond the record's
    own are taken from other records (distractors).
  - offset: distractor passages worth ~N tokens are put before the record's first four
    passages, so those sit N tokens further along than where they were encoded.
  - chunk_tokens: the record's passages re-cut to at most N tokens per chunk.
  - budget: repair strategies and budgets on the records as given.
  - order: the record's passages given or shuffled.
- KL to full is the headline: it is exact (zero) for a single chunk behind E and grows
  with what the cached KV never saw. Verdict thresholds are stated in `VERDICTS`.
- `axes` picks the axes to run (a big model may not afford them all), and `on_cell` gets each
  cell's rows as it finishes, so a long map killed half-way keeps what it measured.
"""

from __future__ import annotations

from dataclasses import replace

from kvlib.bench.data import QARecord
from kvlib.bench.runner import BenchConfig, BenchRunner
from kvlib.engine.spec import parse_modes
from kvlib.errors import InputError

AXIS_MODES = "full,naive+sink,rerope+sink"
BUDGET_MODES = ("full,rerope+sink,rerope+sink+boundary:8,rerope+sink+boundary:16,rerope+sink+boundary:32,"
                "rerope+sink+blend:0.15,rerope+sink+blend:0.3,rerope+sink+query:0.15,rerope+sink+auto,"
                "rerope+sink+auto:0.8")
AXES = ("chunks", "offset", "chunk_tokens", "budget", "order")
CHUNK_COUNTS = (1, 2, 4, 8, 16)
OFFSETS = (0, 512, 1024, 2048, 4096)
CHUNK_TOKENS = (32, 64, 128, 256)
# KL to full (nats per gold token): below SAFE reuse as is; above BROKEN the answer distribution has moved.
SAFE, BROKEN = 0.05, 0.5
VERDICTS = {"safe": f"KL < {SAFE}", "repair": f"{SAFE} <= KL < {BROKEN}", "breaks": f"KL >= {BROKEN}"}


def distractors(records, i: int):
    """Passages of the other records, starting after record i (never its own)."""
    others = records[i + 1 :] + records[:i]
    return [p for r in others for p in r.passages]


def parse_axes(text: str) -> tuple[str, ...]:
    """'all' or a comma list of AXES, in AXES order; InputError naming an unknown one."""
    if text.strip() == "all":
        return AXES
    asked = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in asked if a not in AXES]
    if unknown or not asked:
        raise InputError(f"unknown map axis '{(unknown or [text])[0]}'; choose all or some of {', '.join(AXES)}")
    return tuple(a for a in AXES if a in asked)


def cells(records, approx_tokens_per_passage: int = 130, axes=AXES) -> list[tuple[str, object, list, dict]]:
    """(axis, value, records, overrides) for every cell of the map on the chosen axes."""
    out = []
    for n in CHUNK_COUNTS:
        recs = [replace(r, passages=tuple((list(r.passages) + distractors(records, i))[:n]))
                for i, r in enumerate(records)]
        out.append(("chunks", n, recs, {}))
    for off in OFFSETS:
        k = -(-off // approx_tokens_per_passage)  # ceil: at least `off` tokens of filler
        recs = [replace(r, passages=tuple(distractors(records, i)[:k] + list(r.passages[:4])))
                for i, r in enumerate(records)]
        out.append(("offset", off, recs, {}))
    for n in CHUNK_TOKENS:
        out.append(("chunk_tokens", n, list(records), {"chunk_tokens": n}))
    out.append(("budget", "given", list(records), {"modes": BUDGET_MODES}))
    out.append(("order", "shuffled", list(records), {"orders": ["shuffled"]}))
    return [c for c in out if c[0] in axes]


def run_sweep(engine, library, records: list[QARecord], *, seed: int, max_new_tokens: int, progress=None,
              axes=AXES, on_cell=None) -> list[dict]:
    rows = []
    todo = cells(records, axes=axes)
    for axis, value, recs, over in todo:
        config = BenchConfig(modes=parse_modes(over.get("modes", AXIS_MODES)), orders=over.get("orders", ["given"]),
                             seed=seed, max_new_tokens=max_new_tokens, chunk_tokens=over.get("chunk_tokens", 512))
        _, results, _ = BenchRunner(engine, library, config).run(recs)
        cell = [{"axis": axis, "value": value, **{k: r[k] for k in (
            "mode", "order", "n", "ttft_s", "kl_to_full", "nll", "f1", "em", "attn_sim", "recompute_frac")}}
            for r in results]
        rows.extend(cell)
        if on_cell:
            on_cell(cell)
        if progress:
            progress("cells", 1, len(todo))
    return rows


def verdict(kl: float) -> str:
    return "safe" if kl < SAFE else "repair" if kl < BROKEN else "breaks"


def _pick(rows, axis, mode):
    return [r for r in rows if r["axis"] == axis and r["mode"] == mode]


def axis_sentences(rows: list[dict]) -> list[str]:
    out = []
    for axis, unit in (("chunks", "chunks"), ("offset", "tokens of offset"), ("chunk_tokens", "tokens per chunk")):
        for mode in ("rerope+sink", "naive+sink"):
            pts = _pick(rows, axis, mode)
            if pts:
                desc = ", ".join(f"{r['value']}: {r['kl_to_full']:.3f} ({verdict(r['kl_to_full'])})" for r in pts)
                out.append(f"{mode} KL to full by {unit}: {desc}.")
    return out


def threshold_sentences(rows: list[dict]) -> list[str]:
    """Per axis and mode, in words: up to where reuse as is stays safe, and from where it breaks."""
    out = []
    for axis, unit in (("chunks", "chunks composed"), ("offset", "tokens of offset"),
                       ("chunk_tokens", "tokens per chunk")):
        for mode in ("rerope+sink", "naive+sink"):
            pts = sorted(_pick(rows, axis, mode), key=lambda r: r["value"])
            if not pts:
                continue
            safe = [r["value"] for r in pts if verdict(r["kl_to_full"]) == "safe"]
            broken = [r["value"] for r in pts if verdict(r["kl_to_full"]) == "breaks"]
            worst = max(pts, key=lambda r: r["kl_to_full"])
            where_safe = f"safe to reuse as is at {', '.join(map(str, safe))} {unit}" if safe else \
                f"not safe as is at any measured value ({pts[0]['value']}-{pts[-1]['value']} {unit})"
            where_broken = f"breaks at {', '.join(map(str, broken))}" if broken else \
                f"never breaks (worst KL {worst['kl_to_full']:.3f} at {worst['value']})"
            out.append(f"{mode}, {unit}: {where_safe}; {where_broken}.")
    return out


def budget_sentences(rows: list[dict]) -> list[str]:
    pts = {r["mode"]: r for r in rows if r["axis"] == "budget"}
    full, base = pts.get("full"), pts.get("rerope+sink")
    if not (full and base) or base["kl_to_full"] <= 0:
        return []
    out = []
    for mode, r in pts.items():
        if mode in ("full", "rerope+sink"):
            continue
        recovered = 1 - r["kl_to_full"] / base["kl_to_full"]
        speed = full["ttft_s"]["median"] / r["ttft_s"]["median"]
        out.append(f"{mode}: recovers {recovered:.0%} of rerope+sink's KL gap ({base['kl_to_full']:.3f} -> "
                   f"{r['kl_to_full']:.3f}), recomputing {r['recompute_frac']:.0%} of context tokens, "
                   f"TTFT {speed:.1f}x below full.")
    return out


def order_sentence(rows: list[dict]) -> list[str]:
    given = next((r for r in rows if r["axis"] == "budget" and r["mode"] == "rerope+sink"), None)
    shuf = next((r for r in rows if r["axis"] == "order" and r["mode"] == "rerope+sink"), None)
    if not (given and shuf):
        return []
    return [f"Order: rerope+sink KL to full is {given['kl_to_full']:.3f} in given order and "
            f"{shuf['kl_to_full']:.3f} shuffled."]


def sweep_findings(rows: list[dict]) -> list[str]:
    rule = f"Verdicts: safe = {VERDICTS['safe']}, needs repair = {VERDICTS['repair']}, breaks = {VERDICTS['breaks']}."
    return [rule] + threshold_sentences(rows) + axis_sentences(rows) + budget_sentences(rows) + order_sentence(rows)


def plot_sweep(out_dir, rows: list[dict]) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    axes_names = ("chunks", "offset", "chunk_tokens")
    fig = Figure(figsize=(15, 4))
    FigureCanvasAgg(fig)
    for ax, axis in zip(fig.subplots(1, len(axes_names)), axes_names):
        for mode in ("naive+sink", "rerope+sink"):
            pts = _pick(rows, axis, mode)
            ax.plot([r["value"] for r in pts], [r["kl_to_full"] for r in pts], marker="o", label=mode)
        ax.axhline(SAFE, ls=":", c="grey")
        ax.axhline(BROKEN, ls="--", c="grey")
        ax.set_xlabel(axis)
        ax.set_ylabel("KL to full (nats)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(f"{out_dir}/map_axes.png", dpi=110)
    fig2 = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig2)
    ax = fig2.subplots()
    for r in (r for r in rows if r["axis"] == "budget"):
        ax.scatter([r["ttft_s"]["median"] * 1000], [r["kl_to_full"]])
        ax.annotate(r["mode"].replace("rerope+sink+", ""), (r["ttft_s"]["median"] * 1000, r["kl_to_full"]),
                    fontsize="x-small", xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("median TTFT, ms")
    ax.set_ylabel("KL to full (nats)")
    ax.set_title("repair budget: quality vs latency")
    fig2.savefig(f"{out_dir}/map_budget.png", dpi=110)
    return ["map_axes.png", "map_budget.png"]


def write_sweep_report(out_dir, settings: dict, rows: list[dict], plots: list[str]) -> None:
    import json

    lines = ["# kvlib reusability map", "", f"Data: {settings['data']}, {settings['n']} records per cell, "
             f"model {settings['model']} ({settings['dtype']}, {settings['hardware']}).", "", "## Findings", ""]
    lines += [f"- {s}" for s in sweep_findings(rows)]
    lines += ["", "## Cells", "", "| axis | value | mode | KL to full | gold NLL | F1 | TTFT median ms | recompute |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['axis']} | {r['value']} | {r['mode']} | {r['kl_to_full']:.4f} | {r['nll']:.3f} | {r['f1']:.2f} | "
              f"{r['ttft_s']['median'] * 1000:.0f} | {r['recompute_frac']:.2f} |" for r in rows]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    (out_dir / "map.md").write_text("\n".join(lines) + "\n")
    (out_dir / "map.json").write_text(json.dumps({"settings": settings, "cells": rows}, indent=2))
