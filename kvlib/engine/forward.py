"""kvlib's own forward pass for the Llama family, over the weights of the HF modules.

Design facts:
- One sequence (batch 1). Shapes in comments: T new tokens, P past slots,
  H query heads, Hkv key/value heads, D head_dim, L layers.
- The KV cache holds *rotated* keys per slot. Slots are in prompt order; the rotary
  position of a slot is whatever its keys were rotated to, which is how `naive`
  composition (keys at their encoding positions) can sit at any slot.
- New tokens attend to every past slot and causally to each other, unless a mask
  is given (repair strategies recompute tokens in the middle of a prompt).
- The forward returns each layer's pre-RoPE keys (after the key norm, Qwen3) and
  values for the new tokens: exactly what the library stores.
- Attention is PyTorch SDPA with grouped-query attention; float32 or bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvlib.engine.rope import apply_rope
from kvlib.errors import KvlibError


class KVCache:
    """Preallocated per-layer rotated keys and values for one sequence.

    k, v: [L, Hkv, capacity, D]; `length` slots are filled.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, lm, capacity: int, n_layers: int | None = None) -> "KVCache":
        """A cache for all layers, or for the first n_layers only (a partial forward)."""
        return cls(n_layers or lm.n_layers, lm.n_kv_heads, lm.head_dim, capacity, lm.dtype, lm.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        """Append whole-model KV. k_rot, v: [L, Hkv, T, D] (cast to the cache dtype)."""
        t = k_rot.shape[2]
        self._check_room(t)
        self.k[:, :, self.length : self.length + t] = k_rot
        self.v[:, :, self.length : self.length + t] = v
        self.length += t

    def write_layer(self, layer: int, start: int, k_rot: torch.Tensor, v: torch.Tensor):
        """Write one layer's new KV ([Hkv, T, D]) at slot `start`; return views of slots [0, start+T)."""
        end = start + k_rot.shape[1]
        self._check_room(end - self.length)
        self.k[layer, :, start:end] = k_rot
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def _check_room(self, extra: int) -> None:
        if self.length + extra > self.capacity:
            raise KvlibError(f"KV cache full: {self.length} + {extra} > capacity {self.capacity}")


@dataclass
class ForwardOut:
    logits: torch.Tensor | None  # [T, V] float32 (or [1, V] when only the last is asked)
    k_sem: torch.Tensor | None  # [L, Hkv, T, D] pre-RoPE keys of the new tokens
    v: torch.Tensor | None  # [L, Hkv, T, D]
    attn: list | None = None  # per layer [H, T, P+T] attention probabilities, when asked


CAUSAL = "causal"  # mask marker: no past, plain causal attention (lets SDPA skip masked blocks)


@dataclass(frozen=True)
class CausalPast:
    """Causal attention for T new tokens behind P past slots (run by causal_behind).

    SDPA's is_causal aligns the mask top-left; with P zero queries put in front, new token j
    (row P + j) sees slots 0..P+j, exactly every past slot and the new tokens up to itself.
    The kernel then skips masked blocks; a dense bool mask makes it compute all T x (P+T)
    scores (twice the work at P << T: exact prefix caching with a short hit was slower than
    full recompute because of it). When P > T the padding would cost more than it saves,
    and causal_behind uses the dense mask instead.
    """

    t_new: int
    t_past: int

    def dense(self, device) -> torch.Tensor:
        return torch.ones(self.t_new, self.t_past + self.t_new, dtype=torch.bool, device=device).tril(
            diagonal=self.t_past)


@dataclass(frozen=True)
class Packed:
    """Several sequences packed in one forward, each behind the same P past slots and causal
    within itself, blind to the others (ingest encodes many chunks behind E at once).

    `own_past` optionally gives each sequence a span (first slot, count) of past slots that
    only it sees, after the shared ones (the drift score puts each chunk's head behind its
    own neighbour). The new tokens' slots follow every past slot.

    The linear layers run on all T = sum(lengths) tokens together; attention runs per
    sequence with the causal kernel (CausalPast's padding), so its cost is sum(n x (P + n))
    rather than the T x (P + T) a dense block-diagonal mask computes.
    """

    lengths: tuple[int, ...]
    t_past: int
    own_past: tuple[tuple[int, int], ...] = ()

    @property
    def first_new_slot(self) -> int:
        return max([self.t_past] + [a + n for a, n in self.own_past])

    def slots(self, i: int, start: int) -> list[slice]:
        """Cache slots sequence i sees, in order; it starts at packed offset `start`."""
        seen = [slice(0, self.t_past)] if self.t_past else []
        if self.own_past:
            a, n = self.own_past[i]
            seen.append(slice(a, a + n))
        new = self.first_new_slot + start
        return seen + [slice(new, new + self.lengths[i])]

    def dense(self, device) -> torch.Tensor:
        """Bool [T, S]: each sequence sees its past slots and, causally, itself only."""
        total = sum(self.lengths)
        mask = torch.zeros(total, self.first_new_slot + total, dtype=torch.bool, device=device)
        start = 0
        for i, n in enumerate(self.lengths):
            *past, own = self.slots(i, start)
            for cols in past:
                mask[start : start + n, cols] = True
            mask[start : start + n, own] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            start += n
        return mask


def causal_mask(t_new: int, t_past: int, device) -> torch.Tensor | str | CausalPast | None:
    """Every past slot, causal among new tokens. None when nothing is masked."""
    if t_new == 1:
        return None
    if t_past == 0:
        return CAUSAL
    return CausalPast(t_new, t_past)


def project_qkv(layer, x: torch.Tensor, head_dim: int):
    """x: [1, T, hidden] -> q [1, H, T, D], k_sem [1, Hkv, T, D], v [1, Hkv, T, D]."""
    attn = layer.self_attn
    shape = (*x.shape[:-1], -1, head_dim)
    q = attn.q_proj(x).view(shape)
    k = attn.k_proj(x).view(shape)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE; k_sem is after it
        q, k = attn.q_norm(q), attn.k_norm(k)
    v = attn.v_proj(x).view(shape)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attention_probs(q, keys, mask, scale: float) -> torch.Tensor:
    """Explicit softmax(QK^T) for analysis. q: [1, H, T, D]; keys: [Hkv, S, D] -> [H, T, S]."""
    rep = q.shape[1] // keys.shape[0]
    kk = keys.repeat_interleave(rep, dim=0).to(torch.float32)
    scores = torch.einsum("htd,hsd->hts", q[0].to(torch.float32), kk) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def single_query_attention(q, keys, values, scale: float) -> torch.Tensor:
    """One new token over every slot, float32 inside. q: [1, H, 1, D]; keys/values: [Hkv, S, D] -> [1, H, 1, D].

    Query heads are grouped per KV head as SDPA's enable_gqa does (head h reads KV head h // G).
    On CPU, SDPA's kernel costs ~8x more than these two matmuls for a single bf16 query
    (2.1 vs 0.25 ms per layer at 2.6k slots, one thread), so decoding uses this path there.
    """
    hkv, group = keys.shape[0], q.shape[1] // keys.shape[0]
    qg = q[0].reshape(hkv, group, q.shape[3]).float()
    scores = torch.matmul(qg, keys.float().transpose(-1, -2)) * scale  # [Hkv, G, S]
    out = torch.matmul(scores.softmax(dim=-1), values.float())  # [Hkv, G, D]
    return out.to(q.dtype).reshape(1, q.shape[1], 1, q.shape[3])


def causal_behind(q, keys, values, t_past: int, scale: float):
    """SDPA of T new queries over t_past past slots and, causally, themselves, on the causal
    kernel: t_past zero queries padded in front (see CausalPast), or a dense mask when the past
    is longer than the queries. q: [1, H, T, D];
    keys/values: [Hkv, P+T, D] -> [1, H, T, D]."""
    t = q.shape[2]
    if t_past > t:  # padding would cost more than it saves: a dense mask for these few queries
        mask = CausalPast(t, t_past).dense(q.device)
        return F.scaled_dot_product_attention(q, keys[None], values[None], attn_mask=mask, scale=scale,
                                              enable_gqa=True)
    if t_past:
        q = torch.cat([q.new_zeros(1, q.shape[1], t_past, q.shape[3]), q], dim=2)
    out = F.scaled_dot_product_attention(q, keys[None], values[None], is_causal=True, scale=scale, enable_gqa=True)
    return out[:, :, t_past:]


def attend(layer, q, keys, values, mask, want_probs: bool):
    """SDPA over all slots. q: [1, H, T, D]; keys/values: [Hkv, S, D] -> out [1, T, hidden]."""
    attn = layer.self_attn
    if isinstance(mask, (CausalPast, Packed)) and want_probs:  # the probabilities need the mask itself
        mask = mask.dense(q.device)
    causal = isinstance(mask, str)
    if isinstance(mask, CausalPast):
        out = causal_behind(q, keys, values, mask.t_past, attn.scaling)
    elif isinstance(mask, Packed):
        parts, start = [], 0
        for i, n in enumerate(mask.lengths):
            seen = mask.slots(i, start)
            k_seq = torch.cat([keys[:, s] for s in seen], dim=1) if len(seen) > 1 else keys[:, seen[0]]
            v_seq = torch.cat([values[:, s] for s in seen], dim=1) if len(seen) > 1 else values[:, seen[0]]
            parts.append(causal_behind(q[:, :, start : start + n], k_seq, v_seq, k_seq.shape[1] - n, attn.scaling))
            start += n
        out = torch.cat(parts, dim=2)
    elif q.shape[2] == 1 and mask is None and q.device.type == "cpu":
        out = single_query_attention(q, keys, values, attn.scaling)
    else:
        out = F.scaled_dot_product_attention(
            q, keys[None], values[None], attn_mask=None if causal else mask, is_causal=causal,
            scale=attn.scaling, enable_gqa=True,
        )
    if want_probs and causal:
        t = q.shape[2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    probs = attention_probs(q, keys, mask, attn.scaling) if want_probs else None
    out = out.transpose(1, 2).reshape(1, q.shape[2], -1)
    return attn.o_proj(out), probs


def run_layer(lm, index: int, h, position_ids, cache: KVCache, start: int, mask, want_probs=False):
    """One decoder layer on new tokens h: [1, T, hidden] written at cache slot `start`.

    Returns (h_out, k_sem [Hkv, T, D], v [Hkv, T, D], probs or None).
    """
    layer = lm.layers[index]
    q, k_sem, v = project_qkv(layer, layer.input_layernorm(h), lm.head_dim)
    q = apply_rope(q, position_ids, lm.rope)
    k_rot = apply_rope(k_sem, position_ids, lm.rope)
    keys, values = cache.write_layer(index, start, k_rot[0], v[0])
    attn_out, probs = attend(layer, q, keys, values, mask, want_probs)
    h = h + attn_out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, k_sem[0], v[0], probs


def embed(lm, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids: [T] -> [1, T, hidden] in the compute dtype."""
    return lm.hf.model.embed_tokens(input_ids.to(lm.device)[None])


def head_logits(lm, h: torch.Tensor) -> torch.Tensor:
    """h: [1, T, hidden] -> logits [T, V] in float32."""
    return lm.hf.lm_head(lm.hf.model.norm(h))[0].float()


def check_window(lm, total: int) -> None:
    window = lm.config_summary.get("sliding_window")
    if window is not None and total > window:
        raise KvlibError(f"prompt of {total} tokens exceeds the model's sliding window ({window})")


@torch.inference_mode()
def forward(lm, input_ids, position_ids, cache: KVCache, *, logits: str = "last",
            keep_kv: bool = False, mask=None, attn_layers=()) -> ForwardOut:
    """Run new tokens at explicit positions on top of `cache`, appending their KV.

    input_ids, position_ids: [T]. logits: "all", "last" or "none".
    keep_kv returns the stacked pre-RoPE keys and values of the new tokens.
    attn_layers: layer indices whose attention probabilities are returned.
    """
    t = int(input_ids.shape[0])
    start = cache.length
    check_window(lm, start + t)
    position_ids = position_ids.to(lm.device)
    mask = causal_mask(t, start, lm.device) if mask is None else mask
    h = embed(lm, input_ids)
    ks, vs, probs = [], [], []
    for i in range(lm.n_layers):
        h, k_sem, v, p = run_layer(lm, i, h, position_ids, cache, start, mask, i in attn_layers)
        if keep_kv:
            ks.append(k_sem)
            vs.append(v)
        probs.append(p)
    cache.length = start + t
    out_logits = None
    if logits != "none":
        out_logits = head_logits(lm, h if logits == "all" else h[:, -1:])
    return ForwardOut(
        logits=out_logits,
        k_sem=torch.stack(ks) if keep_kv else None,
        v=torch.stack(vs) if keep_kv else None,
        attn=probs if attn_layers else None,
    )
