"""`kvlib bench`: every mode on the same token ids, speed and quality side by side.

Design facts:
- The library modes read passages' KV from the library, so the passages of the
  evaluated records are ingested first (public), through the same Ingestor as `kvlib
  ingest`, once per encoding the modes read; each passage is a document whose chunks
  follow one another. Ingest time and bytes are reported apart from query timings. The prefix cache starts cold and lives across the whole
  run (all orders), like a serving engine's: its hits depend honestly on order.
- `full` runs first on every prompt: it is the reference for KL and attention
  similarity, and is computed even when not asked for (then not reported).
- KL to full (and NLL) is measured along each record's gold answer, teacher-forced; with
  kl_target "full", along full recompute's own greedy answer (calibrate.TARGET_TOKENS), which
  full's reference run decodes: the measure of a guard calibrated with `--target full`.
- One untimed warm-up prompt per mode precedes measurement; medians and p90s are
  over prompts; modes are compared within one run. Each prompt's chunks are read once
  before its modes run, so every library mode's load is a warm read (see first_read).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from typing import TYPE_CHECKING

from kvlib.bench.data import ORDERS, permute
from kvlib.bench.metrics import answer_span, attention_similarity, exact_match, f1, gold_nll, kl_divergence, summarize
from kvlib.bench.modes import ModeRunner, PromptItem, Sample
from kvlib.config import PUBLIC
from kvlib.engine.spec import ModeSpec, parse_mode, parse_modes
from kvlib.errors import InputError
from kvlib.rag.ingest import IngestReport, Ingestor, Piece
from kvlib.retrieve.chunker import chunk_passage

if TYPE_CHECKING:
    from kvlib.engine.session import Engine
    from kvlib.store.library import Library

FULL = parse_mode("full")


@dataclass
class BenchConfig:
    modes: list  # [ModeSpec]
    orders: list
    seed: int = 0
    max_new_tokens: int = 12
    chunk_tokens: int = 512  # passages longer than this are split
    data: str = ""
    ctxs: int | None = None
    kl_target: str = "gold"  # KL to full along the gold answer, or along full's own greedy answer ("full")


def expand_modes(text: str) -> list[ModeSpec]:
    """'all' or a comma list of mode names, resolved (spec.py); 'full' is always measured first."""
    return parse_modes(text)


def expand_orders(spec: str) -> list[str]:
    orders = list(ORDERS) if spec == "all" else [spec]
    for o in orders:
        if o not in ORDERS:
            raise InputError(f"unknown order '{o}'; choose given, shuffled, reversed or all")
    return orders


@dataclass
class Prepared:
    """Per record: each passage's chunks (token ids and library keys)."""

    passages: dict = field(default_factory=dict)  # record id -> [[(ids, {encoding: key}), ...] per passage]
    ingest_s: float = 0.0
    ingest_bytes: int = 0
    ingest_new_chunks: int = 0


