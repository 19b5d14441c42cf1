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
  share r of chunk tokens the question attends to most at layer 1 over the cached KV,
  `chunks:n` every token of the n chunks it attends to most there (summed per chunk): on
  Qwen2.5-1.5B (20 dev questions) chunks:2 is a point on the Pareto front, cheaper than
  blend:0.25 and closing less of rerope's gap (docs/guard.md).
- `blend:r` (CacheBlend) refreshes layer 0 for all chunk tokens and, from layer 1 on,
  carries the top-r fraction by KV deviation (fresh against cached) through the layers.
  `blend:r:last` narrows the carried share linearly to `last` at the last layer, each layer
  keeping the tokens whose KV moved most there (CacheBlend's gradual filtering):
  blend:0.6:0.1 costs about what blend:0.35 does and sits closer to full than blend:0.4
  (docs/guard.md). `blend:0` is rerope; `blend:1` is full.
- `auto[:target]` does the same measurement on chunk heads only (where the bench shows
  drift lives), each chunk's head sized by its ingest drift score, and spends the least
  recompute that covers `target` of it.
- A repair is `(lm, composed, chunks, suffix_ids) -> slots`: it rewrites the composed
  cache through its methods and returns the context slots it recomputed in every layer
  (the engine's accounting counts them). The encoding is chosen before any repair, in the
  library: bare, behind E (`+sink`), or behind E and a neutral lead-in (`+lead`); see spec.py.
"""

from __future__ import annotations

import torch

from kvlib.engine.attention import Mask
from kvlib.engine.compose import Composed
from kvlib.engine.forward import embed, project_kv, run_layers, run_layers_narrowing
from kvlib.errors import InputError

NO_SLOTS = torch.zeros(0, dtype=torch.long)


@torch.inference_mode()
def recompute_slots(lm, cache, ids: torch.Tensor, slots: torch.Tensor, layers: range, h=None):
    """Recompute tokens `ids` at `slots` (positions == slots) through `layers`, each attending to
    every slot at or before its own; h: their hidden state entering layers[0]."""
    slots = slots.to(lm.device)
    h = embed(lm, ids) if h is None else h
    return run_layers(lm, h, slots, cache, Mask.at_slots(slots, cache.length), layers=layers, slots=slots).h


def all_ids(composed: Composed, chunks) -> torch.Tensor:
    """Token id of every slot of the composed context (E then chunks)."""
    return torch.cat([composed.context_ids] + [c.token_ids for c in chunks])


def layer1_deviation(lm, cache, ids, slots):
    """Refresh layers 0-1 KV of `slots` and measure how far layer 1 moved.

    Layer 0 runs in full for the slots (its K_sem/V depend on the token alone, but its output
    depends on the new neighbours); layer 1's fresh K/V are then only projected, not attended.
    Both layers keep the fresh KV for every slot: it is exactly what full recompute would hold.
    Returns (deviation [S] summed over heads, finish): `finish(pick)` carries the slots `pick`
    (indices into slots) through layers 1..L-1 and returns those slots.
    """
    h0 = recompute_slots(lm, cache, ids[slots], slots, range(1))
    k_rot, v = project_kv(lm, 1, h0, slots.to(lm.device))
    k_rot, v = k_rot.to(cache.k.dtype), v.to(cache.v.dtype)
    dev = cache.moved(1, slots, k_rot, v)  # [S]
    cache.write_slots(1, slots, k_rot, v)

    def finish(pick: torch.Tensor) -> torch.Tensor:
        if pick.numel():
            recompute_slots(lm, cache, ids[slots[pick]], slots[pick], range(1, lm.n_layers), h=h0[:, pick])
        return slots[pick]

    return dev, finish


def span_slots(spans) -> torch.Tensor:
    """Every slot of the (slot, n_tokens) spans, in their order."""
    return torch.cat([torch.arange(s, s + n) for s, n in spans] or [NO_SLOTS])


def live_spans(composed: Composed, skip_first: bool) -> list:
    """The chunks' spans, without the first where it is exact (first_chunk_exact)."""
    return composed.spans[1:] if skip_first else composed.spans


def chunk_slots(composed: Composed, skip_first: bool) -> torch.Tensor:
    return span_slots(live_spans(composed, skip_first))


def first_chunk_exact(composed: Composed, chunks) -> bool:
    """A chunk encoded behind E that opens the prompt saw exactly its real context."""
    return bool(chunks) and chunks[0].encoded_at in (None, composed.context_ids.numel())


# -- token selectors: (lm, composed, chunks, suffix_ids) -> slots to recompute in every layer --

def boundary_slots(k: int):
    """EPIC: the first k tokens of every chunk but the first."""
    def select(lm, composed: Composed, chunks, suffix_ids) -> torch.Tensor:
        return torch.cat([torch.arange(s, s + min(k, n)) for s, n in composed.spans[1:]] or [NO_SLOTS])
    return select


@torch.inference_mode()
def question_attention(lm, cache, suffix_ids, n_layers: int = 2) -> torch.Tensor:
    """Attention mass [S] the question puts on each context slot at layer n_layers-1.

    The suffix runs through the first n_layers only, in the free slots after the context,
    which the cache does not count as filled: nothing of it stays.
    """
    n_ctx, ids = cache.length, torch.as_tensor(list(suffix_ids), dtype=torch.long)
    pos = torch.arange(n_ctx, n_ctx + ids.shape[0], device=lm.device)
    out = run_layers(lm, embed(lm, ids), pos, cache, Mask.causal(ids.shape[0], n_ctx), layers=range(n_layers),
                     want_probs={n_layers - 1})
    return out.probs[n_layers - 1][:, :, :n_ctx].sum(dim=(0, 1))  # over heads and question tokens


def query_slots(ratio: float):
    """The fraction `ratio` of chunk tokens the question attends to most at layer 1 (cached KV)."""
    def select(lm, composed: Composed, chunks, suffix_ids) -> torch.Tensor:
        slots = chunk_slots(composed, skip_first=first_chunk_exact(composed, chunks))
        n_pick = min(slots.numel(), round(ratio * chunk_slots(composed, False).numel()))
        if n_pick == 0:
            return NO_SLOTS
        mass = question_attention(lm, composed.cache, suffix_ids)[slots]
        return slots[mass.topk(n_pick).indices]
    return select


def chunk_slots_by_attention(n: int):
    """The whole chunks (all their tokens) the question attends to most at layer 1 over the cached KV,
    n of them (an exact first chunk never: it saw its real context)."""
    def select(lm, composed: Composed, chunks, suffix_ids) -> torch.Tensor:
        spans = live_spans(composed, first_chunk_exact(composed, chunks))
        if n <= 0 or not spans:
            return NO_SLOTS
        mass = question_attention(lm, composed.cache, suffix_ids)
        per_chunk = torch.stack([mass[s : s + k].sum() for s, k in spans])
        top = per_chunk.topk(min(n, len(spans))).indices.tolist()
        return span_slots(spans[i] for i in sorted(top))
    return select


def recompute_selected(*selectors):
    """Recompute, in every layer, the union of the slots the selectors pick."""
    def repair(lm, composed: Composed, chunks, suffix_ids) -> torch.Tensor:
        picked = [sel(lm, composed, chunks, suffix_ids) for sel in selectors]
        slots = torch.unique(torch.cat(picked)) if picked else NO_SLOTS
        if slots.numel():
            recompute_slots(lm, composed.cache, all_ids(composed, chunks)[slots], slots, range(lm.n_layers))
        return slots
    return repair


def blend(ratio: float, last: float | None = None):
    """CacheBlend: refresh layer 0 for every chunk token, then carry the top-`ratio` layer-1 deviators
    through the rest; with `last` (blend:R:LAST), the carried share narrows linearly from `ratio` at
    layer 1 to `last` at the last layer, each layer keeping the tokens whose K/V moved most there
    (CacheBlend's gradual filtering). Returns the slots carried in layer 1."""
    last = ratio if last is None else last

    def repair(lm, composed: Composed, chunks, suffix_ids) -> torch.Tensor:
        cache = composed.cache
        if not composed.spans or ratio <= 0:
            return NO_SLOTS
        slots = torch.arange(composed.spans[0][0], cache.length)
        h0 = recompute_slots(lm, cache, all_ids(composed, chunks)[slots], slots, range(1))
        steps = max(lm.n_layers - 2, 1)
        counts = [max(1, round((ratio + (last - ratio) * i / steps) * slots.numel())) for i in range(lm.n_layers - 1)]
        return run_layers_narrowing(lm, h0, slots, cache, range(1, lm.n_layers), counts).cpu()
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
                     or [NO_SLOTS])


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
    def repair(lm, composed: Composed, chunks, suffix_ids) -> torch.Tensor:
        cache = composed.cache
        slots = head_slots(composed, drift_windows(chunks, window, skip_first=first_chunk_exact(composed, chunks)))
        if slots.numel() == 0:
            return NO_SLOTS
        dev, finish = layer1_deviation(lm, cache, all_ids(composed, chunks), slots)
        order = dev.argsort(descending=True)
        covered = dev[order].cumsum(0) / dev.sum().clamp_min(1e-12)
        n_pick = min(int((covered < target - 1e-6).sum()) + 1, slots.numel())
        return finish(order[:n_pick].sort().values)
    return repair


@torch.inference_mode()
def head_deviation(lm, composed: Composed, chunks, window: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """auto's measurement, read-only: the relative layer-1 KV deviation of chunk heads.

    The candidates are the first `window` tokens of every chunk with new neighbours (an exact
    first chunk has none). Layers 0-1 of those slots are refreshed as auto does, the deviation
    is divided by the cached KV's norm (as the ingest drift score is), and the cached KV is
    put back bit for bit, so a composition measured here answers exactly as one that was not.
    Returns (slots [S], deviation [S]).
    """
    skip = first_chunk_exact(composed, chunks)
    slots = head_slots(composed, [0 if skip and i == 0 else window for i in range(len(chunks))])
    if slots.numel() == 0:
        return slots, torch.zeros(0)
    cache = composed.cache
    saved = [tuple(t[:, slots].clone() for t in cache.layer(layer)) for layer in (0, 1)]
    dev, _ = layer1_deviation(lm, cache, all_ids(composed, chunks), slots)
    old_k, old_v = saved[1]
    scale = (old_k.float().norm(dim=-1) + old_v.float().norm(dim=-1)).sum(0).clamp_min(1e-6)  # [S]
    for layer, (k, v) in enumerate(saved):
        cache.write_slots(layer, slots, k, v)
    return slots, (dev / scale).cpu()


AUTO_TARGET = 0.5  # share of question-weighted drift mass to cover


REPAIR_HELP = ("use boundary:K, query:R, chunks:N, a '+'-joined union of those (boundary:8+query:0.05), "
               "blend:R[:LAST] (0 <= LAST <= R <= 1) or auto[:TARGET]")


def parse_repair(name: str):
    """A repair callable from its name; selectors joined with '+' recompute their union."""
    parts = name.split("+")
    try:
        if len(parts) == 1:
            kind, _, arg = name.partition(":")
            ratio, _, last = arg.partition(":")
            if kind == "blend" and 0.0 <= float(last or ratio) <= float(ratio) <= 1.0:
                return blend(float(ratio), float(last) if last else None)
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
    if kind == "chunks" and int(arg) >= 0:
        return chunk_slots_by_attention(int(arg))
    raise ValueError(part)
