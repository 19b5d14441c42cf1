"""Each decoder layer's q/k/v projections as one matrix, and its MLP's gate and up as another.

Design facts:
- A question over cached chunks runs ~30 tokens through every layer: at that size a linear
  layer costs its dispatch and its weight read more than its arithmetic, so three products
  of [T, hidden] against q, k and v (and two against gate and up) cost more than one
  against their rows stacked. Inference engines fuse them the same way (vLLM's
  QKVParallelLinear and MergedColumnParallelLinear).
- No weight is held twice: the stacked matrix is built once, and the HF modules' own
  weights become views of its rows, so transformers' forward (the doctor's reference) reads
  the same memory.
- Built after the model reaches its device and dtype (a later `.to` would copy the views
  apart); `fuse_model` is called by model.wrap_model, the one place a model is made ready.
- A layer whose projections disagree on bias (some with, some without) is left unfused and
  runs through its modules.
- Prepacked weights (oneDNN's blocked layout, `torch.ops.mkldnn._reorder_linear_weight`, what
  inductor's freezing pass does): in bf16 on CPU the same products ran 30-35% faster at 1 and
  30 rows and 10% at 512-2048, with bit-identical outputs (measured here, interleaved). They
  are a second copy of the layer weights, so they are made only when that copy costs at most
  PACK_MAX_BYTES (SmolLM2: ~270 MB with its output head; Qwen2.5-1.5B's 2.6 GB is not
  doubled). `linear` runs a product on the packed copy where there is one. The output head
  is packed too (`pack_head`): one row against SmolLM2's 49k-row head took 6.8 ms plain and
  2.5 ms packed, bit-identical, in every TTFT and every decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

PACK_MAX_BYTES = 512 << 20


@dataclass(frozen=True, eq=False)
class FusedLayer:
    qkv_weight: torch.Tensor  # [(H + 2 Hkv) D, hidden]
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up_weight: torch.Tensor | None  # [2 I, hidden]; None when the MLP is left unfused
    gate_up_bias: torch.Tensor | None
    intermediate: int
    packed: dict | None = None  # "qkv", "o", "gate_up", "down" -> prepacked weight, when made


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed=None) -> torch.Tensor:
    """F.linear(x, weight, bias), on the prepacked copy of weight when there is one (same bits)."""
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def _stack(modules) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One matrix (and bias) from linear modules, whose weights (and biases) become its views."""
    biases = [m.bias is not None for m in modules]
    if any(biases) and not all(biases):
        return None
    weight = torch.cat([m.weight.detach() for m in modules], dim=0)
    bias = torch.cat([m.bias.detach() for m in modules], dim=0) if all(biases) else None
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[start : start + n], requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    return weight, bias


def fuse_layer(layer) -> FusedLayer | None:
    attn, mlp = layer.self_attn, layer.mlp
    qkv = _stack([attn.q_proj, attn.k_proj, attn.v_proj])
    if qkv is None:
        return None
    sizes = (attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0])
    gate_up = _stack([mlp.gate_proj, mlp.up_proj])
    return FusedLayer(qkv_weight=qkv[0], qkv_bias=qkv[1], qkv_sizes=sizes,
                      gate_up_weight=None if gate_up is None else gate_up[0],
                      gate_up_bias=None if gate_up is None else gate_up[1],
                      intermediate=mlp.gate_proj.weight.shape[0])


def packable(hf) -> bool:
    """bf16 on a CPU with oneDNN, and a packed copy of the layer weights within PACK_MAX_BYTES."""
    weight = hf.model.layers[0].self_attn.q_proj.weight
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    size = sum(p.numel() * p.element_size() for layer in hf.model.layers for p in layer.parameters() if p.dim() == 2)
    return size + hf.lm_head.weight.numel() * hf.lm_head.weight.element_size() <= PACK_MAX_BYTES


def _pack(weight: torch.Tensor):
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def pack_layer(layer, fused: FusedLayer) -> FusedLayer:
    weights = {"qkv": fused.qkv_weight, "o": layer.self_attn.o_proj.weight, "gate_up": fused.gate_up_weight,
               "down": layer.mlp.down_proj.weight}
    return replace(fused, packed={name: _pack(w) for name, w in weights.items() if w is not None})


@torch.no_grad()
def pack_head(hf):
    """The output head's prepacked weight, or None (where the layers are not packed either)."""
    return _pack(hf.lm_head.weight) if packable(hf) else None


@torch.no_grad()
def fuse_model(hf) -> list[FusedLayer | None]:
    pack = packable(hf)
    fused = [fuse_layer(layer) for layer in hf.model.layers]
    return [pack_layer(layer, f) if pack and f is not None else f for layer, f in zip(hf.model.layers, fused)]
