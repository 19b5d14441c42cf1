"""Quality repair: recompute some context tokens with full attention to their new neighbours.

Design facts:
- Rotation fixes position drift; it cannot fix context drift (a cached chunk never saw
  the chunks now before it). Repair recomputes a chosen set of context slots, in
  chosen layers, in place in the composed cache, attending to everything before them.
- The primitive is `recompute_slots`: per layer, the selected tokens' new K/V are
  written into their slots first, then they attend to every slot at or before their
  own. Unselected slots keep their cached KV. Recomputing every slot in every layer
  is exactly full recompute.
- Selectors pick slots to recompute in every layer; '+' joins them into a union:
  `boundary:k` the first k tokens of every chunk but the first (EPIC), `query:r` the
  share r of chunk tokens the question attends to most at layer 1 over the cached KV.
- `blend:r` (CacheBlend) refreshes layer 0 for all chunk tokens, projects layer 1's
  fresh K/V to measure each token's deviation, and carries the top-r fraction through
  layers 1..L-1. `blend:0` is rerope; `blend:1` is full.
- `auto[:target]` does the same measurement on chunk heads only (where the bench shows
  drift lives), each chunk's head sized by its ingest drift score, and spends the least
  recompute that covers `target` of it.
- The encoding is chosen before any repair, in the library: bare, behind E (`+sink`),
  or behind E and a neutral lead-in (`+lead`); see Engine.
"""

from __future__ import annotations

import torch

from kvlib.engine.compose import Composed
from kvlib.engine.forward import attend, embed, project_qkv
from kvlib.engine.rope import apply_rope
from kvlib.errors import InputError

# `--modes all` adds these to full, prefix, naive, rerope: each encoding and each repair family once.
REPAIR_MODES = ("naive+sink", "rerope+sink", "rerope+lead", "rerope+sink+boundary:16", "rerope+lead+boundary:16",
                "rerope+sink+blend:0.15", "rerope+sink+auto")


def slot_mask(slots: torch.Tensor, total: int) -> torch.Tensor:
    """Bool [S, total]: selected token at slot p sees slots 0..p."""
    return torch.arange(total, device=slots.device)[None, :] <= slots[:, None]


def run_layer_at(lm, index: int, h, slots, cache, total: int):
    """One layer for tokens at `slots` (positions == slots); writes their KV in place."""
    layer = lm.layers[index]
    q, k_sem, v = project_qkv(layer, layer.input_layernorm(h), lm.head_dim)
    q = apply_rope(q, slots, lm.rope)
    k_rot = apply_rope(k_sem, slots, lm.rope)
    cache.k[index, :, slots] = k_rot[0].to(cache.k.dtype)
    cache.v[index, :, slots] = v[0].to(cache.v.dtype)
    out, _ = attend(layer, q, cache.k[index, :, :total], cache.v[index, :, :total], slot_mask(slots, total), False)
    h = h + out
    return h + layer.mlp(layer.post_attention_layernorm(h))


@torch.inference_mode()
def recompute_slots(lm, cache, ids: torch.Tensor, slots: torch.Tensor, layers: range, h=None):
    """Recompute tokens `ids` at `slots` through `layers`; h: their hidden state entering layers[0]."""
    total = cache.length
    slots = slots.to(lm.device)
    h = embed(lm, ids) if h is None else h
    for i in layers:
        h = run_layer_at(lm, i, h, slots, cache, total)
    return h


def all_ids(composed: Composed, chunks) -> torch.Tensor:
    """Token id of every slot of the composed context (E then chunks)."""
    return torch.cat([composed.context_ids] + [c.token_ids for c in chunks])


def layer1_deviation(lm, cache, ids, slots):
    """Refresh layers 0-1 KV of `slots` and measure how far layer 1 moved.

    Layer 0 runs in full for the slots (its K_sem/V depend on the token alone, but its output
    depends on the new neighbours); layer 1's fresh K/V are then only projected, not attended.
    Both layers keep the fresh KV for every slot: it is exactly what full recompute would hold.
    Returns (deviation [S] summed over heads, finish): `finish(pick)` carries the slots `pick`
    (indices into slots) through layers 1..L-1 and returns len(pick).
    """
    layer = lm.layers[1]
    h0 = recompute_slots(lm, cache, ids[slots], slots, range(1))
    _, k_sem, v = project_qkv(layer, layer.input_layernorm(h0), lm.head_dim)  # [1, Hkv, S, D]
    k_rot = apply_rope(k_sem, slots, lm.rope)[0].to(cache.k.dtype)
    v = v[0].to(cache.v.dtype)
    dev = ((k_rot - cache.k[1, :, slots]).float().norm(dim=-1) +
           (v - cache.v[1, :, slots]).float().norm(dim=-1)).sum(0)  # [S]
    cache.k[1, :, slots], cache.v[1, :, slots] = k_rot, v

    def finish(pick: torch.Tensor) -> int:
        if pick.numel():
            recompute_slots(lm, cache, ids[slots[pick]], slots[pick], range(1, lm.n_layers), h=h0[:, pick])
        return int(pick.numel())

    return dev, finish


