"""Replay's plots (matplotlib, Agg backend: no display is ever needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plot_timeline(result: dict, out: Path) -> str:
    plt = _pyplot()
    pts = result["timeline"]
    timed = all(p["t"] is not None for p in pts)
    x = [p["t"] if timed else p["requests"] for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stackplot(x, [p["prefix_share"] for p in pts], [p["library_share"] for p in pts], [p["new_share"] for p in pts],
                 labels=["prefix", "library beyond prefix", "new"], alpha=0.85)
    ax.set_xlabel("seconds from trace start" if timed else "requests")
    ax.set_ylabel("cumulative share of prompt tokens")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    return _save(fig, plt, out, "shares_over_time.png")


def plot_capacity(result: dict, out: Path) -> str | None:
    rows = result.get("sweep")
    if not rows:
        return None
    plt = _pyplot()
    x = [100 * r["fraction"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [r["prefix_share"] for r in rows], "o-", label="prefix caching")
    ax.plot(x, [r["lru"]["library_any_share"] for r in rows], "s-", label="library, LRU")
    ax.plot(x, [r["cost"]["library_any_share"] for r in rows], "^-", label="library, cost-aware")
    ax.plot(x, [r["lru"]["prefix_plus_library"] for r in rows], "s--", alpha=0.6, label="prefix + library (LRU)")
    ax.plot(x, [r["cost"]["prefix_plus_library"] for r in rows], "^--", alpha=0.6, label="prefix + library (cost)")
    ax.plot(x, [r["prefix_share"] + r["fixed256_share"] for r in rows], "x:", label="prefix + fixed 256-token chunks")
    ax.set_xscale("log")
    ax.set_xlabel("budget, % of unique library bytes (each cache)")
    ax.set_ylabel("share of prompt tokens served")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return _save(fig, plt, out, "capacity_curves.png")


def plot_kinds(result: dict, out: Path) -> str:
    plt = _pyplot()
    kinds = list(result["by_kind"])
    v = result["by_kind"]
    fig, ax = plt.subplots(figsize=(7, 4))
    left = [0.0] * len(kinds)
    for name, label in (("prefix_share", "prefix"), ("library_share", "library beyond prefix"), ("new_share", "new")):
        vals = [v[k][name] for k in kinds]
        ax.barh(kinds, vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("share of the kind's tokens")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    return _save(fig, plt, out, "shares_by_kind.png")


def write_plots(result: dict, out: Path) -> list[str]:
    return [p for p in (plot_timeline(result, out), plot_capacity(result, out), plot_kinds(result, out)) if p]
