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
- A prompt that opens with ids the server's prefix cache holds (prefix_hits.py: a conversation's
  earlier turn) opens with their KV instead of E's, and only the segments after it are laid out.
- Misses of useful length are stored later, each encoded on its own behind E (canonical
  isolation): stored KV never depends on who sent the text first or what came before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvlib.engine.compose import ChunkKV, PrefixHit
from kvlib.segment import spacing_variants


@dataclass
class Layout:
    context: object  # ContextKV the chunks follow: E or the engine's empty context
    chunks: list  # [ChunkKV]: hits with KV, misses without
    suffix: list  # ids prefilled after the chunks
    fates: list = field(default_factory=list)  # per piece: {"kind", "tokens", "fate"}
    to_store: list = field(default_factory=list)  # token-id tuples of reusable misses
    store_at: list = field(default_factory=list)  # (index in chunks, skip): their pieces, from token skip on
    lookup: object = None  # the Lookup that served the hits (touch_served after the first token)
    prefix: object = None  # compose.PrefixHit for the `prefix` base (its opening's KV, prefilled after)

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
    """(segment, skip) for the segments after token offset `cut`; skip counts the first tokens of the
    one straddling it that lie before the cut (0 for the others): only its tokens after it are laid out."""
    return [(s, max(0, cut - s.start)) for s in segments if s.end > cut]


class Lookup:
    """The library's stored chunks for a prompt's segments, found in one manifest query per round
    (the tenant's private key, salted per tenant, before the public one); what it served is
    touched once, after the first token (touch_served), off the request's critical path."""

    def __init__(self, library, engine, tenant: str):
        self.library, self.engine, self.tenant = library, engine, tenant
        self.found: dict = {}  # token ids -> StoredChunk or None
        self.served: list = []  # keys of the chunks a layout used

    def _keys(self, ids: tuple) -> list:
        return self.library.keys_for(tenant=self.tenant, model_fp=self.engine.lm.fingerprint,
                                     context_id=self.engine.context_id, token_ids=ids)

    def fetch(self, id_lists) -> None:
        """Look up every id tuple not looked up yet, all in one query."""
        todo = {ids: self._keys(ids) for ids in id_lists if ids not in self.found}
        if not todo:
            return
        stored = self.library.find_many([k for keys in todo.values() for k in keys], self.tenant)
        fp = self.engine.lm.fingerprint
        for ids, keys in todo.items():
            hits = [stored[k.hex] for k in keys if k.hex in stored and stored[k.hex].model_fp == fp]
            self.found[ids] = hits[0] if hits else None

    def get(self, ids: tuple):
        """A visible stored chunk with these ids (fetched before), or None; counted as served."""
        stored = self.found.get(ids)
        if stored is not None:
            self.served.append(stored.key)
        return stored

    def touch_served(self) -> None:
        if self.served:
            self.library.touch(self.served)
            self.served = []


def lay_out(engine, library, tenant: str, ids: list, segments: list, *, reuse: bool, opening=None) -> Layout:
    """The prompt's pieces for Engine.begin; with reuse False the library is not touched (may be None).
    opening: the prompt's first ids with their KV from the prefix cache (prefix_hits.py), or None;
    with reuse, used only when longer than E (E's KV serves a prompt that opens with it)."""
    e_ids = [int(t) for t in engine.context.token_ids]
    opens_with_e = ids[: len(e_ids)] == e_ids
    if opening is not None and reuse and opens_with_e and opening.n_tokens <= len(e_ids):
        opening = None
    context = opening if opening is not None else engine.context if opens_with_e else engine.bare
    opened = context.n_tokens
    last = max((i for i, s in enumerate(segments) if s.reusable), default=-1)
    body_end = segments[last].end if last >= 0 else 0
    body = split_at([s for s in segments if s.end <= body_end], opened)
    out = Layout(context=context, chunks=[], suffix=ids[max(body_end, opened):])
    if opening is not None:
        out.fates.append({"kind": "prefix", "tokens": opened, "fate": "hit"})
        out.prefix = None if reuse else PrefixHit(opening.n_tokens, opening.parts())
    elif opens_with_e:  # without reuse (full recompute) E is prefilled with the rest
        out.fates.append({"kind": "context", "tokens": len(e_ids), "fate": "hit" if reuse else "computed"})
    found = Lookup(library, engine, tenant) if reuse else None
    out.lookup = found
    wanted = [s.token_ids for s, _ in body if reuse and s.reusable]
    if found is not None:
        found.fetch(wanted)
        missed = list(dict.fromkeys(ids for ids in wanted if found.found[ids] is None))
        variants = dict(zip(missed, spacing_variants(engine.lm.tokenizer, missed)))
        found.fetch(v[0] for v in variants.values() if v is not None)  # a second round only for misses
    for s, skip in body:  # a segment the opening cuts is looked up whole, and laid out from `skip` on
        seg = s.token_ids
        if not (reuse and s.reusable):
            out.add(s.kind, seg[skip:], None)
            continue
        stored = found.get(seg)
        if stored is not None:
            out.add(s.kind, seg[skip:], stored, skip=skip)
            continue
        variant = variants[seg]
        stored = found.get(variant[0]) if variant is not None else None
        if stored is None:
            out.add(s.kind, seg[skip:], None)
            out.to_store.append(seg)  # a server without reuse stores nothing either
            out.store_at.append((len(out.chunks) - 1, skip))
            continue
        # The other spacing is stored: its KV serves the ids after the first word, which differs.
        alt, shared = variant
        head = len(seg) - shared
        if skip < head:
            out.add(s.kind, seg[skip:head], None)
        out.add(s.kind, seg[max(head, skip):], stored, skip=len(alt) - shared + max(0, skip - head))
    out.fates.append({"kind": "suffix", "tokens": len(out.suffix), "fate": "computed"})
    return out
