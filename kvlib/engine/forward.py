"""kvlib's own forward pass for the Llama family, over the weights of the HF modules.

Design facts:
- This module and model.py are the only ones that touch transformers' modules (fused.py
  stacks and packs the tensors model.py hands it); every other engine module runs layers through
  `forward`, `run_layers` or `project_kv`.
- One sequence (batch 1). Shapes in comments: T new tokens, P past slots, H query heads,
  Hkv key/value heads, D head_dim, L layers.
- The KV cache (cache.py) holds *rotated* keys per slot; new tokens are written at the
  slots after the filled ones, or at chosen slots (`run_layers(..., slots=...)`, which is
  how repair recomputes tokens in the middle of a prompt).
- What new tokens see is a `Mask` (attention.py); `forward` defaults to causal behind
  every filled slot.
- The forward returns each layer's pre-RoPE keys (after the key norm, Qwen3) and values
  for the new tokens: exactly what the library stores.
- Where every layer would run on kvlib's C kernels (new tokens at a contiguous start, causal, no
  probabilities or KV asked for), run_layers hands all of them to layer_loop.c in one call: the
  same kernels in the same order, the same bits, without the Python between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvlib.engine import layer_loop, pointwise_kernel
from kvlib.engine.attention import Mask, attend, one_query
from kvlib.engine.cache import KVCache
from kvlib.engine.fused import linear
from kvlib.engine.rope import apply_rope, forward_half_tables
from kvlib.engine.stages import stage
from kvlib.errors import KvlibError


@dataclass
class ForwardOut:
    logits: torch.Tensor | None  # [T, V] float32 (or [1, V] when only the last is asked)
    k_sem: torch.Tensor | None  # [L, Hkv, T, D] pre-RoPE keys of the new tokens
    v: torch.Tensor | None  # [L, Hkv, T, D]
    attn: list | None = None  # per layer [H, T, P+T] attention probabilities, when asked


@dataclass
class LayersOut:
    h: torch.Tensor  # [1, T, hidden] leaving the last layer run
    k_sem: list = field(default_factory=list)  # per layer run [Hkv, T, D], when kept
    v: list = field(default_factory=list)
    probs: dict = field(default_factory=dict)  # layer -> [H, T, S], when asked


# transformers' RMSNorm classes of the supported families: weight * (x / rms(x) in float32, cast back)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
SILUS = ("SiLUActivation", "SiLU")  # transformers' and torch's module for act "silu"


def norm(module, x: torch.Tensor) -> torch.Tensor:
    """The module's RMSNorm of x in one pass (pointwise_kernel in float32 or bf16 where it builds, else
    torch's rms_norm instead of transformers' five elementwise ops), the same formula; any
    other norm runs as its module."""
    if type(module).__name__ not in RMS_NORMS:
        return module(x)
    out = pointwise_kernel.rms_norm(x, module.weight, module.variance_epsilon)
    if out is not None:
        return out
    return module.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=module.variance_epsilon).to(x.dtype)


def packed(fused, name: str):
    """The prepacked weight of one of a fused layer's products, or None (fused.py)."""
    return None if fused is None or fused.packed is None else fused.packed.get(name)


def project_qkv(lm, index: int, x: torch.Tensor):
    """x: [1, T, hidden] -> q [1, H, T, D], k_sem [1, Hkv, T, D], v [1, Hkv, T, D]
    (one product against the layer's stacked q/k/v rows where fused.py stacked them)."""
    attn, fused = lm.layers[index].self_attn, lm.fused[index] if lm.fused else None
    if fused is not None:
        return split_qkv(lm, attn, fused, linear(x, fused.qkv_weight, fused.qkv_bias, packed(fused, "qkv")))
    shape = (*x.shape[:-1], -1, lm.head_dim)
    return _heads(attn, attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape))


def split_qkv(lm, attn, fused, qkv: torch.Tensor):
    """The fused product's output [1, T, (H + 2 Hkv) D] as project_qkv's q, k_sem, v."""
    shape = (*qkv.shape[:-1], -1, lm.head_dim)
    q, k, v = qkv.split(fused.qkv_sizes, dim=-1)
    return _heads(attn, q.view(shape), k.view(shape), v.view(shape))


