"""Can the answer itself predict a request's KL to full? An experiment for the guard (docs/guard.md).

    python scripts/guard_probes.py measure DATA HOME OUT.json [--limit N] [--model M] [--rows calibrate.json]
                                                                             # the model runs: ~20 s a request
                                                                             # (with --rows, the probes only)
    python scripts/guard_probes.py analyze OUT.json                          # numpy only

`measure` takes each record as `kvlib calibrate` does (the same rows: guard features, KL to full and
TTFT per rung, through kvlib.bench.calibrate.measure_request) and adds probes of the question's
first-token distribution on the rerope composition: its entropy and top probability, and its KL
from the first-token distribution of four cheap variants (naive positions, the chunks in reversed
order, rerope+blend:0.05, rerope+boundary:4), with each probe's seconds. The output is a
calibrate.json (`kvlib calibrate --rows` reads it) with a `probes` object per row.

`analyze` prints each feature's and probe's correlation with every rung's log KL, and the exact
leave-one-out error of the guard's ridge (kvlib.engine.calibration.fit_ridge) on the guard's
features alone and with the probes added, beside the spread of log KL itself: a predictor whose
leave-one-out error equals that spread predicts nothing beyond each rung's mean.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvlib.engine.guard import FEATURES, LADDER, LEGACY_LADDER  # noqa: E402

PROBES = ("entropy", "max_p", "kl_naive", "kl_reversed", "kl_blend05", "kl_boundary4")


def measure(data: str, home: Path, out: Path, limit: int | None, model: str | None = None,
            rows_file: Path | None = None) -> None:
    import torch

    from kvlib.bench.calibrate import measure_request, read_rows
    from kvlib.bench.data import load_records
    from kvlib.bench.runner import BenchConfig, BenchRunner
    from kvlib.engine.guard import rung_spec
    from kvlib.engine.spec import parse_mode
    from kvlib.rag.stack import open_stack

    stack = open_stack(home, model=model)
    engine = stack.engine
    measured = {}  # --rows: an earlier calibrate.json's rows, by record (only the probes are measured)
    if rows_file is not None:
        earlier = read_rows(rows_file)  # the checks a refit makes of a calibrate.json
        if earlier["fingerprint"] != engine.lm.fingerprint or list(earlier["ladder"]) != list(LADDER):
            sys.exit(f"{rows_file} was measured on another model or ladder")
        measured = {r["record"]: r for r in earlier["rows"]}
    records = load_records(data, limit=limit, seed=0).records
    rungs = [rung_spec("sink", r) for r in LADDER]
    config = BenchConfig(modes=rungs, orders=["given"], seed=0, max_new_tokens=1, chunk_tokens=512, data=data)
    runner = BenchRunner(engine, stack.library, config)
    runner.modes.attention = False
    items = runner.items(records, runner.prepare(records, None), "given")
    runner.warm_up(items)

    def first(spec, chunks, suffix):
        t0 = time.perf_counter()
        gen = engine.answer(spec, chunks, suffix_ids=suffix, max_new_tokens=1)
        return torch.log_softmax(gen.first_logits.float(), -1), time.perf_counter() - t0

    rows = []
    for item in items:
        row = measured.get(item.record_id) or measure_request(runner, item, rungs)
        chunks, _ = runner.modes.load_chunks(item, rungs[0])
        base, seconds = first(rungs[0], chunks, item.suffix_ids)
        probes = {"entropy": float(-(base.exp() * base).sum()), "max_p": float(base.exp().max()), "t_rerope": seconds}
        for name, spec, order in (("naive", parse_mode("naive"), chunks), ("reversed", rungs[0], chunks[::-1]),
                                  ("blend05", parse_mode("rerope+blend:0.05"), chunks),
                                  ("boundary4", parse_mode("rerope+boundary:4"), chunks)):
            other, seconds = first(spec, order, item.suffix_ids)
            probes[f"kl_{name}"] = float((other.exp() * (other - base)).sum())
            probes[f"t_{name}"] = seconds
        rows.append({**row, "probes": probes})
        print(len(rows), item.record_id, flush=True)
        out.write_text(json.dumps({"model": engine.lm.name, "fingerprint": engine.lm.fingerprint, "encoding": "sink",
                                   "data": data, "ladder": list(LADDER), "rows": rows}))  # kept whole after every request
    stack.close()


def analyze(path: Path) -> None:
    from kvlib.engine.calibration import column_moments, fit_ridge, log_kl

    measured = json.loads(path.read_text())
    rows, ladder = measured["rows"], measured.get("ladder", LEGACY_LADDER)
    y = log_kl([r["kl"] for r in rows])

    def column(name):
        if name in FEATURES:
            return np.array([np.nan if r["features"][name] is None else r["features"][name] for r in rows], float)
        x = np.array([r["probes"][name] for r in rows], float)
        return np.log(x + 1e-4) if name.startswith("kl_") else x

    t = np.array([r["ttft_s"] for r in rows])
    print(f"{len(rows)} requests; mean KL per rung {np.round(np.exp(y).mean(0), 3).tolist()}; "
          f"mean TTFT per rung vs full {np.round(t.mean(0) / t[:, -1].mean(), 3).tolist()}")
    print("probe seconds vs full's TTFT:", {k: round(float(np.mean([r['probes'][f't_{k}'] for r in rows]) / t[:, -1].mean()), 3)
                                           for k in ("rerope", "naive", "reversed", "blend05", "boundary4")})
    print("\ncorrelation with log KL (kl_* probes in log)")
    print(f"{'':16s}" + "".join(f"{(r or 'rerope'):>13s}" for r in ladder))
    for name in (*FEATURES, *PROBES):
        x = column(name)
        ok = ~np.isnan(x)
        print(f"{name:16s}" + "".join(f"{np.corrcoef(x[ok], y[ok, i])[0, 1]:13.2f}" for i in range(len(ladder))))
    print(f"\n{'std of log KL':28s}", np.round(y.std(0), 3).tolist())
    for label, names in (("guard features", FEATURES), ("features + cheap probes", (*FEATURES, *PROBES[:4])),
                         ("features + all probes", (*FEATURES, *PROBES))):
        x = np.stack([column(n) for n in names], axis=1)
        center, scale = column_moments(x)
        z = np.nan_to_num((x - center) / scale)
        print(f"{'LOO rms, ' + label:28s}", [round(fit_ridge(z, y[:, i])[2], 3) for i in range(len(ladder))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("data")
    m.add_argument("home", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--limit", type=int)
    m.add_argument("--model", help="a model name or path (default: kvlib's)")
    m.add_argument("--rows", type=Path, help="a calibrate.json of these records: measure the probes only")
    a = sub.add_parser("analyze")
    a.add_argument("rows", type=Path)
    args = ap.parse_args()
    if args.cmd == "measure":
        measure(args.data, args.home, args.out, args.limit, args.model, args.rows)
    else:
        analyze(args.rows)


if __name__ == "__main__":
    main()
