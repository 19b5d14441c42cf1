"""Build a prompt's KV from cached chunks placed at the positions they take in this prompt.

Design facts:
- A chunk is stored as pre-RoPE keys and values computed behind the encoding context E
  (E's own KV dropped). Since RoPE attention depends only on distances, those are the
  same wherever the chunk is placed, so placing it is a rotation, never a recompute.
- Bases (a ModeSpec's `base`, spec.py): `full` recomputes everything; `prefix` reuses the
  KV of an exact token prefix and prefills the rest; `rerope` rotates keys to their real
  positions; `naive` keeps keys at the positions where they were encoded (|E| ... |E|+T-1),
  which is what reusing a post-RoPE cache without re-rotation does.
- A chunk without KV (`k_sem` None) in a library layout is a miss: its slots are left
  empty here and computed in context by the engine, attending to everything before them.
- E's KV is computed once per model and template and reused (a system-prompt cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvlib.engine.attention import Mask
from kvlib.engine.cache import KVCache
from kvlib.engine.forward import forward
from kvlib.engine.rope import half_tables
from kvlib.engine.stages import stage
from kvlib.errors import KvlibError

BASES = ("full", "prefix", "naive", "rerope")


@dataclass
class ChunkKV:
    """One chunk's semantic KV. token_ids: [T]; k_sem, v: [L, Hkv, T, D]."""

    token_ids: torch.Tensor
    k_sem: torch.Tensor
    v: torch.Tensor
    encoded_at: int | None = None  # first position at encoding; None = right behind the prompt's E
    drift: float | None = None  # the library's ingest-time drift score, when known
    fresh: bool = False  # encoded for this request (not served from the library): counted as computed

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass
class ContextKV:
    """The encoding context E at positions 0..|E|-1. k_rot, v: [L, Hkv, |E|, D]; or, for a prefix
    cache's hit (serve/prefix_hits.py), `blocks` [(k_rot, v)] in order and k_rot, v None: composing
    copies them into the cache one by one, never concatenated first."""

    token_ids: torch.Tensor
    k_rot: torch.Tensor | None
    v: torch.Tensor | None
    blocks: list | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def parts(self) -> list:
        return self.blocks if self.blocks is not None else [(self.k_rot, self.v)]


@dataclass
class PrefixHit:
    """Exact prefix caching's hit: the rotated KV of the context's first n_tokens, in blocks
    of [L, Hkv, block, D] (as a serving engine stores them)."""

    n_tokens: int
    blocks: list  # [(k_rot, v)]


@dataclass
class Composed:
    """A prompt's context KV so far, and the ids still to prefill (all of them in `full` mode)."""

    cache: KVCache
    pending_ids: torch.Tensor  # [P] ids to prefill before the question
    next_pos: int  # rotary position of the first pending (or question) token
    cached_tokens: int  # context tokens served from cache
    spans: list = field(default_factory=list)  # (slot, n_tokens) of each chunk
    context_ids: torch.Tensor | None = None  # E's ids, so repair can rebuild every slot's id
    misses: list = field(default_factory=list)  # (slot, chunk index) of chunks without KV, computed in context

    @property
    def n_context(self) -> int:
        """Slots of the whole context [E][chunks], once every pending id is prefilled."""
        return self.next_pos + int(self.pending_ids.shape[0])

    def rewind(self) -> None:
        """Back to the end of the context after a prefill and decode: the question and answer
        slots are forgotten, and nothing is pending (the quality pass starts here)."""
        self.cache.truncate(self.n_context)
        self.next_pos, self.pending_ids = self.n_context, torch.zeros(0, dtype=torch.long)


def as_ids(ids) -> torch.Tensor:
    return torch.as_tensor(list(ids) if not torch.is_tensor(ids) else ids, dtype=torch.long).reshape(-1)


def encode_context(lm, context_ids) -> ContextKV:
    """Prefill E once at positions 0..|E|-1."""
    ids = as_ids(context_ids)
    cache = KVCache.for_model(lm, max(1, ids.shape[0]))
    if ids.numel():
        forward(lm, ids, torch.arange(ids.shape[0]), cache, logits="none")
    n = cache.length
    return ContextKV(token_ids=ids, k_rot=cache.k[:, :, :n].clone(), v=cache.v[:, :, :n].clone())


def encode_chunk(lm, context: ContextKV, token_ids, *, offset: int = 0) -> ChunkKV:
    """Encode one chunk behind E (positions offset+|E| ...), returning its pre-RoPE KV.

    With offset 0, E's cached KV is reused; with another offset E is re-run there
    (used to test shift invariance).
    """
    ids = as_ids(token_ids)
    if ids.numel() == 0:
        raise KvlibError("cannot encode an empty chunk")
    n_ctx = context.n_tokens
    cache = KVCache.for_model(lm, n_ctx + ids.shape[0])
    if offset == 0:
        cache.append(context.k_rot, context.v)
    elif n_ctx:
        forward(lm, context.token_ids, torch.arange(offset, offset + n_ctx), cache, logits="none")
    pos = torch.arange(offset + n_ctx, offset + n_ctx + ids.shape[0])
    out = forward(lm, ids, pos, cache, logits="none", keep_kv=True)
    return ChunkKV(token_ids=ids, k_sem=out.k_sem, v=out.v, encoded_at=offset + n_ctx)


