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
    data: Annotated[str, typer.Option(help="Development QA file (ctxs or HotpotQA form; JSON, JSONL, .gz): never the questions you test on.")],
    model: ModelOpt = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use the first N usable records.")] = None,
    ctxs: Annotated[Optional[int], typer.Option(min=1, help="Use the first K passages of each record (as `kvlib bench --ctxs`).")] = None,
    holdout: Annotated[float, typer.Option(help="Share of the records held back to report coverage on (the rest: half fit, half conformal calibration).")] = 0.3,
    confidence: Annotated[float, typer.Option(help="Confidence of the stated bound: P(KL <= bound) for a new request.")] = 0.9,
    encoding: Annotated[str, typer.Option(help="Chunk encoding the guarded modes read: sink (default), lead or bare.")] = "sink",
    seed: Annotated[int, typer.Option(help="Seed of the record split.")] = 0,
    dtype: Annotated[Optional[str], typer.Option(help="Compute dtype: auto, float32, bfloat16.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write calibrate.json (the report and every measured request) here.")] = None,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fit the `guard:B` predictor for one model on development data and store it in the library."""
    from kvlib.bench.calibrate import check_options, run_calibrate, write_calibrate_report

    try:
        check_options(holdout, confidence, encoding)  # bad input fails before the model loads
        log = LogProgress() if not json_out else None
        report = run_calibrate(data=data, home=resolve_home(home), model=model, dtype=dtype, limit=limit,
                               ctxs=ctxs, holdout=holdout, confidence=confidence, encoding=encoding, seed=seed, progress=log)
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
    q = "infinite: too few calibration requests for this confidence" if report["quantile"] is None \
        else f"{report['quantile']:.3f}"
    console.print(f"calibrated {report['model']} ({report['fingerprint'][:12]}, encoding {report['encoding']}) on "
                  f"{report['requests']} requests: {report['n_fit']} fit, {report['n_cal']} calibrate, "
                  f"{report['n_test']} held back; conformal quantile {q} in {report['seconds']:.0f} s", highlight=False)
    held = report["held_back"]
    if not held:
        err_console.print("[yellow]no held-back requests (--holdout 0): coverage not checked[/]", highlight=False)
        return
    rungs = Table(title=f"held back ({held['n']} requests): measured KL <= bound at {report['confidence']:.0%}")
    for col in ("rung", "mean KL (all)", "within bound"):
        rungs.add_column(col, justify="right")
    for r in report["rungs"]:
        rungs.add_row(r["rung"], f"{r['mean_kl']:.3f}", f"{held['per_rung_within_bound'][r['rung']]:.0%}")
    rungs.add_row("every rung at once", "", f"{held['all_rungs_within_bound']:.0%}")
    console.print(rungs)
    guard = Table(title="the guard on the held-back requests")
    for col in ("B", "KL <= B", "served without full", "mean TTFT vs full"):
        guard.add_column(col, justify="right")
    for budget, g in held["budgets"].items():
        ratio = g.get("mean_ttft_vs_full")
        guard.add_row(budget, f"{g['within_budget']:.0%}", f"{g['without_full']:.0%}",
                      "–" if ratio is None else f"{ratio:.2f}x")
    console.print(guard)


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
