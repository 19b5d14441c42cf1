"""`kvlib calibrate`: parse, run kvlib.bench.calibrate, render the held-back coverage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from kvlib.cli.common import HomeOpt, JsonOpt, LogProgress, ModelOpt, console, err_console, fail, print_json
from kvlib.config import resolve_home
from kvlib.errors import KvlibError


def calibrate(
    data: Annotated[Optional[str], typer.Option(help="Development QA file (ctxs or HotpotQA form; JSON, JSONL, .gz): never the questions you test on.")] = None,
    rows: Annotated[Optional[Path], typer.Option(help="Instead of --data: fit again from the rows an earlier run measured (its calibrate.json), measuring nothing.")] = None,
    model: ModelOpt = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use the first N usable records.")] = None,
    ctxs: Annotated[Optional[int], typer.Option(min=1, help="Use the first K passages of each record (as `kvlib bench --ctxs`).")] = None,
    holdout: Annotated[float, typer.Option(help="Share of the records held back to report coverage on (the rest: half fit, half conformal calibration).")] = 0.3,
    confidence: Annotated[float, typer.Option(help="Confidence of the stated bound: P(KL <= bound) for a new request.")] = 0.9,
    encoding: Annotated[str, typer.Option(help="Chunk encoding the guarded modes read: sink (default), lead or bare.")] = "sink",
    seed: Annotated[int, typer.Option(help="Seed of the record split.")] = 0,
    target: Annotated[str, typer.Option(help="What KL to full is measured along: gold (the records' answers) or full (full recompute's own greedy answer; the records need no answers, so unlabeled prompts like your traffic will do).")] = "gold",
    dtype: Annotated[Optional[str], typer.Option(help="Compute dtype: auto, float32, bfloat16.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write calibrate.json (the report and every measured request) here; each request's row is kept in OUT/rows.jsonl as it is measured, and a run cut short resumes from it (same settings).")] = None,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fit the `guard:B` predictor for one model on development data and store it in the library."""
    from kvlib.bench.calibrate import check_options, run_calibrate, run_refit, write_calibrate_report

    try:
        if (data is None) == (rows is None):
            raise fail("give one of --data FILE (measure) or --rows calibrate.json (fit again from earlier rows)")
        check_options(holdout, confidence, encoding, target)  # bad input fails before the model loads
        if rows is not None:
            report = run_refit(rows_file=rows, home=resolve_home(home), model=model, dtype=dtype, holdout=holdout,
                               confidence=confidence, seed=seed)
        else:
            log = LogProgress() if not json_out else None
            report = run_calibrate(data=data, home=resolve_home(home), model=model, dtype=dtype, limit=limit, ctxs=ctxs,
                                   holdout=holdout, confidence=confidence, encoding=encoding, seed=seed,
                                   target=target, progress=log, rows_file=out / "rows.jsonl" if out else None)
        written = write_calibrate_report(out, report) if out is not None else None
    except KvlibError as exc:
        raise fail(str(exc))
    if json_out:
        print_json({k: v for k, v in report.items() if k != "rows"})
        return
    render(report)
    if written:
        console.print(f"wrote {written}")


def render(report: dict) -> None:
    along = "full recompute's own answers" if report.get("target") == "full" else "the gold answers"
    console.print(f"calibrated {report['model']} ({report['fingerprint'][:12]}, encoding {report['encoding']}, KL "
                  f"along {along}) on {report['requests']} requests: {report['n_fit']} fit, {report['n_cal']} calibrate, "
                  f"{report['n_test']} held back, in {report['seconds']:.0f} s", highlight=False)
    rungs = Table(title="the ladder below full (all requests)")
    for col in ("rung", "mean KL", "ridge", "sigma (log KL)"):
        rungs.add_column(col, justify="right")
    for r in report["rungs"]:
        rungs.add_row(r["rung"], f"{r['mean_kl']:.3f}", f"{r['ridge']:g}", f"{r['sigma']:.2f}")
    console.print(rungs)
    held = report["held_back"]
    if not held:
        err_console.print("[yellow]no held-back requests (--holdout 0): the bound not checked[/]", highlight=False)
        return
    guard = Table(title=f"the guard on the {held['n']} held-back requests (promised: KL <= B for "
                        f"{report['confidence']:.0%})")
    for col in ("B", "slack", "KL <= B", "served without full", "mean TTFT vs full", "rungs"):
        guard.add_column(col, justify="right")
    for budget, g in held["budgets"].items():
        ratio = g.get("mean_ttft_vs_full")
        slack = "inf (too few requests)" if g["slack"] is None else f"{g['slack']:.2f}"
        guard.add_row(budget, slack, f"{g['within_budget']:.0%}", f"{g['without_full']:.0%}",
                      "–" if ratio is None else f"{ratio:.2f}x", ", ".join(f"{k} {v}" for k, v in g["rungs"].items()))
    console.print(guard)


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