class BenchRunner:
    def __init__(self, engine: "Engine", library: "Library", config: BenchConfig):
        self.engine, self.library, self.config = engine, library, config
        self.modes = ModeRunner(engine, library, max_new_tokens=config.max_new_tokens)
        self.first_reads: dict = {}  # encoding -> seconds to read one prompt's chunks the first time

    def passage_chunks(self, passage) -> list[tuple[int, ...]]:
        text = f"{passage.title}\n{passage.text}" if passage.title else passage.text
        return chunk_passage(text, self.engine.lm.tokenizer, self.config.chunk_tokens)

    def encodings(self) -> list[str]:
        return sorted({s.encoding for s in self.config.modes if s.reads_library})

    def prepare(self, records, progress=None) -> Prepared:
        """Tokenize every passage and ingest, per needed encoding, the chunks the library lacks."""
        lm, prep = self.engine.lm, Prepared()
        self.library.register_model(lm.fingerprint, lm.name, lm.config_summary)
        ingestors = {enc: Ingestor(self.engine, self.library, tenant=PUBLIC, public=True, encoding=enc)
                     for enc in self.encodings()}
        pieces: list[Piece] = []
        for rec in records:
            groups = []
            for p in rec.passages:
                group, before = [], None
                for ids in self.passage_chunks(p):
                    before = Piece(ids, self.engine.decode(ids), before)
                    pieces.append(before)
                    group.append((list(ids), {enc: ing.key_of(ids) for enc, ing in ingestors.items()}))
                groups.append(group)
            prep.passages[rec.id] = groups
        t0 = time.perf_counter()
        for enc, ingestor in ingestors.items():
            report = IngestReport()
            ingestor.store_pieces(pieces, report, BenchIngestProgress(progress, f"ingest {enc}", pieces))
            prep.ingest_bytes += report.bytes_written
            prep.ingest_new_chunks += report.chunks_new
        prep.ingest_s = time.perf_counter() - t0
        return prep

    def items(self, records, prep: Prepared, order: str) -> list[PromptItem]:
        out = []
        for rec in records:
            groups = permute(prep.passages[rec.id], order, self.config.seed, rec.id)
            chunks = [c for g in groups for c in g]
            keys = {enc: [k[enc] for _, k in chunks] for enc in self.encodings()}
            out.append(PromptItem(record_id=rec.id, order=order, chunk_ids=[ids for ids, _ in chunks],
                                  chunk_keys=keys, suffix_ids=self.engine.suffix_ids(rec.question),
                                  gold_ids=self.engine.tokenize(rec.answers[0] if rec.answers else "") or [self.engine.tokenize(" ")[0]],
                                  golds=rec.answers))
        return out

    def run(self, records, progress=None) -> tuple[dict, list, Prepared]:
        for spec in self.config.modes:  # a guard mode without a calibration fails before any work
            self.modes.calibration_for(spec)
        prep = self.prepare(records, progress)
        samples: dict = {}  # (mode, order) -> [(item, Sample)]
        self.warm_up(self.items(records[:1], prep, "given"))
        if progress:
            progress("query", 0, len(self.config.orders) * len(records) * len(self.config.modes))
        for order in self.config.orders:
            for item in self.items(records, prep, order):
                self.first_read(item)
                ref, item = self.reference(item)
                done = [self.modes.run(item, m) if m != FULL else ref for m in self.config.modes]
                for mode, s in zip(self.config.modes, done):
                    score_sample(s, ref, item)
                    samples.setdefault((mode, order), []).append((item, s))
                    if progress:
                        progress("query", 1)
                for s in done + [ref]:
                    s.attn = s.gold_logits = None
        results = [aggregate(mode, order, rows, self.engine, self.config.kl_target)
                   for (mode, order), rows in samples.items()]
        return self.settings(records, prep), results, prep

    def reference(self, item: PromptItem, target: str | None = None) -> tuple[Sample, PromptItem]:
        """Full recompute of the item, what every mode is scored against, and the item to score them on:
        with target "full" (default: the config's kl_target) full's run also answers the TARGET_TOKENS
        every mode is then teacher-forced along, in place of the gold answer (calibrate's target "full")."""
        from kvlib.bench.calibrate import TARGET_TOKENS

        if (target or self.config.kl_target) != "full":
            return self.modes.run(item, FULL), item
        ref = self.modes.run(item, FULL, own_answer=TARGET_TOKENS)
        return ref, dataclasses.replace(item, gold_ids=ref.forced_ids)

    def first_read(self, item: PromptItem) -> None:
        """Read the prompt's chunks once per encoding, untimed for the modes but recorded.

        A process's first read of a blob costs more than a repeat (page mapping, checksum
        over cold lines); without this, whichever mode reads an encoding first would pay it
        and the modes after it would not. So every library mode's `load` is a warm read, and
        the first-read cost is reported apart (settings.first_read_load_s).
        """
        for enc, keys in item.chunk_keys.items():
            t0 = time.perf_counter()
            self.library.get_many(keys)
            self.first_reads.setdefault(enc, []).append(time.perf_counter() - t0)

    def warm_up(self, items) -> None:
        for mode in [FULL] + self.config.modes:
            self.modes.run(items[0], mode)
        self.modes.prefix.clear()  # the measured run starts with a cold prefix cache

    def settings(self, records, prep: Prepared) -> dict:
        import torch

        lm = self.engine.lm
        return {"model": lm.name, "fingerprint": lm.fingerprint, "dtype": str(lm.dtype).replace("torch.", ""),
                "kv_dtype": str(lm.kv_dtype).replace("torch.", ""), "device": str(lm.device),
                "torch": torch.__version__.split("+")[0], "hardware": hardware_name(lm.device),
                "threads": torch.get_num_threads(), "data": self.config.data, "n": len(records),
                "ctxs": self.config.ctxs, "seed": self.config.seed, "date": datetime.now(timezone.utc).isoformat(),
                "max_new_tokens": self.config.max_new_tokens, "orders": self.config.orders,
                "kl_target": self.config.kl_target,
                "ingest_s": prep.ingest_s, "ingest_bytes": prep.ingest_bytes,
                "ingest_new_chunks": prep.ingest_new_chunks,
                "first_read_load_s": {enc: statistics.median(v) for enc, v in self.first_reads.items()}}


