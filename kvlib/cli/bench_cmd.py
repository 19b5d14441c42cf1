"""`kvlib bench`: parse, run kvlib.bench, render a table and write reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kvlib.cli.common import (
    HomeOpt, JsonOpt, LogProgress, ModelOpt, console, err_console, fail, print_json, require_paths,
)
from kvlib.config import resolve_home
from kvlib.errors import KvlibError
from kvlib.memory import freeze_loaded


def bench(
    data: Annotated[str, typer.Option(help="QA file (ctxs or HotpotQA form; JSON, JSONL, .gz) or 'examples'.")] = "examples",
    modes: Annotated[str, typer.Option(help="'all' or a comma list of BASE[+ENCODING][+REPAIR]: full, prefix, naive, rerope (= rerope+sink), rerope+bare, rerope+lead, rerope+auto, ...")] = "all",
    order: Annotated[str, typer.Option(help="Passage order: given, shuffled, reversed or all.")] = "given",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use the first N usable records.")] = None,
    ctxs: Annotated[Optional[int], typer.Option(min=1, help="Use the first K passages of each record (examples: top-K retrieved, default 4).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for shuffled order.")] = 0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Answer length limit.")] = 12,
    kl_target: Annotated[str, typer.Option("--kl-target", help="What KL to full (and NLL) is measured along: gold (the records' answers) or full (full recompute's own greedy answer, 16 tokens: the measure of a `kvlib calibrate --target full` guard; the records then need no answers).")] = "gold",
    out: Annotated[Path, typer.Option(help="Folder for results.json, report.md and plots.")] = Path("bench-out"),
    home: HomeOpt = None,
    model: ModelOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help="Compute dtype: auto, float32, bfloat16.")] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Run the reusability map instead (chunks, offset, chunk length, budget, order).")] = False,
    axes: Annotated[str, typer.Option(help="With --sweep: 'all' or a comma list of chunks, offset, chunk_tokens, budget, order.")] = "all",
    retrieval: Annotated[Optional[Path], typer.Option(
        "--retrieval", help="Passage pool file: measure recall@k of the records' gold passages instead.")] = None,
    ingest: Annotated[Optional[list[Path]], typer.Option(
        "--ingest", help="Folders/files to ingest: measure ingest throughput against plain prefill instead.")] = None,
    peer: Annotated[Optional[Path], typer.Option(
        "--peer", help="Peer folder made by `make bench-peer`: time llama.cpp and kvlib on the same ids instead.")] = None,
    hot_path: Annotated[bool, typer.Option("--hot-path", help="Profile the cached path's TTFT at 1k/4k/8k context against the measured floor instead (mode: --modes, default rerope).")] = False,
    repeats: Annotated[int, typer.Option(min=1, help="Interleaved rounds for --ingest, timed runs for --hot-path (medians).")] = 3,
    json_out: JsonOpt = False,
) -> None:
    """Compare full recompute, prefix caching, naive reuse and re-RoPE (and repairs) on real QA data."""
    from kvlib.bench.session import run_bench, run_map
    from kvlib.bench.sweep import parse_axes

    if retrieval is not None:
        return recall(data, retrieval, limit, out, json_out)
    if ingest or peer is not None or hot_path:  # the profiles that take a home and a model, not a QA file
        return other_profile(ingest, peer, modes if hot_path else None, repeats, out, resolve_home(home), model,
                             dtype, json_out)
    log = LogProgress() if not (err_console.is_terminal or json_out) else None
    try:
        with Progress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("eta"), TimeRemainingColumn(), console=err_console, disable=json_out or log is not None) as bar:
            common = dict(data=data, limit=limit, seed=seed, max_new_tokens=max_new_tokens, out=out,
                          home=resolve_home(home), model=model, dtype=dtype, progress=bar_progress(bar, log))
            if sweep:
                report = run_map(axes=parse_axes(axes), **common)
            else:
                report = run_bench(modes=modes, order=order, ctxs=ctxs, kl_target=kl_target, **common)
    except KvlibError as exc:
        raise fail(str(exc))
    if sweep:
        render_map(report, out, json_out)
    else:
        render_bench(report, out, json_out)


def bar_progress(bar: Progress, log: LogProgress | None):
    """The bench's progress(stage, n, total): plain log lines where set, else one bar per stage."""
    tasks: dict = {}

    def progress(stage: str, n: int = 1, total: int | None = None) -> None:
        if log is not None:
            return log(stage, n, total)
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        if total is not None:
            bar.update(tasks[stage], total=total)
        bar.advance(tasks[stage], n)
    return progress


def render_bench(report: dict, out: Path, json_out: bool) -> None:
    if json_out:
        print_json(report["results_json"])
        return
    from kvlib.bench.report import render_table

    for where, why in report["skipped"][:5]:
        err_console.print(f"[yellow]skipped[/] {where}: {why}", highlight=False)
    console.print(render_table(report["results_json"]["results"]))
    for line in report["findings"]:
        console.print(f"- {line}", highlight=False, markup=False)
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'} and {len(report['plots'])} plots")


