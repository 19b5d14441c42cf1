"""Ingest throughput against plain prefill of the same chunks: what storing the KV costs.

Design facts:
- The corpus is read and chunked exactly as `kvlib ingest` does (same sources, chunker,
  budget and tokenizer), so every measurement runs the same token ids.
- Three measurements, interleaved `repeats` times and reported as medians, so the slow and
  fast moments of a shared machine fall on all three alike:
  - `prefill_alone`: each chunk as its own sequence behind the system header E (cached),
    causal kernel, last-token logits, nothing kept. What prefilling these chunks costs
    without kvlib, one request per chunk.
  - `prefill_packed`: the forward ingest itself runs (Engine.encode_many over the same
    windows), nothing stored. Against it, the ratio isolates storing and indexing.
  - `ingest`: the real Ingestor into a fresh temporary home beside the library (drift score,
    blob writes, embedding, FAISS index), with its stage split.
- Model loading and the embedder's warm-up are start-up, outside every timing, as in ingest.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvlib.errors import InputError

ROLES = ("prefill_alone", "prefill_packed", "ingest")


def prefill_alone(engine, ids) -> None:
    """Plain prefill of one sequence behind the cached E: causal kernel, last-token logits."""
    from kvlib.engine.compose import as_ids
    from kvlib.engine.forward import KVCache, forward

    ctx, ids = engine.context, as_ids(ids)
    cache = KVCache.for_model(engine.lm, ctx.n_tokens + ids.shape[0])
    cache.append(ctx.k_rot, ctx.v)
    forward(engine.lm, ids, torch.arange(ctx.n_tokens, ctx.n_tokens + ids.shape[0]), cache, logits="last")


def corpus_chunks(engine, paths: list[Path], chunk_tokens: int) -> list[list]:
    """Each readable document's chunks, as ingest makes them."""
    from kvlib.retrieve.chunker import chunk_document
    from kvlib.retrieve.sources import iter_sources

    docs, _ = iter_sources(paths)
    seen: set = set()
    chunked = []
    for doc in docs:
        # A chunk another document already stored is deduplicated by ingest, never encoded.
        chunks = [c for c in chunk_document(doc.text, engine.lm.tokenizer, chunk_tokens) if tuple(c.token_ids) not in seen]
        seen.update(tuple(c.token_ids) for c in chunks)
        chunked.append(chunks)
    if not any(chunked):
        raise InputError(f"no readable document under {', '.join(str(p) for p in paths)}")
    return chunked


def run_ingest_speed(stack_home: Path, engine, paths: list[Path], *, chunk_tokens: int = 256, repeats: int = 3,
                     progress=None, embedder=None) -> dict:
    """Medians over `repeats` interleaved rounds; see the module docstring."""
    from kvlib.retrieve.embed import Embedder

    docs = corpus_chunks(engine, paths, chunk_tokens)
    tokens = sum(len(c.token_ids) for chunks in docs for c in chunks)
    embedder = embedder or Embedder()
    embedder.warm()
    runs: dict = {role: [] for role in ROLES}
    stages: list = []
    for _ in range(repeats):
        seconds, stage_s = time_round(stack_home, engine, embedder, paths, docs, chunk_tokens, tokens)
        for role in ROLES:
            runs[role].append(seconds[role])
        stages.append(stage_s)
        if progress is not None:
            progress("ingest speed", len(ROLES))
    seconds = {role: statistics.median(v) for role, v in runs.items()}
    tok_s = {role: tokens / s for role, s in seconds.items()}
    median_run = sorted(range(repeats), key=lambda i: runs["ingest"][i])[repeats // 2]
    return {
        "paths": [str(p) for p in paths], "documents": len(docs), "chunks": sum(len(c) for c in docs),
        "tokens": tokens, "chunk_tokens": chunk_tokens, "repeats": repeats, "model": engine.lm.name,
        "dtype": str(engine.lm.dtype).removeprefix("torch."), "device": str(engine.lm.device),
        "seconds": seconds, "runs_s": runs, "tok_s": tok_s,
        "ingest_vs_prefill_alone": tok_s["ingest"] / tok_s["prefill_alone"],
        "ingest_vs_prefill_packed": tok_s["ingest"] / tok_s["prefill_packed"],
        "ingest_stage_s": stages[median_run],
    }


def time_round(stack_home: Path, engine, embedder, paths, docs, chunk_tokens: int, tokens: int) -> tuple[dict, dict]:
    """One round: seconds for each role in ROLES, and ingest's stage split."""
    from kvlib.rag.ingest import WINDOW_TOKENS, Ingestor, token_windows
    from kvlib.rag.stack import open_stack

    seconds = {}
    t0 = time.perf_counter()
    for chunks in docs:
        for c in chunks:
            prefill_alone(engine, c.token_ids)
    seconds["prefill_alone"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for chunks in docs:
        for window in token_windows(chunks, WINDOW_TOKENS):
            engine.encode_many([c.token_ids for c in window])
    seconds["prefill_packed"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=stack_home, prefix=".bench-ingest-") as tmp:
        stack = open_stack(Path(tmp), engine=engine)
        try:
            report = Ingestor(stack.engine, stack.library, stack.index, embedder, chunk_tokens=chunk_tokens).run(paths)
        finally:
            stack.close()
    if report.tokens_encoded != tokens:
        raise InputError(f"ingest encoded {report.tokens_encoded} tokens, the prefill runs {tokens}")
    seconds["ingest"] = report.seconds
    return seconds, report.stage_s


def write_ingest_report(out: Path, result: dict) -> None:
    """ingest.json (everything) and ingest.md (the table the README quotes)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ingest.md").write_text("\n".join(report_lines(result)) + "\n")


NAMES = {"prefill_alone": "plain prefill, one chunk per forward",
         "prefill_packed": "plain prefill, packed as ingest packs (nothing stored)",
         "ingest": "kvlib ingest (encode, drift score, blob writes, embedding, index)"}
COLUMNS = ("what", "seconds", "tok/s", "ingest as a share of it")


def table_rows(r: dict) -> list[tuple[str, ...]]:
    return [(NAMES[role], f"{r['seconds'][role]:.1f}", f"{r['tok_s'][role]:,.0f}",
             "" if role == "ingest" else f"{r['tok_s']['ingest'] / r['tok_s'][role]:.0%}") for role in ROLES]


def title(r: dict) -> str:
    return f"Ingest throughput: {r['documents']} documents, {r['chunks']} chunks, {r['tokens']:,} tokens"


def summary(r: dict) -> list[str]:
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in r["ingest_stage_s"].items())
    return [f"{r['model']}, {r['dtype']} on {r['device']}; median of {r['repeats']} interleaved rounds.",
            f"Ingest by stage (the median run): {stages}."]


def report_lines(r: dict) -> list[str]:
    lines = [f"# {title(r)}", "", summary(r)[0], "", "| " + " | ".join(COLUMNS) + " |", "| --- | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(r)]
    return lines + ["", summary(r)[1]]
