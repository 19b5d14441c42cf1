"""`kvlib bench`: every mode on the same token ids, speed and quality side by side.

Design facts:
- The library modes read passages' KV from the library, so the passages of the
  evaluated records are ingested first (public); ingest time and bytes are reported
  apart from query timings. The prefix cache starts cold and lives across the whole
  run (all orders), like a serving engine's: its hits depend honestly on order.
- `full` runs first on every prompt: it is the reference for KL and attention
  similarity, and is computed even when not asked for (then not reported).
- One untimed warm-up prompt per mode precedes measurement; medians and p90s are
  over prompts; modes are compared within one run. Each prompt's chunks are read once
  before its modes run, so every library mode's load is a warm read (see first_read).
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from kvlib.bench.data import ORDERS, permute
from kvlib.bench.metrics import attention_similarity, exact_match, f1, gold_nll, kl_divergence, summarize
from kvlib.bench.modes import BASE_MODES, ModeRunner, PromptItem, Sample, split_mode
from kvlib.errors import InputError
from kvlib.retrieve.chunker import chunk_text


@dataclass
class BenchConfig:
    modes: list
    orders: list
    seed: int = 0
    max_new_tokens: int = 12
    chunk_tokens: int = 512  # passages longer than this are split
    data: str = ""
    ctxs: int | None = None


def expand_modes(spec: str, repair_modes: tuple = ()) -> list[str]:
    """'all' or a comma list; 'full' is always measured first."""
    modes = list(BASE_MODES) + list(repair_modes) if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    if not modes:
        raise InputError("no modes given")
    for mode in modes:  # fail before any work on a typo
        split_mode(mode)
    return sorted(set(modes), key=modes.index)


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
    def __init__(self, engine, library, config: BenchConfig, repairs=None):
        self.engine, self.library, self.config = engine, library, config
        self.modes = ModeRunner(engine, library, max_new_tokens=config.max_new_tokens, repairs=repairs)
        self.first_reads: dict = {}  # encoding -> seconds to read one prompt's chunks the first time
        self.neighbours: dict = {}  # chunk ids -> the chunk before it in its passage (None: first)
        self.drift_scores: dict = {}  # chunk ids -> drift score, computed once for all encodings

    def passage_chunks(self, passage) -> list[list[int]]:
        text = f"{passage.title}\n{passage.text}" if passage.title else passage.text
        ids = self.engine.tokenize(text)
        if len(ids) <= self.config.chunk_tokens:
            return [ids]
        return [list(c.token_ids) for c in chunk_text(text, self.engine.lm.tokenizer, self.config.chunk_tokens)]

    def encodings(self) -> list[str]:
        specs = [split_mode(m) for m in self.config.modes]
        return sorted({s.encoding for s in specs if s.base in ("naive", "rerope")})

    def prepare(self, records, progress=None) -> Prepared:
        """Tokenize every passage and ingest, per needed encoding, the chunks the library lacks."""
        lm, prep, todo = self.engine.lm, Prepared(), {}
        self.library.register_model(lm.fingerprint, lm.name, lm.config_summary)
        for rec in records:
            groups = []
            for p in rec.passages:
                group = []
                pieces = self.passage_chunks(p)
                for before, ids in zip([None] + pieces[:-1], pieces):
                    self.neighbours.setdefault(tuple(ids), before)
                    keys = {}
                    for enc in self.encodings():
                        keys[enc] = self.library.key_for(tenant="public", public=True, model_fp=lm.fingerprint,
                                                         context_id=self.engine.context_id_for(enc), token_ids=ids)
                        if (enc, keys[enc].hex) not in todo and not self.library.has(keys[enc]):
                            todo[(enc, keys[enc].hex)] = ids
                    group.append((ids, keys))
                groups.append(group)
            prep.passages[rec.id] = groups
        t0 = time.perf_counter()
        for enc in self.encodings():
            self._ingest([ids for (e, _), ids in todo.items() if e == enc], enc, prep, progress)
        prep.ingest_s = time.perf_counter() - t0
        return prep

    def _ingest(self, todo: list, encoding: str, prep: Prepared, progress) -> None:
        lm, batch = self.engine.lm, 32
        if progress and todo:
            progress(f"ingest {encoding}", 0, len(todo))
        for start in range(0, len(todo), batch):
            part = todo[start : start + batch]
            for ids, kv in zip(part, self.engine.encode_many(part, encoding=encoding)):
                r = self.library.put(tenant="public", public=True, model_fp=lm.fingerprint,
                                     context_id=self.engine.context_id_for(encoding), token_ids=ids,
                                     k_sem=kv.k_sem, v=kv.v,
                                     text_preview=self.engine.decode(ids), drift_score=self.drift_of(ids))
                prep.ingest_bytes += r.bytes if r.new else 0
                prep.ingest_new_chunks += int(r.new)
            if progress:
                progress(f"ingest {encoding}", len(part))

    def drift_of(self, ids: list) -> float:
        """The chunk's ingest drift score, as `kvlib ingest` measures it, once per content."""
        from kvlib.engine.drift import drift_score

        key = tuple(ids)
        if key not in self.drift_scores:
            before = self.neighbours.get(key)
            self.drift_scores[key] = drift_score(self.engine.lm, self.engine.context,
                                                 self.engine.lead if before is None else before, ids=ids)
        return self.drift_scores[key]

    def items(self, records, prep: Prepared, order: str) -> list[PromptItem]:
        out = []
        for rec in records:
            groups = permute(prep.passages[rec.id], order, self.config.seed, rec.id)
            chunks = [c for g in groups for c in g]
            keys = {enc: [k[enc] for _, k in chunks] for enc in self.encodings()}
            out.append(PromptItem(record_id=rec.id, order=order, chunk_ids=[ids for ids, _ in chunks],
                                  chunk_keys=keys, suffix_ids=self.engine.suffix_ids(rec.question),
                                  gold_ids=self.engine.tokenize(rec.answers[0]) or [self.engine.tokenize(" ")[0]],
                                  golds=rec.answers))
        return out

    def run(self, records, progress=None) -> tuple[dict, list, Prepared]:
        prep = self.prepare(records, progress)
        samples: dict = {}  # (mode, order) -> [(item, Sample)]
        self.warm_up(self.items(records[:1], prep, "given"))
        if progress:
            progress("query", 0, len(self.config.orders) * len(records) * len(self.config.modes))
        for order in self.config.orders:
            for item in self.items(records, prep, order):
                self.first_read(item)
                ref = self.modes.run(item, "full")
                done = [self.modes.run(item, m) if m != "full" else ref for m in self.config.modes]
                for mode, s in zip(self.config.modes, done):
                    score_sample(s, ref, item)
                    samples.setdefault((mode, order), []).append((item, s))
                    if progress:
                        progress("query", 1)
                for s in done + [ref]:
                    s.attn = s.gold_logits = None
        results = [aggregate(mode, order, rows, self.engine) for (mode, order), rows in samples.items()]
        return self.settings(records, prep), results, prep

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
        for mode in ["full"] + self.config.modes:
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
                "ingest_s": prep.ingest_s, "ingest_bytes": prep.ingest_bytes,
                "ingest_new_chunks": prep.ingest_new_chunks,
                "first_read_load_s": {enc: statistics.median(v) for enc, v in self.first_reads.items()}}


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


