"""Replay traces through the accounting: one pass, plus a capacity sweep from a spool on disk.

Design facts:
- The stream is read once. With --sweep each prepared request is also pickled to a spool
  file beside the report, so the sweep's second pass neither re-tokenizes nor holds the trace
  in memory; the spool is deleted at the end.
- Budgets of the sweep are fractions of the unique library bytes: the reusable segment
  tokens an unbounded library ends up holding, times KV bytes per token.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from kvlib.replay.accounting import Accountant, finish_timeline, session_summary, shares
from kvlib.replay.prepare import Prepared, prepare
from kvlib.replay.shape import ModelShape
from kvlib.replay.traces import FileStats, read_traces
from kvlib.segment import DEFAULT_POLICY, SegmentPolicy

SWEEP_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class ReplayConfig:
    capacity_tokens: int | None = None  # None: unbounded
    policy: str = "lru"
    sweep: bool = False
    fractions: tuple[float, ...] = SWEEP_FRACTIONS
    segment_policy: SegmentPolicy = field(default=DEFAULT_POLICY)


Progress = Callable[[int, int], None]  # (requests so far, tokens so far)


def prepared_stream(paths: list[Path], tokenizer, policy: SegmentPolicy) -> tuple[Iterator[Prepared], list[FileStats]]:
    requests, stats = read_traces(paths)
    if tokenizer is None and any(s.form == "openai" for s in stats):
        from kvlib.errors import InputError

        raise InputError("OpenAI-form traces need a tokenizer (a model)")
    return _prepare_all(requests, tokenizer, policy, {Path(s.path).name: s for s in stats}), stats


def _prepare_all(requests, tokenizer, policy: SegmentPolicy, stats: dict[str, FileStats]) -> Iterator[Prepared]:
    """Prepared requests; one the segmenter or chat template refuses (a non-text part, roles a template
    forbids) is a malformed line of its file, never the end of the replay."""
    from jinja2 import TemplateError

    from kvlib.errors import KvlibError

    for r in requests:
        try:
            yield prepare(r, tokenizer, policy)
        except (KvlibError, TemplateError, ValueError, TypeError) as exc:
            file_stats = stats[r.source]
            file_stats.requests -= 1
            file_stats.bad(r.line, f"cannot render: {str(exc)[:120]}")


def _feed(stream: Iterator[Prepared], accountants: list[Accountant], spool, progress: Progress | None) -> None:
    n = tokens = 0
    for req in stream:
        for a in accountants:
            a.observe(req)
        if spool is not None:
            pickle.dump(req, spool, protocol=pickle.HIGHEST_PROTOCOL)
        n, tokens = n + 1, tokens + req.tokens
        if progress and n % 50 == 0:
            progress(n, tokens)
    if progress:
        progress(n, tokens)


def _read_spool(path: Path) -> Iterator[Prepared]:
    with path.open("rb") as f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return


def summarize(acc: Accountant) -> dict:
    t = acc.tally
    by_kind = {k: {**v, "prefix_share": v["prefix"] / (v["tokens"] or 1), "library_share": v["library"] / (v["tokens"] or 1),
                   "new_share": v["new"] / (v["tokens"] or 1)} for k, v in sorted(t.by_kind.items())}
    total = shares(t.total)
    return {"total": {"prefix_share": total["prefix_share"], "library_share": total["library_share"],
                      "new_share": total["new_share"], "tokens": t.total["tokens"], "requests": t.requests},
            "tokens": dict(t.total), "library_any_share": total["library_any_share"],
            "baseline_fixed256": {"chunk_tokens": 256, "share_beyond_prefix": total["fixed256_share"],
                                  "tokens_beyond_prefix": t.total["fixed"]},
            "by_kind": by_kind, "sessions": session_summary(t.by_session), "timeline": finish_timeline(t)}


def _sweep(spool: Path, unique_tokens: int, shape: ModelShape, fractions, progress) -> list[dict]:
    budgets = [max(1, int(unique_tokens * f)) for f in fractions]
    runs = {(b, p): Accountant(b, p, attn_per_ctx_token=shape.attn_ratio, keep_requests=False)
            for b in budgets for p in ("lru", "cost")}
    _feed(_read_spool(spool), list(runs.values()), None, progress)
    rows = []
    for f, b in zip(fractions, budgets):
        row = {"fraction": f, "budget_tokens": b, "budget_bytes": b * shape.kv_bytes_per_token}
        lru = shares(runs[(b, "lru")].tally.total)
        row["prefix_share"] = lru["prefix_share"]
        row["fixed256_share"] = lru["fixed256_share"]
        for p in ("lru", "cost"):
            s = shares(runs[(b, p)].tally.total)
            row[p] = {"library_any_share": s["library_any_share"], "library_share": s["library_share"],
                      "prefix_plus_library": s["prefix_share"] + s["library_share"]}
        rows.append(row)
    return rows


def run_replay(paths: list[Path], *, tokenizer, shape: ModelShape, config: ReplayConfig, work_dir: Path,
               progress: Progress | None = None) -> tuple[dict, Accountant]:
    """The accounting of `paths` as a replay.json-shaped dict, and the main accountant (per-request arrays)."""
    t0 = time.perf_counter()
    stream, stats = prepared_stream(paths, tokenizer, config.segment_policy)
    main = Accountant(config.capacity_tokens, config.policy, attn_per_ctx_token=shape.attn_ratio)
    accountants = [main]
    if config.sweep and config.capacity_tokens is not None:
        accountants.append(Accountant(None, "lru", keep_requests=False))  # for the unique bytes
    spool_path = work_dir / ".replay-spool.pkl"
    spool = spool_path.open("wb") if config.sweep else None
    try:
        _feed(stream, accountants, spool, progress)
        if spool is not None:
            spool.close()
        result = summarize(main)
        unbounded = accountants[-1]
        unique = unbounded.unique_tokens if unbounded.capacity is None else None
        result["unique"] = None if unique is None else {"library_tokens": unique,
                                                         "library_bytes": unique * shape.kv_bytes_per_token}
        result["inputs"] = [s.as_dict() for s in stats]
        result["replay_s"] = time.perf_counter() - t0
        if config.sweep:
            result["sweep"] = _sweep(spool_path, unique, shape, config.fractions, None)
            result["sweep_s"] = time.perf_counter() - t0 - result["replay_s"]
    finally:
        if spool is not None and not spool.closed:
            spool.close()
        spool_path.unlink(missing_ok=True)
    return result, main
