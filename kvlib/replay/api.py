"""`replay()`: the library entry point behind `kvlib replay` (the CLI only parses and renders)."""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass
from pathlib import Path

from kvlib.errors import InputError
from kvlib.replay.run import ReplayConfig, run_replay
from kvlib.replay.shape import SMOLLM2, ModelShape, load_tokenizer_and_shape
from kvlib.replay.traces import OPENAI, detect_form
from kvlib.segment import DEFAULT_POLICY

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_CAPACITY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?|tok|tokens|t)?\s*$", re.I)


@dataclass(frozen=True)
class Capacity:
    tokens: int
    bytes: int


def parse_capacity(text: str | None, kv_bytes_per_token: int) -> Capacity | None:
    """'2GiB', '500MB', '123456' (bytes) or '200000tok' (tokens); None stays unbounded."""
    if text is None:
        return None
    m = _CAPACITY.match(text)
    if not m:
        raise InputError(f"capacity {text!r}: give bytes (e.g. 2GiB, 500MB, 1000000) or tokens (e.g. 200000tok)")
    value, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit in ("tok", "tokens", "t"):
        tokens = int(value)
    else:
        tokens = int(value * _UNITS[unit]) // kv_bytes_per_token
    if tokens < 1:
        raise InputError(f"capacity {text!r} holds less than one token of KV ({kv_bytes_per_token} bytes per token)")
    return Capacity(tokens=tokens, bytes=tokens * kv_bytes_per_token)


def needs_tokenizer(paths: list[Path]) -> bool:
    for p in paths:
        if not p.exists():
            raise InputError(f"trace not found: {p}")
    return any(detect_form(p) == OPENAI for p in paths)


def resolve_model(paths: list[Path], model: str | None, home: Path) -> tuple[object, ModelShape, int, str]:
    """(tokenizer or None, shape, context length, where the shape came from)."""
    if needs_tokenizer(paths) or model is not None:
        tokenizer, shape, context = load_tokenizer_and_shape(model, home)
        return tokenizer, shape, context, "model config"
    return None, SMOLLM2, 8192, "default model's config (segment traces, no --model)"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def add_savings(result: dict, accountant, model: str | None, home: Path, progress=None) -> None:
    from kvlib.replay.cost import PROJECTION_FORMULA, cached_cost_model, projected_cost_model, savings

    measured = cached_cost_model(model, home, progress)
    projected = projected_cost_model(measured)
    per = accountant.tally.per_request
    result["savings"] = {"measured": savings(measured, per), "projection": savings(projected, per),
                         "measured_model": measured.as_dict(), "projected_model": projected.as_dict(),
                         "projection_formula": PROJECTION_FORMULA}


def replay(paths: list[Path], *, out: Path, home: Path, model: str | None = None, capacity: str | None = None,
           policy: str = "lru", sweep: bool = False, live: str | None = None, live_key: str | None = None,
           live_wait: bool = True, costs: bool = True, progress=None, note=None, segment_policy=None) -> dict:
    """Account `paths`, write replay.json, replay.md and the plots into `out`; return the result."""
    from kvlib.replay.policies import POLICIES
    from kvlib.replay.report import write_json, write_markdown

    if policy not in POLICIES:
        raise InputError(f"unknown policy '{policy}'; choose one of {', '.join(POLICIES)}")
    tokenizer, shape, context, shape_source = resolve_model(paths, model, home)
    cap = parse_capacity(capacity, shape.kv_bytes_per_token)
    out.mkdir(parents=True, exist_ok=True)
    config = ReplayConfig(capacity_tokens=cap.tokens if cap else None, policy=policy, sweep=sweep,
                          segment_policy=segment_policy or DEFAULT_POLICY)
    result, main = run_replay(paths, tokenizer=tokenizer, shape=shape, config=config, work_dir=out, progress=progress)
    result["model"] = {**shape.as_dict(), "shape_source": shape_source, "context": context}
    result["config"] = {"capacity_tokens": config.capacity_tokens, "capacity_bytes": cap.bytes if cap else None,
                        "policy": policy, "segment_policy": {k: getattr(config.segment_policy, k) for k in
                                                              ("min_tokens", "avg_tokens", "max_tokens", "cdc_window")}}
    if costs:
        add_savings(result, main, model, home, note)
    if live:
        result["live"] = _live(paths, live, tokenizer, context, progress, config.segment_policy,
                               api_key=live_key, wait=live_wait)
    result["peak_rss_mib"] = peak_rss_mib()
    from kvlib.replay.plots import write_plots

    plots = write_plots(result, out)
    write_json(result, out)
    write_markdown(result, out, plots)
    return result


def _live(paths: list[Path], url: str, tokenizer, context: int, progress, policy, *, api_key: str | None,
          wait: bool) -> dict:
    from kvlib.replay.live import run_live
    from kvlib.replay.traces import read_traces

    if tokenizer is None:
        raise InputError("--live needs OpenAI-form traces (segment traces carry no text to send)")
    requests, stats = read_traces(paths)
    if any(s.form != OPENAI for s in stats):
        raise InputError("--live needs OpenAI-form traces only (segment traces carry no text to send)")
    return run_live(url, requests, tokenizer, context, api_key=api_key, wait=wait, progress=progress, policy=policy)