def chunk_slots(composed: Composed, skip_first: bool) -> torch.Tensor:
    spans = composed.spans[1:] if skip_first else composed.spans
    return torch.cat([torch.arange(s, s + n) for s, n in spans] or [torch.zeros(0, dtype=torch.long)])


def first_chunk_exact(composed: Composed, chunks) -> bool:
    """A chunk encoded behind E that opens the prompt saw exactly its real context."""
    return bool(chunks) and chunks[0].encoded_at in (None, composed.context_ids.numel())


# -- token selectors: (engine, composed, chunks, suffix_ids) -> slots to recompute in every layer --

def boundary_slots(k: int):
    """EPIC: the first k tokens of every chunk but the first."""
    def select(engine, composed: Composed, chunks, suffix_ids) -> torch.Tensor:
        return torch.cat([torch.arange(s, s + min(k, n)) for s, n in composed.spans[1:]]
                         or [torch.zeros(0, dtype=torch.long)])
    return select


@torch.inference_mode()
def question_attention(lm, cache, suffix_ids, n_layers: int = 2) -> torch.Tensor:
    """Attention mass [S] the question puts on each context slot at layer n_layers-1.

    The suffix runs through the first n_layers only, in the free slots after the context;
    the cache length is restored, so nothing of it stays.
    """
    from kvlib.engine.forward import causal_mask, run_layer

    n_ctx, ids = cache.length, torch.as_tensor(list(suffix_ids), dtype=torch.long)
    pos = torch.arange(n_ctx, n_ctx + ids.shape[0], device=lm.device)
    h, mask = embed(lm, ids), causal_mask(ids.shape[0], n_ctx, lm.device)
    for i in range(n_layers):
        h, _, _, probs = run_layer(lm, i, h, pos, cache, n_ctx, mask, want_probs=i == n_layers - 1)
    return probs[:, :, :n_ctx].sum(dim=(0, 1))  # over heads and question tokens


def query_slots(ratio: float):
    """The fraction `ratio` of chunk tokens the question attends to most at layer 1 (cached KV)."""
    def select(engine, composed: Composed, chunks, suffix_ids) -> torch.Tensor:
        slots = chunk_slots(composed, skip_first=first_chunk_exact(composed, chunks))
        n_pick = min(slots.numel(), round(ratio * chunk_slots(composed, False).numel()))
        if n_pick == 0:
            return torch.zeros(0, dtype=torch.long)
        mass = question_attention(engine.lm, composed.cache, suffix_ids)[slots]
        return slots[mass.topk(n_pick).indices]
    return select


def recompute_selected(*selectors):
    """Recompute, in every layer, the union of the slots the selectors pick."""
    def repair(engine, composed: Composed, chunks, suffix_ids) -> int:
        picked = [sel(engine, composed, chunks, suffix_ids) for sel in selectors]
        slots = torch.unique(torch.cat(picked)) if picked else torch.zeros(0, dtype=torch.long)
        if slots.numel():
            recompute_slots(engine.lm, composed.cache, all_ids(composed, chunks)[slots], slots,
                            range(engine.lm.n_layers))
        return int(slots.numel())
    return repair


def blend(ratio: float):
    """CacheBlend: refresh layers 0-1, carry the top-`ratio` layer-1 deviators through the rest."""
    def repair(engine, composed: Composed, chunks, suffix_ids) -> int:
        lm, cache = engine.lm, composed.cache
        if not composed.spans or ratio <= 0:
            return 0
        ids = all_ids(composed, chunks)
        slots = torch.arange(composed.spans[0][0], cache.length)
        dev, finish = layer1_deviation(lm, cache, ids, slots)
        n_pick = max(1, round(ratio * slots.numel())) if ratio < 1 else slots.numel()
        return finish(dev.topk(n_pick).indices.sort().values)
    return repair