def _heads(attn, q, k, v):
    """[1, T, heads, D] -> [1, heads, T, D], the key norm applied (Qwen3: per-head RMSNorm before
    RoPE; k_sem is after it)."""
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def project_kv(lm, index: int, h: torch.Tensor, position_ids: torch.Tensor):
    """Layer `index`'s rotated keys and values for hidden states h entering it, without
    attending: k_rot, v [Hkv, T, D]. (Blend and auto measure a layer's KV deviation this way.)"""
    _, k_sem, v = project_qkv(lm, index, norm(lm.layers[index].input_layernorm, h))
    return apply_rope(k_sem, position_ids, lm.rope)[0], v[0]


def _layer_qkv(lm, index, h, position_ids):
    """q rotated [1, H, T, D], k_sem and k_rot [1, Hkv, T, D], v [1, Hkv, T, D] for hidden states h."""
    q, k_sem, v = project_qkv(lm, index, norm(lm.layers[index].input_layernorm, h))
    return (*_rotate_qk(lm, q, k_sem, position_ids), v)


def _rotate_qk(lm, q, k_sem, position_ids):
    """(q rotated, k_sem, k_rot): one rotation for both, elementwise."""
    qk = apply_rope(torch.cat([q, k_sem], dim=1), position_ids, lm.rope)
    return qk[:, : q.shape[1]], k_sem, qk[:, q.shape[1] :]


