"""One prompt through one mode: a timed answer, then an untimed quality pass.

Design facts:
- Every mode sees the same token ids: [E][chunk 1]...[chunk k][question suffix].
- The timed run goes from request start to the first token, split into load
  (KV from the library, or prefix-cache blocks), compose (rotation and layout, plus
  repair) and prefill. Decoding continues greedily for the answer.
- The quality pass then rewinds the cache to the end of the context and
  teacher-forces the question suffix plus the gold answer, recording the logits over
  the gold tokens and every layer's attention of the suffix over the context. It is
  the same for every mode, so KL and attention similarity compare like with like.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvlib.bench.prefix_cache import PrefixCache
from kvlib.engine.compose import ChunkKV, Composed, as_ids, compose
from kvlib.engine.forward import KVCache, forward
from kvlib.engine.generate import generate
from kvlib.errors import InputError

BASE_MODES = ("full", "prefix", "naive", "rerope")
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


@dataclass(frozen=True)
class ModeSpec:
    base: str  # full, prefix, naive, rerope
    encoding: str  # "bare", "sink" (behind E) or "lead" (behind E + lead-in): which library chunks a mode reads
    repair: str | None  # boundary:k, blend:r, query:r, auto


def split_mode(mode: str) -> ModeSpec:
    """'rerope' -> bare chunks; 'rerope+sink' -> chunks encoded behind E; '+<repair>' on top."""
    from kvlib.engine.repair import parse_repair

    base, *rest = mode.split("+")
    if base not in BASE_MODES:
        raise InputError(f"unknown mode '{mode}'; base modes are {', '.join(BASE_MODES)}")
    encodings = [r for r in rest if r in ("sink", "lead")]
    encoding = encodings[0] if len(encodings) == 1 else "bare"
    repair = "+".join(r for r in rest if r not in ("sink", "lead")) or None
    if len(encodings) > 1:
        raise InputError(f"unknown mode '{mode}': choose one encoding, +sink or +lead")
    if base in ("full", "prefix") and (repair or encodings):
        raise InputError(f"unknown mode '{mode}': use full, prefix, naive[+sink|+lead], rerope[+sink|+lead][+REPAIR]")
    if repair:
        parse_repair(repair)  # fail on a typo before any work
    return ModeSpec(base, encoding if base in ("naive", "rerope") else "sink", repair)


class ModeRunner:
    def __init__(self, engine, library, *, max_new_tokens: int = 12, repairs=None):
        self.engine, self.lm, self.library = engine, engine.lm, library
        self.max_new_tokens = max_new_tokens
        # name -> callable(engine, composed, chunks, suffix_ids) -> context tokens recomputed
        self.repairs = repairs if repairs is not None else {}
        # 4096 blocks of SmolLM2 KV in fp16 are ~1.5 GB: room for every prompt of a 30-question run.
        self.prefix = PrefixCache(block_size=BLOCK, max_blocks=4096, salt=self.lm.fingerprint)

    def run(self, item: PromptItem, mode: str) -> Sample:
        spec = split_mode(mode)
        t0 = time.perf_counter()
        if spec.base == "full":
            composed, load_s, kv_bytes, hits = self._full(item), 0.0, 0, 0
        elif spec.base == "prefix":
            composed, load_s, kv_bytes, hits = self._prefix(item, t0)
        else:
            composed, load_s, kv_bytes, hits = self._library(item, spec, t0)
        sample = self._finish(item, composed, t0, load_s, kv_bytes, hits)
        if spec.base == "prefix":  # the context KV is still valid after the quality pass rewound to it
            self._remember_prefix(self.context_ids(item), composed.cache)
        return sample

    def _full(self, item: PromptItem) -> Composed:
        chunks = [ChunkKV(as_ids(ids), None, None) for ids in item.chunk_ids]
        return compose(self.lm, self.engine.context, chunks, "full", extra=self._extra(item))

    def _library(self, item: PromptItem, spec: ModeSpec, t0: float):
        stored = self.library.get_many(item.chunk_keys[spec.encoding])
        chunks = [ChunkKV(s.token_ids, s.k_sem, s.v, self.engine.encoded_at(s.context_id), s.drift_score)
                  for s in stored]
        load_s = time.perf_counter() - t0
        composed = compose(self.lm, self.engine.context, chunks, spec.base, extra=self._extra(item))
        if spec.repair:
            composed.recomputed = self.repairs[spec.repair](self.engine, composed, chunks, item.suffix_ids)
        kv_bytes = sum(c.k_sem.numel() * c.k_sem.element_size() * 2 for c in chunks)
        return composed, load_s, kv_bytes, composed.cached_tokens

    def _prefix(self, item: PromptItem, t0: float):
        """Exact prefix caching: reuse the longest run of cached 16-token blocks, prefill the rest."""
        ctx_ids = self.context_ids(item)
        match = self.prefix.match(ctx_ids)
        cache = KVCache.for_model(self.lm, len(ctx_ids) + self._extra(item))
        for k, v in match.payloads:  # blocks are stored in the KV dtype: [L, Hkv, 16, D]
            cache.append(k, v)
        kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in match.payloads)
        composed = Composed(cache=cache, pending_ids=torch.tensor(ctx_ids[match.n_tokens:], dtype=torch.long),
                            next_pos=match.n_tokens, cached_tokens=match.n_tokens)
        return composed, time.perf_counter() - t0, kv_bytes, match.n_tokens

    def _extra(self, item: PromptItem) -> int:
        return len(item.suffix_ids) + max(self.max_new_tokens, len(item.gold_ids)) + 2

    def context_ids(self, item: PromptItem) -> list:
        return [int(t) for t in self.engine.context.token_ids] + [t for ids in item.chunk_ids for t in ids]

    def _finish(self, item, composed, t0, load_s, kv_bytes, hits) -> Sample:
        t_comp = time.perf_counter()
        n_ctx = self.engine.context.n_tokens + sum(len(c) for c in item.chunk_ids)
        gen = generate(self.lm, composed, item.suffix_ids, max_new_tokens=self.max_new_tokens,
                       stop=self.engine.stop, t0=t0)
        latency = time.perf_counter() - t0
        recomputed = composed.recomputed
        sample = Sample(ttft=gen.ttft_s, decode_tok_s=gen.decode_tok_s, answer_ids=gen.token_ids,
                        parts={"load": load_s, "compose": t_comp - t0 - load_s, "prefill": gen.ttft_s - (t_comp - t0)},
                        ctx_tokens=n_ctx, hit_tokens=hits, computed_ctx=n_ctx - hits + recomputed,
                        kv_bytes=kv_bytes, latency=latency)
        sample.gold_logits, sample.attn = self.quality_pass(composed.cache, n_ctx, item)
        return sample

    def _remember_prefix(self, ids: list, cache: KVCache) -> None:
        """Insert every full block of this context, as a serving engine does after prefill."""
        n = len(ids) // BLOCK * BLOCK
        k, v = cache.k, cache.v
        dt = self.lm.kv_dtype
        blocks = [(k[:, :, s : s + BLOCK].to(dt).clone(), v[:, :, s : s + BLOCK].to(dt).clone()) for s in range(0, n, BLOCK)]
        self.prefix.insert(ids[:n], blocks)

    def quality_pass(self, cache: KVCache, n_ctx: int, item: PromptItem):
        """Rewind to the context, teacher-force suffix + gold: logits [G, V] and attention over the context."""
        cache.length = n_ctx
        ids = as_ids(list(item.suffix_ids) + list(item.gold_ids[:-1]))
        pos = torch.arange(n_ctx, n_ctx + ids.shape[0])
        out = forward(self.lm, ids, pos, cache, logits="all", attn_layers=range(self.lm.n_layers))
        n_suffix = len(item.suffix_ids)
        attn = [a[:, :n_suffix, :n_ctx].float().cpu() for a in out.attn]  # [H, suffix, ctx] per layer
        return out.logits[n_suffix - 1 :].cpu(), attn
