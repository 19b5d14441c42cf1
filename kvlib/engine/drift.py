"""Per-chunk drift score, measured at ingest: how much a chunk's KV moves when it follows another chunk.

Design facts:
- A chunk is stored as encoded behind E alone. In a prompt it follows other chunks it
  never saw; the larger the resulting change in its KV, the more repair it needs.
- The score recomputes the chunk's head through layers 0-1 behind [E, neighbour], where the
  neighbour is its *cached* KV rotated to follow E: exactly the past a repair of this chunk
  meets in a rerope composition. It compares the head's layer-1 pre-RoPE keys and values
  with the stored ones: mean over tokens of (|dK| + |dV|) / (|K| + |V|). Layer 1 is where
  CacheBlend reads deviation: early enough to be cheap, late enough to see cross-chunk
  attention.
- Only the head's HEAD_TOKENS are computed (the neighbour's KV is read, not recomputed), so a
  score costs about 2 x 64 / (L x T) of an encode, and a document's heads run in one packed
  forward, each behind its own neighbour (a packed Mask with own pasts). Without stored KV
  (ids only) the neighbour's first two layers are computed here behind E instead, which
  gives the same KV.
- The neighbour at ingest is the previous chunk of the same document; a document's first
  chunk (and a one-chunk passage) follows the engine's fixed neutral lead-in instead (a
  ContextKV that already holds E), so every chunk gets a score.
- The score is a property of the chunk's text: `auto` repair reads it to shape how many
  head tokens of each chunk are candidates for recompute (see repair.auto).
"""

from __future__ import annotations

import torch

from kvlib.engine.attention import Mask
from kvlib.engine.cache import KVCache
from kvlib.engine.compose import ChunkKV, ContextKV, as_ids
from kvlib.engine.forward import embed, run_layers
from kvlib.engine.rope import apply_rope
from kvlib.errors import KvlibError

DRIFT_LAYERS = 2
HEAD_TOKENS = 64  # the chunk tokens scored: drift concentrates in a chunk's first tokens (auto reads 32)


@torch.inference_mode()
def layers_behind(lm, past_k_rot, past_v, ids, n_layers: int = DRIFT_LAYERS, mask=None, positions=None):
    """k_sem, v [n_layers, Hkv, T, D] of `ids` run through the first n_layers behind a rotated past.

    past_k_rot, past_v: [>= n_layers, Hkv, P, D]. By default the ids take positions
    P .. P+T-1 behind the whole past; a packed Mask (with its positions) packs several
    sequences instead.
    """
    ids = as_ids(ids)
    p = int(past_k_rot.shape[2])
    cache = KVCache.for_model(lm, p + ids.shape[0], n_layers=n_layers)
    cache.append(past_k_rot, past_v)
    pos = torch.arange(p, p + ids.shape[0]) if positions is None else positions
    mask = Mask.causal(ids.shape[0], p) if mask is None else mask
    # out_rows=0: only the KV is read, so the last layer stops once it is written
    out = run_layers(lm, embed(lm, ids), pos, cache, mask, layers=range(n_layers), keep_kv=True, out_rows=0)
    return torch.stack(out.k_sem), torch.stack(out.v)


def own_past(lm, context: ContextKV, behind, n_layers: int = DRIFT_LAYERS):
    """Rotated (k, v) [n_layers, Hkv, M, D] of what a chunk follows after E, at positions |E|...

    behind: a ContextKV that starts with E (its slots after E: the lead-in), a ChunkKV (its
    cached pre-RoPE KV, rotated to follow E), or token ids (their KV behind E computed here).
    """
    n_ctx = context.n_tokens
    if isinstance(behind, ContextKV):
        if behind.n_tokens < n_ctx or not torch.equal(behind.token_ids[:n_ctx], context.token_ids):
            raise KvlibError("a drift context must start with the encoding context E")
        return behind.k_rot[:n_layers, :, n_ctx:], behind.v[:n_layers, :, n_ctx:]
    if isinstance(behind, ChunkKV):
        k_sem = behind.k_sem[:n_layers].to(lm.device, lm.dtype)
        v = behind.v[:n_layers].to(lm.device, lm.dtype)
    else:
        ids = as_ids(behind)
        if ids.numel() == 0:
            empty = context.k_rot[:n_layers, :, :0]
            return empty, empty
        k_sem, v = layers_behind(lm, context.k_rot, context.v, ids, n_layers)
    return apply_rope(k_sem, torch.arange(n_ctx, n_ctx + k_sem.shape[2]), lm.rope), v


