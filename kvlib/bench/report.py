"""results.json, report.md and the terminal table for `kvlib bench`.

Design facts:
- results.json has one fixed shape (below); `validate_results` is the single check of it
  and is used both by the runner before writing and by the tests. A result row must have
  exactly the listed keys, so a renamed key fails loudly instead of silently vanishing
  from plots; settings may carry extra keys.
- A guarded mode (`+guard:B`) also carries `per_request`: one record per request with
  exactly PER_REQUEST_KEYS (measured and predicted KL, the bound, the rung, whether it
  fell back to full, TTFT); report.md then gets a Guard table (guard_report.py).
- A metric that does not apply to a mode or was not measured (e.g. `attn_sim` when the
  run did not record attentions) is `null`, never NaN: the file is strict JSON.
- Speed is compared within one run as a ratio to `full` in the same order (DESIGN.md §7),
  because absolute timings on shared machines are noise.
- rich is imported inside `render_table`; nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:
    from rich.table import Table

SETTINGS_KEYS = (
    "model", "fingerprint", "dtype", "device", "torch", "hardware", "data", "n", "ctxs", "seed", "date",
)
RESULT_KEYS = (
    "mode", "spec", "order", "n", "ttft_s", "ttft_parts_s", "decode_tok_s", "qps", "f1", "em", "nll", "ppl",
    "kl_to_full", "attn_sim", "attn_sim_per_layer", "hit_rate", "recompute_frac", "kv_bytes_read",
)
TTFT_KEYS = ("median", "p90")
TTFT_PART_KEYS = ("load", "compose", "repair", "prefill")
SPEC_KEYS = ("base", "encoding", "repair")
GUARD_SPEC_KEYS = SPEC_KEYS + ("guard",)  # a guarded mode's spec
PER_REQUEST_KEYS = ("kl_to_full", "predicted_kl", "kl_bound", "rung", "fell_back", "ttft_s")
_NUMBER_KEYS = (
    "decode_tok_s", "qps", "f1", "em", "nll", "ppl", "kl_to_full", "attn_sim", "hit_rate",
    "recompute_frac", "kv_bytes_read",
)


def validate_results(obj: Any) -> None:
    """Raise ValueError naming the first missing, renamed or ill-typed key of a results object."""
    if not isinstance(obj, dict) or set(obj) != {"settings", "results"}:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"results object must have exactly 'settings' and 'results', got {keys}")
    _require_keys(obj["settings"], SETTINGS_KEYS, "settings", extra_ok=True)
    if not isinstance(obj["results"], list):
        raise ValueError("'results' must be a list")
    for i, row in enumerate(obj["results"]):
        _validate_row(row, f"results[{i}]")


def _validate_row(row: Any, where: str) -> None:
    _require_keys(row, RESULT_KEYS, where, extra_ok=True)  # more fields are welcome; none may be missing
    for key in ("mode", "order"):
        if not isinstance(row[key], str) or not row[key]:
            raise ValueError(f"{where}.{key} must be a non-empty string")
    guarded = isinstance(row["spec"], dict) and "guard" in row["spec"]
    _require_keys(row["spec"], GUARD_SPEC_KEYS if guarded else SPEC_KEYS, f"{where}.spec", extra_ok=False)
    if guarded or "per_request" in row:
        _validate_per_request(row, where)
    if not isinstance(row["n"], int) or isinstance(row["n"], bool):
        raise ValueError(f"{where}.n must be an integer")
    _require_keys(row["ttft_s"], TTFT_KEYS, f"{where}.ttft_s", extra_ok=True)
    _require_keys(row["ttft_parts_s"], TTFT_PART_KEYS, f"{where}.ttft_parts_s", extra_ok=True)
    numbers = [(f"ttft_s.{k}", row["ttft_s"][k]) for k in TTFT_KEYS]
    numbers += [(f"ttft_parts_s.{k}", row["ttft_parts_s"][k]) for k in TTFT_PART_KEYS]
    numbers += [(k, row[k]) for k in _NUMBER_KEYS]
    if not isinstance(row["attn_sim_per_layer"], list):
        raise ValueError(f"{where}.attn_sim_per_layer must be a list")
    numbers += [(f"attn_sim_per_layer[{j}]", v) for j, v in enumerate(row["attn_sim_per_layer"])]
    for name, value in numbers:
        _check_number(value, f"{where}.{name}")


def _validate_per_request(row: dict, where: str) -> None:
    """A guard row's per-request records: exactly PER_REQUEST_KEYS each, one per request."""
    per = row.get("per_request")
    if not isinstance(per, list) or len(per) != row["n"]:
        raise ValueError(f"{where}.per_request must be a list of {row['n']} records (one per request)")
    for j, rec in enumerate(per):
        _require_keys(rec, PER_REQUEST_KEYS, f"{where}.per_request[{j}]", extra_ok=False)
        if not isinstance(rec["rung"], str) or not isinstance(rec["fell_back"], bool):
            raise ValueError(f"{where}.per_request[{j}]: rung must be a string and fell_back a boolean")
        for key in ("kl_to_full", "predicted_kl", "kl_bound", "ttft_s"):
            _check_number(rec[key], f"{where}.per_request[{j}].{key}")


def _require_keys(obj: Any, keys: Sequence[str], where: str, *, extra_ok: bool) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be an object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    extra = [k for k in obj if k not in keys]
    if missing:
        hint = f" (unexpected: {', '.join(map(repr, extra))}; renamed?)" if extra else ""
        raise ValueError(f"{where} is missing key(s) {', '.join(map(repr, missing))}{hint}")
    if extra and not extra_ok:
        raise ValueError(f"{where} has unexpected key(s) {', '.join(map(repr, extra))}")