def aggregate(mode: str, order: str, rows: list, engine) -> dict:
    """Per (mode, order): medians for speed, means for quality, sums for reuse."""
    samples: list[Sample] = [s for _, s in rows]
    answers = [engine.decode(s.answer_ids).strip() for s in samples]
    nlls = [s.nll for s in samples]
    sims = [s.sim for s in samples]
    n_layers = len(sims[0].js_sim_per_layer)
    per_layer = [statistics.fmean(x.js_sim_per_layer[i] for x in sims) for i in range(n_layers)]
    ctx = sum(s.ctx_tokens for s in samples)
    ttft = summarize([s.ttft for s in samples])
    mean_nll = statistics.fmean(nlls)
    return {
        "mode": mode, "order": order, "n": len(samples),
        "ttft_s": {"median": ttft["median"], "p90": ttft["p90"], "mean": ttft["mean"]},
        "ttft_parts_s": {k: statistics.median(s.parts[k] for s in samples) for k in ("load", "compose", "prefill")},
        "decode_tok_s": statistics.median(s.decode_tok_s for s in samples),
        "qps": len(samples) / sum(s.latency for s in samples),
        "f1": statistics.fmean(f1(a, item.golds) for a, (item, _) in zip(answers, rows)),
        "em": statistics.fmean(exact_match(a, item.golds) for a, (item, _) in zip(answers, rows)),
        "nll": mean_nll, "ppl": math.exp(min(mean_nll, 50.0)),
        "kl_to_full": statistics.fmean(s.kl for s in samples),
        "attn_sim": statistics.fmean(x.js_sim for x in sims), "attn_sim_per_layer": per_layer,
        "attn_cos": statistics.fmean(x.cosine for x in sims),
        "hit_rate": sum(s.hit_tokens for s in samples) / ctx,
        "recompute_frac": sum(s.computed_ctx for s in samples) / ctx,
        "kv_bytes_read": sum(s.kv_bytes for s in samples),
        "answers": answers[:5],
    }
