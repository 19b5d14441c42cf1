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
- Misses of useful length are stored later, each encoded on its own behind E (canonical
  isolation): stored KV never depends on who sent the text first or what came before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvlib.engine.compose import ChunkKV
from kvlib.errors import CorruptBlobError, NotFoundError


@dataclass
class Layout:
    context: object  # ContextKV the chunks follow: E or the engine's empty context
    chunks: list  # [ChunkKV]: hits with KV, misses without
    suffix: list  # ids prefilled after the chunks
    fates: list = field(default_factory=list)  # per piece: {"kind", "tokens", "fate"}
    to_store: list = field(default_factory=list)  # token-id tuples of reusable misses


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
        stored = lookup(library, engine, tenant, s.token_ids) if reuse and s.reusable else None
        ids_t = torch.tensor(s.token_ids, dtype=torch.long)
        if stored is not None:
            out.chunks.append(ChunkKV(ids_t, stored.k_sem, stored.v, drift=stored.drift_score))
        else:
            out.chunks.append(ChunkKV(ids_t, None, None))
            if s.reusable and reuse:  # a server without reuse stores nothing either
                out.to_store.append(s.token_ids)
        out.fates.append({"kind": s.kind, "tokens": len(s.token_ids), "fate": "hit" if stored is not None else "miss"})
    out.fates.append({"kind": "suffix", "tokens": len(out.suffix), "fate": "computed"})
    return out