def _check_number(value: Any, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number or null, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{where} is {value}; write null for a missing value (strict JSON)")


def write_results(out_dir: str | Path, settings: dict, results: list[dict]) -> Path:
    """Validate and write `out_dir/results.json` atomically; returns its path."""
    obj = {"settings": settings, "results": results}
    validate_results(obj)
    path = Path(out_dir) / "results.json"
    _write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")
    return path


def load_results(path: str | Path) -> dict:
    """Read and validate a results.json written by `write_results`."""
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    validate_results(obj)
    return obj


def _write_atomic(path: Path, text: str) -> None:
    # A crashed or interrupted bench must not leave a half-written file that looks valid.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# Columns shared by report.md and the terminal table: (header, cell formatter).
def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


_COLUMNS: tuple[tuple[str, Callable[[dict, dict], str]], ...] = (
    ("mode", lambda r, _: r["mode"]),
    ("order", lambda r, _: r["order"]),
    ("n", lambda r, _: str(r["n"])),
    ("TTFT ms (p50)", lambda r, _: _fmt(r["ttft_s"]["median"], ".1f", 1e3)),
    ("TTFT ms (p90)", lambda r, _: _fmt(r["ttft_s"]["p90"], ".1f", 1e3)),
    ("speedup vs full", lambda r, full: _speedup(r, full)),
    ("load/compose/repair/prefill ms", lambda r, _: "/".join(
        _fmt(r["ttft_parts_s"][k], ".1f", 1e3) for k in TTFT_PART_KEYS)),
    ("decode tok/s", lambda r, _: _fmt(r["decode_tok_s"], ".1f")),
    ("qps", lambda r, _: _fmt(r["qps"], ".2f")),
    ("F1", lambda r, _: _fmt(r["f1"], ".3f")),
    ("EM", lambda r, _: _fmt(r["em"], ".3f")),
    ("NLL", lambda r, _: _fmt(r["nll"], ".3f")),
    ("PPL", lambda r, _: _fmt(r["ppl"], ".2f")),
    ("KL to full", lambda r, _: _fmt(r["kl_to_full"], ".4f")),
    ("attn sim", lambda r, _: _fmt(r["attn_sim"], ".3f")),
    ("hit rate", lambda r, _: _fmt(r["hit_rate"], ".1%")),
    ("recompute", lambda r, _: _fmt(r["recompute_frac"], ".1%")),
    ("KV read MB", lambda r, _: _fmt(r["kv_bytes_read"], ".1f", 1e-6)),
)


def _speedup(row: dict, full_by_order: dict) -> str:
    full = full_by_order.get(row["order"])
    mine = row["ttft_s"]["median"]
    if full is None or full["ttft_s"]["median"] is None or not mine:
        return "–"
    return f"{full['ttft_s']['median'] / mine:.2f}x"


# The terminal shows the headline columns (80 columns fit them); report.md has every column.
TERMINAL_COLUMNS = ("mode", "order", "TTFT ms (p50)", "speedup vs full", "KL to full", "F1", "hit rate", "recompute")


def table_rows(results: Iterable[dict], only: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells, one row per (mode, order) result, in input order."""
    results = list(results)
    full_by_order = {r["order"]: r for r in results if r["mode"] == "full"}
    columns = [c for c in _COLUMNS if only is None or c[0] in only]
    headers = [name for name, _ in columns]
    rows = [[cell(r, full_by_order) for _, cell in columns] for r in results]
    return headers, rows


def render_table(results: list[dict]) -> "Table":
    """A rich Table of every mode x order with the headline columns, for the terminal."""
    from rich.table import Table

    headers, rows = table_rows(results, TERMINAL_COLUMNS)
    table = Table(title="kvlib bench")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < 2 else "right", no_wrap=i < 2)
    for row in rows:
        table.add_row(*row)
    return table


def _markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = [":---" if i < 2 else "---:" for i in range(len(headers))]
    return [line(headers), "|" + "|".join(align) + "|", *(line(r) for r in rows)]


def write_report_md(
    out_dir: str | Path,
    settings: dict,
    results: list[dict],
    plots: list[str],
    findings: Sequence[str] = (),
) -> Path:
    """Write `out_dir/report.md`: settings, the mode x order table, findings and plots."""
    lines = ["# kvlib bench report", "", "## Settings", "", "| setting | value |", "|:---|:---|"]
    lines += [f"| {k} | {_setting_value(v)} |" for k, v in settings.items()]
    lines += ["", "## Results", ""]
    lines += _markdown_table(*table_rows(results))
    lines += ["", "TTFT speedup is relative to `full` in the same passage order, within this run."]
    from kvlib.bench.pareto import pareto_markdown, pareto_rows

    for order in dict.fromkeys(r["order"] for r in results):
        rows = pareto_rows(results, order)
        if len(rows) > 2:
            lines += ["", f"## Trade-off ({order} order): fastest first; gap closed = 1 - KL / KL(base)", ""]
            lines += pareto_markdown(rows)
    from kvlib.bench.guard_report import guard_markdown, guard_rows

    guarded = guard_rows(results)
    if guarded:
        lines += ["", "## Guard: per-request bound on KL to full", "",
                  "Share of requests whose measured KL to full is <= B, share served without full recompute, "
                  "and mean TTFT against full's; beside the best fixed reuse mode whose mean TTFT is no more.", ""]
        lines += guard_markdown(guarded)
    if findings:
        lines += ["", "## Findings", "", *(f"- {f}" for f in findings)]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
    path = Path(out_dir) / "report.md"
    _write_atomic(path, "\n".join(lines) + "\n")
    return path


def _setting_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")