def drift_windows(chunks, window: int, skip_first: bool) -> list[int]:
    """Head tokens per chunk that auto may recompute, shaped by the ingest drift scores.

    A chunk's window is `window` scaled by its stored drift score over the mean score of the
    prompt's chunks with new neighbours (capped at 2 x window): a chunk whose KV barely moves
    behind other text gets few or no candidates, a sensitive one more; the total stays about
    `window` per chunk. Without scores for every such chunk, each gets `window`. An exact
    first chunk gets 0.
    """
    live = list(range(1 if skip_first else 0, len(chunks)))
    scores = [chunks[i].drift for i in live]
    sizes = [0] * len(chunks)
    if not live:
        return sizes
    if any(sc is None for sc in scores) or sum(scores) <= 0:
        for i in live:
            sizes[i] = window
        return sizes
    mean = sum(scores) / len(scores)
    for i, sc in zip(live, scores):
        sizes[i] = min(2 * window, round(window * sc / mean))
    return sizes


def head_slots(composed: Composed, sizes: list[int]) -> torch.Tensor:
    """The first sizes[i] tokens of chunk i."""
    return torch.cat([torch.arange(s, s + min(w, n)) for (s, n), w in zip(composed.spans, sizes) if w > 0]
                     or [torch.zeros(0, dtype=torch.long)])


def auto(target: float, window: int = 32):
    """Least recompute that covers `target` of the measured drift where drift lives: chunk heads.

    The bench's map shows context drift concentrates in the first tokens of each chunk
    (boundary:k recovers about twice the KL per recomputed token that blend's global pick
    does). So the candidates are the first `window` tokens of every chunk with new
    neighbours; layer 0 is refreshed for them alone (cheap: a few percent of the context)
    and their layer-1 KV deviation measured. The smallest set covering `target` of the
    candidates' deviation mass is carried through every layer: the budget follows how much
    this prompt's chunks actually interact. A chunk encoded behind E that opens the prompt
    has no new neighbours and is never spent on. The library's ingest drift score of each
    chunk sets how many of its head tokens are candidates (drift_windows).
    """
    def repair(engine, composed: Composed, chunks, suffix_ids) -> int:
        lm, cache = engine.lm, composed.cache
        slots = head_slots(composed, drift_windows(chunks, window, skip_first=first_chunk_exact(composed, chunks)))
        if slots.numel() == 0:
            return 0
        dev, finish = layer1_deviation(lm, cache, all_ids(composed, chunks), slots)
        order = dev.argsort(descending=True)
        covered = dev[order].cumsum(0) / dev.sum().clamp_min(1e-12)
        n_pick = min(int((covered < target - 1e-6).sum()) + 1, slots.numel())
        return finish(order[:n_pick].sort().values)
    return repair


AUTO_TARGET = 0.5  # share of question-weighted drift mass to cover


REPAIR_HELP = ("use boundary:K, query:R, a '+'-joined union of those (boundary:8+query:0.05), "
               "blend:R (0 <= R <= 1) or auto[:TARGET]")


def parse_repair(name: str):
    """A repair callable from its name; selectors joined with '+' recompute their union."""
    parts = name.split("+")
    try:
        if len(parts) == 1:
            kind, _, arg = name.partition(":")
            if kind == "blend" and 0.0 <= float(arg) <= 1.0:
                return blend(float(arg))
            if kind == "auto" and (arg == "" or 0.0 < float(arg) <= 1.0):
                return auto(float(arg) if arg else AUTO_TARGET)
        return recompute_selected(*(_selector(p) for p in parts))
    except ValueError:
        pass
    raise InputError(f"unknown repair '{name}'; {REPAIR_HELP}")


def _selector(part: str):
    kind, _, arg = part.partition(":")
    if kind == "boundary" and int(arg) >= 0:
        return boundary_slots(int(arg))
    if kind == "query" and 0.0 <= float(arg) <= 1.0:
        return query_slots(float(arg))
    raise ValueError(part)


class _Registry(dict):
    """name -> repair callable, built on first use from the name itself."""

    def __missing__(self, name: str):
        self[name] = parse_repair(name)
        return self[name]


def repair_registry() -> dict:
    return _Registry()
