"""Lay a served prompt out for the engine's door: segments -> library hits and misses.

Design facts:
- The prompt is the chat template's rendering of the messages (kvlib/segment.py, shared
  with replay), so its ids are exactly what full recompute sees; the segments tile them.
- The suffix the engine prefills is everything after the last reusable segment (the
  question, the assistant header). Before it, each reusable segment is looked up by
  content key in the library: the tenant's private key (salted per tenant), then the
  public one. A hit is served at the positions it takes now; everything else is a miss,
  computed in context by the engine.
- When the prompt opens with exactly the engine's encoding context E (the chat header
  with kvlib's system prompt), E's cached KV opens it and a document right behind it is
  exact composition; otherwise the prompt's own opening is a miss behind nothing.
- A block after a header on the same line starts with a spaced first token (' Text'), the same
  block behind a blank line (or stored from POST /v1/documents) with 'Text': when the exact ids
  miss, the other spacing is looked up too, and a hit serves all tokens after the first word.
- Misses of useful length are stored later, each encoded on its own behind E (canonical
  isolation): stored KV never depends on who sent the text first or what came before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvlib.engine.compose import ChunkKV
from kvlib.errors import CorruptBlobError, NotFoundError
from kvlib.segment import spacing_variant


@dataclass
class Layout:
    context: object  # ContextKV the chunks follow: E or the engine's empty context
    chunks: list  # [ChunkKV]: hits with KV, misses without
    suffix: list  # ids prefilled after the chunks
    fates: list = field(default_factory=list)  # per piece: {"kind", "tokens", "fate"}
    to_store: list = field(default_factory=list)  # token-id tuples of reusable misses
    store_at: list = field(default_factory=list)  # their indices in chunks

    def add(self, kind: str, token_ids: tuple, stored, skip: int = 0) -> None:
        """One piece: a hit on `stored` (its KV from token `skip` on) or, with stored None, a miss."""
        ids_t = torch.tensor(token_ids, dtype=torch.long)
        if stored is None:
            self.chunks.append(ChunkKV(ids_t, None, None))
        else:
            k, v = stored.k_sem[:, :, skip:], stored.v[:, :, skip:]
            self.chunks.append(ChunkKV(ids_t, k, v, drift=stored.drift_score))
        self.fates.append({"kind": kind, "tokens": len(token_ids), "fate": "miss" if stored is None else "hit"})


def split_at(segments: list, cut: int) -> list:
    """The segments after token offset `cut`, the one straddling it trimmed (as a non-reusable miss)."""
    from kvlib.segment import Segment

    out = []
    for s in segments:
        if s.end <= cut:
            continue
        if s.start < cut:
            s = Segment(kind="template", start=cut, token_ids=s.token_ids[cut - s.start:], reusable=False)
        out.append(s)
    return out


def lookup(library, engine, tenant: str, ids: tuple):
    """A visible stored chunk with these ids (private to the tenant, else public), or None."""
    lm = engine.lm
    for public in (False, True):
        key = library.key_for(tenant=tenant, public=public, model_fp=lm.fingerprint,
                              context_id=engine.context_id, token_ids=ids)
        try:
            stored = library.get(key, tenant)
        except (NotFoundError, CorruptBlobError):
            continue
        if stored.model_fp == lm.fingerprint:
            return stored
    return None


def lay_out(engine, library, tenant: str, ids: list, segments: list, *, reuse: bool) -> Layout:
    e_ids = [int(t) for t in engine.context.token_ids]
    opens_with_e = ids[: len(e_ids)] == e_ids
    context = engine.context if opens_with_e else engine.bare
    last = max((i for i, s in enumerate(segments) if s.reusable), default=-1)
    body_end = segments[last].end if last >= 0 else 0
    body = split_at([s for s in segments if s.end <= body_end], len(e_ids) if opens_with_e else 0)
    out = Layout(context=context, chunks=[], suffix=ids[max(body_end, len(e_ids) if opens_with_e else 0):])
    if opens_with_e:
        out.fates.append({"kind": "context", "tokens": len(e_ids), "fate": "hit"})
    for s in body:
        if not (reuse and s.reusable):
            out.add(s.kind, s.token_ids, None)
            continue
        stored = lookup(library, engine, tenant, s.token_ids)
        if stored is not None:
            out.add(s.kind, s.token_ids, stored)
            continue
        variant = spacing_variant(engine.lm.tokenizer, s.token_ids)
        stored = lookup(library, engine, tenant, variant[0]) if variant is not None else None
        if stored is None:
            out.add(s.kind, s.token_ids, None)
            out.to_store.append(s.token_ids)  # a server without reuse stores nothing either
            out.store_at.append(len(out.chunks) - 1)
            continue
        # The other spacing is stored: its KV serves the ids after the first word, which differs.
        alt, shared = variant
        head = len(s.token_ids) - shared
        out.add(s.kind, s.token_ids[:head], None)
        out.add(s.kind, s.token_ids[head:], stored, skip=len(alt) - shared)
    out.fates.append({"kind": "suffix", "tokens": len(out.suffix), "fate": "computed"})
    return out
