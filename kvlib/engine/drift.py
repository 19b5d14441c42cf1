"""Per-chunk drift score, measured at ingest: how much a chunk's KV moves when it follows another chunk.

Design facts:
- A chunk is stored as encoded behind E alone. In a prompt it follows other chunks it
  never saw; the larger the resulting change in its KV, the more repair it needs.
- The score runs the chunk's head behind [E, neighbour's tail] through layers 0-1 only
  and compares its layer-1 pre-RoPE keys and values with the stored ones: mean over
  tokens of (|dK| + |dV|) / (|K| + |V|). Layer 1 is where CacheBlend reads
  deviation: early enough to be cheap, late enough to see cross-chunk attention.
- The neighbour at ingest is the previous chunk of the same document; a document's
  first chunk (and a one-chunk passage) follows the engine's fixed neutral lead-in
  instead, so every chunk gets a score.
- The score is a property of the chunk's text: `auto` repair reads it to shape how
  many head tokens of each chunk are candidates for recompute (see repair.auto).
"""

from __future__ import annotations

import torch

from kvlib.engine.compose import ChunkKV, as_ids
from kvlib.engine.forward import KVCache, causal_mask, embed, run_layer

DRIFT_LAYERS = 2
HEAD_TOKENS = 64  # the chunk tokens scored: drift concentrates in a chunk's first tokens (auto reads 32)
NEIGHBOUR_TAIL = 128  # the neighbour's last tokens the head is put behind


@torch.inference_mode()
def layer_kv_behind(lm, context, neighbour, ids, n_layers: int = DRIFT_LAYERS):
    """k_sem, v [Hkv, T, D] of `ids` at layer n_layers-1, encoded behind [E, neighbour] in one pass."""
    nb, ids = as_ids(neighbour), as_ids(ids)
    both = torch.cat([nb, ids])
    cache = KVCache.for_model(lm, context.n_tokens + both.shape[0], n_layers=n_layers)
    cache.append(context.k_rot[:n_layers], context.v[:n_layers])
    start = cache.length
    pos = torch.arange(start, start + both.shape[0], device=lm.device)
    h, mask = embed(lm, both), causal_mask(both.shape[0], start, lm.device)
    for i in range(n_layers):
        h, k_sem, v, _ = run_layer(lm, i, h, pos, cache, start, mask)
    return k_sem[:, nb.shape[0]:], v[:, nb.shape[0]:]


def drift_score(lm, context, neighbour_ids, chunk: ChunkKV | None = None, ids=None) -> float:
    """Relative layer-1 KV change of a chunk's head once it follows `neighbour_ids` instead of E alone.

    Scored on the chunk's first HEAD_TOKENS behind the neighbour's last NEIGHBOUR_TAIL tokens
    (about 2 x 192 / (L x T) of an encode). The baseline is `chunk`'s stored KV when it was
    encoded behind E, else (ids given) its layer-1 KV behind E computed here.
    """
    ids = as_ids(chunk.token_ids if chunk is not None else ids)[:HEAD_TOKENS]
    k, v = layer_kv_behind(lm, context, as_ids(neighbour_ids)[-NEIGHBOUR_TAIL:], ids)
    layer, n = DRIFT_LAYERS - 1, ids.shape[0]
    if chunk is None:
        k0, v0 = (t.float() for t in layer_kv_behind(lm, context, [], ids))
    else:
        k0 = chunk.k_sem[layer, :, :n].to(lm.device, torch.float32)
        v0 = chunk.v[layer, :, :n].to(lm.device, torch.float32)
    delta = (k.float() - k0).norm(dim=-1) + (v.float() - v0).norm(dim=-1)  # [Hkv, T]
    scale = k0.norm(dim=-1) + v0.norm(dim=-1)
    return float((delta / scale.clamp_min(1e-6)).mean())
