"""One prompt through one mode: a timed answer through Engine.answer, then its quality pass.

Design facts:
- Every mode sees the same token ids: [E][chunk 1]...[chunk k][question suffix].
- The timed run goes from request start to the first token, split into load (KV from
  the library, or prefix-cache blocks), then the engine's compose, repair and prefill.
  Decoding continues greedily for the answer.
- The quality pass (Engine.teacher_force) then rewinds the answer's own context KV and
  teacher-forces the question suffix plus the gold answer, recording the logits over the
  gold tokens and every layer's attention of the suffix over the context. It is the same
  for every mode, so KL and attention similarity compare like with like.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvlib.engine.prefix_cache import PrefixCache
from kvlib.engine.compose import ChunkKV, PrefixHit, as_ids
from kvlib.engine.spec import ModeSpec

if TYPE_CHECKING:
    from kvlib.engine.session import Engine
    from kvlib.store.library import Library

BLOCK = 16  # tokens per prefix-cache block, as vLLM and SGLang default


@dataclass
class PromptItem:
    """One record in one order, tokenized once for all modes."""

    record_id: str
    order: str
    chunk_ids: list  # [[int]]
    chunk_keys: dict  # encoding -> [ChunkKey] in the library
    suffix_ids: list
    gold_ids: list
    golds: tuple


@dataclass
class Sample:
    ttft: float
    parts: dict
    decode_tok_s: float
    answer_ids: list
    ctx_tokens: int
    hit_tokens: int
    computed_ctx: int
    kv_bytes: int
    latency: float
    gold_logits: torch.Tensor | None = field(default=None, repr=False)
    attn: list | None = field(default=None, repr=False)
    # Scored against full as soon as the prompt is done, so the large tensors above can go:
    # one prompt's attention over all layers is tens of MB.
    kl: float | None = None
    nll: float | None = None
    sim: object = None  # AttentionSimilarity
    guard: dict | None = None  # a guarded mode's choice (guard.GuardChoice.as_dict())
    forced_ids: list | None = None  # what gold_logits were teacher-forced along (run(own_answer=N): its own answer)


class ModeRunner:
    def __init__(self, engine: "Engine", library: "Library", *, max_new_tokens: int = 12, attention: bool = True):
        self.engine, self.lm, self.library = engine, engine.lm, library
        self.max_new_tokens = max_new_tokens
        self.attention = attention  # record every layer's attention in the quality pass (calibrate needs none)
        # 4096 blocks of SmolLM2 KV in fp16 are ~1.5 GB: room for every prompt of a 30-question run.
        self.prefix = PrefixCache(block_size=BLOCK, max_blocks=4096, salt=self.lm.fingerprint)
        self.calibrations: dict = {}  # encoding -> the guard's Calibration, read once from the library

    def calibration_for(self, spec: ModeSpec):
        """A guarded spec's calibration (CalibrationMissingError without one); None for other specs."""
        from kvlib.engine.guard import load_calibration

        if spec.guard is None:
            return None
        if spec.encoding not in self.calibrations:
            self.calibrations[spec.encoding] = load_calibration(self.library, self.lm, spec)
        return self.calibrations[spec.encoding]

    def load_chunks(self, item: PromptItem, spec: ModeSpec) -> tuple[list[ChunkKV], int]:
        """The prompt's chunks as `spec` reads them (library KV, or ids only) and the KV bytes read."""
        if not spec.reads_library:
            return [ChunkKV(as_ids(ids), None, None) for ids in item.chunk_ids], 0
        stored = self.library.get_many(item.chunk_keys[spec.encoding], touch=False)  # counted after the answer
        chunks = [ChunkKV(s.token_ids, s.k_sem, s.v, self.engine.encoded_at(s.context_id), s.drift_score)
                  for s in stored]
        return chunks, sum(c.k_sem.numel() * c.k_sem.element_size() * 2 for c in chunks)

    def run(self, item: PromptItem, spec: ModeSpec, own_answer: int | None = None) -> Sample:
        """One request in `spec`, scored along item.gold_ids; with own_answer=N, along the first N tokens
        of its own greedy answer instead (its stop token when it stops at once), decoded in the same
        pass: full recompute's reference for KL along full's answer (calibrate --target full, bench
        --kl-target full), one prefill not two. answer_ids stay the first max_new_tokens (greedy: what
        a run without own_answer answers)."""
        calibration = self.calibration_for(spec)  # read before the clock starts, as a server holds it
        t0 = time.perf_counter()
        prefix = None
        chunks, kv_bytes = self.load_chunks(item, spec)
        if spec.base == "prefix":
            prefix = self.prefix_hit(item)
            kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in prefix.blocks)
        load_s = time.perf_counter() - t0
        gen = self.engine.answer(spec, chunks, suffix_ids=item.suffix_ids, prefix=prefix,
                                 max_new_tokens=max(own_answer or 0, self.max_new_tokens), t0=t0, spent={"load": load_s},
                                 extra=self._extra(item) + (own_answer or 0), keep_state=True, calibration=calibration)
        latency = time.perf_counter() - t0
        if spec.reads_library:
            self.library.touch(item.chunk_keys[spec.encoding])
        n_ctx = gen.state.n_context
        sample = Sample(ttft=gen.ttft_s, decode_tok_s=gen.decode_tok_s, answer_ids=gen.token_ids[: self.max_new_tokens],
                        parts={k: gen.timings[k] for k in ("load", "compose", "repair", "prefill")},
                        ctx_tokens=n_ctx, hit_tokens=gen.tokens["cached"] + gen.tokens["recomputed"],
                        computed_ctx=n_ctx - gen.tokens["cached"], kv_bytes=kv_bytes, latency=latency,
                        guard=gen.guard)
        forced = item.gold_ids if own_answer is None else (gen.token_ids[:own_answer] or [min(self.engine.stop)])
        sample.forced_ids = list(forced)
        sample.gold_logits, sample.attn = self.engine.teacher_force(
            gen.state, item.suffix_ids, forced, attn_layers=range(self.lm.n_layers) if self.attention else ())
        if spec.base == "prefix":  # the context KV is still valid after the quality pass rewound to it
            self._remember_prefix(self.context_ids(item), gen.state.cache)
        return sample

    def prefix_hit(self, item: PromptItem) -> PrefixHit:
        """Exact prefix caching: the longest run of cached 16-token blocks of this context."""
        match = self.prefix.match(self.context_ids(item))
        return PrefixHit(n_tokens=match.n_tokens, blocks=list(match.payloads))  # [L, Hkv, 16, D] in the KV dtype

    def _extra(self, item: PromptItem) -> int:
        return len(item.suffix_ids) + max(self.max_new_tokens, len(item.gold_ids)) + 2

    def context_ids(self, item: PromptItem) -> list:
        return [int(t) for t in self.engine.context.token_ids] + [t for ids in item.chunk_ids for t in ids]

    def _remember_prefix(self, ids: list, cache) -> None:
        """Insert every full block of this context, as a serving engine does after prefill."""
        n = len(ids) // BLOCK * BLOCK
        dt = self.lm.kv_dtype
        blocks = [tuple(t.to(dt).clone() for t in cache.read(s, s + BLOCK)) for s in range(0, n, BLOCK)]
        self.prefix.insert(ids[:n], blocks)