def _qkv_into_cache(lm, index, h, position_ids, cache: KVCache, slots):
    """New tokens h's q rotated [1, H, T, D], k_sem and v [1, Hkv, T, D], with their rotated keys
    and values written at `slots` (run_layer's); returns (q, k_sem, v, keys, values), the last two
    the layer's KV to attend over. A fused product's output at a contiguous start goes into the
    cache in one pass (KVCache.write_projected), 20-odd small ops fewer a layer."""
    attn, fused = lm.layers[index].self_attn, lm.fused[index] if lm.fused else None
    x = norm(lm.layers[index].input_layernorm, h)
    if isinstance(slots, int) and fused is not None and not hasattr(attn, "q_norm"):
        qkv = linear(x, fused.qkv_weight, fused.qkv_bias, packed(fused, "qkv"))
        tables = forward_half_tables(lm.rope, position_ids, lm.device)
        done = cache.write_projected(index, slots, qkv, fused.qkv_sizes[0] // lm.head_dim, tables)
        q, k_sem, v = split_qkv(lm, attn, fused, qkv)
        if done is not None:
            return done[0], k_sem, v, done[1], done[2]
    else:
        q, k_sem, v = project_qkv(lm, index, x)
    q, k_sem, k_rot = _rotate_qk(lm, q, k_sem, position_ids)
    if isinstance(slots, int):
        return (q, k_sem, v, *cache.write(index, slots, k_rot[0], v[0]))
    cache.write_slots(index, slots, k_rot[0], v[0])
    return (q, k_sem, v, *cache.layer(index))


def _layer_out(lm, index, h, out):
    """The residual stream after attention output out [1, H, T, D] and the MLP."""
    layer, fused = lm.layers[index], lm.fused[index] if lm.fused else None
    o, down = layer.self_attn.o_proj, layer.mlp.down_proj
    h = linear(out.transpose(1, 2).reshape(1, out.shape[2], -1), o.weight, o.bias, packed(fused, "o"), residual=h)
    x = norm(layer.post_attention_layernorm, h)
    if fused is None or fused.gate_up_weight is None:
        return h + layer.mlp(x)
    gate_up = linear(x, fused.gate_up_weight, fused.gate_up_bias, packed(fused, "gate_up"))
    act = gated(layer.mlp.act_fn, gate_up, fused.intermediate)
    return linear(act, down.weight, down.bias, packed(fused, "down"), residual=h)


def loop_layers(lm) -> list | None:
    """Per layer, what layer_loop.c runs it with: (input norm weight, its eps, post-attention norm
    weight, its eps, attention scale, output bias, down bias, FusedLayer); None where some layer is not
    the plain fused layer it runs (unfused, a query/key norm, another norm or activation)."""
    out = []
    for index, layer in enumerate(lm.layers):
        fused, attn = lm.fused[index] if lm.fused else None, layer.self_attn
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if (fused is None or fused.gate_up_weight is None or hasattr(attn, "q_norm")
                or any(type(n).__name__ not in RMS_NORMS for n in norms)
                or type(layer.mlp.act_fn).__name__ not in SILUS):
            return None
        out.append((norms[0].weight, norms[0].variance_epsilon, norms[1].weight, norms[1].variance_epsilon,
                    attn.scaling, attn.o_proj.bias, layer.mlp.down_proj.bias, fused))
    return out


def gated(act_fn, gate_up: torch.Tensor, intermediate: int) -> torch.Tensor:
    """act_fn(gate) * up of a fused gate/up product's output; SiLU through pointwise_kernel."""
    out = pointwise_kernel.silu_mul(gate_up, intermediate) if type(act_fn).__name__ in SILUS else None
    if out is not None:
        return out
    gate, up = gate_up.split(intermediate, dim=-1)
    return act_fn(gate) * up


def run_layer(lm, index: int, h, position_ids, cache: KVCache, mask: Mask, slots, want_probs: bool,
              keep: int | None = None):
    """One decoder layer on new tokens h: [1, T, hidden], their KV written at `slots`
    (an int: contiguous from that slot; a tensor: scattered, attending over every filled slot).
    keep: carry only the last `keep` tokens past writing their KV (run_layers' out_rows).

    Returns (h_out, k_sem [Hkv, T, D], v [Hkv, T, D], probs or None).
    """
    layer = lm.layers[index]
    with stage("layers"):
        q, k_sem, v, keys, values = _qkv_into_cache(lm, index, h, position_ids, cache, slots)
        t = h.shape[1]
        if keep is not None and keep < t:
            if keep == 0:
                return h[:, t:], k_sem[0], v[0], None
            q, h, mask = q[:, :, t - keep:], h[:, t - keep:], Mask.causal(keep, mask.t_past + t - keep)
        with stage("attention"):
            out, probs = attend(q, keys, values, mask, layer.self_attn.scaling, want_probs)
        h = _layer_out(lm, index, h, out)
    return h, k_sem[0], v[0], probs


@torch.inference_mode()
def decode_batch(lm, token_ids: list[int], positions: list[int], caches: list[KVCache]) -> torch.Tensor:
    """One new token for each of B sequences, each over its own cache: logits [B, V].

    The linear layers run on the B tokens together, so each step reads the weights once for
    all of them (decode is bound by reading weights); attention runs per sequence. Every layer
    in one C call where layer_loop.c runs (the same kernels: the same bits), here otherwise.
    """
    position_ids = torch.tensor(positions, device=lm.device)
    h = embed(lm, torch.tensor(token_ids))  # [1, B, hidden]: the batch rides on the token axis
    h_loop = layer_loop.run_batch(lm, h, position_ids, caches)
    h = _decode_layers(lm, h, position_ids, caches) if h_loop is None else h_loop
    for cache in caches:
        check_window(lm, cache.length + 1)
        cache.commit(cache.length + 1)
    return head_logits(lm, h)


@torch.inference_mode()
def prefill_batch(lm, seqs: list) -> torch.Tensor:
    """New tokens of B sequences in one pass, each at its own slots of its own cache: logits of
    each sequence's last new token [B, V].

    seqs: [(cache, ids [T_b], slots [T_b])]; positions are slots (rerope layouts), slots may be
    scattered among filled ones (a layout's misses, then its question), and each cache is
    committed to cover them. Each token attends to every slot of its cache up to its own. The
    products run on every sequence's rows together, so the weights are read once for the batch
    (as decode_batch does for one token each); rotation, cache writes and attention per sequence.
    generate.start_batch's pass: the server begins a batch of requests with it."""
    counts = [int(ids.shape[0]) for _, ids, _ in seqs]
    slots = [s.to(lm.device) for _, _, s in seqs]
    masks = [Mask.at_slots(s, cache.length) for (cache, _, _), s in zip(seqs, slots)]
    position_ids = torch.cat(slots)
    h = embed(lm, torch.cat([torch.as_tensor(ids, dtype=torch.long) for _, ids, _ in seqs]))
    for index in range(lm.n_layers):
        scale = lm.layers[index].self_attn.scaling
        q, _, k_rot, v = _layer_qkv(lm, index, h, position_ids)
        outs = []
        for q_b, k_b, v_b, (cache, _, _), s, mask in zip(q.split(counts, dim=2), k_rot[0].split(counts, dim=1),
                                                        v[0].split(counts, dim=1), seqs, slots, masks):
            cache.write_slots(index, s, k_b, v_b)
            outs.append(attend(q_b, *cache.layer(index), mask, scale)[0])
        h = _layer_out(lm, index, h, torch.cat(outs, dim=2))
    return head_logits(lm, h[:, torch.tensor(counts).cumsum(0) - 1])


def _decode_layers(lm, h, position_ids, caches: list[KVCache]) -> torch.Tensor:
    """decode_batch's layers in Python: h [1, B, hidden] through every layer."""
    for index in range(lm.n_layers):
        scale = lm.layers[index].self_attn.scaling
        q, _, k_rot, v = _layer_qkv(lm, index, h, position_ids)
        outs = []
        for q_b, k_b, v_b, cache in zip(q.split(1, dim=2), k_rot[0].split(1, dim=1), v[0].split(1, dim=1), caches):
            keys, values = cache.write(index, cache.length, k_b, v_b)
            outs.append(one_query(q_b, keys, values, scale))  # what attend runs for one causal token
        h = _layer_out(lm, index, h, torch.cat(outs, dim=2))
    return h


def run_layers(lm, h, position_ids, cache: KVCache, mask: Mask, *, layers=None, slots=None,
               want_probs=(), keep_kv: bool = False, out_rows: int | None = None) -> LayersOut:
    """Run new tokens' hidden states h ([1, T, hidden], entering layers[0]) through `layers`
    (default: all). Their KV goes to the slots after the filled ones, or to `slots` (a tensor
    of filled slots, rewritten in place). The cache's length is left as it was.

    out_rows: the hidden states wanted of only the last `out_rows` tokens (1: the last token's
    logits; 0: none, the KV alone). The last layer then runs attention, output product and MLP
    for those rows only, once every token's KV is written (1/L of a prefill's work saved, as
    llama.cpp does for the outputs it is not asked for); `h` holds those rows. Only under a causal
    mask at contiguous slots for out_rows >= 1, and not where the last layer's probabilities are
    asked for; elsewhere every row runs."""
    every = layers is None or list(layers) == list(range(lm.n_layers))
    layers = range(lm.n_layers) if layers is None else layers
    where = cache.length if slots is None else slots.to(lm.device)
    position_ids = position_ids.to(lm.device)
    t = h.shape[1]
    trim = out_rows is not None and out_rows < t and len(layers) > 0 and layers[-1] not in want_probs and (
        out_rows == 0 or (slots is None and mask.kind == "causal"))
    keep = out_rows if trim else None
    if every and slots is None and mask.kind == "causal" and mask.t_past == cache.length and not want_probs \
            and not keep_kv:
        h_out = layer_loop.run(lm, h, position_ids, cache, where, keep)
        if h_out is not None:  # the same kernels in one C call (layer_loop.py)
            return LayersOut(h=h_out)
    out = LayersOut(h=h)
    for i in layers:
        out.h, k_sem, v, p = run_layer(lm, i, out.h, position_ids, cache, mask, where, i in want_probs,
                                       keep if i == layers[-1] else None)
        if keep_kv:
            out.k_sem.append(k_sem)
            out.v.append(v)
        if p is not None:
            out.probs[i] = p
    return out


def run_layers_narrowing(lm, h, slots: torch.Tensor, cache: KVCache, layers: range, counts: list[int]) -> torch.Tensor:
    """Recompute tokens at scattered filled `slots` (h: their hidden states entering layers[0])
    through `layers`, carrying fewer at each: at layer layers[i] every token still carried writes
    its fresh K/V in its slot, then only the counts[i] whose K/V moved furthest from what the slot
    held (KVCache.moved) attend and go on to the next layer.
    The others keep, from the next layer on, the KV their slots held. Returns the slots that
    attended in layers[0]."""
    slots = slots.to(lm.device)
    first = None
    for index, count in zip(layers, counts):
        with stage("layers"):
            q, _, k_rot, v = _layer_qkv(lm, index, h, slots)
            k_new, v_new = k_rot[0].to(cache.k.dtype), v[0].to(cache.v.dtype)
            moved = cache.moved(index, slots, k_new, v_new) if count < slots.numel() else None
            cache.write_slots(index, slots, k_new, v_new)
            if moved is not None:
                keep = moved.topk(max(count, 1)).indices.sort().values
                slots, h, q = slots[keep], h[:, keep], q[:, :, keep]
            first = slots if first is None else first
            keys, values = cache.layer(index)
            with stage("attention"):
                out, _ = attend(q, keys, values, Mask.at_slots(slots, cache.length), lm.layers[index].self_attn.scaling)
            h = _layer_out(lm, index, h, out)
    return slots[:0] if first is None else first


def embed(lm, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids: [T] -> [1, T, hidden] in the compute dtype."""
    return lm.hf.model.embed_tokens(input_ids.to(lm.device)[None])


def head_logits(lm, h: torch.Tensor) -> torch.Tensor:
    """h: [1, T, hidden] -> logits [T, V] in float32 (on the prepacked head where there is one)."""
    head = lm.hf.lm_head
    return linear(norm(lm.hf.model.norm, h), head.weight, head.bias, lm.head_packed)[0].float()


@torch.inference_mode()
def reference_logits(lm, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' own forward of the same ids: [T, V] float32, the yardstick of kvlib's (doctor),
    on the modules' dense weights (model.plain_weights: packed products hold none otherwise)."""
    from kvlib.engine.model import plain_weights

    with plain_weights(lm) as hf:
        return hf(input_ids.to(lm.device)[None]).logits[0].float()


def check_window(lm, total: int) -> None:
    window = lm.config_summary.get("sliding_window")
    if window is not None and total > window:
        raise KvlibError(f"prompt of {total} tokens exceeds the model's sliding window ({window})")


@torch.inference_mode()
def forward(lm, input_ids, position_ids, cache: KVCache, *, logits: str = "last",
            keep_kv: bool = False, mask: Mask | None = None, attn_layers=()) -> ForwardOut:
    """Run new tokens at explicit positions on top of `cache`, appending their KV.

    input_ids, position_ids: [T]. logits: "all", "last" or "none".
    keep_kv returns the stacked pre-RoPE keys and values of the new tokens.
    attn_layers: layer indices whose attention probabilities are returned.
    """
    t = int(input_ids.shape[0])
    start = cache.length
    check_window(lm, start + t)
    mask = Mask.causal(t, start) if mask is None else mask
    out = run_layers(lm, embed(lm, input_ids), position_ids, cache, mask, want_probs=attn_layers, keep_kv=keep_kv,
                     out_rows={"all": None, "last": 1, "none": 0}.get(logits))
    cache.commit(start + t)
    out_logits = None
    if logits != "none":
        with stage("logits"):
            out_logits = head_logits(lm, out.h if logits == "all" else out.h[:, -1:])
    return ForwardOut(
        logits=out_logits,
        k_sem=torch.stack(out.k_sem) if keep_kv else None,
        v=torch.stack(out.v) if keep_kv else None,
        attn=[out.probs.get(i) for i in range(lm.n_layers)] if attn_layers else None,
    )