class BenchIngestProgress:
    """Ingest progress as the bench's `progress(stage, n, total)` lines."""

    def __init__(self, progress, stage: str, pieces: list):
        self.progress, self.stage = progress, stage
        if progress:
            progress(stage, 0, len(pieces))

    def chunk_done(self, n_tokens: int, new: bool) -> None:
        if self.progress:
            self.progress(self.stage, 1)


def hardware_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{torch.get_num_threads()} threads"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def score_sample(s: Sample, ref: Sample, item: PromptItem) -> None:
    """Quality against full for one prompt (ref may be s itself)."""
    if s.kl is None:
        s.kl = kl_divergence(ref.gold_logits, s.gold_logits)
        s.nll = gold_nll(s.gold_logits, item.gold_ids)
        s.sim = attention_similarity(s.attn, ref.attn)


def aggregate(spec: ModeSpec, order: str, rows: list, engine, kl_target: str = "gold") -> dict:
    """Per (mode, order): medians for speed, means for quality, sums for reuse."""
    samples: list[Sample] = [s for _, s in rows]
    answers = [engine.decode(s.answer_ids).strip() for s in samples]
    spans = [answer_span(a) for a in answers]
    labelled = [(a, item) for a, (item, _) in zip(spans, rows) if item.golds]
    nlls = [s.nll for s in samples]
    sims = [s.sim for s in samples]
    n_layers = len(sims[0].js_sim_per_layer)
    per_layer = [statistics.fmean(x.js_sim_per_layer[i] for x in sims) for i in range(n_layers)]
    ctx = sum(s.ctx_tokens for s in samples)
    ttft = summarize([s.ttft for s in samples])
    mean_nll = statistics.fmean(nlls)
    return {
        "mode": spec.name, "spec": spec.as_dict(), "order": order, "n": len(samples),
        "ttft_s": {"median": ttft["median"], "p90": ttft["p90"], "mean": ttft["mean"]},
        "ttft_parts_s": {k: statistics.median(s.parts[k] for s in samples) for k in ("load", "compose", "repair", "prefill")},
        "decode_tok_s": statistics.median(s.decode_tok_s for s in samples),
        "qps": len(samples) / sum(s.latency for s in samples),
        # None where the records carry no answers (kl_target "full" reads unlabeled records)
        "f1": statistics.fmean(f1(a, item.golds) for a, item in labelled) if labelled else None,
        "em": statistics.fmean(exact_match(a, item.golds) for a, item in labelled) if labelled else None,
        "nll": mean_nll, "ppl": math.exp(min(mean_nll, 50.0)),
        "kl_to_full": statistics.fmean(s.kl for s in samples),
        "attn_sim": statistics.fmean(x.js_sim for x in sims), "attn_sim_per_layer": per_layer,
        "attn_cos": statistics.fmean(x.cosine for x in sims),
        "hit_rate": sum(s.hit_tokens for s in samples) / ctx,
        "recompute_frac": sum(s.computed_ctx for s in samples) / ctx,
        "kv_bytes_read": sum(s.kv_bytes for s in samples),
        "answers": answers[:5],
        "kl_per_request": [s.kl for s in samples],  # in record order: what the guard table compares
        "kl_target": kl_target,  # what KL (and NLL) was measured along: the gold answer or full's own
        **guard_fields(spec, samples),
    }


def guard_fields(spec: ModeSpec, samples: list) -> dict:
    """A guarded mode's per-request record (the choice and what it measured) and its budget."""
    if spec.guard is None:
        return {}
    per_request = [{"kl_to_full": s.kl, "predicted_kl": s.guard["predicted_kl"], "kl_bound": s.guard["kl_bound"],
                    "rung": s.guard["rung"], "fell_back": s.guard["fell_back"], "ttft_s": s.ttft} for s in samples]
    return {"per_request": per_request, "guard": {"budget": spec.guard, "confidence": samples[0].guard["confidence"],
                                                  "target": samples[0].guard["target"]}}