def encode_packed(lm, context: ContextKV, chunk_ids: list) -> list[ChunkKV]:
    """Encode several chunks in one forward, each behind E as if alone.

    Packing turns many small matmuls into a few large ones (chunks are often under
    100 tokens); attention runs per chunk (a packed Mask), so every chunk is blind to the
    others and the result equals encode_chunk per chunk up to float rounding.
    """
    ids = [as_ids(c) for c in chunk_ids]
    if any(i.numel() == 0 for i in ids):
        raise KvlibError("cannot encode an empty chunk")
    lengths, n_ctx = [int(i.shape[0]) for i in ids], context.n_tokens
    cache = KVCache.for_model(lm, n_ctx + sum(lengths))
    cache.append(context.k_rot, context.v)
    pos = torch.cat([torch.arange(n_ctx, n_ctx + n) for n in lengths])
    out = forward(lm, torch.cat(ids), pos, cache, logits="none", keep_kv=True,
                  mask=Mask.packed(tuple(lengths), n_ctx))
    k_parts, v_parts = out.k_sem.split(lengths, dim=2), out.v.split(lengths, dim=2)
    return [ChunkKV(token_ids=i, k_sem=k, v=v, encoded_at=n_ctx) for i, k, v in zip(ids, k_parts, v_parts)]


def chunk_positions(context: ContextKV, chunks: list, mode: str) -> list[torch.Tensor]:
    """Rotary positions for each chunk's tokens under `mode`."""
    start, out = context.n_tokens, []
    for c in chunks:
        if mode == "naive":  # as encoded (right behind its encoding context), whatever its slot
            at = context.n_tokens if c.encoded_at is None else c.encoded_at
            out.append(torch.arange(at, at + c.n_tokens))
        else:
            out.append(torch.arange(start, start + c.n_tokens))
        start += c.n_tokens
    return out


def compose(lm, context: ContextKV, chunks: list, base: str, *, extra: int = 512,
            prefix: PrefixHit | None = None) -> Composed:
    """Lay out [E][chunk 1]...[chunk k]; `extra` slots are reserved for question and answer."""
    if base not in BASES:
        raise KvlibError(f"unknown mode '{base}'; choose one of {', '.join(BASES)}")
    total = context.n_tokens + sum(c.n_tokens for c in chunks)
    with stage("assemble"):
        cache = KVCache.for_model(lm, total + extra)
    if base in ("full", "prefix"):
        ids = torch.cat([context.token_ids] + [c.token_ids for c in chunks])
        hit = prefix.n_tokens if prefix is not None and base == "prefix" else 0
        for k, v in prefix.blocks if hit else []:
            cache.append(k, v)
        return Composed(cache=cache, pending_ids=ids[hit:], next_pos=hit, cached_tokens=hit)
    with stage("assemble"):
        for k, v in context.parts():
            cache.append(k, v)
    positions = chunk_positions(context, chunks, base)
    with stage("rotate"):  # cos/sin once for every cached slot of the prompt
        hits = [p for c, p in zip(chunks, positions) if c.k_sem is not None]
        tables = half_tables(lm.rope, torch.cat(hits), lm.device) if hits else None
    spans, misses, cached, run, slot = [], [], context.n_tokens, [], cache.length
    for i, c in enumerate(chunks):
        spans.append((slot, c.n_tokens))
        if c.k_sem is None:  # a miss: its slots are filled when it is computed in context
            run = _append_run(cache, run, tables, cached - context.n_tokens)
            misses.append((slot, i))
            cache.commit(slot + c.n_tokens)
        else:  # a hit joins the run of hits that are copied in and rotated together
            # stored dtype kept: the copy into the cache converts (a .to(lm.dtype) here was a second
            # full pass, and fresh float32 pages, for every hit where the model computes in float32)
            run.append((c.k_sem.to(device=lm.device), c.v.to(device=lm.device)))
            cached += c.n_tokens
        slot += c.n_tokens
    _append_run(cache, run, tables, cached - context.n_tokens)
    return Composed(cache=cache, pending_ids=torch.zeros(0, dtype=torch.long), next_pos=total,
                    cached_tokens=cached, spans=spans, context_ids=context.token_ids, misses=misses)


def _append_run(cache: KVCache, run: list, tables, end_row: int) -> list:
    """Consecutive hits, copied in and then rotated as one span; their tables are the rows
    before `end_row` (the hits' positions so far, in order). Returns a new, empty run."""
    if run:
        n = sum(k.shape[2] for k, _ in run)
        cache.append_rotated(run, tables.slice(end_row - n, n))
    return []
