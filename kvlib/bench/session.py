"""Wire a bench run: open the library and engine, load data, run, write reports."""

from __future__ import annotations

from pathlib import Path

from kvlib.bench.data import load_records
from kvlib.bench.findings import findings
from kvlib.bench.guard_report import guard_findings
from kvlib.bench.plots import plot_all
from kvlib.bench.report import write_report_md, write_results
from kvlib.bench.runner import BenchConfig, BenchRunner, Prepared, expand_modes, expand_orders


def load_data(data: str, stack, *, limit, ctxs, seed, progress, kl_target: str = "gold"):
    from kvlib.bench.calibrate import load_targeted

    if data == "examples":
        from kvlib.bench.corpus import example_records

        return example_records(stack, k=ctxs or 4, limit=limit, progress=None)
    return load_targeted(data, limit=limit, ctxs=ctxs, seed=seed, target=kl_target, option="--kl-target")


def run_map(*, data: str, limit, seed: int, max_new_tokens: int, out: Path, home: Path, model=None, dtype=None,
            progress=None, engine=None, axes=None) -> dict:
    """The reusability sweep: the chosen axes of kvlib.bench.sweep (all by default) on the same records.
    Each finished cell is appended to OUT/cells.jsonl at once, so a run cut short keeps its cells."""
    import json

    from kvlib.bench.sweep import AXES, plot_sweep, run_sweep, sweep_findings, write_sweep_report
    from kvlib.rag.stack import open_stack

    stack = open_stack(home, model=model, dtype=dtype, engine=engine)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "cells.jsonl"
    partial.write_text("")

    def keep(cell: list[dict]) -> None:
        with partial.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in cell)

    try:
        loaded = load_records(data, limit=None, seed=seed)
        records = loaded.records[: limit or 8]
        rows = run_sweep(stack.engine, stack.library, records, seed=seed, max_new_tokens=max_new_tokens,
                         progress=progress, axes=axes or AXES, on_cell=keep)
        config = BenchConfig(modes=[], orders=[], seed=seed, max_new_tokens=max_new_tokens, data=str(data))
        settings = BenchRunner(stack.engine, stack.library, config).settings(records, Prepared())
    finally:
        stack.close()
    plots = plot_sweep(out, rows)
    write_sweep_report(out, settings, rows, plots)
    return {"settings": settings, "cells": rows, "findings": sweep_findings(rows), "plots": plots}


def run_bench(*, data: str, modes: str, order: str, limit, ctxs, seed: int, max_new_tokens: int, out: Path,
              home: Path, model=None, dtype=None, progress=None, engine=None, kl_target: str = "gold") -> dict:
    from kvlib.bench.calibrate import check_target
    from kvlib.rag.stack import open_stack

    check_target(kl_target, "--kl-target")
    mode_list, orders = expand_modes(modes), expand_orders(order)
    stack = open_stack(home, model=model, dtype=dtype, engine=engine)
    try:
        loaded = load_data(data, stack, limit=limit, ctxs=ctxs, seed=seed, progress=progress, kl_target=kl_target)
        config = BenchConfig(modes=mode_list, orders=orders, seed=seed, max_new_tokens=max_new_tokens,
                             data=str(data), ctxs=ctxs, kl_target=kl_target)
        runner = BenchRunner(stack.engine, stack.library, config)
        settings, results, _ = runner.run(loaded.records, progress)
    finally:
        stack.close()
    settings["form"] = loaded.form
    settings["skipped_records"] = len(loaded.skipped)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, settings, results)
    plots = plot_all(out, results)
    lines = findings(results) + guard_findings(results)
    write_report_md(out, settings, results, plots, lines)
    return {"results_json": {"settings": settings, "results": results}, "plots": plots, "findings": lines,
            "skipped": loaded.skipped}