def other_profile(ingest, peer, hot_path_modes, repeats, out, home, model, dtype, json_out) -> None:
    if ingest:
        return ingest_speed(ingest, repeats, out, home, model, dtype, json_out)
    if peer is not None:
        return against_peer(peer, repeats, out, home, model, dtype, json_out)
    mode = "rerope" if hot_path_modes == "all" else hot_path_modes
    return profile_hot_path(mode, repeats, out, home, model, dtype, json_out)


def profile_hot_path(mode: str, repeats: int, out: Path, home: Path, model, dtype, json_out: bool) -> None:
    from kvlib.bench.hot_path import report_lines, run_hot_path, write_hot_path
    from kvlib.engine.session import Engine
    from kvlib.engine.spec import parse_mode
    from kvlib.store.library import Library

    try:
        spec = parse_mode(mode)
        engine = Engine.load(model, home, dtype=dtype)
        freeze_loaded()
        with Library(home / "hot-path-scratch") as library, err_console.status("profiling 1k, 4k, 8k contexts"):
            report = run_hot_path(engine, library, spec=spec, repeats=repeats)
    except KvlibError as exc:
        raise fail(str(exc))
    write_hot_path(out, report)
    show_report(report, report_lines(report), json_out, [out / "hot_path.json", out / "hot_path.md"])


def show_report(report: dict, lines: list[str], json_out: bool, written: list[Path]) -> None:
    """--json prints the report; else its markdown lines and the files written."""
    if json_out:
        print_json(report)
        return
    for line in lines:
        console.print(line, highlight=False, markup=False)
    console.print(f"wrote {' and '.join(map(str, written))}")


def against_peer(peer_dir: Path, repeats: int, out: Path, home: Path, model, dtype, json_out: bool) -> None:
    import json

    from kvlib.bench.peer import report_lines, run_peer
    from kvlib.engine.session import Engine
    from kvlib.store.library import Library

    try:
        require_paths([peer_dir])
        engine = Engine.load(model, home, dtype=dtype)
        freeze_loaded()
        with Library(home / "peer-scratch") as library, err_console.status("timing llama.cpp and kvlib in turns"):
            report = run_peer(engine, library, peer_dir, home, rounds=repeats)
    except KvlibError as exc:
        raise fail(str(exc))
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "peer.md").write_text("\n".join(report_lines(report)) + "\n")
    show_report(report, report_lines(report), json_out, [out / "peer.json", out / "peer.md"])


def recall(data: str, pool_path: Path, limit: int | None, out: Path, json_out: bool) -> None:
    import json

    from kvlib.bench.data import load_records
    from kvlib.bench.recall import load_pool, retrieval_recall

    try:
        with err_console.status("embedding the pool and the questions", spinner="dots"):
            report = retrieval_recall(load_records(data, limit=limit).records, load_pool(pool_path))
    except KvlibError as exc:
        raise fail(str(exc))
    report.update(data=str(data), pool_file=str(pool_path))
    out.mkdir(parents=True, exist_ok=True)
    (out / "recall.json").write_text(json.dumps(report, indent=2) + "\n")
    if json_out:
        print_json(report)
        return
    from rich.table import Table

    table = Table(title=f"retrieval: {report['questions']} questions, {report['pool']} passages")
    for col in ("k", "recall@k", "all gold in top k"):
        table.add_column(col, justify="right")
    for k, value in report["recall_at"].items():
        table.add_row(k, f"{value:.3f}", f"{report['all_gold_at'][k]:.3f}")
    console.print(table)
    if report["gold_missing_from_pool"]:
        err_console.print(f"[yellow]{report['gold_missing_from_pool']} gold titles are not in the pool[/]")
    console.print(f"wrote {out / 'recall.json'}")


def ingest_speed(paths: list[Path], repeats: int, out: Path, home: Path, model, dtype, json_out: bool) -> None:
    from rich.table import Table

    from kvlib.bench.ingest_speed import COLUMNS, run_ingest_speed, summary, table_rows, title, write_ingest_report
    from kvlib.engine.session import Engine

    try:
        require_paths(paths)
        home.mkdir(parents=True, exist_ok=True)
        engine = Engine.load(model, home, dtype=dtype)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, disable=json_out) as bar:
            task = bar.add_task("prefill alone, packed, ingest", total=3 * repeats)
            result = run_ingest_speed(home, engine, paths, repeats=repeats, progress=lambda _stage, n: bar.advance(task, n))
    except KvlibError as exc:
        raise fail(str(exc))
    write_ingest_report(out, result)
    if json_out:
        print_json(result)
        return
    table = Table(title=title(result))
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    for line in summary(result):
        console.print(line, highlight=False, markup=False)
    console.print(f"wrote {out / 'ingest.json'} and {out / 'ingest.md'}")


def render_map(report: dict, out: Path, json_out: bool) -> None:
    if json_out:
        print_json(report)
        return
    for line in report["findings"]:
        console.print(f"- {line}", highlight=False, markup=False)
    console.print(f"wrote {out / 'map.md'}, {out / 'map.json'} and {len(report['plots'])} plots")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