def head_kv(lm, context: ContextKV, pasts: list, heads: list):
    """Layer DRIFT_LAYERS-1 k_sem, v of each head behind [E, its own past], in one packed forward.

    pasts: (k, v) per head from own_past; heads: token ids. Returns [(k [Hkv, n, D], v)].
    """
    n_ctx, n_layers = context.n_tokens, DRIFT_LAYERS
    spans, slot = [], n_ctx
    for k, _ in pasts:
        spans.append((slot, int(k.shape[2])))
        slot += int(k.shape[2])
    past_k = torch.cat([context.k_rot[:n_layers]] + [k for k, _ in pasts], dim=2)
    past_v = torch.cat([context.v[:n_layers]] + [v for _, v in pasts], dim=2)
    lengths = tuple(int(h.shape[0]) for h in heads)
    pos = torch.cat([torch.arange(n_ctx + m, n_ctx + m + n) for (_, m), n in zip(spans, lengths)])
    k, v = layers_behind(lm, past_k, past_v, torch.cat(heads), n_layers, Mask.packed(lengths, n_ctx, tuple(spans)), pos)
    return list(zip(k[-1].split(lengths, dim=1), v[-1].split(lengths, dim=1)))


def drift_scores(lm, context: ContextKV, pairs: list) -> list[float]:
    """Drift scores of several chunks at once: pairs of (behind, chunk).

    behind: see own_past. chunk: a ChunkKV, whose stored KV (encoded behind E) is the
    baseline, or token ids, whose head's KV behind E alone is computed here.
    """
    if not pairs:
        return []
    heads = [as_ids(c.token_ids if isinstance(c, ChunkKV) else c)[:HEAD_TOKENS] for _, c in pairs]
    if any(h.numel() == 0 for h in heads):
        raise KvlibError("cannot score an empty chunk")
    moved = head_kv(lm, context, [own_past(lm, context, b) for b, _ in pairs], heads)
    alone = None
    if not all(isinstance(c, ChunkKV) for _, c in pairs):
        empty = context.k_rot[:DRIFT_LAYERS, :, :0]
        alone = head_kv(lm, context, [(empty, empty)] * len(heads), heads)
    layer, out = DRIFT_LAYERS - 1, []
    for i, ((_, chunk), head, (k, v)) in enumerate(zip(pairs, heads, moved)):
        if isinstance(chunk, ChunkKV):
            n = head.shape[0]
            k0, v0 = chunk.k_sem[layer, :, :n].to(lm.device), chunk.v[layer, :, :n].to(lm.device)
        else:
            k0, v0 = alone[i]
        k, v, k0, v0 = (t.float() for t in (k, v, k0, v0))
        delta = (k - k0).norm(dim=-1) + (v - v0).norm(dim=-1)  # [Hkv, n]
        scale = k0.norm(dim=-1) + v0.norm(dim=-1)
        out.append(float((delta / scale.clamp_min(1e-6)).mean()))
    return out


def drift_score(lm, context: ContextKV, behind, chunk: ChunkKV | None = None, ids=None) -> float:
    """Relative layer-1 KV change of one chunk's head once it follows `behind` instead of E alone
    (see drift_scores; `ids` instead of `chunk` when no stored KV exists)."""
    return drift_scores(lm, context, [(behind, chunk if chunk is not None else as_ids(ids))])[0]
