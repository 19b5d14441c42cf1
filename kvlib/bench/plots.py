"""PNG plots of a `kvlib bench` run, drawn from the result rows of results.json.

Design facts:
- Figures are built with `matplotlib.figure.Figure` on an explicit Agg canvas, never
  through pyplot: no global figure state, no GUI backend, safe in tests and threads.
  matplotlib is imported inside the functions so `kvlib --help` stays instant.
- Modes and orders are laid out in the order they first appear in the results, so the
  runner controls the reading order; a mode missing from one order, a single order, or
  a metric that is null leaves a gap instead of failing.
- `plot_all` returns file names relative to `out_dir`, which is how report.md links them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_NAN = float("nan")


def plot_all(out_dir: str | Path, results: list[dict]) -> list[str]:
    """Write ttft_by_mode, quality_by_mode, hit_rate_by_order and pareto PNGs (and, with guard
    modes, guard_predicted_vs_measured); return their names."""
    if not results:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawers = {
        "ttft_by_mode.png": plot_ttft,
        "quality_by_mode.png": plot_quality,
        "hit_rate_by_order.png": plot_hit_rate,
        "pareto.png": plot_pareto,
    }
    if any("per_request" in r for r in results):
        from kvlib.bench.guard_report import plot_guard

        drawers["guard_predicted_vs_measured.png"] = plot_guard
    names = []
    for name, draw in drawers.items():
        fig = draw(results)
        fig.savefig(out / name, dpi=120)
        names.append(name)
    return names


def _new_figure(ncols: int = 1) -> tuple["Figure", list["Axes"]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * ncols, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _unique(results: list[dict], key: str) -> list[str]:
    return list(dict.fromkeys(r[key] for r in results))


def _value(row: dict | None, get: Callable[[dict], float | None]) -> float:
    value = None if row is None else get(row)
    return _NAN if value is None else float(value)


def _grouped_bars(
    ax: "Axes",
    results: list[dict],
    x_key: str,
    group_key: str,
    get: Callable[[dict], float | None],
    upper: Callable[[dict], float | None] | None = None,
) -> None:
    """Bars at each `x_key` value, one per `group_key` value; NaN (missing) draws nothing."""
    xs, groups = _unique(results, x_key), _unique(results, group_key)
    index = {(r[x_key], r[group_key]): r for r in results}
    width = 0.8 / len(groups)
    for g, group in enumerate(groups):
        rows = [index.get((x, group)) for x in xs]
        heights = [_value(r, get) for r in rows]
        positions = [i + (g - (len(groups) - 1) / 2) * width for i in range(len(xs))]
        yerr = None
        if upper is not None:
            # One-sided whisker from the median up to p90: latency tails only go up.
            tops = [_value(r, upper) for r in rows]
            yerr = [[0.0] * len(xs), [_whisker(t, h) for t, h in zip(tops, heights)]]
        ax.bar(positions, heights, width, yerr=yerr, capsize=3, label=group)
    ax.set_xticks(range(len(xs)), xs, rotation=20, ha="right")
    if len(groups) > 1:
        ax.legend(title=group_key, fontsize="small")


def _whisker(top: float, height: float) -> float:
    gap = top - height
    return 0.0 if math.isnan(gap) else max(gap, 0.0)


def plot_ttft(results: list[dict]) -> "Figure":
    fig, (ax,) = _new_figure()
    _grouped_bars(ax, results, "mode", "order",
                  lambda r: _ms(r["ttft_s"]["median"]), lambda r: _ms(r["ttft_s"]["p90"]))
    ax.set_ylabel("time to first token, ms (median, whisker to p90)")
    ax.set_title("TTFT by mode")
    return fig


def plot_quality(results: list[dict]) -> "Figure":
    """F1 (where the records carry answers) and KL to full, by mode."""
    with_f1 = any(r["f1"] is not None for r in results)
    fig, axes = _new_figure(ncols=2 if with_f1 else 1)
    if with_f1:
        ax_f1 = axes[0]
        _grouped_bars(ax_f1, results, "mode", "order", lambda r: r["f1"])
        ax_f1.set_ylabel("answer F1 (higher is better)")
        ax_f1.set_title("F1 by mode")
    ax_kl = axes[-1]
    _grouped_bars(ax_kl, results, "mode", "order", lambda r: r["kl_to_full"])
    ax_kl.set_ylabel("KL(full || mode), nats (lower is better)")
    ax_kl.set_title("KL to full recompute")
    return fig


def plot_hit_rate(results: list[dict]) -> "Figure":
    fig, (ax,) = _new_figure()
    _grouped_bars(ax, results, "order", "mode", lambda r: r["hit_rate"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("cache hit rate (fraction of prompt tokens)")
    ax.set_title("Hit rate by passage order")
    return fig


def plot_pareto(results: list[dict]) -> "Figure":
    """Quality against median TTFT: one panel for KL to full, one for F1, where measured."""
    metrics = [(key, label) for key, label in
               (("kl_to_full", "KL to full, nats (lower is better)"), ("f1", "F1 (higher is better)"))
               if any(r[key] is not None for r in results)]
    fig, axes = _new_figure(ncols=max(len(metrics), 1))
    # Colour names the mode and the marker the order, so close points stay tellable apart.
    colours = {m: f"C{i % 10}" for i, m in enumerate(_unique(results, "mode"))}
    markers = {o: "osD^v<>"[i % 7] for i, o in enumerate(_unique(results, "order"))}
    for ax, (key, label) in zip(axes, metrics):
        for r in results:
            x, y = _ms(r["ttft_s"]["median"]), r[key]
            if x is None or y is None:
                continue
            ax.scatter([x], [y], color=colours[r["mode"]], marker=markers[r["order"]])
            ax.annotate(f"{r['mode']}/{r['order']}", (x, y), fontsize="x-small",
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("median TTFT, ms")
        ax.set_ylabel(label)
        ax.set_title("quality vs latency")
    if not metrics:
        axes[0].set_title("no quality metric measured")
    return fig


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3
